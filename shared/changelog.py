"""A service's per-key state as a changelog on Kafka: a compacted topic with one partition per input
partition, so that the state of input partition p lives in changelog partition p and moves with it.

- `changelog_topic(settings, service, topic)`: the changelog's name for `service` reading `topic`.
- `ensure_changelog(settings, name, partitions)`: create it (cleanup.policy=compact) if missing; an
  existing one with another partition count is refused (ValueError): its partitions would no longer
  line up with the input's.
- `write(producer, name, partition, key, value)`: the new value of `key` (None: delete it) into
  exactly that partition. Durable once the producer's delivery report says so (flush it).
- `restore(settings, name, partitions)`: partition -> {key: last value}, each partition read from
  its beginning to its end. Read committed: a transactional writer's records count once its
  transaction committed; an open transaction is not waited for (the end is the last stable offset)
  and what it wrote is not returned.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import NewTopic

from shared.config import Settings
from shared.kafka import client_config, make_admin, produce

RESTORE_BATCH = 100_000  # messages per consume() call while restoring


def changelog_topic(settings: Settings, service: str, topic: str) -> str:
    """The changelog of `service`'s state about input `topic`."""
    return f"{settings.state_topic_prefix}-{service}-{topic}"


def _partition_count(admin, name: str, timeout: float) -> int | None:
    meta = admin.list_topics(name, timeout=timeout).topics.get(name)
    if meta is None or meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
        return None
    if meta.error is not None:
        raise KafkaException(meta.error)
    return len(meta.partitions)


def ensure_changelog(settings: Settings, name: str, partitions: int, timeout: float = 30) -> None:
    """Create the compacted changelog `name` with `partitions` partitions (the input topic's count)
    unless it exists; raise ValueError if it exists with a different count."""
    admin = make_admin(settings)
    existing = _partition_count(admin, name, timeout)
    if existing is None:
        topic = NewTopic(name, num_partitions=partitions, replication_factor=settings.replication_factor,
                         config={"cleanup.policy": "compact"})
        try:
            admin.create_topics([topic], operation_timeout=timeout)[name].result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # created meanwhile by another copy
                raise
        # A new topic's metadata and partition leaders reach the client a moment after creation.
        deadline = time.monotonic() + timeout
        while True:
            meta = admin.list_topics(name, timeout=timeout).topics.get(name)
            if (meta is not None and meta.error is None and meta.partitions
                    and all(p.leader >= 0 for p in meta.partitions.values())):
                existing = len(meta.partitions)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"changelog topic {name} not visible {timeout}s after its creation")
            time.sleep(0.1)
    if existing != partitions:
        raise ValueError(f"changelog topic {name} has {existing} partitions but its input topic has {partitions}: "
                         f"state partition p must belong to input partition p (delete the changelog, or "
                         f"give the input topic {existing} partitions)")


def write(producer, name: str, partition: int, key: bytes, value: bytes | None, on_delivery=None) -> None:
    """The new `value` of `key` (None: a tombstone, the key is deleted) into partition `partition`
    of changelog `name`. Durable once acknowledged: flush the producer, or watch `on_delivery`."""
    kwargs = {"partition": partition}
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    produce(producer, name, value, key, **kwargs)


def restore(settings: Settings, name: str, partitions: list[int], timeout: float = 120,
            with_offsets: bool = False) -> dict[int, dict[bytes, bytes]]:
    """partition -> {key: last value} of changelog `name`, each of `partitions` read from its
    beginning to its end (read committed: to the last stable offset). A None or empty value deletes
    its key. With `with_offsets` each value is (value, offset of its record), so that one key can
    be read again later without reading the partition. Raises TimeoutError naming the topic if
    some partition was not read to its end in time."""
    state: dict[int, dict[bytes, bytes]] = {p: {} for p in partitions}
    if not partitions:
        return state
    consumer = Consumer(client_config(settings) | {
        "group.id": f"anomstream-restore-{uuid.uuid4().hex}",  # assign() only: no group is joined or committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": 52_428_800,
        "max.partition.fetch.bytes": 10_485_760,
        "queued.min.messages": 1_000_000,
    })
    pending = set(partitions)
    last_error: KafkaError | None = None
    deadline = time.monotonic() + timeout
    try:
        # Empty partitions (a first deployment, a new topic) are done at once: waiting for their
        # end-of-partition event would hold up every rebalance by a fetch round trip or more.
        for p in list(pending):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5)
            except KafkaException:
                continue  # read it the long way
            if high <= low:
                pending.discard(p)
        if not pending:
            return state
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in pending])
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"restoring changelog {name}: partitions {sorted(pending)} not read to their end "
                                   f"within {timeout}s" + (f" (last error: {last_error.str()})" if last_error else ""))
            for msg in consumer.consume(RESTORE_BATCH, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                    elif err.fatal():
                        raise KafkaException(err)
                    else:  # a partition without a leader yet, the broker away: retried until the deadline
                        last_error = err
                    continue
                p = msg.partition()
                if p not in pending:  # written after this partition's end was reached: not ours to read
                    continue
                key, value = msg.key(), msg.value()
                if key is None:
                    continue
                if value:
                    state[p][key] = (value, msg.offset()) if with_offsets else value
                else:
                    state[p].pop(key, None)
    finally:
        consumer.close()
    return state
