"""The detector service scores `kafka_metrics` with the Real-Time K-Means, on the real broker:
every scrape scored once, injected anomalies alerted in Slack, bad records dead-lettered with the
reason, and a restart resumes the streaming state from its changelog topic, wherever it runs."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from helpers import as_settings, broker_metrics_frame, wait_until
from slack_server import VALID_TOKEN, SlackTestServer

from models.kmeans.scorer import ClusterScorer
from shared.changelog import changelog_topic, restore
from shared.kafka import end_offsets, ensure_topics, make_producer, read_topic
from shared.records.anomalies import anomaly_record_adapter
from shared.records.kmeans import BrokerMetricsRecord, ClusterScoreRecord

SOURCE = "http://127.0.0.1:7071/metrics"


def record(row) -> bytes:
    metrics = {c: float(row[c]) for c in ("messages_in", "bytes_in", "bytes_out", "fetch_requests",
                                           "produce_requests")}
    return BrokerMetricsRecord(source=SOURCE, timestamp=float(row["timestamp"]), interval_s=1.0,
                               metrics=metrics).model_dump_json().encode()


def send(settings, payloads: list[bytes | None]) -> None:
    producer = make_producer(settings)
    for p in payloads:
        producer.produce(settings.topic_kafka_metrics, p, key=SOURCE.encode())
    assert producer.flush(30) == 0


def count(settings, topic) -> int:
    return sum(end_offsets(settings, topic).values())


def saved_state(settings) -> dict | None:
    """The K-Means state of input partition 0 in the detector's changelog (None: none yet)."""
    name = changelog_topic(settings, "detector", settings.topic_kafka_metrics)
    try:
        value = restore(settings, name, [0], timeout=10)[0].get(b"kmeans")
    except Exception:  # the changelog not created yet
        return None
    return None if value is None else json.loads(value)


def rows_seen(settings) -> int:
    state = saved_state(settings)
    return -1 if state is None else state["model"]["rows_seen"]


BAD = [
    (b"{not json", "Invalid JSON"),
    (orjson.dumps({"source": SOURCE, "timestamp": 1.7e9, "interval_s": 1.0, "metrics": {"messages_in": -5.0}}),
     "greater than or equal to 0"),
    (orjson.dumps({"source": SOURCE, "timestamp": 1.7e9, "interval_s": 1.0, "metrics": {"bytes_in": "12"}}),
     "valid number"),
    (orjson.dumps({"source": SOURCE, "timestamp": 1.7e9, "interval_s": 1.0, "metrics": {}, "host": "b1"}),
     "Extra inputs"),
    (orjson.dumps({"source": SOURCE, "timestamp": 1.7e9, "metrics": {}}), "interval_s: Field required"),
]


@pytest.mark.kafka
def test_detector_scores_broker_metrics_alerts_and_resumes_from_checkpoint(pipeline_settings, services):
    frame = broker_metrics_frame(80, seed=5, bursts=[40], large=[60])
    with SlackTestServer() as slack:
        overrides = pipeline_settings | {"workers": 2, "slack_bot_token": VALID_TOKEN,
                                         "slack_base_url": slack.base_url, "alert_cooldown_s": 0,
                                         "alert_grouping": False}  # one message per anomaly
        settings = as_settings(overrides)
        ensure_topics(settings)
        detector = services("detector", overrides)
        alerter = services("alerter", overrides)
        first = frame.iloc[:70]
        send(settings, [record(r) for _, r in first.iterrows()][:50] + [p for p, _ in BAD]
             + [record(r) for _, r in first.iterrows()][50:])
        wait_until(lambda: count(settings, settings.topic_scores) >= 70, 180, "70 scores", [detector, alerter])
        wait_until(lambda: len(slack.messages) >= 2, 60, "2 Slack alerts", [alerter])

        wait_until(lambda: rows_seen(settings) == 70, 30, "state of 70 in the changelog")
        assert saved_state(settings)["offset"] == 74  # 70 records + 5 bad ones, offsets 0..74
        assert detector.stop() == 0

        # Restart: the state comes from the changelog, nothing is scored twice.
        detector = services("detector", overrides)
        send(settings, [record(r) for _, r in frame.iloc[70:].iterrows()])
        wait_until(lambda: count(settings, settings.topic_scores) >= 80, 180, "80 scores", [detector, alerter])
        wait_until(lambda: "K-Means state restored" in detector.log, 30, "the restore log line", [detector])
        assert '"source": "checkpoint"' in detector.log
        # The state is written right after the outputs are acknowledged.
        wait_until(lambda: rows_seen(settings) == 80, 30, "state of 80 in the changelog")

    scores = [ClusterScoreRecord.model_validate_json(m.value()) for m in read_topic(settings, settings.topic_scores,
                                                                                      idle=2)]
    assert sorted(r.source_offset for r in scores) == list(range(50)) + list(range(55, 85))
    flagged = sorted(r.timestamp.timestamp() for r in scores if r.is_anomaly)
    assert flagged == [frame["timestamp"][40], frame["timestamp"][60]]
    burst = next(r for r in scores if r.timestamp.timestamp() == frame["timestamp"][40])
    assert burst.score > burst.threshold and set(burst.deviations) <= set(burst.metrics)
    assert max(burst.deviations.values()) > 10  # messages and bytes far above their cluster

    anomalies = [anomaly_record_adapter.validate_json(m.value()) for m in read_topic(settings,
                                                                                     settings.topic_anomalies, idle=2)]
    assert [a.kind for a in anomalies] == ["cluster", "cluster"]
    texts = [m["text"] for m in slack.messages]
    assert len(texts) == 2 and all("Broker metrics anomaly" in t and SOURCE in t for t in texts)
    assert any("messages_in +" in t for t in texts) and any("bytes_in +" in t for t in texts)

    dead = sorted(read_topic(settings, settings.topic_dead_letter, idle=2),
                  key=lambda m: int(dict(m.headers())["dlq.offset"]))
    assert len(dead) == len(BAD)
    for (payload, why), letter in zip(BAD, dead):
        headers = dict(letter.headers())
        assert letter.value() == payload and headers["dlq.topic"].decode() == settings.topic_kafka_metrics
        assert why in headers["dlq.error"].decode(), (why, headers["dlq.error"])
    assert VALID_TOKEN not in detector.log + alerter.log
    assert detector.stop() == 0 and alerter.stop() == 0


