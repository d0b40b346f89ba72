"""Shared fixtures: a real Kafka broker for the session, tiny trained models, service processes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from helpers import HDFS_DIR, SERIES_24AE8D, Service, broker_metrics_frame

from models.kmeans.streaming_kmeans import RealTimeKMeans
from models.metrics.features import VectorBatch, read_series_csv
from services.jobs.logs_train import train_log_model
from shared.local_broker import LocalBroker, free_port

# Settings made in this process (helpers.as_settings) read the tests' own topics from the start, as
# the services the tests start do (helpers.Service).
os.environ.setdefault("ANOMSTREAM_AUTO_OFFSET_RESET", "earliest")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> dict:
    """A real single-node broker, with the Prometheus JMX exporter agent, started for this session
    and stopped after it (or the cluster named by KAFKA_BOOTSTRAP_SERVERS, which is then left alone;
    its exporter is ANOMSTREAM_METRICS_EXPORTER_URL, if set)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield {"bootstrap": external, "metrics_url": os.environ.get("ANOMSTREAM_METRICS_EXPORTER_URL")}
        return
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port(),
                         jmx_port=free_port())
    broker.start()
    try:
        yield {"bootstrap": broker.bootstrap, "metrics_url": broker.metrics_url}
    finally:
        broker.stop()
        assert broker.running_pid() is None


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    return kafka_broker["bootstrap"]


@pytest.fixture(scope="session")
def kafka_metrics_url(kafka_broker) -> str:
    """The session broker's JMX exporter endpoint."""
    if not kafka_broker["metrics_url"]:
        pytest.fail("KAFKA_BOOTSTRAP_SERVERS names an external cluster: set ANOMSTREAM_METRICS_EXPORTER_URL to "
                    "its JMX exporter's metrics endpoint for the broker-metrics tests")
    return kafka_broker["metrics_url"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Both model sets, trained small (1 LSTM epoch) so the suite stays fast, the Real-Time
    K-Means on synthetic broker metrics and the next-event log model (10 epochs, ~10 s) on the
    HDFS sessions; quality is not what these tests measure."""
    from models.metrics.model_set import train_model_set
    from models.metrics.synthetic import transactions

    folder = tmp_path_factory.mktemp("models")
    train_model_set("ec2_cpu", read_series_csv(SERIES_24AE8D), folder, epochs=1, progress=False)
    train_model_set("transactions", transactions(3000, outlier_prob=0, seed=1)[["series", "epoch_s", "value"]],
                    folder, epochs=1, progress=False)
    kmeans = RealTimeKMeans().fit(VectorBatch.from_frame(broker_metrics_frame(300)))
    kmeans.version = "kafka_kmeans-test"
    kmeans.save(folder / "kafka_kmeans")
    train_log_model(HDFS_DIR / "hdfs_100k_sessions.csv", HDFS_DIR / "hdfs_100k_templates.csv", folder / "hdfs_logs",
                    epochs=10)
    return folder


@pytest.fixture
def pipeline_settings(kafka_bootstrap, model_dir, tmp_path) -> dict:
    """Settings overrides with topics and groups of this test alone."""
    run = uuid.uuid4().hex[:8]
    return {
        "bootstrap_servers": kafka_bootstrap,
        "model_dir": str(model_dir),
        "topic_input": f"input_data_{run}",
        "topic_transactions": f"transactions_{run}",
        "topic_scores": f"scores_{run}",
        "topic_anomalies": f"anomalies_{run}",
        "topic_dead_letter": f"dead_letter_{run}",
        "topic_kafka_metrics": f"kafka_metrics_{run}",
        "topic_logs": f"logs_{run}",
        "logdetector_group": f"logdetector_{run}",
        "log_state_dir": str(tmp_path / "log_state"),
        "consumer_group": f"detector_{run}",
        "alerter_group": f"alerter_{run}",
        "poll_timeout_s": "0.1",
    }


@pytest.fixture
def services(tmp_path):
    """Start services with services(name, overrides); all are stopped when the test ends."""
    started: list[Service] = []

    def start(name: str, overrides: dict, *args: str, env: dict | None = None,
              command: list[str] | None = None) -> Service:
        svc = Service(name, overrides, tmp_path, *args, env=env, command=command)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()
