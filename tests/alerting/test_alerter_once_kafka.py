"""The alerter service on the real broker and the local Slack server, killed (SIGKILL) between a
Slack post and its commit and started again: every anomaly reaches Slack, and exactly once; the
cooldown outlives a restart, however the service stopped."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

import pytest
from helpers import as_settings, wait_until
from slack_server import VALID_TOKEN, SlackTestServer

from shared.changelog import changelog_topic, restore
from shared.kafka import committed_offsets, end_offsets, ensure_topics, make_producer
from shared.records.metrics import ScoreRecord

pytestmark = pytest.mark.kafka

T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc).timestamp()
PAUSED = "fault injection: paused after a post, before its commit"


def anomaly(series: str, ts: float = T0) -> bytes:
    return ScoreRecord.model_validate({
        "series": series, "timestamp": datetime.fromtimestamp(ts, timezone.utc).isoformat(), "value": 97.25,
        "is_anomaly": True, "if_anomaly": True, "lstm_anomaly": False, "reconstruction_error": 0.125,
        "if_score": 0.625, "model_version": "ec2_cpu-test", "source_topic": "input_data", "source_partition": 0,
        "source_offset": 0, "source_timestamp_ms": 0, "detected_at": "2024-05-06T07:08:10Z",
    }).model_dump_json().encode()


def posted_series(server: SlackTestServer) -> Counter:
    """Series name -> how many times Slack accepted its alert ("... Anomaly in <series> at ...")."""
    return Counter(m["text"].split("Anomaly in ", 1)[1].split(" at ", 1)[0] for m in server.messages)


def log_events(log: str, event: str) -> list[dict]:
    return [r for r in (json.loads(line) for line in log.splitlines() if line.startswith("{"))
            if r.get("event") == event]


class Anomalies:
    def __init__(self, overrides: dict):
        self.settings = as_settings(overrides)
        ensure_topics(self.settings)
        self.producer = make_producer(self.settings)

    def send(self, *alerts: tuple[str, float]) -> dict[int, int]:
        for series, ts in alerts:
            self.producer.produce(self.settings.topic_anomalies, anomaly(series, ts), series.encode())
        assert self.producer.flush(30) == 0
        return end_offsets(self.settings, self.settings.topic_anomalies)

    def committed(self, end: dict[int, int]) -> dict[int, int]:
        return committed_offsets(self.settings, self.settings.alerter_group, self.settings.topic_anomalies, end)


def test_killed_between_each_post_and_its_commit_every_anomaly_reaches_slack_exactly_once(pipeline_settings,
                                                                                          services):
    with SlackTestServer() as server:
        overrides = pipeline_settings | {"alert_cooldown_s": 0, "alert_grouping": False, "slack_bot_token": VALID_TOKEN,
                                         "slack_base_url": server.base_url}
        topic = Anomalies(overrides)
        series = [f"cpu-{i}" for i in range(8)]
        end = topic.send(*[(s, T0) for s in series])
        assert sum(end.values()) == 8 and len([p for p in end.values() if p]) >= 2  # spread over partitions
        kills, in_hand, skipped = 3, [], []

        def skips(log: str) -> list[tuple[int, int]]:
            return [(e["partition"], e["offset"]) for e in log_events(log, "already posted before a restart; skipped")]

        for kill in range(kills):
            alerter = services("alerter", overrides | {"fault_pause_after_post_s": 300})
            wait_until(lambda: log_events(alerter.log, PAUSED), 90, f"a post, before the kill {kill + 1}", [alerter])
            (paused,) = log_events(alerter.log, PAUSED)
            # Slack has it, its offset is not committed: the kill falls between the post and the commit.
            assert len(server.messages) == kill + 1 and set(posted_series(server).values()) == {1}
            assert topic.committed(end)[paused["partition"]] == paused["offset"]
            alerter.proc.kill()
            alerter.proc.wait()
            in_hand.append((paused["partition"], paused["offset"]))
            skipped += skips(alerter.log)
        alerter = services("alerter", overrides)
        wait_until(lambda: topic.committed(end) == end, 120, "every anomaly handled after the last restart", [alerter])
        assert in_hand[-1] in skips(alerter.log)  # only this run comes after the last kill
        assert alerter.stop() == 0
    # Each record in hand at a kill was read again and skipped, once: in the next run, or a later one
    # when the next run took another partition's record first (the order partitions are read in varies).
    assert sorted(skipped + skips(alerter.log)) == sorted(in_hand)
    assert posted_series(server) == {s: 1 for s in series}  # none twice, none lost
    (stopped,) = log_events(alerter.log, "stream loop stopped")
    assert stopped["posted"] == len(series) - kills and stopped["already_posted"] >= 1


@pytest.mark.parametrize("how", ["stopped", "killed after the post"])
def test_the_cooldown_outlives_a_restart(pipeline_settings, services, how):
    with SlackTestServer() as server:
        overrides = pipeline_settings | {"alert_cooldown_s": 3600, "alert_grouping": False, "slack_bot_token": VALID_TOKEN,
                                         "slack_base_url": server.base_url}
        topic = Anomalies(overrides)
        end = topic.send(("cpu-a", T0))
        if how == "stopped":
            alerter = services("alerter", overrides)
            wait_until(lambda: topic.committed(end) == end, 90, "the first alert handled", [alerter])
            assert alerter.stop() == 0
        else:  # its cooldown not written yet: it is set again from the record, read again and skipped
            alerter = services("alerter", overrides | {"fault_pause_after_post_s": 300})
            wait_until(lambda: log_events(alerter.log, PAUSED), 90, "the first alert posted", [alerter])
            alerter.proc.kill()
            alerter.proc.wait()
        assert posted_series(server) == {"cpu-a": 1}
        end = topic.send(("cpu-a", T0 + 60), ("cpu-b", T0 + 60))  # a repeat within the cooldown, another series
        alerter = services("alerter", overrides)
        wait_until(lambda: topic.committed(end) == end, 90, "both alerts handled after the restart", [alerter])
        assert alerter.stop() == 0
    assert posted_series(server) == {"cpu-a": 1, "cpu-b": 1}
    (stopped,) = log_events(alerter.log, "stream loop stopped")
    assert stopped["suppressed"] == 1 and stopped["suppressed_by_series"] == {"cpu-a": 1}
    # The cooldowns, on the changelog, in the partition of the record that set each.
    settings = topic.settings
    name = changelog_topic(settings, "alerter", settings.topic_anomalies)
    state = restore(settings, name, list(end))
    cooldowns = {k: (p, float(v)) for p, entries in state.items() for k, v in entries.items()
                 if k.startswith(b"cooldown:")}
    assert {k: t for k, (_, t) in cooldowns.items()} == {b"cooldown:cpu-a": T0, b"cooldown:cpu-b": T0 + 60}
