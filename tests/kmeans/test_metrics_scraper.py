"""The broker-metrics scraper: exposition text -> counters -> rates -> BrokerMetricsRecord -> kafka_metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests
from helpers import Service, as_settings, wait_until

from services.scraper.service import (
    MetricsScraper,
    RecordPublisher,
    Ticker,
    compile_patterns,
    rates,
    read_counters,
    safe_url,
)
from shared.kafka import (
    DeliveryTracker,
    end_offsets,
    ensure_topics,
    make_producer,
    produce,
    read_topic,
)
from shared.local_broker import free_port
from shared.records.kmeans import BrokerMetricsRecord

# Two scrapes of a JMX exporter, in its example Kafka config's names, plus a jvm metric to ignore.
SCRAPE_1 = """\
# HELP jvm_threads_current Current thread count of a JVM
# TYPE jvm_threads_current gauge
jvm_threads_current 40.0
# TYPE kafka_server_brokertopicmetrics_messagesin_total counter
kafka_server_brokertopicmetrics_messagesin_total 1000.0
kafka_server_brokertopicmetrics_messagesin_total{topic="orders",} 600.0
kafka_server_brokertopicmetrics_messagesin_total{topic="gone",} 400.0
# TYPE kafka_server_brokertopicmetrics_bytesin_total counter
kafka_server_brokertopicmetrics_bytesin_total 5000.0
# TYPE kafka_server_brokertopicmetrics_bytesout_total counter
kafka_server_brokertopicmetrics_bytesout_total{topic="orders",} 100.0
kafka_server_brokertopicmetrics_bytesout_total{topic="pay",} 50.0
# TYPE kafka_server_brokertopicmetrics_totalfetchrequests_total counter
kafka_server_brokertopicmetrics_totalfetchrequests_total 70.0
"""
SCRAPE_2 = """\
# HELP jvm_threads_current Current thread count of a JVM
# TYPE jvm_threads_current gauge
jvm_threads_current 41.0
# TYPE kafka_server_brokertopicmetrics_messagesin_total counter
kafka_server_brokertopicmetrics_messagesin_total 1300.0
kafka_server_brokertopicmetrics_messagesin_total{topic="orders",} 800.0
kafka_server_brokertopicmetrics_messagesin_total{topic="fresh",} 50.0
# TYPE kafka_server_brokertopicmetrics_bytesin_total counter
kafka_server_brokertopicmetrics_bytesin_total 4000.0
# TYPE kafka_server_brokertopicmetrics_bytesout_total counter
kafka_server_brokertopicmetrics_bytesout_total{topic="orders",} 160.0
kafka_server_brokertopicmetrics_bytesout_total{topic="pay",} 70.0
# TYPE kafka_server_brokertopicmetrics_totalfetchrequests_total counter
kafka_server_brokertopicmetrics_totalfetchrequests_total 90.0
"""
PATTERNS = compile_patterns()


def test_counters_broker_wide_and_per_topic_series():
    assert read_counters(SCRAPE_1, PATTERNS) == {
        "messages_in": 1000.0, "messages_in:orders": 600.0, "messages_in:gone": 400.0, "bytes_in": 5000.0,
        "bytes_out:orders": 100.0, "bytes_out:pay": 50.0, "fetch_requests": 70.0,
    }


def test_rates_reset_new_gone_and_sum_over_topics():
    result = rates(read_counters(SCRAPE_1, PATTERNS), read_counters(SCRAPE_2, PATTERNS), dt=2.0)
    assert result.values == {
        "messages_in": 150.0,  # the broker-wide series, not the sum of its topics
        "messages_in:orders": 100.0,
        "bytes_out:orders": 30.0,
        "bytes_out:pay": 10.0,
        "bytes_out": 40.0,  # no broker-wide series: the sum over topics
        "fetch_requests": 10.0,
    }
    assert result.deltas["messages_in"] == 300.0
    assert result.reset == ["bytes_in"]  # went down: a broker restart, no (negative) rate
    assert result.new == ["messages_in:fresh"]  # no rate in the interval it appears in
    assert "messages_in:gone" not in result.values  # disappeared: dropped
    assert all(v >= 0 for v in result.values.values())
    with pytest.raises(ValueError):
        rates({}, {}, 0.0)


def test_older_exporter_names_are_accepted_and_other_attributes_ignored():
    text = """\
