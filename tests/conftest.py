"""Shared fixtures: a real Kafka broker for the session, tiny trained models, service processes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from helpers import SERIES_24AE8D, Service

from shared.features import read_series_csv
from shared.local_broker import LocalBroker, free_port


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> str:
    """A real single-node broker started for this session and stopped after it (or the cluster
    named by KAFKA_BOOTSTRAP_SERVERS, which is then left alone)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
        assert broker.running_pid() is None


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Both model sets, trained small (1 LSTM epoch) so the suite stays fast; quality is not
    what these tests measure."""
    from models.model_set import train_model_set
    from shared.synthetic import transactions

    folder = tmp_path_factory.mktemp("models")
    train_model_set("ec2_cpu", read_series_csv(SERIES_24AE8D), folder, epochs=1, progress=False)
    train_model_set("transactions", transactions(3000, outlier_prob=0, seed=1)[["series", "epoch_s", "value"]],
                    folder, epochs=1, progress=False)
    return folder


@pytest.fixture
def pipeline_settings(kafka_bootstrap, model_dir) -> dict:
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
        "consumer_group": f"detector_{run}",
        "alerter_group": f"alerter_{run}",
        "poll_timeout_s": "0.1",
    }


@pytest.fixture
def services(tmp_path):
    """Start services with services(name, overrides); all are stopped when the test ends."""
    started: list[Service] = []

    def start(name: str, overrides: dict, *args: str) -> Service:
        svc = Service(name, overrides, tmp_path, *args)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()
