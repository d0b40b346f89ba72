"""metrics scraper: a Kafka broker's own metrics as a stream.

Every interval it reads a Prometheus endpoint (the broker's JMX exporter), keeps the counters that
matter (messages in, bytes in, bytes out, fetch and produce requests; broker-wide and per topic),
turns them into per-second rates over the interval and publishes one `BrokerMetricsRecord` per
scrape to `kafka_metrics`, keyed by the endpoint URL.

A counter that went down (the broker restarted) or a series seen for the first time has no rate
in that interval; a series that disappears is dropped. An endpoint that is down, answers an HTTP
error or unparsable text is logged and tried again on the next tick: the scraper never stops for it.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click
import requests
from confluent_kafka import KafkaException
from prometheus_client.parser import text_string_to_metric_families

from shared.app_logging import get_logger, setup_logging
from shared.cli import CONTEXT, run_command
from shared.config import Settings, load_settings
from shared.kafka import DeliveryTracker, ensure_topics, make_producer, produce
from shared.records.kmeans import BrokerMetricsRecord
from shared.signals import on_stop_signal
from shared.telemetry import SCRAPES, Heartbeat, Probe, serve_http

# Output name -> regex over the exposition's sample names. The defaults match the names of the
# JMX exporter's example Kafka config (kafka_server_brokertopicmetrics_messagesin_total) and its
# older variants (..._count, no suffix, CamelCase ...PerSec_Count).
DEFAULT_PATTERNS: dict[str, str] = {
    name: rf"kafka_server_brokertopicmetrics_{mbean}(?:persec)?(?:_total|_count)?"
    for name, mbean in (("messages_in", "messagesin"), ("bytes_in", "bytesin"), ("bytes_out", "bytesout"),
                        ("fetch_requests", "totalfetchrequests"), ("produce_requests", "totalproducerequests"))
}
MAX_SERIES = 2000  # BrokerMetricsRecord.metrics holds at most this many entries
ACCEPT = "text/plain;version=0.0.4;q=1.0, */*;q=0.1"  # the text format, not OpenMetrics or protobuf


def safe_url(url: str) -> str:
    """The URL without user info (user:password@), for logs, records and keys."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _scrub(text: str, url: str) -> str:
    parts = urlsplit(url)
    for secret in (parts.password, parts.username):
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text


def compile_patterns(patterns: dict[str, str] | None = None) -> dict[str, re.Pattern]:
    return {name: re.compile(regex, re.IGNORECASE) for name, regex in (patterns or DEFAULT_PATTERNS).items()}


def read_counters(text: str, patterns: dict[str, re.Pattern], topics: re.Pattern | None = None) -> dict[str, float]:
    """Series -> counter value from Prometheus exposition text: `name` for a series without a
    topic label, `name:topic` for one with (series that differ in other labels are added up).
    Raises ValueError for text that is not the exposition format."""
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = next((n for n, p in patterns.items() if p.fullmatch(sample.name)), None)
            if name is None or not math.isfinite(sample.value):
                continue
            topic = sample.labels.get("topic")
            if topic and topics is not None and not topics.fullmatch(topic):
                continue
            key = f"{name}:{topic}" if topic else name
            counters[key] = counters.get(key, 0.0) + float(sample.value)
    return counters


@dataclass(frozen=True)
class Rates:
    values: dict[str, float]  # series -> per-second rate
    deltas: dict[str, float]  # series -> counter increase over the interval
    reset: list[str]  # counters that went down (a restart): no rate this interval
    new: list[str]  # series absent from the previous scrape: no rate this interval


def rates(prev: dict[str, float], cur: dict[str, float], dt: float) -> Rates:
    """Counters -> rates over dt seconds. A broker-wide name the exporter does not give (only
    per-topic series) is the sum of its topics' rates."""
    if not dt > 0:
        raise ValueError(f"interval must be > 0, not {dt}")
    deltas: dict[str, float] = {}
    reset, new = [], []
    for key, value in cur.items():
        before = prev.get(key)
        if before is None:
            new.append(key)
        elif value < before:
            reset.append(key)
        else:
            deltas[key] = value - before
    for name in {k.split(":", 1)[0] for k in cur if ":" in k} - {k for k in cur if ":" not in k}:
        parts = [d for k, d in deltas.items() if k.startswith(name + ":")]
        if parts:
            deltas[name] = sum(parts)
    return Rates({k: d / dt for k, d in deltas.items()}, deltas, sorted(reset), sorted(new))


