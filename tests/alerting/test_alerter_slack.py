"""Alert text and Block Kit, Slack delivery against a local Slack-speaking server (429, 503, bad token,
webhook), and the alerter's per-series cooldown and dead-lettering, without a broker; rule firings
(kind "rule") beside ML scores on the same topic: their text, channels and own cooldown."""

from __future__ import annotations

import json
import socket
import tempfile
from collections import Counter
from datetime import datetime, timezone

import pytest
from confluent_kafka import TopicPartition
from helpers import FakeMsg
from slack_sdk.errors import SlackApiError
from slack_server import VALID_TOKEN, SlackTestServer

import services.alerter.service as alerter_module
from services.alerter.formatting import format_alert, format_rule_alert, format_window
from services.alerter.service import Alerter
from services.alerter.slack import SlackNotifier
from services.alerter.state import MemoryStore
from shared.app_logging import setup_logging
from shared.config import Settings
from shared.records.anomalies import anomaly_record_adapter
from shared.records.metrics import ScoreRecord
from shared.records.rules import RuleFiringRecord
from shared.stream import StreamLoop

T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc).timestamp()


def record(series="cpu-web-1", ts=T0, value=97.25, if_anomaly=True, lstm_anomaly=False, **kw) -> dict:
    return {
        "series": series, "timestamp": datetime.fromtimestamp(ts, timezone.utc).isoformat(), "value": value,
        "is_anomaly": True, "if_anomaly": if_anomaly, "lstm_anomaly": lstm_anomaly,
        "reconstruction_error": 0.125, "if_score": 0.625, "model_version": "ec2_cpu-20240101T000000-abcdef12",
        "source_topic": "input_data", "source_partition": 1, "source_offset": 42,
        "source_timestamp_ms": int(ts * 1000), "detected_at": "2024-05-06T07:08:10Z", **kw,
    }


def score_record(**kw) -> ScoreRecord:
    return ScoreRecord.model_validate(record(**kw))


class FakeProducer:
    """Records produce() calls and acknowledges each at once, like a broker that always accepts;
    transactional (the stream core's default, exactly_once): the offsets sent to a transaction
    are committed with it, into `commits`."""

    def __init__(self):
        self.produced: list[dict] = []
        self.commits: list[list] = []
        self.sent: list = []

    def init_transactions(self, timeout=None):
        pass

    def begin_transaction(self):
        self.sent = []

    def send_offsets_to_transaction(self, offsets, metadata, timeout=None):
        self.sent = [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def commit_transaction(self, timeout=None):
        self.commits.append(self.sent)

    def abort_transaction(self, timeout=None):
        pass

    def produce(self, topic, value=None, key=None, on_delivery=None, headers=None):
        self.produced.append({"topic": topic, "value": value, "key": key, "headers": headers})
        if on_delivery is not None:
            on_delivery(None, None)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=None):
        return 0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeConsumer:
    """Records the offsets the stream core commits."""

    def __init__(self):
        self.commits: list[list] = []

    def commit(self, offsets=None, asynchronous=True):
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def consumer_group_metadata(self):
        return None

    def assignment(self):
        return []

    def pause(self, partitions):
        self.paused = True

    def poll(self, timeout=None):
        return None


class LoopedAlerter:
    """The Alerter processor run by the real stream core one message at a time, as in the service,
    with a fake producer (dead letters) and consumer (commits) instead of a broker."""

    def __init__(self, settings: Settings, store: MemoryStore | None = None):
        log = setup_logging(settings, "alerter")
        self.store = store if store is not None else MemoryStore()  # the changelog, in memory
        self.processor = Alerter(settings, log, self.store)
        self.loop = StreamLoop(settings, self.processor, settings.alerter_group, log, producer=FakeProducer())
        self.loop.consumer.close()
        self.loop.consumer = FakeConsumer()

    def handle(self, msg) -> bool:
        """True when the message is done with: its offset was committed."""
        self.loop.handle([msg], 0.0)
        batches = self.loop.consumer.commits + self.producer.commits  # at_least_once, exactly_once
        committed = [c for batch in batches for c in batch]
        return (msg.topic(), msg.partition(), msg.offset() + 1) in committed

    @property
    def stats(self) -> Counter:
        return Counter(self.loop.stats) + Counter(self.processor.stats)

    @property
    def producer(self) -> FakeProducer:
        return getattr(self.loop.producer, "producer", self.loop.producer)  # inside a TransactionalProducer

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.loop.stopping = value

    def __getattr__(self, name):  # slack, last_alert, suppressed: the processor's
        return getattr(self.processor, name)


