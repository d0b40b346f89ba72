"""Labelled metrics (issue 17): {"metric", "labels", "timestamp", "value"} beside {"series", ...}; the
series identity is the metric and its sorted labels; top-level fields are labels only when a setting
says so; epoch milliseconds only when a setting says so; the detector and the rules service read a
message the same way (shared.records.metrics.MetricInput)."""

from __future__ import annotations

import pytest

from models.rules.definitions import parse_definition
from models.rules.engine import RuleEngine
from shared.config import Settings
from shared.records.metrics import (
    MetricInput,
    decode_metric,
    decode_metric_fields,
    decode_metrics,
    parse_timestamp,
    series_identity,
    series_labels,
)

MAX = 64 * 1024
T = 1_700_000_000  # 2023-11-14T22:13:20Z


def test_the_identity_is_the_metric_and_its_labels_sorted_whatever_their_order():
    a = decode_metric(b'{"metric": "cpu", "labels": {"region": "eu", "host": "a"}, "timestamp": 1700000000, '
                      b'"value": 1.5}', MAX)
    b = decode_metric(b'{"value": 1.5, "timestamp": "2023-11-14T22:13:20Z", "labels": {"host": "a", '
                      b'"region": "eu"}, "metric": "cpu"}', MAX)
    assert a.series == b.series == 'cpu{host="a",region="eu"}'
    assert a.timestamp == b.timestamp and a.value == 1.5
    # No labels: the metric alone, the same series as today's {"series": "cpu"}.
    assert decode_metric(b'{"metric": "cpu", "timestamp": 1, "value": 2}', MAX).series == "cpu"
    assert decode_metric(b'{"series": "cpu", "labels": {"h": "x"}, "timestamp": 1, "value": 2}', MAX).series \
        == 'cpu{h="x"}'


@pytest.mark.parametrize("labels", [{"host": "a"}, {"z": 'q"uote', "a": "back\\slash"}, {"k": "{x},y=\"z\""}])
def test_series_labels_reads_back_what_series_identity_wrote(labels):
    assert series_labels(series_identity("http_requests", labels)) == ("http_requests", labels)
    assert series_labels("ec2_cpu_utilization_24ae8d") == ("ec2_cpu_utilization_24ae8d", {})


def test_top_level_fields_are_labels_only_when_the_setting_names_them():
    payload = b'{"metric": "cpu", "host": "a", "timestamp": 1700000000, "value": 3.0}'
    with pytest.raises(ValueError, match="host: unknown field.*ANOMSTREAM_LABEL_FIELDS"):
        decode_metric(payload, MAX)
    fmt = MetricInput.of(Settings(label_fields=["host"]))
    assert decode_metric(payload, MAX, fmt=fmt).series == 'cpu{host="a"}'
    # Today's shape with a mapped field too.
    assert decode_metric(b'{"series": "cpu", "host": "a", "timestamp": 1, "value": 3}', MAX, fmt=fmt).series \
        == 'cpu{host="a"}'


@pytest.mark.parametrize("payload, reason", [
    (b'{"metric": "cpu", "labels": {"1x": "a"}, "timestamp": 1, "value": 1}', "label name is letters"),
    (b'{"metric": "cpu", "labels": {"value": "a"}, "timestamp": 1, "value": 1}', "reserved name"),
    (b'{"metric": "cpu", "labels": {"h": 1}, "timestamp": 1, "value": 1}', "labels.h: Input should be a valid string"),
    (b'{"metric": "cpu", "labels": {"h": "a\\nb"}, "timestamp": 1, "value": 1}', "labels.h"),
    (b'{"metric": "cpu", "labels": ["h"], "timestamp": 1, "value": 1}', "labels: must be an object"),
    (b'{"metric": "cpu", "series": "cpu", "timestamp": 1, "value": 1}', "not both"),
    (b'{"labels": {"h": "a"}, "timestamp": 1, "value": 1}', "has neither"),
    (b'{"metric": "cpu", "labels": {"h": "a"}, "value": 1}', "timestamp: Field required"),
    (b'{"metric": "cpu", "labels": {"h": "a"}, "timestamp": 1, "value": "1"}', "value"),
    (b'{"metric": "c{pu", "labels": {"h": "a"}, "timestamp": 1, "value": 1}', "cannot be part of a metric name"),
    (b'{"metric": "cpu", "labels": {"h": "a", "h": "b"}, "timestamp": 1, "value": 1}', "h: duplicate key"),
])
def test_a_bad_labelled_message_is_refused_with_a_reason(payload, reason):
    with pytest.raises(ValueError, match=reason):
        decode_metric(payload, MAX)
    batch = decode_metrics([payload, b'{"metric": "cpu", "timestamp": 1, "value": 1}'], MAX)
    assert batch.index == [1] and batch.errors[0][0] == 0 and reason.split(":")[0] in batch.errors[0][1]


def test_epoch_milliseconds_only_when_the_setting_says_so_in_both_shapes():
    plain = b'{"series": "cpu", "timestamp": 1700000000000, "value": 1}'
    labelled = b'{"metric": "cpu", "labels": {"h": "a"}, "timestamp": 1700000000000, "value": 1}'
    for payload in (plain, labelled):
        with pytest.raises(ValueError, match="ANOMSTREAM_TIMESTAMP_UNIT=milliseconds"):
            decode_metric(payload, MAX)
        ms = decode_metric(payload, MAX, fmt=MetricInput(timestamp_unit="milliseconds"))
        assert ms.timestamp.timestamp() == T
    # ISO 8601 reads the same in either unit; the rules' timestamp fields read as the metrics' do.
    assert parse_timestamp("2023-11-14T22:13:20Z", "milliseconds") == parse_timestamp(T) == T
    assert parse_timestamp(T * 1000) is None and parse_timestamp(T * 1000, "milliseconds") == T
    assert parse_timestamp(True) is None and parse_timestamp("yesterday") is None


