"""scenario kafka-load: a broker under a known load, with injected anomalies, as a labelled CSV.

Two producers send 70-byte messages following a fixed pattern (every period divided by --factor):
producer 1 to <prefix>p1: 1 message every 2 s, 2 every 10 s, 5 every 1/50 s, 100 every 5 min 20 s;
producer 2 to <prefix>p2: 1 every 2 s. A consumer group reads both topics, so bytes out and fetch
requests are real traffic. The broker's metrics are scraped in-process (services.scraper.service),
published to kafka_metrics as `anomstream scrape` would, and written one row per scrape to --out.

Anomalies are injected right after a scrape completes and finish (acknowledged by the broker and
read by the consumer group) well before the next one, so each lies in exactly one row: message-rate
bursts (--burst-messages as fast as the producer can) and large messages (~960 KB). None falls in
the first --quiet-fraction of the rows (the training history); they are spread out after it, at
least --min-gap rows apart. A row is labelled anomalous iff its scrape interval overlaps an injected
anomaly's [start, end]; `<out>.anomalies.json` lists the injections.

CSV columns: timestamp (epoch s, end of the scrape interval), interval_s, the broker-wide metrics
and the scenario topics' metrics (sorted; a rate the scrape did not give is 0.0), is_anomaly, anomaly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from services.scraper.service import (
    DEFAULT_PATTERNS,
    MetricsScraper,
    RecordPublisher,
    Ticker,
)
from shared.app_logging import get_logger, setup_logging
from shared.cli import CONTEXT, PATH, given_arguments, run_command
from shared.config import Settings, load_settings
from shared.kafka import (
    DeliveryTracker,
    ensure_topics,
    make_consumer,
    make_producer,
    produce,
)
from shared.local_broker import LocalBroker, free_port
from shared.signals import on_stop_signal

SCENARIOS = ("kafka-load",)
MESSAGE_BYTES = 70
# (messages, every seconds) before acceleration
PATTERN_P1 = ((1, 2.0), (2, 10.0), (5, 1 / 50), (100, 320.0))
PATTERN_P2 = ((1, 2.0),)
BROKER_MESSAGE_MAX_BYTES = 2 * 1024 * 1024  # LocalBroker's message.max.bytes


@dataclass
class LoadConfig:
    rows: int = 1000
    interval_s: float = 1.0
    factor: float = 2.0
    bursts: int = 4
    burst_messages: int = 30_000
    large_messages: int = 2
    large_bytes: int = 960_000
    quiet_fraction: float = 0.4  # no anomaly in this first part of the rows
    min_gap: int = 20  # rows between two anomalies, at least
    topic_prefix: str = "load_"
    group: str = "anomstream-kafka-load"
    publish: bool = True  # also publish each record to settings.topic_kafka_metrics

    @property
    def topics(self) -> tuple[str, str]:
        return f"{self.topic_prefix}p1", f"{self.topic_prefix}p2"


@dataclass
class Injection:
    name: str
    kind: str  # "burst" | "large-message"
    after_row: int  # injected right after this row's scrape
    topic: str
    messages: int
    bytes: int
    start: float | None = None  # wall clock, epoch s
    acked: float | None = None  # every message acknowledged by the broker
    end: float | None = None  # every message also read by the consumer group
    last_offsets: dict = field(default_factory=dict)  # (topic, partition) -> last offset written
    consumed: threading.Event = field(default_factory=threading.Event)
    rows: list[int] = field(default_factory=list)

    def public(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "kind", "topic", "start", "end", "acked", "messages", "bytes",
                                              "rows")}


def schedule(config: LoadConfig) -> list[tuple[int, str]]:
    """(row after which to inject, kind) for every anomaly: after the quiet part, spread evenly,
    bursts and large messages interleaved. Raises ValueError when they do not fit."""
    kinds = sorted([((i + 0.5) / config.bursts, "burst") for i in range(config.bursts)]
                   + [((i + 0.5) / config.large_messages, "large-message") for i in range(config.large_messages)])
    if not kinds:
        return []
    first = math.ceil(config.quiet_fraction * config.rows)
    span = config.rows - 1 - first  # the injection lands in the row after the one it follows
    step = span / len(kinds)
    rows = [first + int((i + 0.5) * step) for i in range(len(kinds))]
    if span < 1 or (len(rows) > 1 and min(b - a for a, b in zip(rows, rows[1:])) < config.min_gap):
        raise ValueError(f"{len(kinds)} anomalies do not fit {config.min_gap} rows apart in rows {first}..{config.rows - 1}")
    return [(row, kind) for row, (_, kind) in zip(rows, kinds)]


def payload(tag: str, seq: int, size: int = MESSAGE_BYTES) -> bytes:
    return f"{tag} {seq:012d} ".encode().ljust(size, b".")


class Load:
    """The two paced producers and the consumer group, each in a thread."""

    def __init__(self, settings: Settings, config: LoadConfig, log):
        self.settings, self.config, self.log = settings, config, log
        self.stop = threading.Event()
        self.assigned = threading.Event()
        self.lock = threading.Lock()
        self.positions: dict[tuple[str, int], int] = {}  # last offset read by the consumer group
        self.pending: list[Injection] = []
        self.sent = {t: 0 for t in config.topics}
        self.consumed = 0
        self.errors: list[str] = []
        p1, p2 = config.topics
        self.threads = [threading.Thread(target=self._guard, args=(self._paced, p1, PATTERN_P1), daemon=True),
                        threading.Thread(target=self._guard, args=(self._paced, p2, PATTERN_P2), daemon=True),
                        threading.Thread(target=self._guard, args=(self._consume,), daemon=True)]

    def start(self, timeout: float = 60) -> None:
        for thread in self.threads:
            thread.start()
        if not self.assigned.wait(timeout):
            raise TimeoutError("the consumer group got no partitions")

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
        if self.errors:
            raise RuntimeError(f"load failed: {self.errors[:3]}")

    def _guard(self, target, *args) -> None:
        try:
            target(*args)
        except Exception as exc:  # a dead load thread must not go unnoticed
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.log.error("load thread failed", error=str(exc))
            self.stop.set()

    def _paced(self, topic: str, pattern) -> None:
        """Sends each (count, period) component count messages every period/factor seconds, at the
        times t0 + k·period: a late wake-up catches up, so the rates hold without drift."""
        producer = make_producer(self.settings, **{"compression.type": "none"})
        tracker = DeliveryTracker()
        periods = [(count, period / self.config.factor) for count, period in pattern]
        done = [0] * len(periods)
        t0 = time.monotonic()
        seq = 0
        while not self.stop.is_set():
            elapsed = time.monotonic() - t0
            for i, (count, period) in enumerate(periods):
                due = int(elapsed / period) + 1
                for _ in range((due - done[i]) * count):
                    produce(producer, topic, payload(topic, seq), on_delivery=tracker)
                    seq += 1
                done[i] = due
            producer.poll(0)
            wake = min(done[i] * period for i, (_, period) in enumerate(periods))
            self.stop.wait(max(0.001, wake - (time.monotonic() - t0)))
        tracker.flush(producer)
        self.sent[topic] = tracker.delivered

    def _consume(self) -> None:
        consumer = make_consumer(self.settings, self.config.group, **{
            "enable.auto.commit": True, "enable.auto.offset.store": True, "auto.offset.reset": "latest"})
        consumer.subscribe(list(self.config.topics), on_assign=lambda c, parts: self.assigned.set())
        try:
            while not self.stop.is_set():
                batch = consumer.consume(10_000, 0.05)
                for msg in batch:
                    if msg.error():
                        self.log.warning("consumer error", error=str(msg.error()))
                        continue
                    key = (msg.topic(), msg.partition())
                    self.positions[key] = max(self.positions.get(key, -1), msg.offset())
                    self.consumed += 1
                if batch:
                    self._check_pending()
        finally:
            consumer.close()

    def watch(self, injection: Injection) -> None:
        with self.lock:
            self.pending.append(injection)
        self._check_pending()

    def _check_pending(self) -> None:
        now = time.time()
        with self.lock:
            for inj in list(self.pending):
                if all(self.positions.get(k, -1) >= off for k, off in inj.last_offsets.items()):
                    inj.end = now
                    inj.consumed.set()
                    self.pending.remove(inj)


class Injector:
    def __init__(self, settings: Settings, load: Load, config: LoadConfig, log):
        self.load, self.config, self.log = load, config, log
        # Large messages: up to the broker's message.max.bytes; incompressible, sent uncompressed.
        self.producer = make_producer(settings, **{"compression.type": "none",
                                                   "message.max.bytes": BROKER_MESSAGE_MAX_BYTES})

    def inject(self, inj: Injection, deadline: float) -> None:
        """Sends the injection and waits until it is acknowledged and read by the consumer group, or
        until the monotonic `deadline` (it is then finished later, and may spill into the next row)."""
        tracker = DeliveryTracker()

        def delivered(err, msg):
            tracker(err, msg)
            if err is None:
                key = (msg.topic(), msg.partition())
                inj.last_offsets[key] = max(inj.last_offsets.get(key, -1), msg.offset())

        inj.start = time.time()
        if inj.kind == "burst":
            for seq in range(inj.messages):
                produce(self.producer, inj.topic, payload(inj.name, seq), on_delivery=delivered)
        else:
            produce(self.producer, inj.topic, os.urandom(inj.bytes), on_delivery=delivered)
        tracker.flush(self.producer)
        inj.acked = time.time()
        self.load.watch(inj)
        inj.consumed.wait(max(0.0, deadline - time.monotonic()))


def _rows_overlapping(rows: list[dict], start: float, end: float) -> list[int]:
    return [i for i, row in enumerate(rows) if row["timestamp"] - row["interval_s"] <= end and start <= row["timestamp"]]


def label(rows: list[dict], injections: list[Injection], log) -> None:
    """is_anomaly / anomaly of every row from the injections' [start, end]."""
    for row in rows:
        row["is_anomaly"], row["anomaly"] = 0, ""
    for inj in injections:
        if inj.start is None:
            continue
        end = inj.end or inj.acked
        inj.rows = _rows_overlapping(rows, inj.start, end)
        if len(inj.rows) > 1:
            log.warning("injection overran into the next scrape interval: both rows labelled",
                        anomaly=inj.name, rows=inj.rows)
        for i in inj.rows:
            rows[i]["is_anomaly"] = 1
            rows[i]["anomaly"] = "+".join(filter(None, [rows[i]["anomaly"], inj.name]))


