"""The rules service end to end on the real broker: a definition fires, the alert reaches the Slack
test server and the run history; bad and late messages reach dead_letter; definitions reload live."""

from __future__ import annotations

import textwrap

import orjson
import pytest
from helpers import as_settings, wait_until
from slack_server import VALID_TOKEN, SlackTestServer

from models.rules.run_history import RunHistory
from shared.kafka import end_offsets, ensure_topics, make_producer, read_topic
from shared.records.rules import RuleFiringRecord

pytestmark = pytest.mark.kafka

T0 = 1_699_999_980  # a whole minute, so windows are [T0 + 60k, T0 + 60(k+1))

LATENCY_RULE = """\
name: api-latency
description: checkout latency above 800 ms on average for 2 checks
environment: test
trigger_every: 1m
allowed_lateness: 10s
query:
  topic: {topic}
  group_by: service
filter:
  field: path
  regex: "^/api/"
conditions:
  - type: metric
    aggregation: average
    field: latency_ms
    operator: above
    value: 800
    times: 2
actions:
  - type: slack
    channel: "#api-oncall"
  - type: kafka
    topic: {firings}
  - type: log
    level: warning
"""

ERROR_RATIO_RULE = """\
name: api-errors
environment: [test]
trigger_every: 1m
allowed_lateness: 10s
query:
  topic: {topic}
  group_by: service
conditions:
  - type: ratio
    query: {{field: status, gte: 500}}
    operator: above
    percent: 40
"""


def send(settings, topic: str, records: list[dict | bytes]) -> None:
    producer = make_producer(settings)
    for r in records:
        producer.produce(topic, r if isinstance(r, bytes) else orjson.dumps(r), b"checkout")
    assert producer.flush(30) == 0


def event(minute: float, latency: float, status: int = 200, path: str = "/api/pay") -> dict:
    return {"timestamp": T0 + minute * 60, "service": "checkout", "path": path, "latency_ms": latency,
            "status": status}


def test_a_definition_fires_alerts_slack_records_history_and_reloads_live(pipeline_settings, services, tmp_path):
    run = pipeline_settings["topic_input"].rsplit("_", 1)[1]
    topic, firings = f"gateway_{run}", f"rule_firings_{run}"
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "api-latency.yaml").write_text(LATENCY_RULE.format(topic=topic, firings=firings))
    (rules_dir / "prod-only.yaml").write_text(
        LATENCY_RULE.format(topic=topic, firings=firings).replace("api-latency", "prod-only")
        .replace("environment: test", "environment: prod"))
    db_url = f"sqlite:///{tmp_path / 'history.db'}"
    with SlackTestServer() as slack:
        overrides = pipeline_settings | {
            "rules_dir": str(rules_dir), "rules_db_url": db_url, "rules_group": f"rules_{run}",
            "environment": "test", "rules_idle_partition_s": 30,
            "slack_bot_token": VALID_TOKEN, "slack_base_url": slack.base_url, "alert_cooldown_s": 0,
        }
        settings = as_settings(overrides)
        ensure_topics(settings, {topic: 1} | settings.topic_partitions())
        rules = services("rules", overrides)
        alerter = services("alerter", overrides)

        send(settings, topic, [
            event(0, 900), event(0, 1000), event(0, 5000, path="/health"),  # the filter drops /health
            b"this is not json",
            event(1, 850),
            event(2, 100),
            event(3, 100),  # watermark T0+180: windows 0 and 1 (end + 10 s lateness) are checked
        ])
        wait_until(lambda: any("Rule api-latency fired" in m["text"] for m in slack.messages), 90,
                   "the firing to reach Slack", [rules, alerter])
        send(settings, topic, [event(0, 2000)])  # window 0 was checked 110 s of event time ago: late

        posted = [m for m in slack.messages if "api-latency" in m["text"]]
        assert len(posted) == 1 and posted[0]["channel"] == "#api-oncall"
        assert "checkout" in posted[0]["text"] and "850" in posted[0]["text"]

        history = RunHistory(db_url)
        checks = sorted(history.recent("api-latency"), key=lambda c: c["window_start"])
        assert [(int(c["window_start"].timestamp()) - T0, c["status"]) for c in checks] == [(0, "ok"), (60, "fired")]
        assert checks[0]["values"]["average(latency_ms)"] == 950 and checks[0]["messages"] == 2
        assert checks[1]["conditions"][0]["detail"]["streak"] == 2
        assert {a["type"]: a["outcome"] for a in checks[1]["actions"]} == {
            "anomalies": "produced", "slack": "queued for the alerter", "kafka": "produced", "log": "logged"}
        assert history.definitions() == ["api-latency"]  # prod-only does not run in test

        (fired,) = read_topic(settings, firings, count=1, timeout=30)
        record = RuleFiringRecord.model_validate_json(fired.value())
        assert record.definition == "api-latency" and record.series == "checkout"
        assert record.channels == ["#api-oncall"] and record.window_end.timestamp() == T0 + 120

        def dead_letters():
            return {m.value(): dict(m.headers()) for m in read_topic(settings, settings.topic_dead_letter, idle=2)}

        wait_until(lambda: len(dead_letters()) >= 2, 60, "two dead letters", [rules])
        dead = dead_letters()
        assert b"Invalid JSON" in dead[b"this is not json"]["dlq.error"]
        assert dead[b"this is not json"]["dlq.service"] == b"rules"
        late = dead[orjson.dumps(event(0, 2000))]["dlq.error"].decode()
        assert "api-latency: late" in late and "allowed lateness 10s" in late

        # Live reload: a new definition starts, an invalid file is reported, the rest keeps running.
        (rules_dir / "api-errors.yaml").write_text(ERROR_RATIO_RULE.format(topic=topic))
        (rules_dir / "broken.yaml").write_text(ERROR_RATIO_RULE.format(topic=topic).replace("percent: 40", "percent: lots"))
        wait_until(lambda: "definition loaded" in rules.log and "api-errors" in rules.log, 30,
                   "the new definition to load", [rules])
        wait_until(lambda: "broken.yaml:" in rules.log, 30, "the invalid file to be reported", [rules])
        assert "conditions.0.percent" in rules.log
        send(settings, topic, [event(4, 100, 500), event(4, 100, 503), event(4, 100, 200), event(5, 100), event(6, 100)])
        wait_until(lambda: any(c["status"] == "fired" for c in history.recent("api-errors")), 60,
                   "api-errors to fire", [rules])
        (err_check,) = [c for c in history.recent("api-errors") if c["status"] == "fired"]
        assert int(err_check["window_start"].timestamp()) == T0 + 240
        assert err_check["values"]["ratio[0]"] == pytest.approx(200 / 3)
        history.close()
        assert VALID_TOKEN not in rules.log + alerter.log
    assert rules.stop() == 0 and alerter.stop() == 0