def test_the_rules_engine_groups_labelled_metrics_by_a_label():
    """decode_metric_fields (what the rules service hands its engine on a metric topic) exposes each
    label as a field: a definition groups by `host` across metrics and regions."""
    defn = parse_definition("""
name: per-host
trigger_every: 60s
allowed_lateness: 0s
query:
  topic: metrics
  group_by: host
conditions:
  - {type: metric, aggregation: max, field: value, operator: above, value: 90}
""")
    engine = RuleEngine([defn], timestamp_unit="milliseconds")
    fmt = MetricInput(timestamp_unit="milliseconds")
    msgs = [(b'{"metric": "cpu", "labels": {"host": "a", "region": "eu"}, "timestamp": %d, "value": 95}', T),
            (b'{"metric": "cpu", "labels": {"host": "a", "region": "us"}, "timestamp": %d, "value": 10}', T + 1),
            (b'{"metric": "cpu", "labels": {"host": "b", "region": "eu"}, "timestamp": %d, "value": 50}', T + 2),
            (b'{"metric": "cpu", "labels": {"host": "b"}, "timestamp": %d, "value": 1}', T + 120)]  # closes it
    for offset, (payload, t) in enumerate(msgs):
        record = decode_metric_fields(payload % (t * 1000), MAX, fmt=fmt)
        assert parse_timestamp(record["timestamp"], "milliseconds") == t
        assert engine.add("metrics", 0, offset, record, now=0) == []
    checks = {c.group: c for c in engine.advance(0) if c.window_start == T // 60 * 60}
    assert set(checks) == {"a", "b"}
    assert checks["a"].fired and checks["a"].values["max(value)"] == 95
    assert not checks["b"].fired and checks["b"].values["count"] == 1


PER_HOST_RULE = """\
name: per-host-cpu
environment: test
trigger_every: 1m
allowed_lateness: 0s
query:
  topic: {topic}
  group_by: host
conditions:
  - {{type: metric, aggregation: max, field: value, operator: above, value: 90}}
"""


@pytest.mark.kafka
def test_labelled_metrics_are_scored_and_grouped_and_refused_alike_by_both_services(pipeline_settings, services,
                                                                                   tmp_path):
    import orjson
    from helpers import as_settings, wait_until

    from shared.kafka import ensure_topics, make_producer, read_topic

    run = pipeline_settings["topic_input"].rsplit("_", 1)[1]
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "per-host.yaml").write_text(PER_HOST_RULE.format(topic=pipeline_settings["topic_input"]))
    overrides = pipeline_settings | {
        "label_fields": ["host"], "rules_dir": str(rules_dir), "rules_db_url": f"sqlite:///{tmp_path / 'h.db'}",
        "rules_group": f"rules_{run}", "environment": "test", "rules_idle_partition_s": 5}
    settings = as_settings(overrides)
    ensure_topics(settings)
    detector = services("detector", overrides)
    rules = services("rules", overrides)
    producer = make_producer(settings)
    good = 0
    for minute in range(4):
        for host, value in (("a", 95.0 if minute == 1 else 20.0), ("b", 30.0)):
            producer.produce(settings.topic_input, orjson.dumps({
                "metric": "cpu", "labels": {"region": "eu"}, "host": host, "timestamp": T + 60 * minute,
                "value": value}), host.encode())
            good += 1
    bad = [b'{"metric": "cpu", "zone": "z1", "timestamp": 1700000000, "value": 1.0}',
           b'{"series": "cpu", "timestamp": 1700000000000, "value": 1.0}']
    for payload in bad:
        producer.produce(settings.topic_input, payload, b"a")
    assert producer.flush(30) == 0

    def dead_letters() -> dict[tuple[str, bytes], str]:
        out = {}
        for m in read_topic(settings, settings.topic_dead_letter, idle=1, timeout=30):
            headers = {k: v.decode() for k, v in m.headers()}
            out[(headers["dlq.service"], m.value())] = headers["dlq.error"]
        return out

    wait_until(lambda: len(read_topic(settings, settings.topic_scores, idle=1)) >= good
               and len(dead_letters()) >= 2 * len(bad), 180, "scores and dead letters", [detector, rules])
    series = {orjson.loads(m.value())["series"] for m in read_topic(settings, settings.topic_scores, idle=1)}
    assert series == {'cpu{host="a",region="eu"}', 'cpu{host="b",region="eu"}'}
    reasons = dead_letters()
    for payload in bad:  # the same reason from the detector and from the rules service
        assert reasons[("detector", payload)] == reasons[("rules", payload)], reasons
    assert "zone: unknown field" in reasons[("detector", bad[0])]
    assert "ANOMSTREAM_TIMESTAMP_UNIT" in reasons[("detector", bad[1])]

    def firings() -> list[dict]:
        return [r for r in (orjson.loads(m.value()) for m in read_topic(settings, settings.topic_anomalies, idle=1))
                if r.get("kind") == "rule"]

    wait_until(lambda: firings(), 120, "the per-host rule to fire", [rules])
    fired = firings()
    assert {r["series"] for r in fired} == {"a"} and fired[0]["values"]["max(value)"] == 95.0