@pytest.fixture
def make_alerter():
    def make(store: MemoryStore | None = None, **overrides) -> LoopedAlerter:
        # One post per anomaly (the cooldown's mode); grouping has tests of its own (test_alert_grouping.py).
        return LoopedAlerter(Settings(bootstrap_servers=f"127.0.0.1:{closed_port()}", home=tempfile.mkdtemp(),
                                      **({"alert_grouping": False} | overrides)), store)

    yield make


def blocks_of(body: dict) -> list:
    blocks = body["blocks"]
    return json.loads(blocks) if isinstance(blocks, str) else blocks


# --- format_alert

def test_alert_text_names_series_value_and_detectors():
    text, _ = format_alert(score_record(series="db-7", value=97.25, if_anomaly=True, lstm_anomaly=False))
    assert "db-7" in text and "97.25" in text
    assert "IsolationForest" in text and "LSTM" not in text
    assert "2024-05-06 07:08:09 UTC" in text
    text, _ = format_alert(score_record(if_anomaly=False, lstm_anomaly=True))
    assert "LSTM autoencoder" in text and "IsolationForest" not in text
    text, _ = format_alert(score_record(if_anomaly=True, lstm_anomaly=True))
    assert "IsolationForest" in text and "LSTM autoencoder" in text
    text, _ = format_alert(score_record(if_anomaly=False, lstm_anomaly=False))
    assert "combined rule" in text


def test_alert_time_is_shown_in_utc():
    rec = ScoreRecord.model_validate(record() | {"timestamp": "2024-05-06T09:08:09+02:00"})
    text, blocks = format_alert(rec)
    assert "2024-05-06 07:08:09 UTC" in text
    assert "2024-05-06 07:08:09 UTC" in blocks[1]["fields"][0]["text"]


def test_alert_blocks_have_header_and_fields():
    _, blocks = format_alert(score_record(series="db-7", value=3.5, lstm_anomaly=True))
    header = blocks[0]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert "db-7" in header["text"]["text"]
    section = blocks[1]
    assert section["type"] == "section"
    fields = " ".join(f["text"] for f in section["fields"])
    assert all(f["type"] == "mrkdwn" for f in section["fields"])
    assert "3.5" in fields and "IsolationForest, LSTM autoencoder" in fields
    assert "0.625" in fields and "0.125" in fields  # IF score, reconstruction error
    context = json.dumps(blocks[2])
    assert "input_data[1]@42" in context and "ec2_cpu-20240101T000000-abcdef12" in context


def test_long_series_name_fits_slack_header_limit():
    _, blocks = format_alert(score_record(series="s" * 400))
    assert len(blocks[0]["text"]["text"]) <= 150  # Slack rejects a longer header


# --- SlackNotifier against the local Slack server

def test_bot_token_post():
    text, blocks = format_alert(score_record())
    with SlackTestServer() as server:
        notifier = SlackNotifier(Settings(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
                                          slack_channel="#ops-alerts"))
        assert notifier.configured
        notifier.post(text, blocks)
    assert len(server.messages) == 1
    body = server.messages[0]
    assert body["channel"] == "#ops-alerts" and body["text"] == text and blocks_of(body) == blocks
    assert server.requests[0]["path"] == "/api/chat.postMessage"


