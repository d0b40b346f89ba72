"""The stream core's failure paths on the real broker, through real services: a message too large
to dead-letter as it is, a Slack outage longer than max.poll.interval.ms, a broker outage longer
than librdkafka's delivery timeout (in both delivery modes)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections import Counter

import orjson
import pytest
from helpers import as_settings, wait_until
from slack_server import VALID_TOKEN, SlackTestServer

from shared.kafka import (
    committed_offsets,
    end_offsets,
    ensure_topics,
    make_producer,
    read_topic,
)
from shared.local_broker import LocalBroker, free_port
from shared.records.metrics import ScoreRecord

pytestmark = pytest.mark.kafka


def point(i: int) -> bytes:
    return orjson.dumps({"series": "big-test", "timestamp": 1_700_000_000 + 300 * i, "value": float(i % 7)})


def test_a_message_over_the_producer_limit_is_dead_lettered_as_a_summary_and_the_partition_moves_on(
        pipeline_settings, services):
    overrides = pipeline_settings | {"workers": 1, "partitions_input": 1}
    settings = as_settings(overrides)
    ensure_topics(settings)
    # 1.5 MB: the local broker takes it (2 MB), librdkafka's default message.max.bytes (1 MB) does not.
    huge = b'{"series": "big-test", "value": 1, "pad": "' + b"x" * 1_500_000 + b'"}'
    producer = make_producer(settings, **{"message.max.bytes": 2 * 1024 * 1024, "compression.type": "none"})
    payloads = [point(i) for i in range(20)] + [huge] + [point(i) for i in range(20, 40)]
    for p in payloads:
        producer.produce(settings.topic_input, p, b"big-test")
    assert producer.flush(30) == 0
    detector = services("detector", overrides)
    # Committed input offsets, not the scores topic's end (transaction markers take offsets there too).
    wait_until(lambda: committed_offsets(settings, settings.consumer_group, settings.topic_input, [0]) == {0: 41},
               240, "the 40 good messages scored", [detector])
    (letter,) = read_topic(settings, settings.topic_dead_letter, idle=3, timeout=30)
    headers = {k: v.decode() for k, v in letter.headers()}
    assert headers["dlq.summary"] == "true" and headers["dlq.offset"] == "20"
    assert "exceeds the 65536-byte limit" in headers["dlq.error"]
    summary = orjson.loads(letter.value())
    assert summary["size"] == len(huge) and summary["sha256"] == hashlib.sha256(huge).hexdigest()
    assert base64.b64decode(summary["prefix_base64"]) == huge[:1024]
    scores = [ScoreRecord.model_validate_json(m.value()) for m in read_topic(settings, settings.topic_scores, idle=2)]
    assert sorted(r.source_offset for r in scores) == [o for o in range(41) if o != 20]
    assert "worker died" not in detector.log
    assert detector.stop() == 0


def test_the_alerter_rides_out_a_slack_outage_longer_than_max_poll_interval(pipeline_settings, services):
    # Slack answers 503 for ~20 s (slack-sdk's own retries, then the alerter's back-off) while the
    # group would drop a member that does not poll for 10 s.
    anomalies = [{"series": f"outage-{i}", "timestamp": "2024-05-06T07:08:09Z", "value": 99.0, "is_anomaly": True,
                  "if_anomaly": True, "lstm_anomaly": False, "reconstruction_error": 0.1, "if_score": 0.7,
                  "model_version": "v", "source_topic": "input_data", "source_partition": 0, "source_offset": i,
                  "source_timestamp_ms": 0, "detected_at": "2024-05-06T07:08:10Z"} for i in range(3)]
    with SlackTestServer(fail_5xx_first=12) as slack:
        overrides = pipeline_settings | {
            "slack_bot_token": VALID_TOKEN, "slack_base_url": slack.base_url, "partitions_anomalies": 1,
            "kafka_extra": {"max.poll.interval.ms": 10000, "session.timeout.ms": 6000},
            "alert_grouping": False,  # one post per anomaly, each retried through the outage
        }
        settings = as_settings(overrides)
        ensure_topics(settings)
        producer = make_producer(settings)
        for rec in anomalies:
            producer.produce(settings.topic_anomalies, orjson.dumps(rec), rec["series"].encode())
        assert producer.flush(30) == 0
        alerter = services("alerter", overrides)
        end = end_offsets(settings, settings.topic_anomalies)
        wait_until(lambda: committed_offsets(settings, settings.alerter_group, settings.topic_anomalies, end) == end,
                   240, "the alerter to post and commit every anomaly", [alerter])
        time.sleep(3)  # a re-read after losing the group would post again now
        posted = sorted(m["text"].split(" at ")[0] for m in slack.messages)
        assert posted == [f":rotating_light: Anomaly in outage-{i}" for i in range(3)], posted  # once each
        assert slack.requests[0]["status"] == 503
        assert slack.requests[-1]["time"] - slack.requests[0]["time"] > 10  # the outage outlasted the interval
        assert "commit refused by a rebalance" not in alerter.log
        assert alerter.stop() == 0


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_a_broker_outage_longer_than_the_delivery_timeout_delays_scoring_and_crashes_nothing(
        model_dir, tmp_path, services, delivery):
    """A broker of this test alone, stopped for 20 s while the detector scores a backlog, with
    librdkafka giving up on a record after 5 s: every input is scored and no worker dies.
    at_least_once: the records it gave up on are sent again once the broker is back (one may
    repeat). exactly_once: the transaction they were in is aborted and its inputs scored again;
    read_committed, each input's score is there once."""
    broker = LocalBroker(tmp_path / "broker", port=free_port(), controller_port=free_port())
    broker.start()
    try:
        overrides = {
            "bootstrap_servers": broker.bootstrap, "model_dir": str(model_dir), "workers": 1,
            "partitions_input": 1, "poll_timeout_s": "0.1", "batch_size": 500,
            "kafka_extra": {"message.timeout.ms": 5000}, "delivery": delivery,
        }
        settings = as_settings(overrides)
        ensure_topics(settings)
        n = 30_000
        producer = make_producer(settings)
        for i in range(n):
            producer.produce(settings.topic_input, point(i), b"big-test")
            if i % 5000 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0
        detector = services("detector", overrides)
        scored = lambda: sum(end_offsets(settings, settings.topic_scores, timeout=5).values())  # noqa: E731
        wait_until(lambda: scored() > 0, 180, "the first scores", [detector])
        broker.stop()
        time.sleep(20)
        assert detector.alive()
        broker.start()
        committed = lambda: committed_offsets(settings, settings.consumer_group, settings.topic_input, [0])  # noqa: E731
        wait_until(lambda: committed() == {0: n}, 300, "every input scored after the outage", [detector])
        records = read_topic(settings, settings.topic_scores, idle=3, timeout=120)
        per_input = Counter(ScoreRecord.model_validate_json(m.value()).source_offset for m in records)
        assert set(per_input) == set(range(n))  # no gap
        if delivery == "exactly_once":
            assert set(per_input.values()) == {1} and len(records) == n  # and none twice
        # at_least_once: a record sent again may repeat
        assert "worker died" not in detector.log
        assert detector.stop() == 0
    finally:
        broker.stop()
