"""End-to-end tests on the real broker: services run as their own processes, as in production."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import orjson
import pytest
from helpers import as_settings, series_frame, wait_until, worker_pids
from slack_server import VALID_TOKEN, SlackTestServer

from shared.kafka import (
    caught_up,
    end_offsets,
    ensure_topics,
    make_producer,
    read_topic,
    send,
)
from shared.records.metrics import ScoreRecord, encode_metric_frame

pytestmark = pytest.mark.kafka


def count(settings, topic) -> int:
    """The records in `topic` a read_committed reader sees (not its end offsets: the stream core's
    transaction markers take offsets too)."""
    return len(read_topic(settings, topic, idle=2, timeout=60))


def test_replay_scores_every_input_once_and_alerts_reach_slack(pipeline_settings, services):
    frame = series_frame()
    with SlackTestServer(rate_limit_first=1, retry_after=1) as slack:
        overrides = pipeline_settings | {
            "slack_bot_token": VALID_TOKEN, "slack_base_url": slack.base_url,
            "slack_channel": "#sre-alerts", "alert_cooldown_s": 86400,
            "decision": ["isolation_forest", "lstm_autoencoder"],  # the seed's IF-or-LSTM
        }
        settings = as_settings(overrides)
        ensure_topics(settings)
        detector = services("detector", overrides)
        alerter = services("alerter", overrides)
        keys, values = encode_metric_frame(frame)
        assert send(settings, settings.topic_input, keys, values) == len(frame)

        wait_until(lambda: count(settings, settings.topic_scores) >= len(frame), 180, "all scores",
                   [detector, alerter])
        time.sleep(2)  # a duplicate would arrive now, if the detector wrote any
        scores = read_topic(settings, settings.topic_scores, idle=3, timeout=60)
        records = [ScoreRecord.model_validate_json(m.value()) for m in scores]
        assert len(records) == len(frame)
        expected = {(s, ts.to_pydatetime()) for s, ts in zip(frame["series"], frame["timestamp"])}
        assert {(r.series, r.timestamp) for r in records} == expected
        assert {(r.source_partition, r.source_offset) for r in records} == {
            (m.partition(), m.offset()) for m in read_topic(settings, settings.topic_input, idle=2)}

        anomalies = [r for r in records if r.is_anomaly]
        assert all(r.is_anomaly == (r.if_anomaly or r.lstm_anomaly) for r in records)
        assert anomalies, "the seed IsolationForest flags about 10% of training-like data"
        # Each anomaly says which detectors decided it (and only those that flagged); no other record does.
        assert all((r.why is not None) == r.is_anomaly for r in records)
        assert all(r.why.deciding and all(r.flags[d] for d in r.why.deciding) for r in anomalies)
        assert count(settings, settings.topic_anomalies) == len(anomalies)

        # Every anomaly handled (posted or suppressed by the cooldown) and committed by the alerter.
        # (committed up to the last record: under exactly-once a commit marker ends the topic)
        wait_until(lambda: caught_up(settings, settings.alerter_group, settings.topic_anomalies),
                   120, "the alerter to commit every anomaly", [alerter])
        assert slack.requests[0]["status"] == 429
        assert slack.requests[1]["time"] - slack.requests[0]["time"] >= 1.0, "Retry-After was not honoured"
        assert slack.messages, "no alert reached Slack"
        for posted in slack.messages:
            assert posted["channel"] == "#sre-alerts"
            assert "ec2_cpu_utilization_24ae8d" in posted["text"]
            assert posted["blocks"][0]["type"] == "header"
        # The cooldown is one day of event time over a 14-day series: at most one alert per day.
        assert len(slack.messages) <= 15
        assert VALID_TOKEN not in detector.log + alerter.log
    assert detector.stop() == 0 and alerter.stop() == 0


MALFORMED = [
    (b"this is not json", "Invalid JSON"),
    (b'{"series": "s", "timestamp": "2014-02-14T14:30:00Z"}', "value: Field required"),
    (b'{"series": "s", "timestamp": "2014-02-14T14:30:00Z", "value": "0.5"}', "value"),
    (b'{"series": "s", "timestamp": "2014-02-14T14:30:00Z", "value": NaN}', "finite"),
    (b'{"series": "s", "timestamp": "2014-02-14T14:30:00Z", "value": 1e999}', "finite"),
    (b'{"series": "s", "timestamp": "yesterday-ish", "value": 1.0}', "timestamp"),
    (b'{"series": "s", "timestamp": "2014-02-14T14:30:00Z", "value": 1.0, "host": "x"}', "host: unknown field"),
    (b'{"series": 42, "timestamp": "2014-02-14T14:30:00Z", "value": 1.0}', "series"),
    (b'[1, 2, 3]', "payload: Input should be an object"),
    (b'{"series": "s", "timestamp": 1, "value": 1}, {"series": "s", "timestamp": 2, "value": 2}', "Invalid JSON"),
    (b"", "Invalid JSON"),
    (None, "empty message"),
    (b'{"series": "s", "timestamp": 1392388200, "value": "x", "value": 1.0}', "value: duplicate key"),
    (b'{"series": "s", "timestamp": 25340256000, "value": 1.0}', "never as milliseconds"),
    (b'{"series": "s", "timestamp": 1392388200, "value": 1e13}', "ANOMSTREAM_MAX_ABS_VALUE"),
    (b'{"series": "s\\nFAKE", "timestamp": 1392388200, "value": 1.0}', "U+000A"),
    (b'{"series": "s", "timestamp": "2014-02-14T14:30:00Z", "value": 1.0, "pad": "' + b"x" * 70_000 + b'"}',
     "exceeds"),
]


def test_malformed_messages_go_to_dead_letter_with_reasons(pipeline_settings, services):
    settings = as_settings(pipeline_settings)
    ensure_topics(settings)
    detector = services("detector", pipeline_settings)
    good_keys, good_values = encode_metric_frame(series_frame().head(60))
    producer = make_producer(settings)
    # Interleave bad messages between good ones, all on one key so they share a partition and batch.
    for i, (key, value) in enumerate(zip(good_keys, good_values)):
        producer.produce(settings.topic_input, value, b"mixed")
        if i < len(MALFORMED):
            producer.produce(settings.topic_input, MALFORMED[i][0], b"mixed")
    assert producer.flush(30) == 0

    wait_until(lambda: count(settings, settings.topic_dead_letter) >= len(MALFORMED), 120, "dead letters",
               [detector])
    dead = read_topic(settings, settings.topic_dead_letter, idle=2)
    assert len(dead) == len(MALFORMED)
    inputs = {m.offset(): m.value() for m in read_topic(settings, settings.topic_input, idle=2)}
    by_bytes = {}
    for msg in dead:
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["dlq.topic"] == settings.topic_input
        assert headers["dlq.service"] == "detector"
        assert inputs[int(headers["dlq.offset"])] == msg.value(), "original bytes must be kept unchanged"
        by_bytes[msg.value()] = headers["dlq.error"]
    for payload, reason in MALFORMED:
        assert reason in by_bytes[payload], f"{payload[:60]!r}: {by_bytes[payload]!r}"

    wait_until(lambda: count(settings, settings.topic_scores) >= 60, 60, "good messages scored", [detector])
    # The workers are still alive and still scoring.
    more_keys, more_values = encode_metric_frame(series_frame().iloc[60:70])
    send(settings, settings.topic_input, more_keys, more_values)
    wait_until(lambda: count(settings, settings.topic_scores) >= 70, 60, "later messages scored", [detector])
    assert count(settings, settings.topic_scores) == 70
    assert "worker died" not in detector.log
    assert detector.alive()


def test_worker_killed_mid_stream_leaves_no_gap(pipeline_settings, services):
    overrides = pipeline_settings | {"batch_size": 200}
    settings = as_settings(overrides)
    ensure_topics(settings)
    detector = services("detector", overrides)
    keys, values = encode_metric_frame(series_frame())
    wait_until(lambda: detector.log.count("worker ready") >= 3, 120, "3 workers ready", [detector])

    sender = threading.Thread(target=send, args=(settings, settings.topic_input, keys, values, 800))
    sender.start()  # ~5 s of traffic at 800 msgs/s
    wait_until(lambda: count(settings, settings.topic_scores) >= 800, 60, "scoring under way", [detector])
    workers = worker_pids(detector.proc.pid)
    assert len(workers) == 3
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    sender.join()

    wait_until(lambda: "worker died; restarting" in detector.log, 30, "the supervisor to restart the worker",
               [detector])
    inputs = {(m.partition(), m.offset()) for m in read_topic(settings, settings.topic_input, idle=2)}
    assert len(inputs) == len(keys)

    def covered() -> bool:
        return count(settings, settings.topic_scores) >= len(inputs) and inputs <= {
            (r["source_partition"], r["source_offset"])
            for r in (orjson.loads(m.value()) for m in read_topic(settings, settings.topic_scores, idle=1))
        }

    wait_until(covered, 180, "every input scored after the restart", [detector])
    assert victim not in worker_pids(detector.proc.pid)


def test_offsets_of_a_topic_created_a_moment_ago(pipeline_settings):
    # Right after creation a partition can answer "not leader"; end_offsets waits that out.
    settings = as_settings(pipeline_settings)
    for _ in range(3):
        topics = {f"fresh_{uuid.uuid4().hex[:8]}": 3 for _ in range(4)}
        ensure_topics(settings, topics)
        for topic in topics:
            assert end_offsets(settings, topic) == {0: 0, 1: 0, 2: 0}