def test_rate_limited_post_waits_retry_after_then_succeeds():
    with SlackTestServer(rate_limit_first=1, retry_after=1) as server:
        notifier = SlackNotifier(Settings(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url))
        notifier.post("hello", [])
    assert [r["status"] for r in server.requests] == [429, 200]
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 1.0
    assert [m["text"] for m in server.messages] == ["hello"]


def test_server_error_is_retried():
    with SlackTestServer(fail_5xx_first=1) as server:
        notifier = SlackNotifier(Settings(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url))
        notifier.post("after 503", [])
    assert [r["status"] for r in server.requests] == [503, 200]
    assert [m["text"] for m in server.messages] == ["after 503"]


def test_invalid_token_raises():
    with SlackTestServer() as server:
        notifier = SlackNotifier(Settings(slack_bot_token="xoxb-wrong", slack_base_url=server.base_url))
        with pytest.raises(SlackApiError) as info:
            notifier.post("nope", [])
    assert info.value.response["error"] == "invalid_auth"
    assert server.messages == []


def test_webhook_post():
    text, blocks = format_alert(score_record())
    with SlackTestServer() as server:
        notifier = SlackNotifier(Settings(slack_webhook_url=server.webhook_url))
        assert notifier.configured and notifier.web is None
        notifier.post(text, blocks)
    assert server.requests[0]["path"] == "/services/T000/B000/XXXX"
    assert len(server.messages) == 1
    assert server.messages[0]["text"] == text and blocks_of(server.messages[0]) == blocks


def test_webhook_rate_limit_is_retried():
    with SlackTestServer(rate_limit_first=1, retry_after=1) as server:
        SlackNotifier(Settings(slack_webhook_url=server.webhook_url)).post("hi", [])
    assert [r["status"] for r in server.requests] == [429, 200]
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 1.0


def test_not_configured():
    assert not SlackNotifier(Settings()).configured


# --- Alerter.handle

def payload(**kw) -> bytes:
    return json.dumps(record(**kw)).encode()


@pytest.fixture
def slack_server():
    with SlackTestServer() as server:
        yield server


def test_cooldown_suppresses_repeats_of_a_series(make_alerter, slack_server):
    a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, alert_cooldown_s=300)
    assert a.handle(FakeMsg(payload(series="A", ts=T0), offset=1))
    assert a.handle(FakeMsg(payload(series="A", ts=T0 + 60), offset=2))  # within 300 s: suppressed
    assert a.handle(FakeMsg(payload(series="B", ts=T0 + 60), offset=3))  # another series: posted
    assert a.handle(FakeMsg(payload(series="A", ts=T0 - 100), offset=4))  # late, still within: suppressed
    assert a.handle(FakeMsg(payload(series="A", ts=T0 + 299), offset=5))  # suppressed
    assert a.handle(FakeMsg(payload(series="A", ts=T0 + 300), offset=6))  # cooldown over: posted
    assert a.stats["posted"] == 3 and a.stats["suppressed"] == 3
    assert a.suppressed == {"A": 3}
    assert [m["text"].split(" at ")[0] for m in slack_server.messages] == [
        ":rotating_light: Anomaly in A", ":rotating_light: Anomaly in B", ":rotating_light: Anomaly in A"]
    assert a.last_alert == {"A": T0 + 300, "B": T0 + 60}
    assert a.producer.produced == []


def test_zero_cooldown_posts_everything(make_alerter, slack_server):
    a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, alert_cooldown_s=0)
    for i in range(3):
        assert a.handle(FakeMsg(payload(series="A", ts=T0), offset=i))
    assert a.stats["posted"] == 3 and len(slack_server.messages) == 3


