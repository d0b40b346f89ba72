"""Settings: defaults, ANOMSTREAM_* overrides, the KAFKA_BOOTSTRAP_SERVERS alias, clear errors, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, Settings, anomstream_home, load_settings
from shared.kafka import client_config
from shared.records.metrics import DEFAULT_MAX_ABS_VALUE


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ANOMSTREAM_* variable and no .env of the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("ANOMSTREAM_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # Settings reads `.env` from the working directory


def test_defaults():
    s = load_settings()
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.security_protocol == "PLAINTEXT"
    assert s.sasl_mechanism is None and s.sasl_username is None and s.sasl_password is None
    assert (s.topic_input, s.topic_transactions, s.topic_anomalies, s.topic_scores, s.topic_dead_letter) == (
        "input_data", "transactions", "anomalies", "scores", "dead_letter")
    assert s.workers == 3
    assert s.batch_size == 5000
    assert s.max_message_bytes == 64 * 1024
    assert s.max_abs_value == DEFAULT_MAX_ABS_VALUE == 1e12
    assert s.combine == "or"
    assert s.slack_bot_token is None and s.slack_webhook_url is None
    assert s.slack_channel == "#alerts"
    assert s.alert_cooldown_s == 300.0
    assert (s.log_level, s.log_format) == ("INFO", "json")
    home = Path.cwd() / ".anomstream"  # the fixture's tmp_path
    assert s.home == home
    assert s.model_dir == home / "models"
    assert s.log_state_dir == home / "state" / "logs"
    assert s.rules_db_url == f"sqlite:///{home / 'state' / 'rules_history.db'}"
    assert s.kmeans_training_data is None  # the recording shipped as package data (models.kmeans.RECORDING)
    assert s.rules_dir == Path.cwd() / "rules"
    assert s.data_dir == Path.cwd().parent / "shared" / "data"
    assert s.topic_models() == {"input_data": "ec2_cpu", "transactions": "transactions"}
    assert s.topic_partitions()["dead_letter"] == 1


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("ANOMSTREAM_WORKERS", "7")
    monkeypatch.setenv("ANOMSTREAM_BATCH_SIZE", "250")
    monkeypatch.setenv("ANOMSTREAM_POLL_TIMEOUT_S", "0.5")
    monkeypatch.setenv("ANOMSTREAM_TOPIC_INPUT", "metrics_in")
    monkeypatch.setenv("ANOMSTREAM_MODEL_INPUT", "my_model")
    monkeypatch.setenv("ANOMSTREAM_COMBINE", "majority")
    monkeypatch.setenv("ANOMSTREAM_MODEL_DIR", "/tmp/somewhere")
    monkeypatch.setenv("ANOMSTREAM_KAFKA_EXTRA", '{"client.rack": "a", "socket.timeout.ms": 1000}')
    monkeypatch.setenv("ANOMSTREAM_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("ANOMSTREAM_MAX_ABS_VALUE", "1e6")
    s = load_settings()
    assert s.workers == 7 and isinstance(s.workers, int)
    assert s.batch_size == 250
    assert s.poll_timeout_s == 0.5
    assert s.topic_input == "metrics_in"
    assert s.topic_models()["metrics_in"] == "my_model"
    assert s.combine == "majority"
    assert str(s.model_dir) == "/tmp/somewhere"
    assert s.kafka_extra == {"client.rack": "a", "socket.timeout.ms": 1000}
    assert s.log_level == "DEBUG"
    assert s.max_abs_value == 1e6


def test_keyword_overrides_beat_environment(monkeypatch):
    monkeypatch.setenv("ANOMSTREAM_WORKERS", "7")
    assert load_settings(workers=2).workers == 2
    assert load_settings(bootstrap_servers="h:1").bootstrap_servers == "h:1"


def test_dotenv_file_is_read_and_environment_wins(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("ANOMSTREAM_WORKERS=5\nANOMSTREAM_SLACK_CHANNEL=#from-dotenv\n")
    s = load_settings()
    assert (s.workers, s.slack_channel) == (5, "#from-dotenv")
    monkeypatch.setenv("ANOMSTREAM_WORKERS", "9")
    assert load_settings().workers == 9


def test_kafka_bootstrap_servers_alias(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-a:9092,broker-b:9092")
    assert load_settings().bootstrap_servers == "broker-a:9092,broker-b:9092"


def test_prefixed_bootstrap_servers(monkeypatch):
    monkeypatch.setenv("ANOMSTREAM_BOOTSTRAP_SERVERS", "kafka.internal:9093")
    assert load_settings().bootstrap_servers == "kafka.internal:9093"


def test_operator_variable_wins_over_prefixed_one(monkeypatch):
    monkeypatch.setenv("ANOMSTREAM_BOOTSTRAP_SERVERS", "prefixed:1")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "operator:2")
    assert load_settings().bootstrap_servers == "operator:2"


@pytest.mark.parametrize("var, value", [
    ("ANOMSTREAM_WORKERS", "0"),
    ("ANOMSTREAM_WORKERS", "65"),
    ("ANOMSTREAM_BATCH_SIZE", "abc"),
    ("ANOMSTREAM_BATCH_SIZE", "0"),
    ("ANOMSTREAM_COMBINE", "xor"),
    ("ANOMSTREAM_POLL_TIMEOUT_S", "0"),
    ("ANOMSTREAM_LOG_LEVEL", "chatty"),
    ("ANOMSTREAM_LOG_FORMAT", "xml"),
    ("ANOMSTREAM_SECURITY_PROTOCOL", "TLS"),
    ("ANOMSTREAM_SASL_MECHANISM", "GSSAPI2"),
    ("ANOMSTREAM_ALERT_COOLDOWN_S", "-1"),
    ("ANOMSTREAM_MAX_MESSAGE_BYTES", "10"),
    ("ANOMSTREAM_MAX_ABS_VALUE", "0"),
    ("ANOMSTREAM_MAX_ABS_VALUE", "inf"),
    ("ANOMSTREAM_MAX_ABS_VALUE", "nan"),
    ("ANOMSTREAM_KAFKA_EXTRA", '{"a": [1, 2]}'),
    ("ANOMSTREAM_KAFKA_EXTRA", "not json"),
    ("KAFKA_BOOTSTRAP_SERVERS", ""),
    ("ANOMSTREAM_BOOTSTRAP_SERVERS", ""),
])
def test_invalid_values_raise_config_error_naming_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert isinstance(info.value, SystemExit)  # the service exits with the message, no traceback
    assert var in str(info.value)
    assert str(info.value).startswith("invalid setting")


def test_invalid_keyword_is_named_as_its_variable():
    with pytest.raises(ConfigError, match="ANOMSTREAM_WORKERS"):
        load_settings(workers=0)


def test_several_problems_are_all_named(monkeypatch):
    monkeypatch.setenv("ANOMSTREAM_WORKERS", "0")
    monkeypatch.setenv("ANOMSTREAM_COMBINE", "xor")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ANOMSTREAM_WORKERS" in str(info.value) and "ANOMSTREAM_COMBINE" in str(info.value)


def test_secrets_are_not_in_repr(monkeypatch):
    token, password, webhook = "xoxb-1234-very-secret", "s3cr3t-p4ss", "https://hooks.slack.com/services/T/B/zzz"
    monkeypatch.setenv("ANOMSTREAM_SLACK_BOT_TOKEN", token)
    monkeypatch.setenv("ANOMSTREAM_SASL_PASSWORD", password)
    monkeypatch.setenv("ANOMSTREAM_SLACK_WEBHOOK_URL", webhook)
    s = load_settings()
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert token not in text and password not in text and webhook not in text
    # ...while the services can still read them.
    assert s.slack_bot_token.get_secret_value() == token
    assert s.sasl_password.get_secret_value() == password
    assert s.slack_webhook_url.get_secret_value() == webhook


def test_client_config_passes_sasl_settings(monkeypatch):
    monkeypatch.setenv("ANOMSTREAM_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ANOMSTREAM_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("ANOMSTREAM_SASL_USERNAME", "svc-anomstream")
    monkeypatch.setenv("ANOMSTREAM_SASL_PASSWORD", "pw-xyz")
    monkeypatch.setenv("ANOMSTREAM_SSL_CA_LOCATION", "/etc/ssl/ca.pem")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9096")
    monkeypatch.setenv("ANOMSTREAM_KAFKA_EXTRA", '{"client.id": "unit"}')
    conf = client_config(load_settings())
    assert conf.pop("logger").name == "librdkafka"  # librdkafka's lines go through the structured log
    assert conf == {
        "bootstrap.servers": "k1:9096",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc-anomstream",
        "sasl.password": "pw-xyz",  # the plain value: librdkafka needs it
        "ssl.ca.location": "/etc/ssl/ca.pem",
        "client.id": "unit",
    }


def test_client_config_plaintext_has_no_sasl_keys():
    conf = client_config(Settings())
    del conf["logger"]
    assert conf == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}


# --- One data directory: ANOMSTREAM_HOME

DERIVED = ("model_dir", "log_state_dir")


def _rules_db_path(s: Settings) -> Path:
    assert s.rules_db_url.startswith("sqlite:///"), s.rules_db_url
    return Path(s.rules_db_url.removeprefix("sqlite:///"))


def test_every_derived_path_is_under_anomstream_home(monkeypatch, tmp_path):
    home = tmp_path / "data-home"
    monkeypatch.setenv("ANOMSTREAM_HOME", str(home))
    s = load_settings()
    assert s.home == home
    for field in DERIVED:
        assert getattr(s, field).is_relative_to(home), (field, getattr(s, field))
    assert _rules_db_path(s).is_relative_to(home)
    assert anomstream_home() == home  # the light reader (local broker) agrees with Settings


def test_home_from_dotenv_is_read_by_both(tmp_path):
    (tmp_path / ".env").write_text(f"ANOMSTREAM_HOME={tmp_path / 'from-dotenv'}\n")
    assert load_settings().home == anomstream_home() == tmp_path / "from-dotenv"


def test_relative_home_is_made_absolute_when_settings_are_created(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMSTREAM_HOME", "rel")
    s = load_settings()
    assert s.home == tmp_path / "rel" and s.model_dir == tmp_path / "rel" / "models"


def test_explicit_path_beats_the_home_default(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANOMSTREAM_MODEL_DIR", str(tmp_path / "elsewhere"))
    s = load_settings()
    assert s.model_dir == tmp_path / "elsewhere"
    assert s.log_state_dir == tmp_path / "home" / "state" / "logs"  # the others still follow home
    assert load_settings(model_dir=tmp_path / "kw").model_dir == tmp_path / "kw"
    monkeypatch.setenv("ANOMSTREAM_RULES_DB_URL", "postgresql+psycopg://u:p@db/h")
    assert load_settings().rules_db_url == "postgresql+psycopg://u:p@db/h"


def test_home_defaults_to_dot_anomstream_in_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_settings().home == tmp_path / ".anomstream"
    assert anomstream_home() == tmp_path / ".anomstream"
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # resolved when the settings are created, not at import
    assert load_settings().home == other / ".anomstream"


def test_no_default_path_lies_in_the_package_source(monkeypatch, tmp_path):
    """An installed (non-editable) package must not write into site-packages: with the current
    directory elsewhere, no default path is inside shared/, models/ or services/."""
    import models
    import services
    import shared
    from shared import local_broker

    monkeypatch.chdir(tmp_path)
    s = load_settings()
    packages = [Path(p.__file__).resolve().parent for p in (shared, models, services)]
    paths = {name: value for name, value in s.model_dump().items() if isinstance(value, Path)}
    paths["rules_db_url"] = _rules_db_path(s)
    paths["anomstream_home()"] = anomstream_home()
    paths["local broker cache"] = local_broker.cache_dir()
    assert set(DERIVED) | {"home", "rules_dir", "data_dir"} <= set(paths)
    for name, path in paths.items():
        for package in packages:
            assert not path.resolve().is_relative_to(package), f"{name} = {path} is inside {package}"
