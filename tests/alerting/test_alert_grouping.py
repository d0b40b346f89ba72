"""Alertmanager-like grouping in the alerter, on a fake clock: group_wait, group_interval,
resolve_timeout (services.alerter.grouping), then the alerter itself on the local Slack server
(real slack-sdk): one message per group notification, silences, routes, the resolved notice, the
chart in the message's thread, and once-only posting of grouped records across a restart."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from confluent_kafka import TopicPartition
from helpers import FakeMsg
from slack_server import VALID_TOKEN, SlackTestServer
from test_alerter_slack import LoopedAlerter, closed_port, record, rule_payload

from services.alerter.grouping import Alert, Grouper
from services.alerter.silences import Silence, write_silences
from services.alerter.state import MemoryStore
from shared.config import Settings

T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc).timestamp()
PNG = b"\x89PNG\r\n\x1a\n"


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def alert(series: str, kind: str = "metric", definition: str = "ec2_cpu", ref=None) -> Alert:
    labels = {"series": series, "kind": kind, "definition": definition}
    return Alert(f"{kind}:{series}", labels, f"Anomaly in {series}", ref=ref)


def test_group_wait_then_group_interval_then_resolve_timeout():
    clock = Clock(0)
    g = Grouper(["kind", "definition"], group_wait=30, group_interval=300, resolve_timeout=600, clock=clock)
    g.add("#a", alert("cpu-1"))
    clock.t = 10
    g.add("#a", alert("cpu-2"))
    g.add("#a", alert("db-1", definition="rds"))  # another group
    g.add("#b", alert("cpu-3"))  # another channel: another group
    assert len(g.groups) == 3
    clock.t = 29.9
    assert g.due() == []  # group_wait: 30 s from each group's first alert
    clock.t = 30
    (first,) = g.due()
    assert first.key == ("#a", "metric", "ec2_cpu") and [a.labels["series"] for a in first.pending] == ["cpu-1", "cpu-2"]
    g.notified(first, list(first.pending), [])
    clock.t = 40
    assert {grp.key for grp in g.due()} == {("#a", "metric", "rds"), ("#b", "metric", "ec2_cpu")}
    g.add("#a", alert("cpu-4"))
    clock.t = 329.9
    assert all(grp is not first for grp in g.due())  # group_interval after its last notification
    clock.t = 330
    assert any(grp is first for grp in g.due()) and [a.labels["series"] for a in first.pending] == ["cpu-4"]
    g.notified(first, list(first.pending), [])
    assert first.firing.keys() == {"metric:cpu-1", "metric:cpu-2", "metric:cpu-4"}
    clock.t = 610  # cpu-1 (last at 0) and cpu-2 (last at 10) quiet for 600 s: resolved ...
    assert all(grp is not first for grp in g.due())
    assert sorted(a.labels["series"] for a in first.resolved) == ["cpu-1", "cpu-2"]
    clock.t = 630  # ... and notified with the group's next notification, 300 s after the last one
    (due,) = [grp for grp in g.due() if grp is first]
    assert sorted(a.labels["series"] for a in due.resolved) == ["cpu-1", "cpu-2"] and due.pending == []
    g.notified(due, [], list(due.resolved))
    clock.t = 929.9
    assert all(grp is not first for grp in g.due())  # cpu-4 (last at 40) resolved at 640
    clock.t = 930
    assert any(grp is first for grp in g.due()) and [a.labels["series"] for a in first.resolved] == ["cpu-4"]
    g.notified(first, [], list(first.resolved))
    assert first.key not in g.groups  # nothing firing, nothing to say: forgotten
    g.add("#a", alert("cpu-1"))  # fires again: a new group, group_wait again
    clock.t = 959.9
    assert all(grp.key != first.key for grp in g.due())
    clock.t = 960
    assert any(grp.key == first.key for grp in g.due())


def test_a_series_firing_again_before_its_resolved_notice_is_not_resolved():
    clock = Clock(0)
    g = Grouper(["kind"], group_wait=0, group_interval=100, resolve_timeout=50, clock=clock)
    g.add(None, alert("cpu-1"))
    (grp,) = g.due()
    g.notified(grp, list(grp.pending), [])
    clock.t = 60
    assert g.due() == [] and [a.labels["series"] for a in grp.resolved] == ["cpu-1"]  # interval not over
    g.add(None, alert("cpu-1"))
    assert grp.resolved == []  # fired again: the notice is dropped
    clock.t = 100
    assert [a.labels["series"] for a in g.due()[0].pending] == ["cpu-1"]


def test_revoked_partitions_take_their_pending_alerts_and_series_along():
    g = Grouper(["kind"], 30, 300, 600, Clock(0))
    g.add("#a", alert("cpu-1", ref=(0, 5)))
    g.add("#a", alert("cpu-2", ref=(1, 7)))
    g.drop({0})
    (grp,) = g.groups.values()
    assert [a.ref for a in grp.pending] == [(1, 7)] and set(grp.firing) == {"metric:cpu-2"}


# --- the alerter, grouping, on the local Slack server

def payload(series: str, ts: float = T0, value: float = 97.25, model: str = "ec2_cpu") -> bytes:
    return json.dumps(record(series=series, ts=ts, value=value,
                             model_version=f"{model}-20240101T000000-abcdef12")).encode()


def make(store=None, clock=None, **overrides) -> LoopedAlerter:
    settings = Settings(bootstrap_servers=f"127.0.0.1:{closed_port()}", topic_anomalies="anomalies",
                        **({"alert_grouping": True, "alert_group_wait_s": 30, "alert_group_interval_s": 300,
                            "alert_resolve_timeout_s": 600} | overrides))
    a = LoopedAlerter(settings, store)
    if clock is not None:
        for part in (a.processor, a.processor.grouper, a.processor.silencer):
            part.clock = clock
    return a


def msg(series: str, offset: int, partition: int = 0, **kw) -> FakeMsg:
    return FakeMsg(payload(series, **kw), topic="anomalies", partition=partition, offset=offset)


def tick(a: LoopedAlerter) -> None:
    a.processor.flushed_at = float("-inf")  # the groups are looked over at most every FLUSH_EVERY_S of real time
    a.loop.handle([], 0.0)  # what the stream loop does when no message came (ticks_when_idle)


def committed(a: LoopedAlerter) -> dict[int, int]:
    out: dict[int, int] = {}
    for batch in a.loop.consumer.commits + a.producer.commits:
        for _, p, o in batch:
            out[p] = max(out.get(p, 0), o)
    return out


@pytest.fixture
def server():
    with SlackTestServer() as s:
        yield s


def test_one_message_per_group_notification_and_held_commits(server, tmp_path):
    clock = Clock()
    a = make(clock=clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)
    assert a.processor.ticks_when_idle
    assert not a.handle(msg("cpu-1", 0, ts=T0))  # held: not committed before its group's notification
    clock.t += 5
    assert not a.handle(msg("cpu-2", 1, ts=T0 + 60, value=12.5))
    assert not a.handle(msg("cpu-1", 2, ts=T0 + 120))
    assert not a.handle(msg("db-1", 3, model="rds"))  # another group (definition rds)
    clock.t += 24.9
    tick(a)
    assert server.messages == [] and committed(a).get(0, 0) == 0  # nothing past the first held record
    clock.t += 0.1  # 30 s after the first
    tick(a)
    assert len(server.messages) == 1 and committed(a) == {0: 3}  # db-1 (offset 3) still held
    clock.t += 5  # db-1's group came 5 s later
    tick(a)
    (grouped, lone) = server.messages
    assert grouped["text"].startswith(":rotating_light: [FIRING:2] kind=metric definition=ec2_cpu\n")
    lines = grouped["text"].split("\n")[1:]
    assert len(lines) == 2 and lines[0].startswith("• Anomaly in cpu-1 at 2024-05-06 07:10:09 UTC") \
        and lines[0].endswith("(×2)") and "value 12.5" in lines[1]
    assert lone["text"].startswith(":rotating_light: Anomaly in db-1 at")  # alone: its own message
    assert committed(a) == {0: 4} and a.processor.held == {}
    assert a.stats["posted"] == 2 and a.stats["grouped"] == 4
    # The chart: a PNG of cpu-1's points, in the thread of the grouped message.
    assert len(server.files) == 2
    png = server.files[0]
    assert png["data"].startswith(PNG) and len(png["data"]) == png["length"] and png["channel_id"] == "C0TEST"
    assert [f["thread_ts"] for f in server.files] == server.message_ts  # each in its message's thread
    assert a.stats["charts"] == 2


def test_group_interval_bounds_later_notifications_and_the_resolved_notice_comes_once(server, tmp_path):
    clock = Clock()
    a = make(clock=clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_chart_points=0)
    a.handle(msg("cpu-1", 0))
    a.handle(msg("cpu-2", 1))
    clock.t += 30
    tick(a)
    assert len(server.messages) == 1
    clock.t += 10
    a.handle(msg("cpu-3", 2))
    clock.t += 200
    tick(a)
    assert len(server.messages) == 1 and committed(a) == {0: 2}  # cpu-3 held until group_interval is over
    clock.t += 90  # 300 s after the first notification
    tick(a)
    assert len(server.messages) == 2 and server.messages[1]["text"].startswith(":rotating_light: Anomaly in cpu-3")
    assert committed(a) == {0: 3}
    clock.t += 270  # cpu-1 and cpu-2 quiet for 600 s; the group notified 270 s ago
    tick(a)
    assert len(server.messages) == 2
    clock.t += 30
    tick(a)
    resolved = server.messages[2]["text"]
    assert resolved.startswith(":white_check_mark: [RESOLVED:2] kind=metric definition=ec2_cpu")
    assert "• cpu-1" in resolved and "• cpu-2" in resolved and "cpu-3" not in resolved
    clock.t += 300
    tick(a)
    assert "• cpu-3" in server.messages[3]["text"] and server.messages[3]["text"].startswith(
        ":white_check_mark: [RESOLVED:1]")
    clock.t += 3600
    tick(a)
    assert len(server.messages) == 4 and a.processor.grouper.groups == {}  # once, then forgotten
    assert a.stats["resolved"] == 3


def test_a_group_lists_at_most_max_listed_series(server, tmp_path):
    clock = Clock()
    a = make(clock=clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_group_max_listed=3, alert_chart_points=0)
    for i in range(7):
        a.handle(msg(f"cpu-{i}", i))
    clock.t += 30
    tick(a)
    (m,) = server.messages
    assert m["text"].startswith(":rotating_light: [FIRING:7]") and m["text"].endswith("… and 4 more")
    assert m["text"].count("• ") == 3 and committed(a) == {0: 7}


def test_silenced_anomalies_are_counted_not_posted(server, tmp_path):
    clock = Clock()
    path = tmp_path / "silences.yaml"
    write_silences(path, [Silence("quiet-hosts", ['series=~"host-.*"', "kind=metric"], clock.t - 1, clock.t + 3600)])
    a = make(clock=clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_silences_file=path, alert_chart_points=0)
    a.processor.refresh()
    assert a.handle(msg("host-1", 0))  # silenced: done with (committed) at once
    assert a.handle(msg("host-2", 1))
    assert not a.handle(msg("db-1", 2))
    clock.t += 30
    tick(a)
    assert [m["text"].split(" at ")[0] for m in server.messages] == [":rotating_light: Anomaly in db-1"]
    assert a.stats["silenced"] == 2 and a.processor.silenced == {"quiet-hosts": 2}
    clock.t += 3600  # expired
    a.handle(msg("host-1", 3))
    clock.t += 300
    tick(a)
    last = server.messages[-1]["text"]  # host-1 firing, and db-1 (quiet for 600 s by now) resolved
    assert last.startswith(":rotating_light: [FIRING:1, RESOLVED:1]") and "• Anomaly in host-1" in last
    assert last.endswith("Resolved (no anomaly for 600 s):\n• db-1")


def test_routes_pick_each_groups_channel(server, tmp_path):
    clock = Clock()
    routes = [{"match": {"definition": "rds"}, "channel": "#db"}, {"matchers": ['series=~"web-.*"'], "channel": "#web"}]
    a = make(clock=clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_routes=routes, slack_channel="#default", alert_chart_points=0)
    for i, (series, model) in enumerate([("db-1", "rds"), ("web-1", "ec2_cpu"), ("web-2", "ec2_cpu"),
                                         ("cpu-9", "ec2_cpu")]):
        a.handle(msg(series, i, model=model))
    clock.t += 30
    tick(a)
    by_channel = {m["channel"]: m["text"] for m in server.messages}
    assert set(by_channel) == {"#db", "#web", "#default"}
    assert "db-1" in by_channel["#db"] and "[FIRING:2]" in by_channel["#web"] and "cpu-9" in by_channel["#default"]


def test_without_grouping_routes_and_silences_apply_too(server, tmp_path):
    path = tmp_path / "silences.json"
    write_silences(path, [Silence("s", ["series=cpu-2"], 0, 4e9)])
    a = make(home=tmp_path, alert_grouping=False, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_routes=[{"match": {"kind": "metric"}, "channel": "#metrics"}], alert_silences_file=path,
             alert_cooldown_s=0)
    a.processor.refresh()
    assert a.handle(msg("cpu-1", 0)) and a.handle(msg("cpu-2", 1))  # posted at once, committed at once
    assert [(m["channel"], m["text"].split(" at ")[0]) for m in server.messages] == [
        ("#metrics", ":rotating_light: Anomaly in cpu-1")]
    assert a.stats["silenced"] == 1
    (png,) = server.files  # the chart, in the message's thread
    assert png["data"].startswith(PNG) and png["thread_ts"]


def test_a_webhook_warns_that_it_ignores_route_and_rule_channels(server, tmp_path, capsys):
    a = make(home=tmp_path, alert_grouping=False, alert_cooldown_s=0, slack_webhook_url=server.webhook_url,
             alert_routes=[{"match": {"kind": "rule"}, "channel": "#rules"}])
    capsys.readouterr()
    a.processor.warn_webhook_channels()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    (warning,) = [x for x in lines if x.get("level") == "warning"]
    assert "ignored" in warning["event"] and warning["routes"] == ["#rules"]
    for offset in range(2):  # a rule's own channels: said once per definition, then posted to the webhook
        assert a.handle(FakeMsg(rule_payload(channels=["#ops"]), topic="anomalies", offset=offset))
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    (warning,) = [x for x in lines if x.get("level") == "warning"]
    assert warning["definition"] == "cpu-high" and warning["channels"] == ["#ops"] and "ignored" in warning["event"]
    assert len(server.messages) == 2 and "channel" not in server.messages[0]
    b = make(home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_routes=[{"match": {"kind": "rule"}, "channel": "#rules"}])
    capsys.readouterr()
    b.processor.warn_webhook_channels()
    assert "ignored" not in capsys.readouterr().err


def test_grouped_records_are_posted_once_across_restarts(server, tmp_path):
    store = MemoryStore()
    clock = Clock()
    settings = dict(home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url, alert_chart_points=0)
    a = make(store, clock, **settings)
    a.handle(msg("cpu-1", 0))
    a.handle(msg("cpu-2", 1))
    # Crash before the notification: nothing posted, nothing committed; the records are read again.
    b = make(store, clock, **settings)
    b.handle(msg("cpu-1", 0))
    b.handle(msg("cpu-2", 1))
    b.handle(msg("cpu-3", 2))
    clock.t += 30
    tick(b)
    assert len(server.messages) == 1 and "[FIRING:3]" in server.messages[0]["text"]
    assert {k for k in store.partitions[0] if k.startswith(b"sent:")} == {b"sent:0", b"sent:1", b"sent:2"}
    assert json.loads(store.partitions[0][b"sent:2"]) == ["#alerts"]
    # Crash after the notification, before its commit: read again, not posted again.
    c = make(store, clock, **settings)
    for i in range(3):
        assert c.handle(msg(f"cpu-{i + 1}", i))  # done with at once
    assert c.stats["already_posted"] == 3
    c.handle(msg("cpu-4", 3))
    clock.t += 300
    tick(c)
    assert len(server.messages) == 2 and server.messages[1]["text"].startswith(":rotating_light: Anomaly in cpu-4")
    # The markers below the committed offset are deleted with the next notification's.
    assert {k for k in store.partitions[0] if k.startswith(b"sent:")} == {b"sent:3"}


class AlertmanagerStub:
    """A tiny local Alertmanager: records what POST /api/v2/alerts receives."""

    def __init__(self):
        self.received: list[list[dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = self.path == "/api/v2/alerts" and self.headers.get("Content-Type") == "application/json"
                if ok:
                    stub.received.append(json.loads(body))
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_alerts_are_forwarded_to_an_alertmanager_firing_then_resolved(tmp_path):
    am, clock = AlertmanagerStub(), Clock()
    try:
        a = make(clock=clock, home=tmp_path, alertmanager_url=am.url, alert_group_wait_s=0,
                 alert_resolve_timeout_s=60)
        a.handle(msg("cpu-1", 0))
        tick(a)
        ((firing,),) = am.received
        assert firing["labels"] == {"alertname": "anomstream_metric", "series": "cpu-1", "kind": "metric",
                                    "definition": "ec2_cpu"}
        assert firing["startsAt"] == "2024-05-06T07:08:09+00:00" and "Anomaly in cpu-1" in firing["annotations"]["summary"]
        assert "endsAt" not in firing
        clock.t += 400  # quiet for the resolve timeout, and the group interval is over
        tick(a)
        ((resolved,),) = am.received[1:]
        assert resolved["labels"] == firing["labels"] and resolved["endsAt"].startswith(
            datetime.fromtimestamp(clock.t, timezone.utc).strftime("%Y-%m-%dT%H:%M"))
        assert a.stats["alertmanager_sent"] == 2 and a.stats["logged"] == 2  # no Slack: logged
    finally:
        am.close()
    a.handle(msg("cpu-2", 1))  # Alertmanager gone: counted and logged, the alert goes on
    assert a.stats["alertmanager_failed"] == 1


def test_a_chart_that_cannot_be_uploaded_does_not_hold_the_alert(server, tmp_path, monkeypatch):
    a = make(home=tmp_path, alert_grouping=False, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)

    def refused(*args, **kwargs):
        raise RuntimeError("upload refused")

    monkeypatch.setattr(a.slack, "upload_png", refused)
    assert a.handle(msg("cpu-1", 0))  # posted and committed all the same
    assert len(server.messages) == 1 and server.files == []
    assert a.stats["charts_failed"] == 1 and a.stats["posted"] == 1
    monkeypatch.undo()
    assert a.handle(msg("cpu-1", 1, ts=T0 + 600))
    (png,) = server.files  # the ring holds both points of cpu-1; the chart goes under the second message
    assert png["thread_ts"] == server.message_ts[1] and len(a.recent.of("cpu-1")) == 2


def test_a_series_firing_before_a_restart_is_resolved_after_it(server, tmp_path):
    store, clock = MemoryStore(), Clock()
    settings = dict(home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url, alert_chart_points=0)
    a = make(store, clock, **settings)
    a.handle(msg("cpu-1", 0))
    seen = clock.t
    clock.t += 30
    tick(a)
    firing = {k: json.loads(v) for k, v in store.partitions[0].items() if k.startswith(b"firing:")}
    assert firing == {b'firing:["#alerts", "metric:cpu-1"]': {
        "seen": seen, "labels": {"series": "cpu-1", "kind": "metric", "definition": "ec2_cpu"}}}
    clock.t += 100
    b = make(store, clock, **settings)  # restarted: cpu-1 is not read again (committed), yet still firing
    b.processor.on_assign([TopicPartition("anomalies", 0)])
    clock.t = seen + 599
    tick(b)
    assert len(server.messages) == 1  # not quiet for resolve_timeout yet, counted from its anomaly
    clock.t = seen + 600 + 30  # resolved; a group restored after a restart waits group_wait
    tick(b)
    assert server.messages[1]["text"] == (":white_check_mark: [RESOLVED:1] kind=metric definition=ec2_cpu\n"
                                          "Resolved (no anomaly for 600 s):\n• cpu-1")
    assert not any(k.startswith(b"firing:") for k in store.partitions[0])  # deleted with the notice
    c = make(store, clock, **settings)
    c.processor.on_assign([TopicPartition("anomalies", 0)])
    clock.t += 3600
    tick(c)
    assert len(server.messages) == 2  # resolved once


def test_without_a_resolve_timeout_no_firing_state_is_kept(server, tmp_path):
    store, clock = MemoryStore(), Clock()
    a = make(store, clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_chart_points=0, alert_resolve_timeout_s=0)
    a.handle(msg("cpu-1", 0))
    clock.t += 30
    tick(a)
    clock.t += 10 ** 6
    tick(a)
    assert len(server.messages) == 1 and not any(k.startswith(b"firing:") for k in store.partitions[0])


def test_a_rule_firing_for_two_channels_is_held_until_both_groups_notified_it(tmp_path, monkeypatch):
    store, clock = MemoryStore(), Clock()
    with SlackTestServer() as server:
        settings = dict(home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)
        a = make(store, clock, **settings)
        real_post = a.slack.post

        def post(text, blocks, channel=None):
            if channel == "#b":
                a.stopping = True  # Slack fails for #b and the service is told to stop meanwhile
                raise RuntimeError("slack is down")
            return real_post(text, blocks, channel)

        monkeypatch.setattr(a.slack, "post", post)
        monkeypatch.setattr("services.alerter.service.time.sleep", lambda s: None)
        rule = FakeMsg(rule_payload(channels=["#a", "#b"]), topic="anomalies", offset=0)
        assert not a.handle(rule)
        clock.t += 30
        tick(a)
        assert [m["channel"] for m in server.messages] == ["#a"]
        assert json.loads(store.partitions[0][b"sent:0"]) == ["#a"] and committed(a).get(0, 0) == 0
        monkeypatch.undo()
        b = make(store, clock, **settings)  # started again: read again, only #b's group still owes it
        assert not b.handle(rule)
        clock.t += 30
        tick(b)
        assert [m["channel"] for m in server.messages] == ["#a", "#b"]
        assert json.loads(store.partitions[0][b"sent:0"]) == ["#a", "#b"] and committed(b) == {0: 1}
        assert server.messages[1]["text"].startswith(":rotating_light: Rule cpu-high fired")  # alone: its own text


def test_a_firing_series_silenced_is_not_resolved_while_its_anomalies_go_on(server, tmp_path):
    clock = Clock()
    path = tmp_path / "silences.yaml"
    a = make(clock=clock, home=tmp_path, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
             alert_silences_file=path, alert_chart_points=0)
    a.handle(msg("cpu-1", 0))
    clock.t += 30
    tick(a)
    write_silences(path, [Silence("s", ["series=cpu-1"], clock.t, clock.t + 86400)])
    a.processor.refresh()
    for i in range(1, 5):  # an anomaly every 5 minutes, silenced, for 20 minutes
        clock.t += 300
        a.handle(msg("cpu-1", i))
        tick(a)
    assert len(server.messages) == 1 and a.stats["silenced"] == 4  # no resolved notice meanwhile
    clock.t += 600  # then quiet for the resolve timeout
    tick(a)
    assert server.messages[1]["text"].startswith(":white_check_mark: [RESOLVED:1]")


def test_without_a_resolve_timeout_a_quiet_group_is_forgotten_after_its_interval():
    clock = Clock(0)
    g = Grouper(["series"], group_wait=0, group_interval=60, resolve_timeout=0, clock=clock)
    for i in range(1000):
        g.add(None, alert(f"cpu-{i}"))
    for grp in g.due():
        g.notified(grp, list(grp.pending), [])
    g.add(None, alert("cpu-1"))
    clock.t = 59
    assert g.due() == [] and len(g.groups) == 1000  # group_interval still holds cpu-1's next notification
    clock.t = 60
    assert [grp.key for grp in g.due()] == [(None, "cpu-1")] and len(g.groups) == 1  # the quiet ones are gone


def test_a_group_with_too_many_new_alerts_is_notified_at_once(monkeypatch):
    monkeypatch.setattr("services.alerter.grouping.MAX_PENDING", 5)
    clock = Clock(0)
    g = Grouper(["kind"], group_wait=30, group_interval=300, resolve_timeout=600, clock=clock)
    for i in range(4):
        g.add(None, alert(f"cpu-{i}"))
    assert g.due() == []
    g.add(None, alert("cpu-4"))
    (grp,) = g.due()  # before group_wait: five held is the most
    assert len(grp.pending) == 5