def test_without_slack_alerts_are_logged(make_alerter, capsys):
    a = make_alerter(alert_cooldown_s=300)
    capsys.readouterr()
    assert a.handle(FakeMsg(payload(series="disk-3", value=12.5)))
    assert a.handle(FakeMsg(payload(series="disk-3", ts=T0 + 10)))
    assert a.stats["logged"] == 1 and a.stats["suppressed"] == 1 and a.stats["posted"] == 0
    alerts = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    alerts = [r for r in alerts if r.get("event") == "alert"]
    assert len(alerts) == 1 and "disk-3" in alerts[0]["text"] and "12.5" in alerts[0]["text"]


@pytest.mark.parametrize("value, why", [
    (b'{"series": "x"}', "required"),
    (b"not json at all", "json"),
    (None, "json"),
    (json.dumps(record() | {"is_anomaly": "perhaps"}).encode(), "is_anomaly"),
])
def test_malformed_record_goes_to_dead_letter(make_alerter, value, why):
    a = make_alerter(topic_dead_letter="dlq_unit")
    msg = FakeMsg(value, key=b"series-key", topic="anomalies", partition=2, offset=17)
    assert a.handle(msg)
    assert a.stats["dead_lettered"] == 1 and a.stats["posted"] == a.stats["logged"] == 0
    (sent,) = a.producer.produced
    assert sent["topic"] == "dlq_unit"
    assert sent["value"] == value and sent["key"] == b"series-key"  # the original bytes, unchanged
    headers = dict(sent["headers"])
    assert headers["dlq.topic"] == b"anomalies"
    assert headers["dlq.partition"] == b"2"
    assert headers["dlq.offset"] == b"17"
    assert headers["dlq.service"] == b"alerter"
    error = headers["dlq.error"].decode().lower()
    assert error.startswith("invalid anomaly record") and why in error
    assert a.last_alert == {}


def test_stopping_while_slack_fails_leaves_the_alert_unhandled(make_alerter, monkeypatch):
    with SlackTestServer() as server:
        a = make_alerter(slack_bot_token="xoxb-wrong", slack_base_url=server.base_url)
        sleeps = []

        def fake_sleep(seconds):  # the first back-off: the service is told to stop meanwhile
            sleeps.append(seconds)
            a.stopping = True

        monkeypatch.setattr(alerter_module.time, "sleep", fake_sleep)
        assert a.handle(FakeMsg(payload(series="A"))) is False
    assert sleeps == [1.0]
    assert a.stats["posted"] == 0 and a.last_alert == {}  # not committed, not in cooldown
    assert len(server.requests) == 1 and server.messages == []


def test_failed_post_is_retried_until_slack_accepts(make_alerter, monkeypatch):
    with SlackTestServer() as server:
        a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)
        real_post, calls = a.slack.post, []

        def flaky_post(text, blocks, channel=None):
            calls.append(text)
            if len(calls) < 3:
                raise RuntimeError("connection reset")
            real_post(text, blocks, channel)

        monkeypatch.setattr(a.slack, "post", flaky_post)
        sleeps = []
        monkeypatch.setattr(alerter_module.time, "sleep", sleeps.append)
        assert a.handle(FakeMsg(payload(series="A")))
    assert len(calls) == 3 and sleeps == [1.0, 2.0]  # doubling back-off
    assert len(server.messages) == 1 and a.stats["posted"] == 1


# --- rule firings (kind "rule", written by the rules service to the same topic)

W0 = datetime(2014, 2, 14, 14, 0, tzinfo=timezone.utc).timestamp()


def rule_record(definition="cpu-high", series="ec2_cpu_utilization_24ae8d", start=W0, minutes=15,
                channels=(), value=85.2, **kw) -> dict:
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat()  # noqa: E731
    end = start + minutes * 60
    return {
        "kind": "rule", "definition": definition, "version": "0123456789ab", "series": series,
        "timestamp": iso(end), "window_start": iso(start), "window_end": iso(end),
        "values": {"average(value)": value, "count": 3},
        "conditions": [{"type": "metric", "text": "average(value) above 80 for 3 times",
                        "metric": "average(value)", "value": value, "holds": True,
                        "detail": {"threshold": 80.0, "streak": 3}}],
        "source_topic": "input_data", "environment": "prod", "channels": list(channels),
        "detected_at": "2014-02-14T14:16:00Z", **kw,
    }


