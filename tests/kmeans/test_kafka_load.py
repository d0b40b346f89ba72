"""scenario kafka-load: its schedule, its labels, a short run on the session broker, and the recording."""

from __future__ import annotations

import json
import uuid

import pandas as pd
import pytest
from helpers import REPO_ROOT, as_settings

from services.jobs.scenario import (
    MESSAGE_BYTES,
    PATTERN_P1,
    Injection,
    LoadConfig,
    columns_for,
    label,
    run_scenario,
    schedule,
)
from services.scraper.service import DEFAULT_PATTERNS
from shared.app_logging import setup_logging
from shared.kafka import read_topic
from shared.records.kmeans import BrokerMetricsRecord

RECORDING = REPO_ROOT / "models" / "kmeans" / "data" / "kafka_load.csv"


def test_schedule_spares_the_training_part_and_spreads_the_anomalies():
    config = LoadConfig()
    plan = schedule(config)
    assert [k for _, k in plan].count("burst") == 4 and [k for _, k in plan].count("large-message") == 2
    rows = [row + 1 for row, _ in plan]  # an injection lands in the row after the scrape it follows
    assert min(rows) >= 0.4 * config.rows and max(rows) < config.rows
    assert min(b - a for a, b in zip(rows, rows[1:])) >= config.min_gap
    assert [k for _, k in plan][:2] == ["burst", "large-message"]  # interleaved
    with pytest.raises(ValueError):
        schedule(LoadConfig(rows=60, bursts=5, large_messages=2, min_gap=20))


class Log:
    def __init__(self):
        self.warnings = []

    def warning(self, event, **kw):
        self.warnings.append((event, kw))


def test_labels_come_from_the_injection_times():
    rows = [{"timestamp": t, "interval_s": 1.0, "metrics": {}} for t in (1.0, 2.0, 3.0, 4.0)]
    inside = Injection("burst-1", "burst", 0, "p1", 10, 700, start=1.1, acked=1.3, end=1.4)
    overran = Injection("large-message-1", "large-message", 2, "p1", 1, 9, start=3.2, acked=3.9, end=4.1)
    never = Injection("burst-2", "burst", 3, "p1", 10, 700)  # not injected (the run stopped early)
    log = Log()
    label(rows, [inside, overran, never], log)
    assert [(r["is_anomaly"], r["anomaly"]) for r in rows] == [
        (0, ""), (1, "burst-1"), (0, ""), (1, "large-message-1")]
    assert inside.rows == [1] and overran.rows == [3]
    late = Injection("burst-3", "burst", 0, "p1", 10, 700, start=1.5, acked=2.2, end=2.3)
    label(rows, [late], log)
    assert late.rows == [1, 2] and [r["anomaly"] for r in rows] == ["", "burst-3", "burst-3", ""]
    assert log.warnings and log.warnings[-1][1]["rows"] == [1, 2]


def test_columns_are_the_broker_and_the_scenario_topics():
    columns = columns_for(LoadConfig(topic_prefix="x_"))
    assert columns == sorted(columns) and len(columns) == 15
    assert set(DEFAULT_PATTERNS) < set(columns) and "messages_in:x_p2" in columns
    assert not any("kafka_metrics" in c or "__" in c for c in columns)


