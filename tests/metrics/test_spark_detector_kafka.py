"""The detector on Spark Structured Streaming (`anomstream spark-detect`, local[2]) against the real
broker: it scores every input once, with the detector service's numbers, and a restart from its
checkpoint goes on from where it stopped, with each series' state restored from Spark's state store."""

from __future__ import annotations

import math
import sys
import uuid
from pathlib import Path

import pytest
from helpers import as_settings, series_frame, wait_until

import services.detector.spark.__main__ as spark_main
from services.detector.spark.connector import connector_jars
from shared.kafka import ensure_topics, read_topic, send
from shared.records.metrics import ScoreRecord, encode_metric_frame

pytestmark = pytest.mark.kafka

SPARK_MAIN = Path(spark_main.__file__)  # what spark-submit runs (README, "Run on Spark")
MALFORMED = b'{"series": "ec2_cpu_utilization_24ae8d", "timestamp": "not a time", "value": 1.0}'


def scored(settings) -> dict[tuple[int, int], ScoreRecord]:
    """Score records by their input's (partition, offset); fails on a second record for one input."""
    records = [ScoreRecord.model_validate_json(m.value())
               for m in read_topic(settings, settings.topic_scores, idle=3, timeout=120)]
    by_source = {(r.source_partition, r.source_offset): r for r in records}
    assert len(by_source) == len(records), "an input was scored twice"
    return by_source


def test_spark_detector_scores_as_the_service_and_restarts_from_its_checkpoint(pipeline_settings, services,
                                                                                tmp_path):
    frame = series_frame()
    keys, values = encode_metric_frame(frame)
    half = len(frame) // 2
    spark_overrides = pipeline_settings | {
        "spark_checkpoint": str(tmp_path / "checkpoint"), "spark_state_partitions": 2,
        "spark_trigger_s": 0.5, "spark_conf": {"spark.ui.enabled": "false"},
    }
    settings = as_settings(spark_overrides)
    ensure_topics(settings)

    # First run, as on a cluster (spark-submit of the module's file, the connector's jars passed to
    # it): the first half and a malformed message, then the query stops by itself.
    send(settings, settings.topic_input, keys[:half] + [b"bad"], values[:half] + [MALFORMED])
    submit = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]",
              "--jars", ",".join(str(j) for j in connector_jars()),
              str(SPARK_MAIN)]
    python = {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}  # this venv's
    first = services("detector.spark", spark_overrides, "--available-now", command=submit, env=python)
    assert first.proc.wait(300) == 0, first.log[-3000:]
    assert len(scored(settings)) == half
    assert '"available_now": true, "spark_submit": true' in first.log and "query stopped" in first.log

    # Second run, from the checkpoint, as `anomstream spark-detect` (python -m, local[2]) and a
    # long-running query: the second half, then SIGTERM.
    second = services("detector.spark", spark_overrides)
    send(settings, settings.topic_input, keys[half:], values[half:])
    wait_until(lambda: len(read_topic(settings, settings.topic_scores, idle=1, timeout=60)) >= len(frame), 300,
               "the second half's scores", [second])
    assert second.stop(180) == 0, second.log[-3000:]
    assert '"spark_submit": false, "master": "local[2]"' in second.log and "query stopped" in second.log

    spark_scores = scored(settings)
    inputs = {(m.partition(), m.offset()): m for m in read_topic(settings, settings.topic_input, idle=2)}
    assert len(inputs) == len(frame) + 1
    good = {source for source, m in inputs.items() if m.value() != MALFORMED}
    assert set(spark_scores) == good, "every good input scored exactly once, across the restart"

    # The malformed message reached dead_letter, unchanged, with the reason.
    dead = read_topic(settings, settings.topic_dead_letter, idle=2, timeout=60)
    assert [m.value() for m in dead] == [MALFORMED]
    headers = dict(dead[0].headers())
    assert b"timestamp" in headers["dlq.error"] and headers["dlq.service"] == b"detector-spark"

    # The detector service on the same input, into topics of its own: the same numbers per input
    # (one model set, each series in offset order), so the second run scored from the first's state.
    run = uuid.uuid4().hex[:8]
    service_overrides = pipeline_settings | {
        "topic_scores": f"svc_scores_{run}", "topic_anomalies": f"svc_anomalies_{run}",
        "topic_dead_letter": f"svc_dead_letter_{run}", "consumer_group": f"svc_detector_{run}", "workers": 1}
    service_settings = as_settings(service_overrides)
    detector = services("detector", service_overrides)
    wait_until(lambda: len(read_topic(service_settings, service_settings.topic_scores, idle=1, timeout=60))
               >= len(good), 300, "the detector service's scores", [detector])
    service_scores = scored(service_settings)
    assert set(service_scores) == good
    for source, theirs in service_scores.items():
        ours = spark_scores[source]
        assert (ours.series, ours.timestamp, ours.value) == (theirs.series, theirs.timestamp, theirs.value)
        assert ours.is_anomaly == theirs.is_anomaly, source
        assert ours.flags == theirs.flags, source
        assert ours.scores.keys() == theirs.scores.keys()
        for name, score in theirs.scores.items():
            assert math.isclose(ours.scores[name], score, rel_tol=1e-6, abs_tol=1e-9), (source, name)
        assert ours.why == theirs.why
    assert any(r.is_anomaly for r in spark_scores.values()), "the series has anomalies to compare"
    anomalies = read_topic(settings, settings.topic_anomalies, idle=2, timeout=60)
    assert len(anomalies) == sum(r.is_anomaly for r in spark_scores.values())