def rule_payload(**kw) -> bytes:
    return json.dumps(rule_record(**kw)).encode()


def test_rule_alert_text_and_blocks():
    text, blocks = format_rule_alert(RuleFiringRecord.model_validate(rule_record()))
    assert text == (":rotating_light: Rule cpu-high fired for ec2_cpu_utilization_24ae8d "
                    "(window 2014-02-14 14:00–14:15 UTC): average(value) 85.2 above 80 for 3 times")
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": "Rule cpu-high fired"}}
    fields = [f["text"] for f in blocks[1]["fields"]]
    assert fields == ["*Group*\nec2_cpu_utilization_24ae8d", "*Window*\n2014-02-14 14:00–14:15 UTC",
                      "*average(value) above 80 for 3 times*\n85.2 ✓"]
    context = blocks[-1]["elements"][0]["text"]
    assert blocks[-1]["type"] == "context" and "0123456789ab" in context and "input_data" in context


def test_rule_alert_one_clause_per_condition_and_slack_limits():
    ratio = {"type": "ratio", "text": "ratio of matching messages above 5%", "metric": "ratio[1]",
             "value": 7.5, "holds": True}
    metric = rule_record()["conditions"][0]
    rec = RuleFiringRecord.model_validate(rule_record(definition="d" * 200, conditions=[metric] + [ratio] * 9))
    text, blocks = format_rule_alert(rec)
    assert text.endswith(": average(value) 85.2 above 80 for 3 times; "
                         + "; ".join(["ratio of matching messages above 5% (7.5)"] * 9))
    assert len(blocks[0]["text"]["text"]) <= 150
    sections = [b for b in blocks if b["type"] == "section"]
    assert [len(b["fields"]) for b in sections] == [10, 2]  # group, window and 10 conditions; ≤ 10 a section


def test_window_format():
    at = lambda *a: datetime(*a, tzinfo=timezone.utc)  # noqa: E731
    assert format_window(at(2014, 2, 14, 14, 0), at(2014, 2, 14, 14, 0, 30)) == "2014-02-14 14:00:00–14:00:30 UTC"
    assert format_window(at(2014, 2, 14, 23, 0), at(2014, 2, 15, 0, 0)) == "2014-02-14 23:00–2014-02-15 00:00 UTC"


def test_record_without_kind_parses_as_a_score():
    raw = record()
    assert "kind" not in raw
    rec = anomaly_record_adapter.validate_json(json.dumps(raw))
    assert isinstance(rec, ScoreRecord) and rec.kind == "score"
    assert isinstance(anomaly_record_adapter.validate_json(rule_payload()), RuleFiringRecord)


def test_rule_firing_posts_to_each_of_its_channels(make_alerter, slack_server):
    a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, slack_channel="#default")
    assert a.handle(FakeMsg(rule_payload(channels=["#ops", "#db-team"]), topic="anomalies"))
    assert [m["channel"] for m in slack_server.messages] == ["#ops", "#db-team"]
    expected, blocks = format_rule_alert(RuleFiringRecord.model_validate(rule_record()))
    for body in slack_server.messages:
        assert body["text"] == expected and blocks_of(body) == blocks
        assert "Rule cpu-high fired for ec2_cpu_utilization_24ae8d" in body["text"]
    assert a.stats["posted"] == 1 and a.producer.produced == []


def test_rule_firing_without_channels_goes_to_the_default(make_alerter, slack_server):
    a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, slack_channel="#default")
    assert a.handle(FakeMsg(rule_payload(channels=[])))
    assert [m["channel"] for m in slack_server.messages] == ["#default"]


