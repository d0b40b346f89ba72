"""The alerter on the real broker: killed without warning and started again, it is the same static
member of its group, so it gets its partitions back at once instead of after the session timeout."""

from __future__ import annotations

import time

import pytest
from helpers import as_settings, wait_until

from shared.kafka import committed_offsets, end_offsets, ensure_topics, make_producer
from shared.records.metrics import ScoreRecord

pytestmark = pytest.mark.kafka

SESSION_TIMEOUT_S = 45  # librdkafka's session.timeout.ms: what a restarted dynamic member waited for


def anomaly(series: str) -> bytes:
    return ScoreRecord.model_validate({
        "series": series, "timestamp": "2024-05-06T07:08:09Z", "value": 97.25, "is_anomaly": True,
        "if_anomaly": True, "lstm_anomaly": False, "reconstruction_error": 0.125, "if_score": 0.625,
        "model_version": "ec2_cpu-test", "source_topic": "input_data", "source_partition": 0, "source_offset": 0,
        "source_timestamp_ms": 0, "detected_at": "2024-05-06T07:08:10Z",
    }).model_dump_json().encode()


def test_a_killed_alerter_started_again_resumes_well_within_the_session_timeout(pipeline_settings, services):
    # No Slack, no grouping (tests/alerting/test_alert_grouping_kafka.py): each alert is logged.
    overrides = pipeline_settings | {"alert_cooldown_s": 0, "alert_grouping": False}
    settings = as_settings(overrides)
    ensure_topics(settings)
    producer = make_producer(settings)

    def alert(series: str) -> dict[int, int]:
        producer.produce(settings.topic_anomalies, anomaly(series), series.encode())
        assert producer.flush(30) == 0
        return end_offsets(settings, settings.topic_anomalies)

    def handled(end: dict[int, int]) -> bool:
        return committed_offsets(settings, settings.alerter_group, settings.topic_anomalies, end) == end

    alerter = services("alerter", overrides)
    end = alert("cpu-before-the-kill")
    wait_until(lambda: handled(end), 90, "the first alert handled", [alerter])
    alerter.proc.kill()  # SIGKILL: no LeaveGroup, the member stays in the group until its session expires
    alerter.proc.wait()

    end = alert("cpu-after-the-restart")
    restarted = time.monotonic()
    alerter = services("alerter", overrides)
    wait_until(lambda: handled(end), 90, "the alert sent while the alerter was down handled", [alerter])
    took = time.monotonic() - restarted
    print(f"restarted alerter handled its first alert {took:.1f}s after it was started")
    assert took < SESSION_TIMEOUT_S / 3
    assert "cpu-after-the-restart" in alerter.log
    assert alerter.stop() == 0
