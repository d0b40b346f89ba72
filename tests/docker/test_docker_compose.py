"""The Docker files: docker/docker-compose.yml must resolve with a real compose implementation
(`docker compose config`, no engine needed), and docker/Dockerfile must install the project and
run as a non-root user."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from dockerfile import (
    COMPOSE_FILE,
    INSTALL_HINT,
    REPO,
    compose_env,
    find_compose,
    instructions,
)

DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVICES = {"kafka", "trainer", "detector", "logdetector", "rules", "alerter", "scraper", "producer", "log-producer"}

def _env_mapping(env) -> dict[str, str]:
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in (env or {}).items()}


def resolved_config(compose: list[str]) -> tuple[set[str], dict[str, str]]:
    """(service names, detector's environment) as the compose implementation resolves them."""
    base = [*compose, "-f", str(COMPOSE_FILE), "config"]
    run = dict(capture_output=True, text=True, timeout=120, env=compose_env(), cwd=REPO)

    # compose v2 prints JSON on request; v1 knows no --format (and prints its usage instead).
    result = subprocess.run([*base, "--format", "json"], **run)
    if result.returncode == 0 and result.stdout.lstrip().startswith("{"):
        config = json.loads(result.stdout)
        return set(config["services"]), _env_mapping(config["services"]["detector"].get("environment"))

    result = subprocess.run(base, **run)  # compose v1: YAML only
    assert result.returncode == 0, (
        f"`{' '.join(base)}` exited {result.returncode}:\n{result.stderr}\n{result.stdout}"
    )
    config = yaml.safe_load(result.stdout)
    return set(config["services"]), _env_mapping(config["services"]["detector"].get("environment"))


def test_compose_file_resolves():
    compose = find_compose()
    if compose is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    services, detector_env = resolved_config(compose)
    assert SERVICES <= services, f"missing services: {sorted(SERVICES - services)}"
    assert detector_env.get("ANOMSTREAM_BOOTSTRAP_SERVERS") == "kafka:9092", detector_env


def test_dockerfile_installs_project_as_non_root():
    text = DOCKERFILE.read_text()
    # Join continuation lines so each instruction is one line.
    instructions = [
        line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions[0].upper().startswith("FROM PYTHON:3.11-SLIM"), instructions[0]
    runs = " ".join(i for i in instructions if i.upper().startswith("RUN "))
    assert re.search(r"\bpip install\b[^&;]*\s(\.|/\S+)(\s|$)", runs), "the project is not pip-installed"
    assert "[test]" not in runs, "test extras must not be installed in the image"
    users = [i.split(None, 1)[1].strip() for i in instructions if i.upper().startswith("USER ")]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"final USER is root: {users[-1]}"
    assert any(i.upper().startswith("CMD") for i in instructions), "no default CMD"
    assert not re.search(r"\b(openjdk|default-jre|default-jdk|temurin)\b", text, re.I), "no Java in the image"


def test_kafka_image_runs_the_same_jmx_exporter_as_the_local_broker():
    pom = (REPO / "broker" / "pom.xml").read_text()
    pom_version = re.search(r"<jmx.exporter.version>([^<]+)<", pom).group(1)
    kafka_image = (REPO / "docker" / "Dockerfile.kafka").read_text()
    assert re.search(rf"ARG JMX_EXPORTER_VERSION={re.escape(pom_version)}\n", kafka_image)
    assert "-javaagent:/opt/jmx/jmx_prometheus_javaagent.jar=7071:/opt/jmx/jmx-exporter.yaml" in kafka_image
    scraper = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["scraper"]
    assert scraper["environment"]["ANOMSTREAM_METRICS_EXPORTER_URL"] == "http://kafka:7071/metrics"


def test_image_writes_under_one_data_directory():
    """ANOMSTREAM_HOME is the image's data directory: no per-path variable for what follows it, no
    copy of the K-Means recording (package data), and every named volume is mounted on a folder
    under it that the image creates for its user (so a new volume starts out writable)."""
    text = DOCKERFILE.read_text()
    env = dict(re.findall(r"\b(ANOMSTREAM_[A-Z_]+)=(\S+)", text))
    assert env.get("ANOMSTREAM_HOME") == "/app/data", env
    stale = {"ANOMSTREAM_MODEL_DIR", "ANOMSTREAM_KMEANS_STATE_DIR", "ANOMSTREAM_LOG_STATE_DIR",
             "ANOMSTREAM_RULES_DB_URL", "ANOMSTREAM_KMEANS_TRAINING_DATA"} & set(env)
    assert not stale, f"derived from ANOMSTREAM_HOME, not to be set: {sorted(stale)}"
    assert "kafka_load.csv" not in text and "tests/" not in text
    created = {Path(d) for m in re.findall(r"mkdir -p ([^&\n]+)", re.sub(r"\\\n", " ", text)) for d in m.split()}
    for name, service in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "$")):
                continue  # a bind mount (data, definitions), not state the service writes
            assert Path(target).is_relative_to("/app/data"), f"{name}: volume {volume} outside ANOMSTREAM_HOME"
            assert any(Path(target) == d or d.is_relative_to(target) for d in created), \
                f"{name}: {target} is not created (for the anomstream user) in the image"