def test_rule_firing_through_a_webhook_is_posted_once(make_alerter, slack_server):
    a = make_alerter(slack_webhook_url=slack_server.webhook_url)
    assert a.handle(FakeMsg(rule_payload(channels=["#ops", "#db-team"])))
    assert len(slack_server.messages) == 1 and "Rule cpu-high fired" in slack_server.messages[0]["text"]


def test_a_channel_that_accepted_is_not_posted_again_while_another_is_retried(make_alerter, monkeypatch):
    with SlackTestServer() as server:
        a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)
        real_post, calls = a.slack.post, []

        def flaky_post(text, blocks, channel=None):
            calls.append(channel)
            if channel == "#b" and calls.count("#b") < 3:
                raise RuntimeError("connection reset")
            real_post(text, blocks, channel)

        monkeypatch.setattr(a.slack, "post", flaky_post)
        monkeypatch.setattr(alerter_module.time, "sleep", lambda s: None)
        assert a.handle(FakeMsg(rule_payload(channels=["#a", "#b"])))
    assert calls == ["#a", "#b", "#b", "#b"]
    assert [m["channel"] for m in server.messages] == ["#a", "#b"]


def test_stopping_while_a_channel_fails_leaves_the_rule_alert_unhandled(make_alerter, monkeypatch):
    with SlackTestServer() as server:
        a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)
        real_post = a.slack.post

        def post(text, blocks, channel=None):
            if channel == "#b":
                raise RuntimeError("slack is down")
            real_post(text, blocks, channel)

        def fake_sleep(seconds):
            a.stopping = True

        monkeypatch.setattr(a.slack, "post", post)
        monkeypatch.setattr(alerter_module.time, "sleep", fake_sleep)
        assert a.handle(FakeMsg(rule_payload(channels=["#a", "#b"]))) is False  # not committed
    assert a.last_alert == {} and a.stats["posted"] == 0


@pytest.mark.parametrize("drop, change, why", [
    ("definition", {}, "'definition'"),
    (None, {"conditions": [{"type": "metric"}]}, "'conditions'"),
    (None, {"kind": "alarm"}, "kind"),
])
def test_invalid_rule_record_goes_to_dead_letter(make_alerter, drop, change, why):
    rec = {k: v for k, v in rule_record(**change).items() if k != drop}
    value = json.dumps(rec).encode()
    a = make_alerter(topic_dead_letter="dlq_unit")
    assert a.handle(FakeMsg(value, key=b"rule-key", topic="anomalies", partition=1, offset=5))
    assert a.stats["dead_lettered"] == 1 and a.stats["posted"] == a.stats["logged"] == 0
    (sent,) = a.producer.produced
    assert sent["topic"] == "dlq_unit" and sent["value"] == value and sent["key"] == b"rule-key"
    error = dict(sent["headers"])["dlq.error"].decode()
    assert error.startswith("invalid anomaly record") and why in error
    assert a.last_alert == {}


def test_rule_cooldown_is_per_definition_and_group_and_spares_ml_alerts(make_alerter, slack_server):
    a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, alert_cooldown_s=3600)
    s = "ec2_cpu_utilization_24ae8d"
    assert a.handle(FakeMsg(rule_payload(series=s, start=W0), offset=1))  # posted
    assert a.handle(FakeMsg(rule_payload(series=s, start=W0 + 900), offset=2))  # same rule and group: suppressed
    assert a.handle(FakeMsg(rule_payload(series="other", start=W0 + 900), offset=3))  # another group: posted
    assert a.handle(FakeMsg(rule_payload(definition="cpu-low", series=s, start=W0 + 900), offset=4))  # another rule: posted
    assert a.handle(FakeMsg(payload(series=s, ts=W0 + 900), offset=5))  # the ML alert of the series: posted
    assert a.handle(FakeMsg(payload(series=s, ts=W0 + 960), offset=6))  # ML cooldown of its own: suppressed
    assert a.handle(FakeMsg(rule_payload(series=s, start=W0 + 3600), offset=7))  # 3600 s after the first window end
    assert a.stats["posted"] == 5 and a.stats["suppressed"] == 2
    assert a.suppressed == {f"rule:cpu-high:{s}": 1, s: 1}
    assert a.last_alert == {f"rule:cpu-high:{s}": W0 + 4500, "rule:cpu-high:other": W0 + 1800,
                            f"rule:cpu-low:{s}": W0 + 1800, s: W0 + 900}
    posted = [m["text"] for m in slack_server.messages]
    assert [t.split(" (window")[0].split(" at ")[0] for t in posted] == [
        f":rotating_light: Rule cpu-high fired for {s}", ":rotating_light: Rule cpu-high fired for other",
        f":rotating_light: Rule cpu-low fired for {s}", f":rotating_light: Anomaly in {s}",
        f":rotating_light: Rule cpu-high fired for {s}"]


