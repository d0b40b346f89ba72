"""Message schemas: what goes on each topic, and the fast batch decoder for input messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
)

StrictFloat = Annotated[float, Strict()]  # a JSON number; "1.5" (a string) or true are refused


class MetricRecord(BaseModel):
    """One point of a metric series: the payload of `input_data` and `transactions`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    series: Annotated[str, Strict()] = Field(min_length=1, max_length=256)
    timestamp: datetime  # ISO 8601 string or epoch seconds; naive means UTC
    value: StrictFloat


Rate = Annotated[float, Strict(), Field(ge=0)]


class BrokerMetricsRecord(BaseModel):
    """One scrape of a broker's metrics endpoint: the payload of `kafka_metrics`. Each value is a
    per-second rate over the interval ending at `timestamp` (counters turned into rates); names
    are `messages_in`, `bytes_in`, `bytes_out`, `fetch_requests`, `produce_requests` for the broker
    and `<name>:<topic>` where the exporter labels a topic."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    kind: Literal["broker_metrics"] = "broker_metrics"
    source: Annotated[str, Strict()] = Field(min_length=1, max_length=512)  # the exporter URL
    timestamp: datetime
    interval_s: Annotated[float, Strict(), Field(gt=0)]
    metrics: dict[str, Rate] = Field(max_length=2000)


def decode_broker_metrics(payload: bytes | None, max_bytes: int) -> BrokerMetricsRecord:
    """Validate one `kafka_metrics` message; raises ValueError with the reason."""
    check_size(payload, max_bytes)
    try:
        return BrokerMetricsRecord.model_validate_json(payload)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


class ClusterScoreRecord(BaseModel):
    """One scored scrape of a broker's metrics (Real-Time K-Means): the payload of `scores`, and of
    `anomalies` when is_anomaly."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["cluster"] = "cluster"
    series: str  # the metrics source (exporter URL)
    timestamp: datetime
    score: float  # distance to the nearest center, in scaled units
    threshold: float
    is_anomaly: bool
    nearest_cluster: int
    # The metrics furthest from the nearest center (scaled units, signed): what made it anomalous.
    deviations: dict[str, float]
    metrics: dict[str, float]  # the scraped rates
    model_version: str
    source_topic: str
    source_partition: int
    source_offset: int
    detected_at: datetime


class LogLineRecord(BaseModel):
    """A raw log line sent as JSON to `logs` (a plain-text message is the line itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message: Annotated[str, Strict()] = Field(min_length=1)
    timestamp: datetime | None = None  # event time; else the line's own header, else the Kafka timestamp


def decode_log_line(payload: bytes | None, max_bytes: int) -> LogLineRecord:
    """One `logs` message -> its line: plain UTF-8 text (one line), or a JSON object with `message`
    (and optionally `timestamp`). Raises ValueError with the reason."""
    check_size(payload, max_bytes)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"a log line must be UTF-8 text: {exc}") from None
    if text.lstrip().startswith("{"):
        try:
            record = LogLineRecord.model_validate_json(payload)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None
        text = record.message
    else:
        record = None
    line = text.rstrip("\r\n")
    if not line.strip():
        raise ValueError("empty log line")
    if "\n" in line or "\r" in line:
        raise ValueError("a message must hold one log line, not several")
    return record if record is not None and line == record.message else LogLineRecord(
        message=line, timestamp=record.timestamp if record else None)


class LogSessionRecord(BaseModel):
    """A log session found anomalous (next-event model): the payload the log detector writes to
    `anomalies`, once per session, at its first unexpected event."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["log"] = "log"
    series: str  # the session key (HDFS: the block id)
    timestamp: datetime  # event time of the offending line (of the session's last line, for a session end)
    event: str  # the offending event id; "<END>" when the session ended where it was not expected to
    template: str  # its template text
    reason: str
    rank: float  # of the event among the model's predictions (1 = most likely; 1e6 = never seen)
    probability: float
    k: int
    min_prob: float
    window: list[str]  # the session's events just before the offending one (oldest first)
    session_events: int  # events of the session so far
    line: str  # the offending raw line (empty for a session end)
    model_version: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    detected_at: datetime