def test_restart_resumes_without_losing_or_repeating_checks(pipeline_settings, services, tmp_path):
    run = pipeline_settings["topic_input"].rsplit("_", 1)[1]
    topic = f"gateway_{run}"
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "api-latency.yaml").write_text(
        textwrap.dedent(LATENCY_RULE.format(topic=topic, firings=f"firings_{run}")).replace("times: 2", "times: 3"))
    db_url = f"sqlite:///{tmp_path / 'history.db'}"
    overrides = pipeline_settings | {"rules_dir": str(rules_dir), "rules_db_url": db_url,
                                     "rules_group": f"rules_{run}", "environment": "test"}
    settings = as_settings(overrides)
    ensure_topics(settings, {topic: 1} | settings.topic_partitions())
    history = RunHistory(db_url)

    rules = services("rules", overrides)
    send(settings, topic, [event(0, 900), event(1, 900), event(1.5, 950), event(2.1, 100)])
    wait_until(lambda: len(history.recent("api-latency")) == 1, 60, "the first check", [rules])
    # Window 1 holds two messages when the service is killed without warning.
    rules.proc.kill()
    rules.proc.wait()

    rules = services("rules", overrides)
    send(settings, topic, [event(2.5, 900), event(3, 900), event(4, 100)])
    wait_until(lambda: len(history.recent("api-latency")) == 3, 60, "three checks", [rules])
    checks = sorted(history.recent("api-latency"), key=lambda c: c["window_start"])
    # Window 1 was rebuilt from the re-read messages; the streak (state of window 0) was resumed.
    assert [c["messages"] for c in checks] == [1, 2, 2]
    assert [c["status"] for c in checks] == ["ok", "ok", "ok"]  # window 2 averages 500
    assert [c["conditions"][0]["detail"]["streak"] for c in checks] == [1, 2, 0]
    assert "dead-lettered" not in rules.log  # re-read messages of checked windows are not called late
    assert sum(end_offsets(settings, settings.topic_dead_letter).values()) == 0
    history.close()
    assert rules.stop() == 0