def _limit(metrics: dict[str, float], log) -> dict[str, float]:
    """Broker-wide series first, then topics by name, up to what a record holds."""
    if len(metrics) <= MAX_SERIES:
        return metrics
    keys = sorted(metrics, key=lambda k: (":" in k, k))[:MAX_SERIES]
    log.warning("too many series; topics beyond the limit left out", series=len(metrics), kept=MAX_SERIES)
    return {k: metrics[k] for k in keys}


class MetricsScraper:
    """Scrapes one endpoint; each scrape_once() after the first returns the rates since the last
    successful scrape as a BrokerMetricsRecord (None when priming or when the scrape failed)."""

    def __init__(self, url: str, session: requests.Session | None = None, patterns: dict[str, str] | None = None,
                 topics: str | None = None, timeout: float = 5.0, log=None):
        self.url = url
        self.source = safe_url(url)
        self.session = session or requests.Session()
        self.patterns = compile_patterns(patterns)
        self.topics = re.compile(topics) if topics else None
        self.timeout = timeout
        self.log = log or get_logger(service="metrics-scraper")
        self.prev: dict[str, float] | None = None
        self.prev_t: float | None = None  # monotonic time of the previous good scrape
        self.failures = 0

    def fetch(self) -> tuple[str, float, float]:
        """The exposition text, and the monotonic and wall-clock times of the read (the middle of the request)."""
        wall0, mono0 = time.time(), time.monotonic()
        resp = self.session.get(self.url, timeout=self.timeout, headers={"Accept": ACCEPT})
        mono1 = time.monotonic()
        resp.raise_for_status()
        return resp.text, (mono0 + mono1) / 2, wall0 + (mono1 - mono0) / 2

    def scrape_once(self) -> BrokerMetricsRecord | None:
        try:
            text, t, wall = self.fetch()
            cur = read_counters(text, self.patterns, self.topics)
            if not cur:
                raise ValueError("no broker metric in the response (is this a Kafka JMX exporter?)")
        except Exception as exc:  # down, HTTP error, not the exposition format: try again next tick
            self.failures += 1
            self.log.warning("scrape failed", url=self.source, error=_scrub(f"{type(exc).__name__}: {exc}", self.url),
                             failures=self.failures)
            return None
        prev, prev_t = self.prev, self.prev_t
        self.prev, self.prev_t = cur, t
        if prev is None:
            self.log.info("primed", url=self.source, series=len(cur))
            return None
        result = rates(prev, cur, t - prev_t)
        if result.reset:
            self.log.warning("counter went down (broker restart?): no rate this interval", series=result.reset)
        if result.new:
            self.log.info("new series: rates from the next interval on", series=result.new)
        return BrokerMetricsRecord(source=self.source, timestamp=datetime.fromtimestamp(wall, timezone.utc),
                                   interval_s=t - prev_t, metrics=_limit(result.values, self.log))


class Ticker:
    """Ticks at start + k·interval on the monotonic clock (no drift); ticks already past are skipped."""

    def __init__(self, interval: float, stop: threading.Event, log=None):
        self.interval = interval
        self.stop = stop
        self.log = log or get_logger(service="metrics-scraper")
        self.next = time.monotonic()

    def wait(self) -> bool:
        """Sleep until the next tick; False once stop is set."""
        now = time.monotonic()
        late = now - self.next
        if late >= self.interval:
            skipped = int(late // self.interval)
            self.next += skipped * self.interval
            self.log.warning("scrape behind schedule: ticks skipped", skipped=skipped)
        if self.stop.wait(max(0.0, self.next - now)):
            return False
        self.next += self.interval
        return not self.stop.is_set()


class RecordPublisher:
    """Writes BrokerMetricsRecords to settings.topic_kafka_metrics, keyed by their source."""

    def __init__(self, settings: Settings, log=None):
        self.topic = settings.topic_kafka_metrics
        self.log = log or get_logger(service="metrics-scraper")
        ensure_topics(settings, {self.topic: settings.partitions_kafka_metrics})
        self.producer = make_producer(settings)
        self.tracker = DeliveryTracker()

    def publish(self, record: BrokerMetricsRecord) -> None:
        produce(self.producer, self.topic, record.model_dump_json().encode(), record.source.encode(),
                on_delivery=self.tracker)
        self.producer.poll(0)
        failed = self.tracker.take_failed()
        if failed:  # a scrape is a moment's reading: the next one supersedes it, nothing to resend
            self.log.error("records not delivered", count=len(failed), errors=[str(r) for r in failed[:3]])

    def close(self, timeout: float = 30) -> int:
        """Flush; returns the number of records the broker acknowledged."""
        self.tracker.flush(self.producer, self.log, timeout)
        return self.tracker.delivered


class CsvRecorder:
    """Writes BrokerMetricsRecords as CSV rows: timestamp, interval_s and one column per counter
    rate, the layout of the recorded scenario the K-Means is trained on (models/kmeans/data). The
    columns are the first record's; a counter that appears later is left out (counted, logged)."""

    def __init__(self, path: Path, log=None):
        self.path = path
        self.log = log or get_logger(service="metrics-scraper")
        self.file = None
        self.writer: csv.DictWriter | None = None
        self.delivered = 0
        self.left_out: set[str] = set()

    def publish(self, record: BrokerMetricsRecord) -> None:
        row = {"timestamp": round(record.timestamp.timestamp(), 3), "interval_s": round(record.interval_s, 4)}
        row |= record.metrics
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=list(row), extrasaction="ignore")
            self.writer.writeheader()
        new = set(row) - set(self.writer.fieldnames) - self.left_out
        if new:
            self.left_out |= new
            self.log.warning("series that appeared after the first record are left out of the CSV",
                             series=sorted(new)[:10], count=len(new))
        self.writer.writerow(row)
        self.file.flush()
        self.delivered += 1

    def close(self, timeout: float = 0) -> int:
        if self.file is not None:
            self.file.close()
        return self.delivered


