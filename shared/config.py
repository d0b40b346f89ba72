"""Settings for every service, read once from ANOMSTREAM_* environment variables and `.env`."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

ENV_PREFIX = "ANOMSTREAM_"
HOME_DIRNAME = ".anomstream"
# librdkafka properties that ANOMSTREAM_KAFKA_EXTRA may not set: the exactly-once and at-least-once
# guarantees (shared.stream) and the group membership depend on the services' own values.
GUARANTEE_PROPERTIES = frozenset({
    "enable.auto.commit", "enable.auto.offset.store", "isolation.level", "enable.idempotence", "acks",
    "transactional.id", "group.id", "group.instance.id", "auto.offset.reset", "enable.partition.eof",
})  # the data directory's name when ANOMSTREAM_HOME is not set


def default_home() -> Path:
    """`.anomstream` in the current directory (where the command runs), absolute."""
    return Path.cwd() / HOME_DIRNAME


class _HomeOnly(BaseSettings):
    """ANOMSTREAM_HOME alone (environment, then `.env`), without validating any other setting."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")
    home: Path | None = None


def anomstream_home() -> Path:
    """The data directory (ANOMSTREAM_HOME, else ./.anomstream) for code that must not load every
    setting, e.g. the local broker's jar cache; Settings.home is the same folder."""
    home = _HomeOnly().home
    return (home.expanduser() if home else default_home()).absolute()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", validate_default=True,
        populate_by_name=True,
    )

    # --- Data directory: trained models, checkpoints, run history and caches all default to
    # folders under it (ANOMSTREAM_HOME; default ./.anomstream, resolved when the settings are
    # created). A path set on its own (e.g. ANOMSTREAM_MODEL_DIR) still wins.
    home: Path = Field(default_factory=default_home)

    # --- Kafka connection. KAFKA_BOOTSTRAP_SERVERS is honoured as-is because it is the name
    # operators already export; setting it also means "use that cluster, start no local broker".
    bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        min_length=1,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", f"{ENV_PREFIX}BOOTSTRAP_SERVERS"),
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    # Any other librdkafka property, as JSON: ANOMSTREAM_KAFKA_EXTRA='{"client.rack": "a"}'. It wins
    # over the services' own tuning (linger.ms, fetch.max.bytes, ...); the properties the delivery
    # guarantees rest on (GUARANTEE_PROPERTIES) are refused at start-up.
    kafka_extra: dict[str, str | int | float | bool] = {}
    # Where a consumer group with no committed offset starts: "latest" (only what arrives from now:
    # a new alerter does not post the topic's whole retention) or "earliest" (`anomstream run`, the
    # demo replay, and a backfill).
    auto_offset_reset: Literal["earliest", "latest"] = "latest"
    # This copy of the services in their consumer groups (static membership, librdkafka's
    # group.instance.id): each long-running consumer joins as "<group>-<service>-<instance_id>", a
    # detector worker with "-<worker>" after it. A member that crashed and is started again under
    # the same id gets its partitions back at once instead of after the session timeout (45 s).
    # Default: the host name. Two copies of one service in one group must differ here (two on one
    # host: set it for each); the same id twice fences the older one out of the group.
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128,
                             pattern=r"^[A-Za-z0-9._-]+$")

    # --- Delivery guarantee (shared.stream) --------------------------------------------------
    # exactly_once: each batch's outputs, dead letters and input offsets are committed in one
    # Kafka transaction (read_committed readers see each output once). at_least_once: idempotent
    # producer + offsets committed after the outputs are acknowledged; for clusters without
    # transactions (e.g. some managed or proxied Kafka).
    delivery: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # --- end of delivery settings -------------------------------------------------------------

    # --- Topics
    topic_input: str = "input_data"
    topic_transactions: str = "transactions"
    topic_anomalies: str = "anomalies"
    topic_scores: str = "scores"
    topic_dead_letter: str = "dead_letter"
    topic_kafka_metrics: str = "kafka_metrics"  # the broker's own metrics, one record per scrape
    topic_logs: str = "logs"  # raw log lines: plain text, or JSON with a `message` field
    partitions_input: int = Field(3, ge=1)
    partitions_transactions: int = Field(3, ge=1)
    partitions_anomalies: int = Field(3, ge=1)
    partitions_scores: int = Field(3, ge=1)
    partitions_dead_letter: int = Field(1, ge=1)
    # One partition: a scraper's records form one time series that one worker scores in order.
    partitions_kafka_metrics: int = Field(1, ge=1)
    # One partition by default: all lines of a session must reach the same log detector, and a
    # plain-text producer sets no key. Raise it only when producers key each line by its session.
    partitions_logs: int = Field(1, ge=1)
    replication_factor: int = Field(1, ge=1)

    # --- Detector service
    consumer_group: str = "anomstream-detector"
    workers: int = Field(3, ge=1, le=64)
    batch_size: int = Field(5000, ge=1, le=100_000)
    poll_timeout_s: float = Field(0.1, gt=0, le=60)
    # Per-series state (models/state.py, services/detector/series_state.py): how often the changed
    # series' state goes to the changelog with the offsets (one transaction under exactly-once, so
    # also how long an output waits to be visible to read_committed readers), and after how long
    # without a point (event time) a series leaves memory (read back from the changelog if it returns).
    detector_commit_interval_s: float = Field(0.2, ge=0, le=60)
    state_idle_s: float = Field(86_400.0, gt=0)
    max_message_bytes: int = Field(64 * 1024, ge=64)
    # Largest record the services produce (librdkafka's message.max.bytes, and the dead_letter
    # topic's max.message.bytes when anomstream creates it). A message to dead-letter that is
    # larger goes there as a bounded summary (reason, origin, size, SHA-256, first bytes).
    max_produce_bytes: int = Field(1_000_000, ge=16 * 1024, le=100 * 1024 * 1024)
    # A metric value v with |v| above this is refused (dead-lettered with the reason); the default is
    # shared.records.metrics.DEFAULT_MAX_ABS_VALUE. The detectors stay finite beyond it too.
    max_abs_value: float = Field(1e12, gt=0, allow_inf_nan=False)
    # Metric input (shared.records.metrics.MetricInput; the detector and the rules service alike): a
    # message is {series, timestamp, value} or {metric, labels, timestamp, value}. Top-level fields
    # named here are labels too (e.g. '["host","region"]'); any other field is refused. A number as
    # timestamp is epoch seconds, or epoch milliseconds when timestamp_unit says so.
    label_fields: list[str] = []
    timestamp_unit: Literal["seconds", "milliseconds"] = "seconds"
    model_dir: Path | None = None  # default: <home>/models
    # Labelled reference data beside the repository (../shared/data when run from the repo root,
    # as `make` and the tests do), for training and replay.
    data_dir: Path = Field(default_factory=lambda: Path.cwd().parent / "shared" / "data")
    # The trained model set (`anomstream train --name`) that scores each input topic.
    model_input: str = "ec2_cpu"
    model_transactions: str = "transactions"
    # The Real-Time K-Means model (`anomstream train-kmeans`) that scores topic_kafka_metrics;
    # its streaming state (centers, counts) is kept per input partition in the changelog topic
    # "<state_topic_prefix>-detector-<topic_kafka_metrics>".
    model_kafka_metrics: str = "kafka_kmeans"
    # The recorded broker-metrics scenario it is trained on (its first 40% is the history).
    # Default (None): the recording shipped as package data, models.kmeans.RECORDING.
    kmeans_training_data: Path | None = None
    combine: Literal["or", "and", "majority"] = "or"
    # Outputs whose flags decide (JSON list, e.g. '["isolation_forest","lstm_autoencoder"]' for the
    # seed's IF-or-LSTM); default: the model set's own decision, chosen by NAB score.
    decision: list[str] | None = None
    # What the detector computes on every message (issue 16). "design": the design card's
    # IsolationForest and LSTM autoencoder scores plus whatever the decision needs; "lean": what the
    # decision needs only (the fastest); "all": every output of the model set. `outputs` (JSON
    # list) adds named outputs to the chosen set. An output not computed is not in a record's
    # `scores`/`flags` (its if_*/lstm_* fields are then false / 0).
    scoring: Literal["design", "lean", "all"] = "design"
    outputs: list[str] = []

    # --- Log detector service (raw lines of topic_logs -> templates -> sessions -> next-event model)
    logdetector_group: str = "anomstream-logdetector"
    model_logs: str = "hdfs_logs"  # `anomstream logs train` writes it under model_dir
    # drain3 state (templates); default: <home>/state/logs. The open sessions are kept per input
    # partition in the changelog topic "<state_topic_prefix>-logdetector-<topic_logs>".
    log_state_dir: Path | None = None
    log_session_key: str = r"blk_-?\d+"  # regex of a session key in a line (default: HDFS block id)
    log_session_timeout_s: float = Field(300.0, gt=0)  # event time without a line that ends a session
    log_terminal_events: list[str] = []  # event ids that end a session at once
    log_max_sessions: int = Field(100_000, ge=1)  # open sessions kept; beyond it the least recent go
    log_checkpoint_interval_s: float = Field(5.0, ge=0)  # changed sessions + offsets to the changelog this often
    log_max_line_bytes: int = Field(16 * 1024, ge=64)

    # --- Alerter service
    alerter_group: str = "anomstream-alerter"
    slack_bot_token: SecretStr | None = None
    slack_webhook_url: SecretStr | None = None
    slack_channel: str = "#alerts"
    slack_base_url: str | None = None  # e.g. a proxy, or the local Slack test server
    slack_timeout_s: float = Field(10.0, gt=0)
    alert_cooldown_s: float = Field(300.0, ge=0)
    # --- Alertmanager-like alerting (services.alerter; README "Grouping, silences, routes"): kept together.
    # Grouping, on by default as in Alertmanager (off: each anomaly is posted at once, with the cooldown
    # above): per channel and group_by labels.
    alert_grouping: bool = True
    alert_group_by: list[str] = ["kind", "definition"]  # labels: series, kind, definition, severity, ...
    alert_group_wait_s: float = Field(30.0, ge=0)  # a new group's first notification waits this long
    alert_group_interval_s: float = Field(300.0, ge=0)  # then at most one notification per group this often
    alert_resolve_timeout_s: float = Field(300.0, ge=0)  # no anomaly of a series this long: resolved (0: never)
    alert_group_max_listed: int = Field(10, ge=1)  # series listed in one message, then "and N more"
    # [{"match": {"kind": "rule"}, "matchers": ["series=~\"db-.*\""], "channel": "#db"}]: first match wins.
    alert_routes: list[dict] = []
    alert_silences_file: Path | None = None  # YAML or JSON; default <home>/silences.yaml
    alert_chart_points: int = Field(60, ge=0)  # recent points per series in a message's PNG (bot token); 0: none
    alertmanager_url: str | None = None  # also POST every alert to <url>/api/v2/alerts
    # --- end of Alertmanager-like alerting

    # --- State changelogs and the alerter's once-only posting (shared.changelog; added together).
    # A service's per-key state on a compacted topic "<state_topic_prefix>-<service>-<input topic>",
    # one partition per input partition, restored when a partition is assigned.
    state_topic_prefix: str = Field("anomstream-state", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    state_restore_timeout_s: float = Field(120.0, gt=0)  # reading a changelog to its end on assignment
    # FOR TESTS ONLY (fault injection): the alerter sleeps this long after an alert was posted and its
    # durable marker written, before the record is committed, so a test can kill it in that gap. 0: off.
    fault_pause_after_post_s: float = Field(0.0, ge=0)
    # --- end of state changelog settings

    # --- Rules service (detector definitions: rules/*.yaml)
    rules_dir: Path = Field(default_factory=lambda: Path.cwd() / "rules")
    rules_group: str = "anomstream-rules"
    environment: str = "prod"  # a definition runs where its `environment` list names this
    rules_allowed_lateness_s: float = Field(60.0, ge=0)  # a definition's allowed_lateness overrides it
    rules_idle_partition_s: float = Field(10.0, gt=0)  # a partition silent this long stops holding the watermark
    # Run history of every check (models.rules.run_history): SQLite file, or postgresql+psycopg://...
    # Default: sqlite:///<home>/state/rules_history.db
    rules_db_url: str | None = None

    # --- Broker metrics scraper (Prometheus JMX exporter endpoint of a broker)
    metrics_exporter_url: str = "http://127.0.0.1:7071/metrics"
    scrape_interval_s: float = Field(1.0, gt=0, le=3600)

    # --- Observability (shared.telemetry): Prometheus /metrics, /healthz and /readyz on this port
    # (0: no HTTP server). Each service in a container of its own: the same port for all; several
    # on one host (`anomstream run`): one port each.
    http_port: int = Field(9400, ge=0, le=65535)
    http_host: str = "0.0.0.0"

    # --- The detector on Spark Structured Streaming (`anomstream spark-detect`, services/detector/spark)
    # Master when not run by spark-submit (which sets its own); checkpoint (offsets, commits and the
    # per-series state store: on a cluster, a path every node reaches, e.g. hdfs:// or s3a://);
    # default <home>/spark/checkpoint. The state partitions are fixed by the first run of a checkpoint.
    spark_master: str = "local[2]"
    spark_checkpoint: str | None = None
    spark_trigger_s: float = Field(1.0, gt=0, le=3600)
    spark_state_partitions: int = Field(8, ge=1, le=10_000)
    spark_max_offsets_per_trigger: int | None = Field(None, ge=1)
    # More options of the Kafka source and sink, Spark's names: '{"kafka.sasl.jaas.config": "..."}'
    # (the connection settings above are mapped to them already), and more Spark configuration.
    spark_kafka_options: dict[str, str] = {}
    spark_conf: dict[str, str] = {}

    # --- Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("kafka_extra")
    @classmethod
    def _no_guarantee_properties(cls, extra: dict) -> dict:
        refused = sorted(set(extra) & GUARANTEE_PROPERTIES)
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot be set here: the delivery guarantees depend on the "
                             "value the services set (see ANOMSTREAM_DELIVERY and ANOMSTREAM_AUTO_OFFSET_RESET)")
        return extra

    @model_validator(mode="after")
    def _paths_under_home(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        if self.model_dir is None:
            self.model_dir = self.home / "models"
        if self.log_state_dir is None:
            self.log_state_dir = self.home / "state" / "logs"
        if self.spark_checkpoint is None:
            self.spark_checkpoint = str(self.home / "spark" / "checkpoint")
        if self.rules_db_url is None:
            self.rules_db_url = f"sqlite:///{self.home / 'state' / 'rules_history.db'}"
        return self

    def topic_models(self) -> dict[str, str]:
        return {self.topic_input: self.model_input, self.topic_transactions: self.model_transactions}

    def nab_csvs(self) -> list[Path]:
        return sorted((self.data_dir / "nab_ec2" / "data" / "realAWSCloudwatch").glob("*.csv"))

    def topic_partitions(self) -> dict[str, int]:
        return {
            self.topic_input: self.partitions_input,
            self.topic_transactions: self.partitions_transactions,
            self.topic_anomalies: self.partitions_anomalies,
            self.topic_scores: self.partitions_scores,
            self.topic_dead_letter: self.partitions_dead_letter,
            self.topic_kafka_metrics: self.partitions_kafka_metrics,
            self.topic_logs: self.partitions_logs,
        }


class ConfigError(SystemExit):
    """Raised at start-up for an invalid setting; the message names the environment variable."""


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            if field == "KAFKA_BOOTSTRAP_SERVERS":  # pydantic names the first alias, whichever was set
                var = f"KAFKA_BOOTSTRAP_SERVERS (or {ENV_PREFIX}BOOTSTRAP_SERVERS)"
            else:
                var = field if field.startswith(ENV_PREFIX) else f"{ENV_PREFIX}{field.upper()}"
            problems.append(f"{var}: {err['msg']}")
        raise ConfigError("invalid setting " + "; ".join(problems)) from None
    except SettingsError as exc:  # e.g. ANOMSTREAM_KAFKA_EXTRA that is not JSON
        match = re.search(r'field "([^"]+)"', str(exc))
        var = f"{ENV_PREFIX}{match.group(1).upper()}" if match else "?"
        raise ConfigError(f"invalid setting {var}: {exc}") from None
