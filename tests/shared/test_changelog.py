"""shared.changelog on the real broker: per-partition state written and restored, last value wins,
tombstones delete, an open transaction neither blocks a restore nor leaks into it, and a changelog
whose partitions no longer line up with its input is refused."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Producer
from helpers import as_settings

from shared.changelog import changelog_topic, ensure_changelog, restore, write
from shared.kafka import DeliveryTracker, client_config, make_admin, make_producer

pytestmark = pytest.mark.kafka


@pytest.fixture
def settings(kafka_bootstrap):
    return as_settings({"bootstrap_servers": kafka_bootstrap})


def fresh(settings, partitions: int) -> str:
    name = changelog_topic(settings, "test", f"input_{uuid.uuid4().hex[:8]}")
    ensure_changelog(settings, name, partitions)
    return name


def written(producer, name: str, items: list[tuple[int, bytes, bytes | None]]) -> None:
    tracker = DeliveryTracker()
    for partition, key, value in items:
        write(producer, name, partition, key, value, on_delivery=tracker)
    tracker.flush(producer, timeout=30)
    assert tracker.delivered == len(items)


def test_topic_name_and_compaction(settings):
    assert changelog_topic(settings, "alerter", "anomalies") == "anomstream-state-alerter-anomalies"
    assert changelog_topic(as_settings({"state_topic_prefix": "x"}), "a", "b") == "x-a-b"
    name = fresh(settings, 3)
    ensure_changelog(settings, name, 3)  # exists already, same count: nothing to do
    admin = make_admin(settings)
    assert len(admin.list_topics(name, timeout=10).topics[name].partitions) == 3
    from confluent_kafka.admin import ConfigResource

    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact"


def test_round_trip_across_partitions_last_value_wins_tombstones_delete(settings):
    name = fresh(settings, 3)
    producer = make_producer(settings)
    written(producer, name, [
        (0, b"a", b"1"), (1, b"a", b"other partition"), (0, b"b", b"2"), (0, b"a", b"3"),  # a: last wins
        (2, b"gone", b"x"), (2, b"kept", b"y"), (2, b"gone", None),  # tombstone
        (1, b"empty", b"z"), (1, b"empty", b""),  # an empty value deletes too
    ])
    assert restore(settings, name, [0, 1, 2]) == {
        0: {b"a": b"3", b"b": b"2"}, 1: {b"a": b"other partition"}, 2: {b"kept": b"y"}}
    assert restore(settings, name, [2]) == {2: {b"kept": b"y"}}  # only the partitions asked for
    assert restore(settings, name, []) == {}
    # With offsets: where each key's last record is (partition 0: a=1, b=2, a=3 at offsets 0, 1, 2).
    assert restore(settings, name, [0], with_offsets=True) == {0: {b"a": (b"3", 2), b"b": (b"2", 1)}}


def test_restore_of_an_empty_changelog(settings):
    name = fresh(settings, 2)
    started = time.monotonic()
    assert restore(settings, name, [0, 1]) == {0: {}, 1: {}}
    assert time.monotonic() - started < 10


def test_a_large_changelog_restores_fast(settings):
    name = fresh(settings, 2)
    producer = make_producer(settings)
    items = [(i % 2, f"key-{i % 50_000}".encode(), f"value-{i}".encode()) for i in range(200_000)]
    written(producer, name, items)
    started = time.monotonic()
    state = restore(settings, name, [0, 1])
    took = time.monotonic() - started
    assert len(state[0]) == len(state[1]) == 25_000
    assert state[0][b"key-0"] == b"value-150000" and state[1][b"key-49999"] == b"value-199999"
    print(f"restored 200000 records in {took:.2f}s")
    assert took < 20


def test_an_open_transaction_does_not_block_a_restore_nor_leak_into_it(settings):
    name = fresh(settings, 2)
    written(make_producer(settings), name, [(0, b"k", b"committed"), (1, b"j", b"committed")])
    txn = Producer(client_config(settings) | {"transactional.id": f"test-{uuid.uuid4().hex}",
                                              "enable.idempotence": True, "acks": "all"})
    txn.init_transactions(30)
    txn.begin_transaction()
    write(txn, name, 0, b"k", b"uncommitted")
    write(txn, name, 0, b"new", b"uncommitted")
    assert txn.flush(30) == 0  # on the broker, in a transaction left open
    # A plain record after the open transaction's: beyond the last stable offset until it ends.
    written(make_producer(settings), name, [(0, b"later", b"plain")])
    try:
        started = time.monotonic()
        assert restore(settings, name, [0, 1], timeout=30) == {0: {b"k": b"committed"}, 1: {b"j": b"committed"}}
        assert time.monotonic() - started < 15  # ends at the last stable offset, not at the open transaction's end
        txn.commit_transaction(30)
        assert restore(settings, name, [0, 1])[0] == {b"k": b"uncommitted", b"new": b"uncommitted",
                                                      b"later": b"plain"}
    finally:
        txn.flush(10)


def test_an_aborted_transaction_is_not_restored(settings):
    name = fresh(settings, 1)
    written(make_producer(settings), name, [(0, b"k", b"before")])
    txn = Producer(client_config(settings) | {"transactional.id": f"test-{uuid.uuid4().hex}"})
    txn.init_transactions(30)
    txn.begin_transaction()
    write(txn, name, 0, b"k", b"aborted")
    txn.flush(30)
    txn.abort_transaction(30)
    written(make_producer(settings), name, [(0, b"after", b"1")])
    assert restore(settings, name, [0]) == {0: {b"k": b"before", b"after": b"1"}}


def test_a_partition_count_mismatch_is_refused(settings):
    name = fresh(settings, 3)
    with pytest.raises(ValueError) as info:
        ensure_changelog(settings, name, 4)
    message = str(info.value)
    assert name in message and "3 partitions" in message and "has 4" in message


def test_a_restore_that_cannot_finish_times_out_naming_the_topic(settings):
    name = fresh(settings, 1)
    with pytest.raises(TimeoutError, match=name):
        restore(settings, name, [0, 5], timeout=3)  # partition 5 does not exist