def columns_for(config: LoadConfig) -> list[str]:
    """The broker-wide metrics and those of the scenario's own topics (not the scraper's
    kafka_metrics topic, nor other topics that happen to be on the broker)."""
    names = list(DEFAULT_PATTERNS)
    return sorted(names + [f"{n}:{t}" for n in names for t in config.topics])


def write_csv(path: Path, rows: list[dict], metrics: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["timestamp", "interval_s", *metrics, "is_anomaly", "anomaly"])
        for row in rows:
            writer.writerow([f"{row['timestamp']:.3f}", f"{row['interval_s']:.4f}",
                             *(f"{row['metrics'].get(m, 0.0):.7g}" for m in metrics),
                             row["is_anomaly"], row["anomaly"]])


def summarize(rows: list[dict], injections: list[Injection], config: LoadConfig) -> dict:
    """What the recording shows: normal rows vs anomalous rows, and the burst's rate vs the load's."""
    def values(metric, rows_):
        return [r["metrics"].get(metric, 0.0) for r in rows_]

    normal = [r for r in rows if not r["is_anomaly"]]
    p1, p2 = config.topics
    out: dict = {"rows": len(rows), "anomaly_rows": len(rows) - len(normal)}
    for metric in ("messages_in", "bytes_in", "bytes_out"):
        v = values(metric, normal)
        if v:
            out[f"normal_{metric}_median"] = round(statistics.median(v), 1)
            out[f"normal_{metric}_max"] = round(max(v), 1)
    for kind, metric in (("burst", "messages_in"), ("large-message", "bytes_in")):
        rows_ = [rows[i] for inj in injections if inj.kind == kind for i in inj.rows]
        if rows_:
            out[f"{kind}_rows_{metric}_min"] = round(min(values(metric, rows_)), 1)
    bursts = [inj for inj in injections if inj.kind == "burst" and inj.acked]
    load_rate = statistics.median(values(f"messages_in:{p1}", normal) or [0]) + statistics.median(
        values(f"messages_in:{p2}", normal) or [0])
    p2_rate = statistics.mean(values(f"messages_in:{p2}", normal) or [0])
    if bursts:
        rate = statistics.median(inj.messages / max(inj.acked - inj.start, 1e-6) for inj in bursts)
        out["burst_rate_msgs_per_s"] = round(rate)
        out["normal_load_msgs_per_s"] = round(load_rate, 2)
        out["producer2_msgs_per_s"] = round(p2_rate, 3)
        out["burst_vs_normal_load"] = round(rate / load_rate) if load_rate else None
        out["burst_vs_producer2"] = round(rate / p2_rate) if p2_rate else None
    return out