def dockerfile_requirements(extras: str) -> list[str]:
    """What the Dockerfile's dependency layer installs for build arg EXTRAS, computed by running its
    own RUN line's Python on this pyproject.toml (ARG values are environment variables in a RUN)."""
    runs = " ".join(i for i in instructions(DOCKERFILE) if i.upper().startswith("RUN "))
    code = re.search(r'python -c "(.*?)" +>', runs).group(1)
    code = code.replace("/tmp/build/pyproject.toml", str(REPO / "pyproject.toml"))  # as the shell passes it
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EXTRAS": extras},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")


def test_service_image_has_no_tensorflow_and_the_trainer_image_has_it():
    """The services' image: the core dependencies and the PostgreSQL driver (the `postgres` extra,
    for a run history on PostgreSQL), no TensorFlow; the trainer's image has TensorFlow. A plain
    `docker build` (EXTRAS empty) installs the core dependencies alone."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    plain = dockerfile_requirements("")
    services = dockerfile_requirements(compose["detector"]["build"]["args"]["EXTRAS"])
    trainer = dockerfile_requirements(compose["trainer"]["build"]["args"]["EXTRAS"])
    for requirements in (plain, services):
        assert any(r.startswith("numpy") for r in requirements) and any(r.startswith("confluent-kafka") for r in requirements)
        assert not any("tensorflow" in r for r in requirements), requirements
    assert not any(r.startswith("psycopg") for r in plain), "psycopg is the postgres extra, not a core dependency"
    assert any(r.startswith("psycopg[binary]") for r in services), services
    assert any(r.startswith("tensorflow-cpu") for r in trainer), trainer
    # Every service but the trainer runs the TensorFlow-free image.
    for name, service in compose.items():
        if name not in ("kafka", "trainer"):
            assert service["image"] == "anomstream:latest" and service["build"] == compose["detector"]["build"], name


# --- Health, start order, stopping ---------------------------------------------------------------

KAFKA_DOCKERFILE = REPO / "docker" / "Dockerfile.kafka"
STREAM_SERVICES = ("detector", "logdetector", "rules", "alerter")  # shared.stream loops: drain on SIGTERM
ONE_SHOTS = ("trainer", "producer", "log-producer")


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def image_healthcheck(dockerfile: Path) -> tuple[list[str], str]:
    """(options, command) of a Dockerfile's HEALTHCHECK."""
    found = [i for i in instructions(dockerfile) if i.upper().startswith("HEALTHCHECK ")]
    assert len(found) == 1, f"{dockerfile.name}: {len(found)} HEALTHCHECK instructions"
    options, _, command = found[0].split(None, 1)[1].partition(" CMD ")
    return options.split(), command.strip()