@pytest.mark.kafka
def test_short_run_labels_the_rows_holding_the_injections(kafka_bootstrap, kafka_metrics_url, tmp_path):
    run = uuid.uuid4().hex[:8]
    settings = as_settings({"bootstrap_servers": kafka_bootstrap, "topic_kafka_metrics": f"kafka_metrics_{run}"})
    # 1 s rows and a 10000-message burst: acknowledged and consumed in ~0.1-0.3 s. On a loaded machine an
    # injection can still overrun into the next scrape; the scenario then labels both rows (checked below).
    config = LoadConfig(rows=24, interval_s=1.0, factor=2, bursts=1, burst_messages=10_000, large_messages=1,
                        quiet_fraction=0.3, min_gap=5, topic_prefix=f"load_{run}_", group=f"load_{run}")
    out = tmp_path / "load.csv"
    summary = run_scenario(settings, kafka_metrics_url, out, config, log=setup_logging(settings, "kafka-load"))
    frame = pd.read_csv(out, keep_default_na=False)
    p1, p2 = config.topics
    assert list(frame.columns) == ["timestamp", "interval_s", *columns_for(config), "is_anomaly", "anomaly"]
    assert len(frame) == 24 and summary["rows"] == 24
    sidecar = json.loads((tmp_path / "load.csv.anomalies.json").read_text())
    injected = {a["name"]: a for a in sidecar["anomalies"]}
    assert set(injected) == {"burst-1", "large-message-1"}
    burst_rows, large_rows = injected["burst-1"]["rows"], injected["large-message-1"]["rows"]
    for rows in (burst_rows, large_rows):  # one row, or two consecutive ones after an overrun
        assert rows == list(range(rows[0], rows[0] + len(rows))) and 1 <= len(rows) <= 2
    labelled = frame[frame.is_anomaly == 1]
    assert labelled.index.tolist() == sorted(burst_rows + large_rows)
    assert set(labelled.anomaly) == {"burst-1", "large-message-1"}
    assert labelled.index.min() >= 0.3 * config.rows

    # The rows holding the injections, by the broker's own counts: inside the labelled ones.
    p1_messages = (frame[f"messages_in:{p1}"] * frame.interval_s).round()
    p1_bytes = frame[f"bytes_in:{p1}"] * frame.interval_s
    normal = frame[frame.is_anomaly == 0]
    assert p1_messages[burst_rows].sum() >= config.burst_messages
    assert p1_bytes[large_rows].sum() >= config.large_bytes
    assert (p1_messages[normal.index] < config.burst_messages / 10).all()
    assert (p1_bytes[normal.index] < config.large_bytes / 10).all()
    burst, large = frame.loc[burst_rows].max(), frame.loc[large_rows].max()
    assert burst.messages_in > 10 * normal.messages_in.median()
    assert large.bytes_in > 5 * normal.bytes_in.median()
    assert frame.loc[large_rows, "messages_in"].max() < 2 * normal.messages_in.max()  # a size anomaly, not a rate one
    # The consumer group read them too, and producer 2 is steady.
    assert burst.bytes_out > 10 * normal.bytes_out.median() and large.bytes_out > 5 * normal.bytes_out.median()
    assert normal[f"messages_in:{p2}"].mean() == pytest.approx(0.5 * config.factor, rel=0.35)
    assert normal[f"messages_in:{p1}"].median() == pytest.approx(
        sum(n / p for n, p in PATTERN_P1) * config.factor, rel=0.15)

    for name, rows in (("burst-1", burst_rows), ("large-message-1", large_rows)):
        a, first, last = injected[name], frame.loc[rows[0]], frame.loc[rows[-1]]
        assert first.timestamp - first.interval_s - 0.01 < a["start"] < a["end"] < last.timestamp + 0.01
    assert injected["burst-1"]["bytes"] == config.burst_messages * MESSAGE_BYTES
    assert summary["burst_vs_normal_load"] > 10

    records = read_topic(settings, settings.topic_kafka_metrics, idle=2, timeout=30)
    assert len(records) == 24
    assert all(BrokerMetricsRecord.model_validate_json(m.value()).source == kafka_metrics_url for m in records)


@pytest.fixture(scope="module")
def recording() -> tuple[pd.DataFrame, dict]:
    frame = pd.read_csv(RECORDING, keep_default_na=False)
    return frame, json.loads(RECORDING.with_name(RECORDING.name + ".anomalies.json").read_text())


def test_recording_is_labelled_and_its_anomalies_stand_out(recording):
    frame, sidecar = recording
    assert len(frame) >= 950 and RECORDING.stat().st_size < 300_000
    assert not any("kafka_metrics" in c or "__" in c for c in frame.columns)
    assert frame.interval_s.between(0.5, 2.0).all() and frame.timestamp.is_monotonic_increasing
    names = [a["name"] for a in sidecar["anomalies"]]
    assert sorted(names) == sorted(f"burst-{i}" for i in range(1, 5)) + sorted(f"large-message-{i}" for i in (1, 2))
    labelled = frame[frame.is_anomaly == 1]
    assert sorted(labelled.anomaly) == sorted(names)  # one row each
    assert labelled.index.min() >= 0.4 * len(frame)
    assert (labelled.index.to_series().diff().dropna() >= 20).all()
    for a in sidecar["anomalies"]:
        row = frame.loc[a["rows"][0]]
        assert row.anomaly == a["name"] and row.timestamp - row.interval_s < a["start"] < a["end"] < row.timestamp
    normal = frame[frame.is_anomaly == 0]
    bursts = labelled[labelled.anomaly.str.startswith("burst")]
    large = labelled[labelled.anomaly.str.startswith("large")]
    assert bursts.messages_in.min() > 20 * normal.messages_in.max()
    assert large.bytes_in.min() > 5 * normal.bytes_in.max()


def test_recording_normal_rows_hold_the_periodic_batches(recording):
    frame, sidecar = recording
    normal = frame[frame.is_anomaly == 0]
    p1 = f"{sidecar['config']['topic_prefix']}p1"
    messages = normal[f"messages_in:{p1}"] * normal.interval_s
    extra = messages - messages.median()
    batches = normal.timestamp[extra > 70]  # the 100 messages every 320 s / factor
    period = 320 / sidecar["config"]["factor"]
    assert len(batches) >= int(len(frame) * frame.interval_s.median() / period) - 1
    gaps = batches.diff().dropna()
    assert ((gaps - period).abs() < 3).all()
    assert extra[extra <= 70].abs().max() < 50  # otherwise the load is steady
