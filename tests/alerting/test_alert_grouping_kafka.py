"""The alerter service with grouping on the real broker and the local Slack server: killed while
its records wait in a group (not notified, not committed), and again after their group message
and before its commit, it posts them once in one group message; silenced series never reach
Slack; the series resolve once quiet, across the restart."""

from __future__ import annotations

import uuid

import pytest
from helpers import as_settings, wait_until
from slack_server import VALID_TOKEN, SlackTestServer
from test_alerter_once_kafka import PAUSED, T0, anomaly, log_events

from services.alerter.silences import Silence, write_silences
from shared.kafka import committed_offsets, end_offsets, ensure_topics, make_producer

pytestmark = pytest.mark.kafka


def resolved_series(messages: list[dict]) -> list[str]:
    return [line[2:] for m in messages for line in m["text"].split("\n") if line.startswith("• ")]


def test_grouped_alerts_survive_a_kill_are_posted_once_silenced_ones_never_and_resolve(kafka_bootstrap, services,
                                                                                       tmp_path):
    run = uuid.uuid4().hex[:8]
    silences = tmp_path / "silences.yaml"
    write_silences(silences, [Silence("hosts", ['series=~"host-.*"'], T0, 4e9, comment="maintenance")])
    with SlackTestServer() as server:
        overrides = {"bootstrap_servers": kafka_bootstrap, "topic_anomalies": f"anomalies_{run}",
                     "topic_dead_letter": f"dead_letter_{run}", "alerter_group": f"alerter_{run}",
                     "poll_timeout_s": "0.1", "slack_bot_token": VALID_TOKEN, "slack_base_url": server.base_url,
                     "alert_grouping": True, "alert_group_wait_s": 600, "alert_group_interval_s": 2,
                     "alert_resolve_timeout_s": 6, "alert_silences_file": str(silences), "alert_chart_points": 0,
                     "home": str(tmp_path / "home")}
        settings = as_settings(overrides)
        ensure_topics(settings)
        producer = make_producer(settings)
        series = ["cpu-1", "cpu-2", "cpu-3", "host-1", "host-2"]
        for s in series:
            producer.produce(settings.topic_anomalies, anomaly(s), s.encode())
        assert producer.flush(30) == 0
        end = end_offsets(settings, settings.topic_anomalies)
        assert sum(end.values()) == 5

        def committed() -> dict[int, int]:
            return committed_offsets(settings, settings.alerter_group, settings.topic_anomalies, end)

        # group_wait 600 s: the three read, grouped, held; then killed (SIGKILL) before the notification.
        alerter = services("alerter", overrides)
        wait_until(lambda: len(log_events(alerter.log, "alert grouped")) == 3, 90, "three alerts grouped", [alerter])
        assert len(log_events(alerter.log, "alert silenced")) == 2
        alerter.proc.kill()
        alerter.proc.wait()
        assert server.messages == []
        assert committed() != end  # not committed past a record still in its group
        # group_wait 1 s: notified; killed after the notification and its markers, before the commit.
        alerter = services("alerter", overrides | {"alert_group_wait_s": 1, "fault_pause_after_post_s": 300})
        wait_until(lambda: log_events(alerter.log, PAUSED), 90, "the group notification", [alerter])
        assert len(server.messages) == 1 and committed() != end
        alerter.proc.kill()
        alerter.proc.wait()
        # Read again: not posted again (sent markers), still firing (firing markers), resolved in time.
        alerter = services("alerter", overrides | {"alert_group_wait_s": 1})
        wait_until(lambda: committed() == end, 90, "every anomaly handled after the restart", [alerter])
        assert len(log_events(alerter.log, "already posted before a restart; skipped")) == 3
        (firing,) = server.messages
        assert firing["text"].startswith(":rotating_light: [FIRING:3] kind=metric definition=ec2_cpu\n")
        assert all(f"Anomaly in cpu-{i}" in firing["text"] for i in (1, 2, 3)) and "host-" not in firing["text"]
        # Each series resolves 6 s after its last anomaly; read a few ms apart, they may resolve at
        # different ticks, so one or more [RESOLVED] messages: each series in exactly one.
        wait_until(lambda: len(resolved_series(server.messages[1:])) == 3, 60, "the resolved notices", [alerter])
        assert alerter.stop() == 0
    notices = server.messages[1:]
    assert all(m["text"].startswith(":white_check_mark: [RESOLVED:") for m in notices)
    assert sorted(resolved_series(notices)) == ["cpu-1", "cpu-2", "cpu-3"]  # each once
    (stopped,) = log_events(alerter.log, "stream loop stopped")
    # Silenced again if read again (a partition held back by a grouped record): never posted.
    assert set(stopped.get("silenced_by", {})) <= {"hosts"}
    assert stopped["posted"] == len(notices) and stopped["resolved"] == 3 and stopped["already_posted"] == 3