@pytest.mark.kafka
def test_kmeans_state_moves_with_the_partition_not_the_data_directory(pipeline_settings, services, tmp_path):
    """The detector is stopped and started again with another ANOMSTREAM_HOME (another host, or its
    data directory wiped) and in another consumer group, which re-reads kafka_metrics from its
    start (as after a crash between the state write and the commit): the state comes back from the
    changelog, the scrapes it already absorbed are skipped (not scored nor learned twice) and the
    model goes on learning from row 60, not from the trained model's 0."""
    frame = broker_metrics_frame(80, seed=7)
    payloads = [record(r) for _, r in frame.iterrows()]
    first = pipeline_settings | {"workers": 1, "home": str(tmp_path / "host-a")}
    settings = as_settings(first)
    ensure_topics(settings)
    detector = services("detector", first)
    send(settings, payloads[:60])
    wait_until(lambda: count(settings, settings.topic_scores) >= 60, 180, "60 scores", [detector])
    wait_until(lambda: rows_seen(settings) == 60, 30, "state of 60 in the changelog")
    assert saved_state(settings)["offset"] == 59
    assert detector.stop() == 0

    moved = first | {"home": str(tmp_path / "host-b"), "consumer_group": first["consumer_group"] + "-moved"}
    detector = services("detector", moved)
    send(settings, payloads[60:])
    wait_until(lambda: count(settings, settings.topic_scores) >= 80, 180, "80 scores", [detector])
    wait_until(lambda: rows_seen(settings) == 80, 30, "state of 80 in the changelog", [detector])
    assert '"source": "checkpoint"' in detector.log and '"offset": 59' in detector.log
    assert saved_state(settings)["offset"] == 79
    scores = [ClusterScoreRecord.model_validate_json(m.value())
              for m in read_topic(settings, settings.topic_scores, idle=2)]
    assert sorted(r.source_offset for r in scores) == list(range(80))  # the 60 re-read scrapes skipped
    assert not (tmp_path / "host-b" / "state" / "kmeans").exists()
    assert detector.stop() == 0


def test_state_round_trip_per_partition_and_version_guard(model_dir):
    frame = broker_metrics_frame(30, seed=9)
    rows = [BrokerMetricsRecord.model_validate_json(record(r)) for _, r in frame.iterrows()]
    scorer = ClusterScorer(model_dir, "kafka_kmeans")
    assert scorer.restore(0, None) == "trained"
    scorer.score(rows[:13], 0, list(range(13)))
    saved = json.loads(json.dumps(scorer.to_dict(0)))  # as the changelog holds it
    assert saved["offset"] == 12 and saved["model"]["rows_seen"] == 13
    resumed = ClusterScorer(model_dir, "kafka_kmeans")
    assert resumed.restore(0, saved) == "checkpoint"
    assert resumed.is_applied(0, 12) and not resumed.is_applied(0, 13) and not resumed.is_applied(1, 0)
    np.testing.assert_array_equal(resumed.score(rows[13:], 0).scores, scorer.score(rows[13:], 0).scores)
    # Each partition has its own state: partition 1 starts from the trained model.
    assert resumed.detector(1).rows_seen == 0 and resumed.to_dict(1)["offset"] == -1
    resumed.drop(0)
    assert not resumed.is_applied(0, 0) and resumed.detector(0).rows_seen == 0

    saved["model"]["version"] = "kafka_kmeans-older"
    fresh = ClusterScorer(model_dir, "kafka_kmeans")
    assert "another model version" in fresh.restore(0, saved)
    assert fresh.applied == {} and fresh.detector(0).rows_seen == 0