class ScoreRecord(BaseModel):
    """One scored input: the payload of `scores`, and of `anomalies` when is_anomaly."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    series: str
    timestamp: datetime
    value: float
    is_anomaly: bool
    if_anomaly: bool
    lstm_anomaly: bool
    reconstruction_error: float
    if_score: float
    model_version: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int
    detected_at: datetime
    scores: dict[str, float] = {}  # every output of the model set, incl. the likelihood stages
    flags: dict[str, bool] = {}
    decision: list[str] = []  # the outputs whose flags made is_anomaly
    kind: Literal["score"] = "score"


# Each message is wrapped as a one-element array and the arrays are joined with a newline: a raw
# newline cannot sit inside a JSON string and a record holds no nested arrays, so a message cannot
# run on into the next one; with exactly one record per wrapper, record i is message i.
_metric_list = TypeAdapter(list[tuple[MetricRecord]])


@dataclass
class DecodedBatch:
    """Good messages as columns (positions into the original batch in `index`), bad ones with reasons."""

    index: list[int] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    timestamps: np.ndarray = field(default_factory=lambda: np.empty(0))  # epoch seconds, UTC
    values: np.ndarray = field(default_factory=lambda: np.empty(0))
    errors: list[tuple[int, str]] = field(default_factory=list)


def _epoch(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
    )


def check_size(payload: bytes | None, max_bytes: int) -> bytes:
    if payload is None:
        raise ValueError("empty message (null value)")
    if len(payload) > max_bytes:
        raise ValueError(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    return payload


def decode_metric(payload: bytes | None, max_bytes: int) -> MetricRecord:
    """Validate one message; raises ValueError with a reason a person can act on."""
    check_size(payload, max_bytes)
    try:
        return MetricRecord.model_validate_json(payload)
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None


def decode_metrics(payloads: list[bytes | None], max_bytes: int) -> DecodedBatch:
    """Decode a batch. The common all-good case is one pydantic-core call for the whole batch;
    only a batch that holds a bad message is decoded message by message to find which."""
    records: list[MetricRecord] | None = None
    if all(p is not None and 0 < len(p) <= max_bytes for p in payloads):
        try:
            wrapped = _metric_list.validate_json(b"[[" + b"]\n,[".join(payloads) + b"]]")
            # A payload such as `{..}],[{..}` would smuggle two records into the joined array.
            records = [t[0] for t in wrapped] if len(wrapped) == len(payloads) else None
        except ValidationError:
            records = None
    out = DecodedBatch()
    if records is not None:
        out.index = list(range(len(payloads)))
    else:
        records = []
        for i, payload in enumerate(payloads):
            try:
                records.append(decode_metric(payload, max_bytes))
                out.index.append(i)
            except ValueError as exc:
                out.errors.append((i, str(exc)))
    out.series = [r.series for r in records]
    out.timestamps = np.fromiter((_epoch(r.timestamp) for r in records), np.float64, len(records))
    out.values = np.fromiter((r.value for r in records), np.float64, len(records))
    return out


def decode_object(payload: bytes | None, max_bytes: int) -> dict:
    """A message as any JSON object (the rules service filters on any field); raises ValueError."""
    check_size(payload, max_bytes)
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"Invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"a message must be a JSON object, not {type(record).__name__}")
    return record


def iso_utc(epoch_s: np.ndarray) -> list[str]:
    """Vectorised epoch seconds -> ISO 8601 strings with a Z suffix."""
    stamps = np.datetime_as_string(np.asarray(epoch_s * 1000, dtype="int64").astype("datetime64[ms]"), unit="s")
    return [s + "Z" for s in stamps.tolist()]


class ConditionResult(BaseModel):
    """One condition of a rule check: its value, whether it held, and the numbers behind it."""

    model_config = ConfigDict(extra="forbid")

    index: int | None = None  # its position in the definition's conditions
    type: str
    text: str
    metric: str
    value: float | None
    holds: bool
    detail: dict[str, float | int | bool | str | None] = {}


class RuleFiringRecord(BaseModel):
    """A rule definition fired for one group key: the payload the rules service writes to `anomalies`."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["rule"] = "rule"
    definition: str
    description: str = ""
    version: str
    series: str  # the group key ("*" when the definition has no group_by)
    timestamp: datetime  # the end of the checked window
    window_start: datetime
    window_end: datetime
    values: dict[str, float | None]
    conditions: list[ConditionResult]
    source_topic: str
    environment: str
    channels: list[str] = []  # Slack channels named by the definition's slack actions ([] = default)
    detected_at: datetime


def _record_kind(v) -> str | None:
    """The `kind` of an anomalies record; records written before rule firings existed have none."""
    if isinstance(v, dict):
        return v.get("kind", "score")
    return getattr(v, "kind", None)


# Any record that can sit on `anomalies`, told apart by `kind` (missing = "score").
AnomalyRecord = Annotated[
    Union[Annotated[ScoreRecord, Tag("score")], Annotated[RuleFiringRecord, Tag("rule")],
          Annotated[ClusterScoreRecord, Tag("cluster")], Annotated[LogSessionRecord, Tag("log")]],
    Discriminator(_record_kind, custom_error_type="anomaly_kind",
                  custom_error_message="an anomaly record is a JSON object whose kind is 'score' (the default), "
                                       "'rule', 'cluster' or 'log'"),
]
anomaly_record_adapter: TypeAdapter[ScoreRecord | RuleFiringRecord | ClusterScoreRecord | LogSessionRecord] = \
    TypeAdapter(AnomalyRecord)


def encode_metric_frame(frame) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of MetricRecord messages for a frame of series, epoch_s, value."""
    stamps = iso_utc(frame["epoch_s"].to_numpy())
    keys = [s.encode() for s in frame["series"]]
    values = [
        orjson.dumps({"series": s, "timestamp": t, "value": v})
        for s, t, v in zip(frame["series"].tolist(), stamps, frame["value"].tolist())
    ]
    return keys, values
