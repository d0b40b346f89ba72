"""Static group membership (shared.kafka): the member ids, leaving the group on close() all the same,
resuming a member's partitions under its id, and the fenced error of a duplicate id."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from confluent_kafka import KafkaError
from helpers import FakeMsg

from shared.app_logging import setup_logging
from shared.config import ConfigError, Settings, load_settings
from shared.kafka import (
    FencedError,
    ensure_topics,
    group_instance_id,
    make_admin,
    make_consumer,
    usable,
)


def test_instance_id_defaults_to_the_host_name_and_is_checked():
    assert Settings().instance_id == socket.gethostname()
    assert Settings(instance_id="rack-a.host-1").instance_id == "rack-a.host-1"
    with pytest.raises(ConfigError, match="ANOMSTREAM_INSTANCE_ID"):
        load_settings(instance_id="two words")


def test_member_ids_name_group_service_instance_and_worker():
    s = Settings(instance_id="host-1")
    assert group_instance_id(s, "anomstream-alerter", "alerter") == "anomstream-alerter-alerter-host-1"
    assert group_instance_id(s, "anomstream-detector", "detector", 2) == "anomstream-detector-detector-host-1-2"
    # The broker takes [A-Za-z0-9._-] only; a group id may hold anything.
    assert group_instance_id(s, "team a/detector", "detector", 0) == "team_a_detector-detector-host-1-0"


class ErrorMsg(FakeMsg):
    def __init__(self, error: KafkaError):
        super().__init__(None)
        self._error = error

    def error(self):
        return self._error


def test_a_fatal_event_stops_the_consumer_and_a_fenced_one_says_why():
    log = setup_logging(Settings(), "test")
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer with "
                                           "same group.instance.id")
    with pytest.raises(FencedError, match="ANOMSTREAM_INSTANCE_ID"):
        usable(ErrorMsg(fenced), log)
    with pytest.raises(RuntimeError, match="fatal consumer error"):
        usable(ErrorMsg(KafkaError(KafkaError._FATAL, "Fatal error: something else")), log)
    assert not usable(ErrorMsg(KafkaError(KafkaError._TRANSPORT, "broker down")), log)


def members(settings, group: str) -> list[str]:
    admin = make_admin(settings)  # kept referenced until the answer is in
    desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
    return sorted(m.group_instance_id or m.member_id for m in desc.members)


def assigned(consumer, timeout: float = 30) -> float:
    """Seconds until the consumer holds an assignment (it is polled meanwhile)."""
    start = time.monotonic()
    while not consumer.assignment():
        assert time.monotonic() - start < timeout, "no assignment"
        consumer.poll(0.05)
    return time.monotonic() - start


@pytest.fixture
def topic_and_group(kafka_bootstrap):
    run = uuid.uuid4().hex[:8]
    settings = Settings(bootstrap_servers=kafka_bootstrap)
    ensure_topics(settings, {f"membership_{run}": 3})
    return settings, f"membership_{run}", f"membership_{run}"


@pytest.mark.kafka
def test_a_static_member_leaves_on_close_unless_told_not_to_and_its_id_resumes_at_once(topic_and_group):
    settings, topic, group = topic_and_group
    first = make_consumer(settings, group, "member-a")
    first.subscribe([topic])
    assigned(first)
    assert members(settings, group) == ["member-a"]
    first.close()  # librdkafka alone would keep a static member in the group for session.timeout.ms
    assert members(settings, group) == []

    # What a member killed without closing leaves behind: its id, still holding the partitions.
    second = make_consumer(settings, group, "member-a", leave_on_close=False)
    second.subscribe([topic])
    assigned(second)
    second.close()
    assert members(settings, group) == ["member-a"]
    again = make_consumer(settings, group, "member-a")
    again.subscribe([topic])
    assert assigned(again) < 5  # not the 45 s session timeout: the id is the member's
    assert len(again.assignment()) == 3
    again.close()
    assert members(settings, group) == []


@pytest.mark.kafka
def test_the_older_of_two_members_with_one_id_is_fenced(topic_and_group):
    settings, topic, group = topic_and_group
    log = setup_logging(settings, "test")
    older = make_consumer(settings, group, "twin")
    older.subscribe([topic])
    assigned(older)
    newer = make_consumer(settings, group, "twin")
    newer.subscribe([topic])
    deadline = time.monotonic() + 30
    with pytest.raises(FencedError):
        while time.monotonic() < deadline:
            newer.poll(0.05)
            for msg in older.consume(10, 0.05):
                usable(msg, log)
    older.close()  # a fenced consumer closes without trying to leave
    assert members(settings, group) == ["twin"]  # the newer one stays
    newer.close()
