"""Prometheus /metrics, /healthz and /readyz (shared.telemetry): scraped from running services on the
real broker, the detector's figures added up over its worker processes."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from helpers import as_settings, series_frame, wait_until
from prometheus_client.parser import text_string_to_metric_families

from shared.kafka import ensure_topics, make_producer, read_topic, send
from shared.local_broker import free_port
from shared.records.metrics import encode_metric_frame
from shared.telemetry import Heartbeat, Probe, reason_kind, serve_http


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def samples(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from /metrics."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_a_dead_letter_reason_becomes_one_of_a_few_kinds():
    assert reason_kind("zone: unknown field; a field that is a label ...") == "unknown_field"
    assert reason_kind("value: Input should be a valid number") == "invalid_value"
    assert reason_kind("timestamp: 1700000000000 is outside ...") == "invalid_timestamp"
    assert reason_kind("labels.h: Input should be a valid string") == "invalid_labels"
    assert reason_kind("Invalid JSON: expected value at line 1") == "invalid_json"
    # Whatever a producer puts in a field name, the label stays in the fixed set.
    kinds = {reason_kind(f"f{i}x: something odd") for i in range(1000)}
    assert kinds == {"other"}


def test_health_and_readiness_follow_the_probe():
    alive, ready = [True], [False]
    port = free_port()
    server = serve_http(port, Probe(lambda: alive[0], lambda: ready[0]), host="127.0.0.1")
    try:
        assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 503
        ready[0] = True
        assert get(port, "/readyz")[0] == 200
        alive[0] = False  # a loop that stopped turning is neither alive nor ready
        assert get(port, "/healthz")[0] == 503 and get(port, "/readyz")[0] == 503
        assert get(port, "/nope")[0] == 404
        assert "python_info" in get(port, "/metrics")[1] or "process_" in get(port, "/metrics")[1]
    finally:
        server.shutdown()
    assert serve_http(0, Probe(lambda: True, lambda: True)) is None
    beat = Heartbeat(stale_s=0.0)
    assert not beat.alive()


@pytest.mark.kafka
def test_the_detector_serves_its_workers_figures_added_up(pipeline_settings, services):
    port = free_port()
    overrides = pipeline_settings | {"workers": 2, "http_port": port}
    settings = as_settings(overrides)
    ensure_topics(settings)
    detector = services("detector", overrides)
    wait_until(lambda: get(port, "/healthz")[0] == 200, 60, "/healthz", [detector])
    wait_until(lambda: get(port, "/readyz")[0] == 200, 120, "/readyz: both workers consuming", [detector])
    good = series_frame().head(300)
    keys, values = encode_metric_frame(good)
    send(settings, settings.topic_input, keys, values)
    bad = [b'{"series": "s", "timestamp": 1, "value": "x"}', b'{"series": "s", "timestamp": 1, "value": 1, "z": 1}',
           b"not json"]
    producer = make_producer(settings)
    for payload in bad:
        producer.produce(settings.topic_input, payload)
    assert producer.flush(30) == 0
    wait_until(lambda: len(read_topic(settings, settings.topic_scores, idle=1)) >= len(good), 120, "scores",
               [detector])

    def consumed() -> float:
        return total(samples(port), "anomstream_consumed_messages_total", service="detector",
                     topic=settings.topic_input)

    wait_until(lambda: consumed() == len(good) + len(bad), 60, "the consumed counter", [detector])
    found = samples(port)
    assert total(found, "anomstream_produced_records_total", topic=settings.topic_scores) == len(good)
    assert total(found, "anomstream_dead_lettered_messages_total", reason="invalid_value") == 1
    assert total(found, "anomstream_dead_lettered_messages_total", reason="unknown_field") == 1
    assert total(found, "anomstream_dead_lettered_messages_total", reason="invalid_json") == 1
    assert total(found, "anomstream_batch_seconds_count", service="detector") >= 1
    assert total(found, "anomstream_ready", service="detector") == 2
    assert total(found, "anomstream_state_restore_seconds_count", service="detector") >= 2  # each worker's assignment
    def lags() -> dict:
        return {ls: v for (n, ls), v in samples(port).items() if n == "anomstream_consumer_lag_messages"}

    # Every input read: the partitions that had any show a lag of 0 (whichever worker holds them now).
    wait_until(lambda: any(dict(ls).get("topic") == settings.topic_input for ls in lags()), 60,
               "the lag gauge", [detector])
    assert all(v == 0 for ls, v in lags().items() if dict(ls).get("topic") == settings.topic_input), lags()
    assert detector.stop() == 0


@pytest.mark.kafka
def test_a_single_process_service_serves_its_own_figures(pipeline_settings, services):
    """The alerter: its dead letter, and its Slack posts and retries (the test server answers 429
    first), counted in its own /metrics."""
    from alerting.test_alerter_kafka import anomaly
    from slack_server import VALID_TOKEN, SlackTestServer

    port = free_port()
    with SlackTestServer(rate_limit_first=1, retry_after=1) as slack:
        overrides = pipeline_settings | {"http_port": port, "slack_bot_token": VALID_TOKEN,
                                         "slack_base_url": slack.base_url}
        settings = as_settings(overrides)
        ensure_topics(settings)
        alerter = services("alerter", overrides)
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, "/readyz", [alerter])
        producer = make_producer(settings)
        producer.produce(settings.topic_anomalies, b"not an anomaly record")
        producer.produce(settings.topic_anomalies, anomaly('cpu{host="a"}'))
        assert producer.flush(30) == 0
        wait_until(lambda: total(samples(port), "anomstream_slack_posts_total", outcome="posted") == 1, 60,
                   "the alert posted and counted", [alerter])
        wait_until(lambda: total(samples(port), "anomstream_consumed_messages_total", service="alerter") == 2,
                   60, "both records counted", [alerter])
        found = samples(port)
        assert total(found, "anomstream_dead_lettered_messages_total", service="alerter") == 1
        assert total(found, "anomstream_slack_retries_total") >= 1  # the 429, retried after Retry-After
        assert len(slack.messages) == 1 and 'cpu{host="a"}' in slack.messages[0]["text"]
        assert alerter.stop() == 0
    assert get(port, "/healthz")[0] == 0  # the server stopped with the service