# The defaults of --url and --interval are settings, read when the command runs: `--help` works
# whatever the ANOMSTREAM_* variables hold.
@click.command("scrape", help=__doc__.split("\n\n")[0], context_settings=CONTEXT)
@click.option("--url", default=None,
              help="the exporter's metrics endpoint (default: setting ANOMSTREAM_METRICS_EXPORTER_URL)")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds between scrapes (default: setting ANOMSTREAM_SCRAPE_INTERVAL_S)")
@click.option("--count", type=int, default=None, help="stop after this many records")
@click.option("--metric", multiple=True, metavar="NAME=REGEX",
              help="select/rename a counter by sample-name regex (repeatable; replaces the defaults)")
@click.option("--topics", default=None, metavar="REGEX", help="keep per-topic series of these topics only")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the records to this CSV (the columns `anomstream train --kmeans-data` reads) instead "
                   "of the topic: record your cluster's normal traffic to train the K-Means on it")
def command(url: str | None, interval: float | None, count: int | None, metric: tuple[str, ...],
            topics: str | None, out: Path | None) -> int:
    patterns = None
    if metric:
        try:
            patterns = dict(m.split("=", 1) for m in metric)
            compile_patterns(patterns)
        except (ValueError, re.error) as exc:
            raise click.UsageError(f"--metric NAME=REGEX: {exc}") from None
    settings = load_settings()
    url = url or settings.metrics_exporter_url
    interval = settings.scrape_interval_s if interval is None else interval
    log = setup_logging(settings, "metrics-scraper")
    stop = threading.Event()
    on_stop_signal(stop.set)
    scraper = MetricsScraper(url, patterns=patterns, topics=topics,
                             timeout=min(max(interval, 1.0), 10.0), log=log)
    publisher = CsvRecorder(out, log) if out else RecordPublisher(settings, log)
    log.info("scraping", url=scraper.source, interval_s=interval, to=str(out) if out else publisher.topic)
    published = 0
    ticker = Ticker(interval, stop, log)
    heartbeat = Heartbeat(stale_s=max(60.0, 5 * interval))
    last_good = [0.0]
    server = serve_http(settings.http_port, Probe(heartbeat.alive,
                                                  lambda: time.monotonic() - last_good[0] < max(30.0, 3 * interval)),
                        host=settings.http_host, log=log)
    try:
        while (count is None or published < count) and ticker.wait():
            heartbeat.beat()
            failures = scraper.failures
            record = scraper.scrape_once()
            SCRAPES.labels("failed" if scraper.failures > failures else "ok").inc()
            if record is not None:
                last_good[0] = time.monotonic()
                publisher.publish(record)
                published += 1
    finally:
        if server is not None:
            server.shutdown()
        try:
            delivered = publisher.close()
        except KafkaException as exc:
            log.error("records not acknowledged", error=str(exc), published=published)
            return 1
        log.info("scraper stopped", published=published, delivered=delivered, failed_scrapes=scraper.failures)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream scrape")


if __name__ == "__main__":
    sys.exit(main())