def test_rule_firing_without_slack_is_logged_with_its_channels(make_alerter, capsys):
    a = make_alerter()
    capsys.readouterr()
    assert a.handle(FakeMsg(rule_payload(channels=["#ops"])))
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (alert,) = [r for r in lines if r.get("event") == "alert"]
    assert "Rule cpu-high fired" in alert["text"] and alert["channels"] == ["#ops"]


def test_a_channel_that_does_not_exist_is_dead_lettered_not_retried_forever(make_alerter):
    with SlackTestServer(missing_channels=frozenset({"#typo"})) as server:
        a = make_alerter(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url, topic_dead_letter="dlq_unit")
        msg = FakeMsg(rule_payload(channels=["#typo", "#ops"]), topic="anomalies", offset=5)
        assert a.handle(msg)  # done with: the good channel got it, the other is kept with the reason
        assert [m["channel"] for m in server.messages] == ["#ops"]
        assert len([r for r in server.requests if r["body"].get("channel") == "#typo"]) == 1
    (sent,) = a.producer.produced
    assert sent["topic"] == "dlq_unit" and sent["value"] == msg.value()
    assert dict(sent["headers"])["dlq.error"] == b"slack refused the alert for good: #typo: channel_not_found"
    assert a.stats["dead_lettered"] == 1 and a.stats["posted"] == 1


# --- once-only posting: the durable marker and cooldowns (services.alerter.state), here in memory

def test_a_record_read_again_after_a_restart_is_not_posted_again(make_alerter, slack_server):
    store = MemoryStore()
    settings = dict(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, alert_cooldown_s=0)
    a = make_alerter(store, **settings)
    assert a.handle(FakeMsg(payload(series="A"), partition=1, offset=7))
    assert len(slack_server.messages) == 1
    assert json.loads(store.partitions[1][b"posted"]) == {"offset": 7, "done": ["#alerts"]}
    b = make_alerter(store, **settings)  # started again: the commit of offset 7 never happened
    assert b.handle(FakeMsg(payload(series="A"), partition=1, offset=6))  # before it: handled before too
    assert b.handle(FakeMsg(payload(series="A"), partition=1, offset=7))
    assert b.stats["already_posted"] == 2 and b.stats["posted"] == 0 and len(slack_server.messages) == 1
    assert b.handle(FakeMsg(payload(series="A"), partition=1, offset=8))  # the next one is posted
    assert b.handle(FakeMsg(payload(series="A"), partition=2, offset=7))  # another partition's own marker
    assert len(slack_server.messages) == 3


def test_a_rule_alert_cut_off_between_channels_posts_only_the_rest_after_a_restart(make_alerter, monkeypatch):
    store = MemoryStore()
    with SlackTestServer() as server:
        settings = dict(slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url)
        a = make_alerter(store, **settings)
        real_post = a.slack.post

        def post(text, blocks, channel=None):
            if channel == "#b":
                raise RuntimeError("slack is down")
            real_post(text, blocks, channel)

        monkeypatch.setattr(a.slack, "post", post)
        monkeypatch.setattr(alerter_module.time, "sleep", lambda s: setattr(a, "stopping", True))
        msg = FakeMsg(rule_payload(channels=["#a", "#b"]), offset=3)
        assert a.handle(msg) is False  # stopped before #b took it: not committed
        monkeypatch.undo()
        b = make_alerter(store, **settings)
        assert b.handle(msg)
    assert [m["channel"] for m in server.messages] == ["#a", "#b"]
    assert json.loads(store.partitions[0][b"posted"]) == {"offset": 3, "done": ["#a", "#b"]}