def run_scenario(settings: Settings, url: str, out: Path, config: LoadConfig, log=None,
                 stop: threading.Event | None = None, command: str = "") -> dict:
    """Runs the scenario against the broker of `settings` and its exporter at `url`; writes the CSV
    and its sidecar; returns the summary."""
    log = log or get_logger(service="kafka-load")
    stop = stop or threading.Event()
    plan = schedule(config)
    p1, _ = config.topics
    injections, counts = [], {"burst": 0, "large-message": 0}
    for row, kind in plan:
        counts[kind] += 1
        injections.append(Injection(
            name=f"{kind}-{counts[kind]}", kind=kind, after_row=row, topic=p1,
            messages=config.burst_messages if kind == "burst" else 1,
            bytes=config.burst_messages * MESSAGE_BYTES if kind == "burst" else config.large_bytes))
    by_row = {inj.after_row: inj for inj in injections}
    ensure_topics(settings, {t: 1 for t in config.topics})
    scraper = MetricsScraper(url, timeout=min(max(config.interval_s, 1.0), 10.0), log=log)
    publisher = RecordPublisher(settings, log) if config.publish else None
    load = Load(settings, config, log)
    injector = Injector(settings, load, config, log)
    rows: list[dict] = []
    log.info("kafka-load starting", rows=config.rows, interval_s=config.interval_s, factor=config.factor,
             topics=list(config.topics), url=scraper.source, anomalies=[(i.name, i.after_row) for i in injections])
    load.start()
    try:
        stop.wait(max(1.0, 2 * config.interval_s))  # every series of the load exists before the first scrape
        ticker = Ticker(config.interval_s, stop, log)
        while len(rows) < config.rows and ticker.wait() and not load.stop.is_set():
            record = scraper.scrape_once()
            if record is None:
                continue
            if publisher:
                publisher.publish(record)
            rows.append({"timestamp": record.timestamp.timestamp(), "interval_s": record.interval_s,
                         "metrics": record.metrics})
            inj = by_row.get(len(rows) - 1)
            if inj is not None:
                injector.inject(inj, deadline=ticker.next - 0.25 * config.interval_s)
                log.info("injected", anomaly=inj.name, messages=inj.messages, bytes=inj.bytes,
                         seconds=round((inj.end or inj.acked) - inj.start, 3), consumed=inj.consumed.is_set())
            if len(rows) % 100 == 0:
                log.info("progress", rows=len(rows), of=config.rows)
    finally:
        injector.producer.flush(30)
        if publisher:
            publisher.close()
        load.close()  # raises if a load thread failed
    for inj in injections:
        if inj.start is not None and inj.end is None:
            log.warning("injection never seen by the consumer group: labelled up to its acknowledgement",
                        anomaly=inj.name)
    label(rows, injections, log)
    write_csv(out, rows, columns_for(config))
    summary = summarize(rows, injections, config)
    sidecar = {
        "scenario": "kafka-load",
        "config": {k: v for k, v in asdict(config).items() if k not in ("group", "publish")},
        "command": command,
        "summary": summary,
        "load": {"sent": load.sent, "consumed": load.consumed},
        "anomalies": [inj.public() for inj in injections if inj.start is not None],
    }
    Path(f"{out}.anomalies.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info("kafka-load done", out=str(out), **summary)
    return summary


_DEFAULTS = LoadConfig()


@click.command("scenario", help=__doc__.split("\n\n")[0], context_settings=CONTEXT)
@click.argument("name", type=click.Choice(SCENARIOS))
@click.option("--out", type=PATH, default=Path("kafka_load.csv"), show_default=True)
@click.option("--rows", type=int, default=_DEFAULTS.rows, show_default=True)
@click.option("--interval", type=float, default=_DEFAULTS.interval_s, show_default=True, help="seconds between scrapes")
@click.option("--factor", type=float, default=_DEFAULTS.factor, show_default=True,
              help="time acceleration of the load pattern")
@click.option("--bursts", type=int, default=_DEFAULTS.bursts, show_default=True)
@click.option("--burst-messages", type=int, default=_DEFAULTS.burst_messages, show_default=True)
@click.option("--large-messages", type=int, default=_DEFAULTS.large_messages, show_default=True)
@click.option("--large-bytes", type=int, default=_DEFAULTS.large_bytes, show_default=True)
@click.option("--quiet-fraction", type=float, default=_DEFAULTS.quiet_fraction, show_default=True,
              help="no anomaly in this first part of the rows")
@click.option("--min-gap", type=int, default=_DEFAULTS.min_gap, show_default=True,
              help="rows between anomalies, at least")
@click.option("--topic-prefix", default=_DEFAULTS.topic_prefix, show_default=True)
@click.option("--no-publish", is_flag=True, help="do not publish the records to kafka_metrics")
@click.option("--bootstrap", default=None, help="the broker (default: settings / KAFKA_BOOTSTRAP_SERVERS; "
                                                "with neither, a local broker is started for the run)")
@click.option("--url", "url_option", default=None, help="its JMX exporter endpoint (default: settings)")
def command(name: str, out: Path, rows: int, interval: float, factor: float, bursts: int, burst_messages: int,
            large_messages: int, large_bytes: int, quiet_fraction: float, min_gap: int, topic_prefix: str,
            no_publish: bool, bootstrap: str | None, url_option: str | None) -> int:
    config = LoadConfig(rows=rows, interval_s=interval, factor=factor, bursts=bursts,
                        burst_messages=burst_messages, large_messages=large_messages,
                        large_bytes=large_bytes, quiet_fraction=quiet_fraction, min_gap=min_gap,
                        topic_prefix=topic_prefix, publish=not no_publish)
    if rows < 2 or interval <= 0 or factor <= 0 or large_bytes > BROKER_MESSAGE_MAX_BYTES - 1024:
        raise click.UsageError("need --rows >= 2, --interval > 0, --factor > 0, --large-bytes below 2 MB")
    try:
        schedule(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    external = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get(
        "ANOMSTREAM_BOOTSTRAP_SERVERS")
    overrides = {"bootstrap_servers": bootstrap} if bootstrap else {}
    settings = load_settings(**overrides)
    log = setup_logging(settings, "kafka-load")
    stop = threading.Event()
    on_stop_signal(stop.set)
    broker, tmp = None, None
    try:
        url = url_option or settings.metrics_exporter_url
        if not external:
            tmp = tempfile.mkdtemp(prefix="anomstream-kafka-load-")
            broker = LocalBroker(Path(tmp), port=free_port(), controller_port=free_port(), jmx_port=free_port())
            broker.start()
            settings = load_settings(bootstrap_servers=broker.bootstrap)
            url = url_option or broker.metrics_url
            log.info("local broker started for the run", bootstrap=broker.bootstrap, metrics=url)
        run_scenario(settings, url, out, config, log, stop,
                     command=shlex.join(["anomstream", "scenario", *given_arguments(click.get_current_context())]))
    finally:
        if broker is not None:
            broker.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream scenario")


if __name__ == "__main__":
    sys.exit(main())