def seconds(duration: str) -> float:
    """A compose duration (`90s`, `1m30s`, `500ms`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


class _Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (None, False)])
def test_service_image_healthcheck_asks_healthz_on_the_configured_port(status, healthy):
    """The image's HEALTHCHECK command, run as Docker runs it (exec form) against a stand-in
    service: healthy (exit 0) only when /healthz answers 200 on ANOMSTREAM_HTTP_PORT."""
    _, command = image_healthcheck(DOCKERFILE)
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"], argv
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Healthz,), {"status": status or 200}))
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens: connection refused
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = subprocess.run([sys.executable, *argv[1:]], env={**compose_env(), "ANOMSTREAM_HTTP_PORT": str(port)},
                              capture_output=True, text=True, timeout=30)
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (done.returncode == 0) == healthy, (status, done.returncode, done.stderr[-500:])
    if not healthy:
        assert done.returncode == 1  # Docker: 1 is unhealthy, 2 is reserved
    assert "'9400'" in argv[2], "the default port is 9400"


def test_compose_healthchecks_are_the_images():
    """Compose spells out the images' checks (so `docker compose config` shows them); the same
    commands, so they cannot drift apart. The broker's check runs its JVM without KAFKA_OPTS (the
    JMX exporter agent there would fail to bind the broker's :7071 and fail the check)."""
    services = compose_services()
    _, service_check = image_healthcheck(DOCKERFILE)
    options, kafka_check = image_healthcheck(KAFKA_DOCKERFILE)
    assert kafka_check.startswith("KAFKA_OPTS= /opt/kafka/bin/kafka-broker-api-versions.sh"), kafka_check
    assert services["kafka"]["healthcheck"]["test"] == ["CMD-SHELL", kafka_check]
    for name in ("detector", "logdetector", "rules", "alerter", "scraper"):
        check = services[name]["healthcheck"]
        assert check["test"] == ["CMD", *json.loads(service_check)], name
        assert seconds(check["timeout"]) > 4, "the check's own urlopen timeout is 4 s"


def test_long_running_services_are_checked_and_one_shots_are_not():
    for name, service in compose_services().items():
        check = service.get("healthcheck", {})
        if name in ONE_SHOTS:
            assert service.get("restart") == "no" and check.get("disable") is True, name
        else:
            assert check.get("test"), f"{name}: no healthcheck"
            assert name == "kafka" or service.get("restart") == "unless-stopped", name


def test_start_order_waits_for_health_and_for_the_trainer():
    services = compose_services()
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, how in depends.items():
            condition = how["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), (name, target, condition)
            if condition == "service_healthy":
                assert services[target]["healthcheck"].get("test"), f"{name} waits for {target}, which has no check"
            else:
                assert target in ONE_SHOTS, (name, target)
        if name not in ("kafka", "trainer"):
            assert depends.get("kafka") == {"condition": "service_healthy"}, name
    for name in ("detector", "logdetector"):
        assert services[name]["depends_on"]["trainer"] == {"condition": "service_completed_successfully"}
    assert services["producer"]["depends_on"]["detector"] == {"condition": "service_healthy"}
    assert services["log-producer"]["depends_on"]["logdetector"] == {"condition": "service_healthy"}


def detector_worker_stop_timeout() -> float:
    """How long the detector's supervisor waits for its SIGTERMed workers before killing them."""
    from services.detector.service import WORKER_STOP_TIMEOUT_S

    return WORKER_STOP_TIMEOUT_S


DRAIN_MARGIN_S = 15.0  # leaving the group, closing the producer, the supervisor's own exit


def test_stop_grace_period_outlasts_the_drain():
    """docker stop kills after stop_grace_period: it must outlast a stream service's drain on
    SIGTERM (finish the batch; send_offsets_to_transaction and commit_transaction, each given up on
    TXN_HUNG_AFTER_S after it was called), and for the detector the supervisor's wait for its workers."""
    from shared.stream import TXN_HUNG_AFTER_S

    services = compose_services()
    transaction = 2 * TXN_HUNG_AFTER_S
    for name in STREAM_SERVICES:
        grace = seconds(services[name].get("stop_grace_period", "10s"))
        assert grace >= transaction + DRAIN_MARGIN_S, f"{name}: stop_grace_period {grace} s"
    detector = seconds(services["detector"]["stop_grace_period"])
    assert detector >= max(detector_worker_stop_timeout(), transaction) + DRAIN_MARGIN_S, detector