def test_the_cooldown_survives_a_restart_and_is_dropped_with_its_partition(make_alerter, slack_server):
    store = MemoryStore()
    settings = dict(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, alert_cooldown_s=300,
                    topic_anomalies="anomalies")
    a = make_alerter(store, **settings)
    assert a.handle(FakeMsg(payload(series="A", ts=T0), topic="anomalies", partition=0, offset=1))
    b = make_alerter(store, **settings)
    b.processor.on_assign([TopicPartition("anomalies", 0), TopicPartition("anomalies", 1)])
    assert b.last_alert == {"A": T0}
    assert b.handle(FakeMsg(payload(series="A", ts=T0 + 60), topic="anomalies", partition=0, offset=2))
    assert b.stats["suppressed"] == 1 and len(slack_server.messages) == 1
    b.processor.on_revoke([TopicPartition("anomalies", 0)])
    assert b.last_alert == {} and 0 not in b.processor.posted


def test_a_crash_after_the_marker_and_before_the_cooldown_write_still_keeps_the_cooldown(make_alerter, slack_server):
    store = MemoryStore()
    settings = dict(slack_bot_token=VALID_TOKEN, slack_base_url=slack_server.base_url, alert_cooldown_s=300)
    a = make_alerter(store, **settings)
    assert a.handle(FakeMsg(payload(series="A", ts=T0), offset=1))
    del store.partitions[0][b"cooldown:A"]  # as if the process died before the cooldown was written
    b = make_alerter(store, **settings)
    assert b.handle(FakeMsg(payload(series="A", ts=T0), offset=1))  # read again: skipped, cooldown set again
    assert b.handle(FakeMsg(payload(series="A", ts=T0 + 60), offset=2))
    assert b.stats["already_posted"] == 1 and b.stats["suppressed"] == 1 and len(slack_server.messages) == 1
    assert store.partitions[0][b"cooldown:A"] == repr(T0).encode()


def test_a_partition_revoked_while_its_alert_is_retried_is_left_to_its_new_owner(make_alerter, monkeypatch):
    """The old owner neither posts, nor marks, nor commits it: the new owner reads it from the last
    commit and posts it once."""
    store = MemoryStore()
    with SlackTestServer() as server:
        a = make_alerter(store, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url, alert_cooldown_s=300,
                         topic_anomalies="anomalies")
        real_post, calls = a.slack.post, []

        def flaky_post(text, blocks, channel=None):
            calls.append(channel)
            if len(calls) == 1:
                a.loop._on_revoke(None, [TopicPartition("anomalies", 0)])  # a rebalance served by keep_alive
                raise RuntimeError("connection reset")
            real_post(text, blocks, channel)

        monkeypatch.setattr(a.slack, "post", flaky_post)
        monkeypatch.setattr(alerter_module.time, "sleep", lambda s: None)
        assert not a.handle(FakeMsg(payload(series="A"), topic="anomalies", offset=4)), "committed by the old owner"
        assert len(calls) == 1 and len(server.messages) == 0  # not retried once revoked
        assert a.stats["left_to_new_owner"] == 1 and not a.loop.stopping
        new_owner = make_alerter(store, slack_bot_token=VALID_TOKEN, slack_base_url=server.base_url,
                                 alert_cooldown_s=300, topic_anomalies="anomalies")
        assert new_owner.handle(FakeMsg(payload(series="A"), topic="anomalies", offset=4))
    assert len(server.messages) == 1  # posted once, by the new owner
    assert a.last_alert == {}
