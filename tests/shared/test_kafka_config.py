"""Kafka client settings a team sets for its own cluster (shared.kafka.client_config): where a new
consumer group starts, ANOMSTREAM_KAFKA_EXTRA over the services' tuning but never over the
guarantees, and librdkafka's own log lines as structured records."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import orjson
import pytest

from shared.config import ConfigError, Settings, load_settings
from shared.kafka import client_config, ensure_topics, make_consumer, send
from shared.local_broker import free_port


def test_a_new_consumer_group_starts_at_the_latest_offset_unless_told(monkeypatch):
    monkeypatch.delenv("ANOMSTREAM_AUTO_OFFSET_RESET", raising=False)
    assert Settings().auto_offset_reset == "latest"
    assert Settings(auto_offset_reset="earliest").auto_offset_reset == "earliest"
    with pytest.raises(ConfigError, match="ANOMSTREAM_AUTO_OFFSET_RESET"):
        load_settings(auto_offset_reset="beginning")


def test_kafka_extra_wins_over_the_tuning_but_not_over_the_guarantees():
    s = Settings(kafka_extra={"linger.ms": 50, "client.rack": "a"})
    conf = client_config(s, {"linger.ms": 5, "acks": "all"})
    assert conf["linger.ms"] == 50 and conf["client.rack"] == "a" and conf["acks"] == "all"
    for prop in ("enable.auto.commit", "isolation.level", "transactional.id", "auto.offset.reset"):
        with pytest.raises(ConfigError, match=f"ANOMSTREAM_KAFKA_EXTRA.*{prop}"):
            load_settings(kafka_extra={prop: "x"})


@pytest.mark.kafka
def test_a_new_group_on_latest_reads_only_what_arrives_after_it_joined(kafka_bootstrap):
    run = uuid.uuid4().hex[:8]
    s = load_settings(bootstrap_servers=kafka_bootstrap, topic_input=f"latest_{run}", auto_offset_reset="latest",
                      partitions_input=1)
    ensure_topics(s)
    send(s, s.topic_input, [b"k"] * 5, [b"old"] * 5)
    consumer = make_consumer(s, f"latest_{run}")
    try:
        consumer.subscribe([s.topic_input])
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.2)
        assert consumer.assignment(), "no partition assigned"
        time.sleep(1)  # the start offset (latest) is resolved before the new records arrive
        consumer.poll(0.5)
        send(s, s.topic_input, [b"k"] * 3, [b"new"] * 3)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            got += [m.value() for m in consumer.consume(10, 0.5) if not m.error()]
        time.sleep(1)
        got += [m.value() for m in consumer.consume(10, 0.5) if not m.error()]
    finally:
        consumer.close()
    assert got == [b"new"] * 3


def test_librdkafka_lines_are_structured_records_and_repeats_are_counted(tmp_path):
    """A producer pointed at a port nobody listens on: librdkafka complains many times a second;
    the service's log gets JSON records (no raw `%3|...` lines), each text once per 30 s."""
    code = (
        "import time\n"
        "from shared.app_logging import setup_logging\n"
        "from shared.config import load_settings\n"
        "from shared.kafka import make_producer\n"
        f"s = load_settings(bootstrap_servers='127.0.0.1:{free_port()}', kafka_extra={{'reconnect.backoff.ms': 10, "
        "'reconnect.backoff.max.ms': 10})\n"
        "setup_logging(s, 'probe')\n"
        "p = make_producer(s)\n"
        "end = time.monotonic() + 4\n"
        "while time.monotonic() < end:\n"
        "    p.poll(0.1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("ANOMSTREAM_")})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines, out
    assert not [line for line in lines if line.startswith("%")], lines[:5]
    assert all(line.startswith("{") for line in lines), out.stderr[-3000:]
    records = [orjson.loads(line) for line in lines]
    kafka = [r for r in records if r.get("source") == "librdkafka"]
    assert kafka and all({"facility", "event", "level"} <= set(r) for r in kafka), records[:3]
    texts = [r["event"] for r in kafka]
    # Connection refused every ~10 ms for 4 s: hundreds of lines without the repeat counting.
    assert len(kafka) < 20, texts


def test_group_offset_calls_wait_while_the_coordinator_moves(monkeypatch):
    """`make run` sets a group's offsets right after the broker starts, when the group's coordinator
    may still answer NOT_COORDINATOR: the call is repeated until the deadline, any other error is not."""
    from confluent_kafka import KafkaError, KafkaException

    from shared import kafka

    monkeypatch.setattr(kafka.time, "sleep", lambda s: None)
    answers = [KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, "done"]

    def call():
        answer = answers.pop(0)
        if answer != "done":
            raise KafkaException(KafkaError(answer))
        return answer

    assert kafka._while_coordinator_moves(call, timeout=30) == "done" and not answers

    def fails(code):
        def call():
            raise KafkaException(KafkaError(code))
        return call

    with pytest.raises(KafkaException) as raised:
        kafka._while_coordinator_moves(fails(KafkaError.TOPIC_AUTHORIZATION_FAILED), timeout=30)
    assert raised.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    with pytest.raises(KafkaException):  # past the deadline the coordinator's error is raised
        kafka._while_coordinator_moves(fails(KafkaError.NOT_COORDINATOR), timeout=0)
