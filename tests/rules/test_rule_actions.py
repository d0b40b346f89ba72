"""A fired rule's actions: webhook POSTs to a local HTTP server (exact JSON and headers, retry of a 503
after its Retry-After, an unreachable URL), a kafka action on a fake producer, and the log line."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
import structlog
from pydantic import TypeAdapter
from structlog.testing import capture_logs

from models.rules.definitions import Action
from services.rules.actions import make_http_session, run_actions, safe_url
from shared.kafka import DeliveryTracker
from shared.records.rules import RuleFiringRecord

actions_of = TypeAdapter(list[Action]).validate_python


def firing(**kw) -> RuleFiringRecord:
    return RuleFiringRecord.model_validate({
        "definition": "cpu-high", "version": "0123456789ab", "series": "ec2_cpu_utilization_24ae8d",
        "timestamp": "2014-02-14T14:15:00Z", "window_start": "2014-02-14T14:00:00Z",
        "window_end": "2014-02-14T14:15:00Z", "values": {"average(value)": 85.2, "count": 3},
        "conditions": [{"type": "metric", "text": "average(value) above 80 for 3 times",
                        "metric": "average(value)", "value": 85.2, "holds": True}],
        "source_topic": "input_data", "environment": "prod", "channels": ["#ops"],
        "detected_at": "2014-02-14T14:16:00Z", **kw,
    })


class HookServer:
    """Answers POSTs with the given statuses in turn (then 200), recording each request."""

    def __init__(self, statuses=(), retry_after: str | None = None):
        self.statuses = list(statuses)
        self.retry_after = retry_after
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"time": time.monotonic(), "path": self.path,
                                        "headers": dict(self.headers), "body": body})
                status = server.statuses.pop(0) if server.statuses else 200
                self.send_response(status)
                if status != 200 and server.retry_after is not None:
                    self.send_header("Retry-After", server.retry_after)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeProducer:
    def __init__(self):
        self.produced = []

    def produce(self, topic, value=None, key=None, on_delivery=None, **kw):
        self.produced.append({"topic": topic, "value": value, "key": key})
        if on_delivery is not None:
            on_delivery(None, None)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http():
    with make_http_session() as session:
        yield session


def run(actions: list[dict], record=None, producer=None, tracker=None, http=None):
    with capture_logs() as logs:
        outcomes = run_actions(actions_of(actions), record or firing(), producer=producer or FakeProducer(),
                               tracker=tracker or DeliveryTracker(), log=structlog.get_logger(), http=http)
    return outcomes, logs


def test_webhook_receives_the_record_as_json_with_its_headers(http):
    rec = firing()
    with HookServer() as server:
        outcomes, logs = run([{"type": "webhook", "url": server.url + "?k=1",
                               "headers": {"Authorization": "Bearer s3cret", "X-Source": "anomstream"}}],
                             rec, http=http)
    # scheme and host only: path and query may carry secrets
    assert outcomes == [{"type": "webhook", "target": server.url.replace("/hook", "/…"), "outcome": "HTTP 200"}]
    (req,) = server.requests
    assert req["path"] == "/hook?k=1"
    assert req["body"] == orjson.dumps(rec.model_dump(mode="json"))
    assert json.loads(req["body"])["definition"] == "cpu-high"
    assert req["headers"]["Authorization"] == "Bearer s3cret" and req["headers"]["X-Source"] == "anomstream"
    assert req["headers"]["Content-Type"] == "application/json"
    assert logs == []


def test_webhook_503_is_retried_after_retry_after(http):
    with HookServer(statuses=[503], retry_after="1") as server:
        outcomes, _ = run([{"type": "webhook", "url": server.url}], http=http)
    assert outcomes[0]["outcome"] == "HTTP 200"
    assert len(server.requests) == 2
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 0.9
    assert server.requests[0]["body"] == server.requests[1]["body"]


def test_webhook_that_keeps_failing_reports_its_status_and_logs_no_header_values(http):
    with HookServer(statuses=[500] * 10) as server:
        outcomes, logs = run([{"type": "webhook", "url": server.url, "headers": {"X-Token": "s3cret"}}], http=http)
    assert outcomes[0]["outcome"] == "failed: HTTP 500"
    assert len(server.requests) == 4  # the first try and 3 retries
    (line,) = logs
    assert line["event"] == "rule action failed" and line["headers"] == ["X-Token"]
    assert "s3cret" not in repr(logs)


def test_unreachable_webhook_fails_quickly_without_raising(http):
    url = f"http://127.0.0.1:{closed_port()}/hook?token=s3cret"
    started = time.monotonic()
    outcomes, logs = run([{"type": "webhook", "url": url, "timeout_s": 0.5, "headers": {"X-Token": "t0ken"}},
                          {"type": "log", "level": "info"}], http=http)
    assert time.monotonic() - started < 8  # 3 retries with 0.5 s backoff: about 3 s
    assert outcomes[0]["outcome"].startswith("failed: ") and "Connection" in outcomes[0]["outcome"]
    assert outcomes[1]["outcome"] == "logged"  # the next action still ran
    assert "s3cret" not in repr(outcomes) + repr(logs) and "t0ken" not in repr(logs)
    assert [entry["event"] for entry in logs] == ["rule action failed", "rule fired"]


def test_kafka_action_produces_the_record(http):
    rec, producer, tracker = firing(), FakeProducer(), DeliveryTracker()
    outcomes, _ = run([{"type": "kafka", "topic": "rule_firings"}], rec, producer, tracker, http)
    assert outcomes == [{"type": "kafka", "target": "rule_firings", "outcome": "produced"}]
    (sent,) = producer.produced
    assert sent["topic"] == "rule_firings" and sent["key"] == b"ec2_cpu_utilization_24ae8d"
    assert orjson.loads(sent["value"]) == rec.model_dump(mode="json")
    assert tracker.delivered == 1  # delivery reports reach the caller's tracker


def test_kafka_failure_is_an_outcome(http):
    class Broken(FakeProducer):
        def produce(self, *a, **kw):
            raise RuntimeError("no such topic")

    outcomes, _ = run([{"type": "kafka", "topic": "t"}], producer=Broken(), http=http)
    assert outcomes[0]["outcome"] == "failed: RuntimeError: no such topic"


def test_log_action_logs_definition_group_window_and_values(http):
    outcomes, logs = run([{"type": "log", "level": "error"}], http=http)
    assert outcomes == [{"type": "log", "target": "error", "outcome": "logged"}]
    (line,) = logs
    assert line["log_level"] == "error" and line["event"] == "rule fired"
    assert line["definition"] == "cpu-high" and line["group"] == "ec2_cpu_utilization_24ae8d"
    assert line["window_start"] == "2014-02-14T14:00:00+00:00" and line["window_end"] == "2014-02-14T14:15:00+00:00"
    assert line["conditions"] == {"average(value) above 80 for 3 times": 85.2}
    assert line["values"] == {"average(value)": 85.2, "count": 3}


def test_slack_action_is_left_to_the_alerter(http):
    outcomes, logs = run([{"type": "slack", "channel": "#ops"}], http=http)
    assert outcomes == [{"type": "slack", "target": "#ops", "outcome": "queued for the alerter"}]
    assert logs == []


def test_outcomes_in_action_order():
    outcomes, _ = run([{"type": "log"}, {"type": "slack", "channel": "#a"}, {"type": "kafka", "topic": "t"}])
    assert [o["type"] for o in outcomes] == ["log", "slack", "kafka"]


def test_safe_url_drops_credentials():
    assert safe_url("https://user:pw@hooks.example.com:8443/a/b?token=x#f") == "https://hooks.example.com:8443/…"
    assert safe_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET") == "https://hooks.slack.com/…"
    assert safe_url("http://collector:8080") == "http://collector:8080"


def test_window_fields_are_utc_iso():
    rec = firing(window_start=datetime(2014, 2, 14, 14, tzinfo=timezone.utc))
    _, logs = run([{"type": "log"}], rec)
    assert logs[0]["window_start"] == "2014-02-14T14:00:00+00:00" and logs[0]["log_level"] == "warning"


def test_default_session_is_used_without_http():
    with HookServer(statuses=[503]) as server:
        outcomes, _ = run([{"type": "webhook", "url": server.url}])
    assert outcomes[0]["outcome"] == "HTTP 200" and len(server.requests) == 2  # retried: the retrying session