# TYPE kafka_server_BrokerTopicMetrics_MessagesInPerSec_Count untyped
kafka_server_BrokerTopicMetrics_MessagesInPerSec_Count{topic="a",} 7.0
# TYPE kafka_server_brokertopicmetrics_bytesin_count untyped
kafka_server_brokertopicmetrics_bytesin_count 9.0
# TYPE kafka_server_brokertopicmetrics_bytesout untyped
kafka_server_brokertopicmetrics_bytesout 11.0
# TYPE kafka_server_brokertopicmetrics_messagesin_oneminuterate gauge
kafka_server_brokertopicmetrics_messagesin_oneminuterate 3.5
"""
    assert read_counters(text, PATTERNS) == {"messages_in:a": 7.0, "bytes_in": 9.0, "bytes_out": 11.0}
    custom = compile_patterns({"in": r"my_messages_total"})
    assert read_counters("my_messages_total 3\nkafka_server_brokertopicmetrics_bytesin_total 4\n", custom) == {"in": 3.0}


class FakeSession:
    """requests.Session.get answering each scripted item in turn: text (200), an int status, or an exception."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.urls = []

    def get(self, url, timeout, headers):
        self.urls.append(url)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        resp = requests.Response()
        resp.status_code, resp.url = (answer, url) if isinstance(answer, int) else (200, url)
        resp._content = (answer if isinstance(answer, str) else "error").encode()
        resp.encoding = "utf-8"
        return resp


class RecordingLog:
    def __init__(self):
        self.lines = []

    def _log(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))

    def __getattr__(self, level):
        return self._log(level)


def test_scrape_once_primes_then_records_and_survives_errors():
    log = RecordingLog()
    url = "http://scraper:s3cret-pw@127.0.0.1:1/metrics"
    session = FakeSession(SCRAPE_1, requests.ConnectionError(f"cannot reach {url}"), 503,
                          "this is { not the exposition format", "<html>not an exporter</html>\n", SCRAPE_2)
    scraper = MetricsScraper(url, session=session, log=log)
    assert scraper.scrape_once() is None  # primes
    for _ in range(4):  # endpoint down, HTTP error, unparsable, no broker metric: no record, no crash
        assert scraper.scrape_once() is None
    assert scraper.failures == 4
    record = scraper.scrape_once()
    assert isinstance(record, BrokerMetricsRecord)
    assert record.source == "http://127.0.0.1:1/metrics"  # no user info in records, keys or logs
    assert record.interval_s > 0
    # The rates span the whole time since the last good scrape.
    assert record.metrics["messages_in"] == pytest.approx(300.0 / record.interval_s)
    assert BrokerMetricsRecord.model_validate_json(record.model_dump_json()) == record
    assert "s3cret-pw" not in repr(log.lines)
    warnings = [kw for level, _, kw in log.lines if level == "warning"]
    assert len([w for w in warnings if "error" in w]) == 4
    assert any(w.get("series") == ["bytes_in"] for w in warnings)  # the counter reset is logged


def test_safe_url():
    assert safe_url("https://u:p@host:7071/metrics?x=1") == "https://host:7071/metrics?x=1"
    assert safe_url("http://127.0.0.1:7071/metrics") == "http://127.0.0.1:7071/metrics"


def test_ticker_keeps_schedule_and_skips_missed_ticks():
    stop = threading.Event()
    ticker = Ticker(0.05, stop, log=RecordingLog())
    start = ticker.next
    times = []
    for i in range(6):
        assert ticker.wait()
        times.append(time.monotonic() - start)
        if i == 2:
            time.sleep(0.12)  # a slow scrape: the ticks it overran are skipped, the grid is kept
    offsets = [t / 0.05 for t in times]
    assert [round(o) for o in offsets] == [0, 1, 2, 4, 5, 6]
    assert all(abs(o - round(o)) < 0.6 for o in offsets)
    stop.set()
    assert not ticker.wait()


def test_unreachable_endpoint_is_a_logged_failure():
    log = RecordingLog()
    scraper = MetricsScraper(f"http://127.0.0.1:{free_port()}/metrics", timeout=2, log=log)
    assert scraper.scrape_once() is None
    assert scraper.failures == 1 and log.lines[0][:2] == ("warning", "scrape failed")


@pytest.fixture
def metrics_settings(kafka_bootstrap) -> dict:
    return {"bootstrap_servers": kafka_bootstrap, "topic_kafka_metrics": f"kafka_metrics_{uuid.uuid4().hex[:8]}"}


@pytest.mark.kafka
def test_real_broker_rates_count_the_messages_produced(kafka_metrics_url, metrics_settings):
    settings = as_settings(metrics_settings)
    topic = f"scrape_{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: 2})
    producer, tracker = make_producer(settings), DeliveryTracker()
    produce(producer, topic, b"first", on_delivery=tracker)  # the topic's series exist from here on
    tracker.flush(producer)
    log = RecordingLog()  # (structlog's global logger may still print to an earlier test's closed capture)
    scraper = MetricsScraper(kafka_metrics_url, log=log)
    assert scraper.scrape_once() is None
    n = 1234
    for i in range(n):
        produce(producer, topic, f"message {i}".encode(), key=str(i).encode(), on_delivery=tracker)
    tracker.flush(producer)
    record = scraper.scrape_once()
    assert record is not None and tracker.delivered == n + 1
    assert round(record.metrics[f"messages_in:{topic}"] * record.interval_s) == n
    assert record.metrics["messages_in"] * record.interval_s >= n - 0.5
    assert record.metrics[f"bytes_in:{topic}"] * record.interval_s > n * len(b"message 0")
    assert record.metrics[f"produce_requests:{topic}"] > 0
    assert set(record.metrics) >= {"messages_in", "bytes_in", "bytes_out", "fetch_requests", "produce_requests"}

    publisher = RecordPublisher(settings, log)
    publisher.publish(record)
    assert publisher.close() == 1
    [msg] = read_topic(settings, settings.topic_kafka_metrics, count=1, timeout=30)
    assert msg.key() == kafka_metrics_url.encode()
    assert BrokerMetricsRecord.model_validate_json(msg.value()) == record


