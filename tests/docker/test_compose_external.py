"""docker/docker-compose.external.yml: the services on the user's own cluster. No bundled broker,
no demo producers, the connection settings (SASL/SSL) passed through from the environment or an
env file, and otherwise the same services as docker-compose.yml."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from dockerfile import (
    COMPOSE_FILE,
    DOCKER_DIR,
    INSTALL_HINT,
    REPO,
    compose_builds,
    compose_env,
    find_compose,
)

EXTERNAL_FILE = DOCKER_DIR / "docker-compose.external.yml"
CONNECTION = ("ANOMSTREAM_SECURITY_PROTOCOL", "ANOMSTREAM_SASL_MECHANISM", "ANOMSTREAM_SASL_USERNAME",
              "ANOMSTREAM_SASL_PASSWORD", "ANOMSTREAM_SSL_CA_LOCATION", "ANOMSTREAM_KAFKA_EXTRA",
              "ANOMSTREAM_DELIVERY", "ANOMSTREAM_REPLICATION_FACTOR")
SAME_AS_BUNDLED = ("image", "build", "command", "healthcheck", "stop_grace_period", "restart")
CERTS = "${ANOMSTREAM_CERTS_DIR:-./certs}:/etc/anomstream/certs:ro"


def services(path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def test_no_broker_and_no_demo_producers():
    external = services(EXTERNAL_FILE)
    assert set(external) == {"trainer", "detector", "logdetector", "rules", "alerter", "scraper"}
    text = EXTERNAL_FILE.read_text()
    assert "kafka:9092" not in text and "Dockerfile.kafka" not in text
    for name, service in external.items():
        assert "kafka" not in service.get("depends_on", {}), name
    assert external["scraper"]["profiles"] == ["scraper"], "the scraper needs the user's exporter URL: opt-in"
    # What it builds is what docker-compose.yml builds, so the build-context test covers it.
    assert set(compose_builds(EXTERNAL_FILE)) <= set(compose_builds(COMPOSE_FILE))


def test_connection_settings_are_passed_through():
    """The bootstrap servers are required (compose stops with the message when unset); every other
    connection setting is passed as-is, and one left unset stays unset in the container (an empty
    value would be an invalid setting: ANOMSTREAM_SASL_MECHANISM='' is no mechanism)."""
    for name, service in services(EXTERNAL_FILE).items():
        env = service["environment"]
        assert env["ANOMSTREAM_BOOTSTRAP_SERVERS"].startswith("${ANOMSTREAM_BOOTSTRAP_SERVERS:?"), name
        for var in CONNECTION:
            assert var in env and env[var] is None, f"{name}: {var} is not passed through"
        if name != "trainer":
            assert CERTS in service["volumes"], f"{name}: the CA folder is not mounted"


def test_services_are_the_bundled_ones_but_for_the_connection():
    bundled, external = services(COMPOSE_FILE), services(EXTERNAL_FILE)
    for name, service in external.items():
        for key in SAME_AS_BUNDLED:
            assert service.get(key) == bundled[name].get(key), f"{name}.{key} differs from docker-compose.yml"
        assert [v for v in service.get("volumes", []) if v != CERTS] == bundled[name].get("volumes", []), name
        env = service["environment"]
        for var, value in bundled[name]["environment"].items():
            if var not in ("ANOMSTREAM_BOOTSTRAP_SERVERS", "ANOMSTREAM_METRICS_EXPORTER_URL"):  # the bundled broker's
                assert env.get(var) == value, f"{name}: {var}"
        bundled_order = {t: c for t, c in bundled[name].get("depends_on", {}).items() if t in external}
        assert service.get("depends_on", {}) == bundled_order, name


def _resolve(tmp_path, env_file_text: str | None) -> subprocess.CompletedProcess:
    compose = find_compose()
    if compose is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    args = [*compose]
    if env_file_text is not None:
        (tmp_path / "cluster.env").write_text(env_file_text)
        args += ["--env-file", str(tmp_path / "cluster.env")]
    return subprocess.run([*args, "-f", str(EXTERNAL_FILE), "config"], capture_output=True, text=True,
                          timeout=120, env=compose_env(), cwd=tmp_path)


def test_compose_resolves_it_with_an_env_file(tmp_path):
    done = _resolve(tmp_path, "ANOMSTREAM_BOOTSTRAP_SERVERS=b-1.example:9096\nANOMSTREAM_SECURITY_PROTOCOL=SASL_SSL\n"
                              "ANOMSTREAM_SASL_MECHANISM=SCRAM-SHA-512\nANOMSTREAM_SASL_USERNAME=svc\n"
                              "ANOMSTREAM_SASL_PASSWORD=pw-123\n")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)["services"]
    assert "kafka" not in config
    env = config["detector"]["environment"]
    assert env["ANOMSTREAM_BOOTSTRAP_SERVERS"] == "b-1.example:9096"
    assert (env["ANOMSTREAM_SECURITY_PROTOCOL"], env["ANOMSTREAM_SASL_MECHANISM"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (env["ANOMSTREAM_SASL_USERNAME"], env["ANOMSTREAM_SASL_PASSWORD"]) == ("svc", "pw-123")
    assert env.get("ANOMSTREAM_SSL_CA_LOCATION") is None  # unset stays unset, not ''
    assert any(v.endswith(":/etc/anomstream/certs:ro") for v in config["detector"]["volumes"]
               if isinstance(v, str)) or any(
        isinstance(v, dict) and v.get("target") == "/etc/anomstream/certs" for v in config["detector"]["volumes"])


def test_compose_reads_docker_dotenv_not_the_repositorys(tmp_path):
    """Without --env-file compose reads the .env beside the compose file (docker/.env), not the
    repository's .env that `make run` reads: the demo and the cluster stay apart."""
    compose = find_compose()
    if compose is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    (tmp_path / "docker").mkdir()
    shutil.copy(EXTERNAL_FILE, tmp_path / "docker" / EXTERNAL_FILE.name)
    (tmp_path / "docker" / ".env").write_text("ANOMSTREAM_BOOTSTRAP_SERVERS=cluster.example:9093\n")
    (tmp_path / ".env").write_text("ANOMSTREAM_BOOTSTRAP_SERVERS=127.0.0.1:9092\n")
    done = subprocess.run([*compose, "-f", f"docker/{EXTERNAL_FILE.name}", "config"], capture_output=True,
                          text=True, timeout=120, env=compose_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    env = yaml.safe_load(done.stdout)["services"]["rules"]["environment"]
    assert env["ANOMSTREAM_BOOTSTRAP_SERVERS"] == "cluster.example:9093"


def test_compose_refuses_it_without_bootstrap_servers(tmp_path):
    done = _resolve(tmp_path, "ANOMSTREAM_SASL_USERNAME=svc\n")
    assert done.returncode != 0
    assert "ANOMSTREAM_BOOTSTRAP_SERVERS" in done.stderr


def test_the_example_env_file_names_only_settings_the_file_passes():
    example = (DOCKER_DIR / "external.env.example").read_text().splitlines()
    names = {line.lstrip("#").split("=", 1)[0] for line in example if "=" in line and line.lstrip("#")[:11] == "ANOMSTREAM_"}
    passed = set(services(EXTERNAL_FILE)["detector"]["environment"])
    assert names and names <= passed, sorted(names - passed)
    assert (REPO / ".gitignore").read_text().count("/docker/certs/") == 1
