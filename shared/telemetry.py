"""Prometheus `/metrics`, `/healthz` and `/readyz` for every long-running service (prometheus-client).

One small HTTP server per service on ANOMSTREAM_HTTP_PORT (0: none). The stream core
(shared.stream) counts what every service does: messages consumed and produced, anomalies, dead
letters by reason, batch latency, consumer lag; the services add their own (Slack posts and retries,
state restore time).

The detector's workers are processes of their own: each writes its figures to files in a folder
the supervisor made (prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR, set before
the workers start), and the supervisor serves them added up (`multiprocess_registry`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

CONSUMED = Counter("anomstream_consumed_messages", "Input messages handled (scored, counted or dead-lettered)",
                   ["service", "topic"])
PRODUCED = Counter("anomstream_produced_records", "Records produced (outputs, not dead letters)",
                   ["service", "topic"])
ANOMALIES = Counter("anomstream_anomalies", "Anomaly records produced to the anomalies topic", ["service"])
DEAD_LETTERED = Counter("anomstream_dead_lettered_messages", "Messages sent to dead_letter, by kind of reason",
                        ["service", "reason"])
BATCH_SECONDS = Histogram("anomstream_batch_seconds", "Time to process one consumed batch", ["service"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
COMMITS = Counter("anomstream_commits", "Offset commits (transactions under exactly-once)", ["service"])
# The most recent value written wins, whichever worker wrote it (a partition moves between workers).
LAG = Gauge("anomstream_consumer_lag_messages", "Messages between a partition's high watermark and this "
            "consumer's position", ["service", "topic", "partition"], multiprocess_mode="livemostrecent")
READY = Gauge("anomstream_ready", "1 once the service (a detector worker) consumes", ["service"],
              multiprocess_mode="livesum")
STATE_RESTORE_SECONDS = Histogram("anomstream_state_restore_seconds", "Time to read a partition's state back "
                                  "from its changelog on assignment", ["service"],
                                  buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
SCRAPES = Counter("anomstream_scrapes", "Scrapes of the broker metrics exporter, by outcome", ["outcome"])
SLACK_POSTS = Counter("anomstream_slack_posts", "Slack calls made for alerts, by outcome", ["outcome"])
SLACK_RETRIES = Counter("anomstream_slack_retries", "Slack calls retried (429 Retry-After, 5xx, connection)")

# A dead letter's reason is free text (it names the offending field); the metric label is its kind,
# from a fixed list, so that a producer cannot make a new time series per message.
_REASON_KINDS = (
    ("unknown field", "unknown_field"), ("duplicate key", "duplicate_key"), ("Invalid JSON", "invalid_json"),
    ("empty message", "empty"), ("exceeds", "too_large"), ("poison pill", "poison_pill"),
    ("processing failed", "processing_failed"), (": late:", "late"),
)
_FIELDS = ("series", "metric", "labels", "timestamp", "value", "payload", "message", "host")
_FIELD = re.compile(r"^([A-Za-z_]+)[.:\[ ]")


def reason_kind(reason: str) -> str:
    """One of a small fixed set of kinds for a dead letter's reason (the `reason` metric label)."""
    for text, kind in _REASON_KINDS:
        if text in reason:
            return kind
    m = _FIELD.match(reason)
    if m and m.group(1) in _FIELDS:
        return f"invalid_{m.group(1)}"
    return "other"


def multiprocess_registry(folder: str) -> CollectorRegistry:
    """A registry that adds up what the worker processes wrote to `folder`."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    return registry


def sample_sum(registry: CollectorRegistry, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels` (e.g. the workers that are ready)."""
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class Probe:
    """What /healthz and /readyz answer: alive (the service's loop turns) and ready (it consumes)."""

    def __init__(self, alive: Callable[[], bool], ready: Callable[[], bool]):
        self.alive, self.ready = alive, ready


class Heartbeat:
    """A loop's last turn; alive while it turned within `stale_s` (a batch that blocks longer, e.g.
    a Slack post retried for minutes, makes the service look dead to an orchestrator)."""

    def __init__(self, stale_s: float = 300.0):
        self.stale_s, self.last = stale_s, time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.stale_s


def serve_http(port: int, probe: Probe, registry: CollectorRegistry = REGISTRY, host: str = "0.0.0.0",
               log=None) -> ThreadingHTTPServer | None:
    """Serve /metrics, /healthz and /readyz on `port` from a daemon thread; None when port is 0."""
    if not port:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/readyz"):
                ok = probe.alive() if path == "/healthz" else probe.alive() and probe.ready()
                body, status, ctype = (b"ok\n" if ok else b"not ok\n"), (200 if ok else 503), "text/plain"
            else:
                body, status, ctype = b"not found: /metrics, /healthz, /readyz\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds are not log lines
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # e.g. the port taken: the service runs on, without its endpoints
        if log is not None:
            log.error("cannot serve /metrics, /healthz, /readyz (setting ANOMSTREAM_HTTP_PORT)", port=port,
                      error=str(exc))
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    if log is not None:
        log.info("serving /metrics, /healthz, /readyz", port=server.server_address[1])
    return server