@pytest.mark.kafka
def test_scrape_command_publishes_until_sigterm(kafka_metrics_url, metrics_settings, tmp_path):
    settings = as_settings(metrics_settings)
    svc = Service("scraper", metrics_settings | {"log_format": "console"}, tmp_path,
                  "--url", kafka_metrics_url, "--interval", "0.2")
    try:
        ensure_topics(settings, {settings.topic_kafka_metrics: 1})
        wait_until(lambda: sum(end_offsets(settings, settings.topic_kafka_metrics).values()) >= 3, 60,
                   "3 records on kafka_metrics", [svc])
    finally:
        assert svc.stop() == 0, svc.log[-3000:]
    assert "scraper stopped" in svc.log
    records = [BrokerMetricsRecord.model_validate_json(m.value())
               for m in read_topic(settings, settings.topic_kafka_metrics, idle=2, timeout=30)]
    assert len(records) >= 3
    assert all(r.source == kafka_metrics_url and 0.1 < r.interval_s < 1.0 for r in records)
    stamps = [r.timestamp for r in records]
    assert stamps == sorted(stamps)


@pytest.mark.kafka
def test_scrape_command_stops_after_count(kafka_metrics_url, metrics_settings, tmp_path):
    settings = as_settings(metrics_settings)
    svc = Service("scraper", metrics_settings, tmp_path, "--url", kafka_metrics_url,
                  "--interval", "0.1", "--count", "2")
    assert svc.proc.wait(60) == 0, svc.log[-3000:]
    svc.stop()
    assert len(read_topic(settings, settings.topic_kafka_metrics, idle=2, timeout=30)) == 2


@pytest.mark.kafka
def test_scrape_out_records_a_csv_the_kmeans_trains_on(kafka_metrics_url, metrics_settings, tmp_path):
    """Own data: `anomstream scrape --out FILE` records a cluster's broker metrics (nothing goes to
    the topic) and `anomstream train --name kafka_kmeans --kmeans-data FILE` trains on them."""
    import pandas as pd

    settings = as_settings(metrics_settings)
    out = tmp_path / "my_cluster.csv"
    topic = f"traffic_{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, {topic: 1})
    done = threading.Event()

    def traffic() -> None:  # some load that varies, as a cluster's does
        producer, i = make_producer(settings), 0
        while not done.is_set():
            for _ in range(1 + (i % 7) * 20):
                producer.produce(topic, b"x" * 100)
            producer.poll(0)
            i += 1
            time.sleep(0.05)
        producer.flush(10)

    feeder = threading.Thread(target=traffic, daemon=True)
    feeder.start()
    svc = Service("scraper", metrics_settings, tmp_path, "--url", kafka_metrics_url,
                  "--interval", "0.1", "--count", "40", "--out", str(out))
    try:
        assert svc.proc.wait(120) == 0, svc.log[-3000:]
    finally:
        done.set()
        feeder.join(30)
        svc.stop()
    frame = pd.read_csv(out)
    assert len(frame) == 40 and list(frame.columns[:2]) == ["timestamp", "interval_s"]
    assert {"messages_in", "bytes_in", "fetch_requests"} <= set(frame.columns)
    assert frame["timestamp"].is_monotonic_increasing and (frame["interval_s"] > 0.05).all()
    ensure_topics(settings, {settings.topic_kafka_metrics: 1})
    assert sum(end_offsets(settings, settings.topic_kafka_metrics).values()) == 0, "--out writes no record to Kafka"

    models = tmp_path / "models"
    train = subprocess.run([sys.executable, "-m", "services.jobs.train", "--name", "kafka_kmeans", "--kmeans-data",
                            str(out), "--kmeans-train-fraction", "1.0", "--model-dir", str(models)],
                           capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if not k.startswith("ANOMSTREAM_")})
    assert train.returncode == 0, train.stderr[-3000:]
    assert (models / "kafka_kmeans" / "realtime_kmeans.json").exists()
    assert '"rows": 40' in train.stderr or "rows=40" in train.stderr, train.stderr[-2000:]
