"""Metric points (`input_data`, `transactions`) and their scores (`scores`, `anomalies`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Literal

import numpy as np
import orjson
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from shared.records.common import (
    Record,
    StrictFloat,
    bounded,
    check_size,
    decode_object,
    describe_errors,
    epoch_seconds,
    iso_utc,
    printable,
)

DEFAULT_MAX_ABS_VALUE = 1e12  # setting max_abs_value (ANOMSTREAM_MAX_ABS_VALUE)
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2200, 1, 1, tzinfo=timezone.utc)

# C0 and C1 controls (NUL, tab, newline, ESC, DEL, NEL, ...), the line and paragraph separators and
# the bidirectional-text controls (embeddings, overrides, isolates, marks): a series name is a Kafka
# key, a log field and a Slack line, where these break lines or reorder what a person reads.
_FORBIDDEN = (r"\x{0}-\x{1F}\x{7F}-\x{9F}\x{61C}\x{200E}\x{200F}\x{2028}\x{2029}\x{202A}-\x{202E}"
              r"\x{2066}-\x{2069}")
# Checked by pydantic-core (Rust regex): no forbidden character, and one that is not white space.
_SERIES_PATTERN = rf"^[^{_FORBIDDEN}]*[^{_FORBIDDEN}\s][^{_FORBIDDEN}]*$"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_FORBIDDEN_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

SeriesName = Annotated[str, Strict(), Field(min_length=1, max_length=256, pattern=_SERIES_PATTERN)]
# ISO 8601 or epoch seconds (naive = UTC), in [1970, 2200). A number is always read as seconds
# (val_temporal_unit): pydantic's default would read one above 2e10 as milliseconds, so epoch
# seconds of year 2773 became 1970-10-21; now they are year 2773, and refused.
Timestamp = Annotated[datetime, Field(ge=EARLIEST, lt=LATEST)]


class MetricRecord(Record):
    """One point of a metric series: the payload of `input_data` and `transactions`. A message must
    also hold each key once and a value within the setting max_abs_value: see decode_metric."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, val_temporal_unit="seconds")

    series: SeriesName
    timestamp: Timestamp
    value: StrictFloat


# The decoder validates into a plain dict (a model instance per message would cost more than the
# validation): the same fields with the same rules, taken from MetricRecord itself.
_MetricFields = TypedDict("_MetricFields", {  # type: ignore[misc]
    name: Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
    for name, f in MetricRecord.model_fields.items()})
_METRIC_CONFIG = {k: v for k, v in MetricRecord.model_config.items() if k != "frozen"}
TimestampUnit = Literal["seconds", "milliseconds"]


def _adapter(fields, unit: TimestampUnit) -> TypeAdapter:
    """A validator of `fields` reading a number as epoch `unit` (the setting timestamp_unit)."""
    fields = TypedDict(fields.__name__, fields.__annotations__, total=fields.__total__)  # type: ignore[misc]
    fields.__pydantic_config__ = ConfigDict(**(_METRIC_CONFIG | {"val_temporal_unit": unit}))
    return TypeAdapter(fields)


_metric_fields = {unit: _adapter(_MetricFields, unit) for unit in ("seconds", "milliseconds")}
_KEYS = tuple(f'"{name}"'.encode() for name in MetricRecord.model_fields)

# --- Labelled input: {"metric": "cpu", "labels": {"host": "a"}, "timestamp": ..., "value": ...} ---
# The series identity is the metric and its labels sorted by name, written as Prometheus writes a
# series: cpu{host="a",region="eu"}. Top-level fields named in the setting label_fields are labels
# too; any other field is refused, in the detector and the rules service alike.
UNKNOWN_FIELD = "unknown field; a field that is a label goes in `labels` or is named in ANOMSTREAM_LABEL_FIELDS"
LABEL_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
MAX_LABELS = 32
MAX_SERIES_CHARS = 1024  # of a labelled series' identity
RESERVED_LABELS = frozenset({"series", "metric", "labels", "timestamp", "value"})
LabelName = Annotated[str, Strict(), Field(min_length=1, max_length=128, pattern=LABEL_NAME)]
LabelValue = Annotated[str, Strict(), Field(min_length=1, max_length=256, pattern=_SERIES_PATTERN)]
_LabelledFields = TypedDict("_LabelledFields", {  # type: ignore[misc]
    "metric": SeriesName,
    "labels": Annotated[dict[LabelName, LabelValue], Field(max_length=MAX_LABELS)],
    "timestamp": Timestamp,
    "value": StrictFloat,
}, total=False)
_labelled_fields = {unit: _adapter(_LabelledFields, unit) for unit in ("seconds", "milliseconds")}


def series_identity(metric: str, labels: dict[str, str]) -> str:
    """metric{a="x",b="y"}: the labels sorted by name, `\\` and `"` escaped in values."""
    if not labels:
        return metric
    inner = ",".join('{}="{}"'.format(k, labels[k].replace("\\", "\\\\").replace('"', '\\"'))
                     for k in sorted(labels))
    return f"{metric}{{{inner}}}"


_LABEL_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def series_labels(series: str) -> tuple[str, dict[str, str]]:
    """The metric and labels of a series identity (series_identity's inverse); a plain series
    name is a metric without labels."""
    if not series.endswith("}") or "{" not in series:
        return series, {}
    metric, inner = series[:series.index("{")], series[series.index("{") + 1:-1]
    pairs = _LABEL_PAIR.findall(inner)
    if not pairs:
        return series, {}
    return metric, {k: re.sub(r"\\(.)", r"\1", v) for k, v in pairs}


@dataclass(frozen=True)
class MetricInput:
    """How a team's metric messages are read (settings label_fields and timestamp_unit): the same
    in every service that reads them."""

    label_fields: tuple[str, ...] = ()
    timestamp_unit: TimestampUnit = "seconds"

    @classmethod
    def of(cls, settings) -> MetricInput:
        return cls(tuple(settings.label_fields), settings.timestamp_unit)

    def plain(self, payload: bytes) -> bool:
        """Today's shape {series, timestamp, value} and nothing to map: the fast validator."""
        return (b'"metric"' not in payload and b'"labels"' not in payload
                and not any(f'"{f}"'.encode() in payload for f in self.label_fields))


def _decode_labelled(payload: bytes, fmt: MetricInput) -> dict:
    """A labelled message -> the plain fields (series: its identity) plus metric and labels."""
    obj = decode_object(payload, len(payload))
    labels = obj.get("labels", {})
    if not isinstance(labels, dict):
        raise ValueError("labels: must be an object of label name -> string value")
    labels = dict(labels)
    for name in fmt.label_fields:
        if name in obj:
            given = obj.pop(name)
            if not isinstance(given, str):
                raise ValueError(f"{printable(name)}: a label (setting ANOMSTREAM_LABEL_FIELDS) must be a string, "
                                 f"not {type(given).__name__}")
            if name in labels:
                raise ValueError(f"{printable(name)}: given both as a field and in labels")
            labels[name] = given
    if labels:
        obj["labels"] = labels
    has_series, has_metric = "series" in obj, "metric" in obj
    if has_series == has_metric:
        raise ValueError("metric: a message names its series with `metric` (and `labels`) or `series`, "
                         + ("not both" if has_series else "and has neither"))
    if has_series:
        obj["metric"] = obj.pop("series")
    extra = sorted(set(obj) - set(_LabelledFields.__annotations__))
    if extra:
        raise ValueError(bounded(f"{printable(extra[0])}: {UNKNOWN_FIELD}"
                                 + (f" (and {len(extra) - 1} more unknown fields)" if len(extra) > 1 else "")))
    reserved = sorted(set(labels) & RESERVED_LABELS)
    if reserved:
        raise ValueError(f"labels.{reserved[0]}: a reserved name (series, metric, labels, timestamp, value) "
                         "cannot be a label")
    missing = [k for k in ("timestamp", "value") if k not in obj]
    if missing:
        raise ValueError("; ".join(f"{k}: Field required" for k in missing))
    try:
        fields = _labelled_fields[fmt.timestamp_unit].validate_python(obj)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc, _explain_labelled)) from None
    if "{" in fields["metric"] and fields.get("labels"):
        raise ValueError("metric: `{` cannot be part of a metric name that has labels (it starts the labels "
                         "in the series identity)")
    fields["series"] = series_identity(fields["metric"], fields.get("labels", {}))
    if len(fields["series"]) > MAX_SERIES_CHARS:
        raise ValueError(f"labels: the series identity (metric and labels) is {len(fields['series'])} characters, "
                         f"more than {MAX_SERIES_CHARS}")
    return fields


def _series_problem(name: str) -> str:
    if not name.strip():
        return "the name is blank (white space only)"
    bad = _FORBIDDEN_RE.search(name)
    if bad is None:
        return "the name is not allowed"
    return (f"the name holds the control or bidirectional-text character U+{ord(bad.group()):04X} at position "
            f"{bad.start()}; such characters are not allowed in a series name")


def _timestamp_problem(given) -> str:
    shown = printable(given if isinstance(given, str) else repr(given), 40)
    return (f"{shown} is outside 1970-01-01..2200-01-01 (epoch seconds 0..{LATEST.timestamp():.0f}); a number is "
            "read as epoch seconds, never as milliseconds unless ANOMSTREAM_TIMESTAMP_UNIT=milliseconds: send seconds, "
            "an ISO 8601 string, or set that")


def _explain(error: dict) -> str | None:
    """Our own words for what pydantic says in its own: which character of a series name is wrong,
    and why a timestamp is refused."""
    loc, kind = error["loc"], error["type"]
    if kind == "extra_forbidden" and len(loc) == 1:
        return UNKNOWN_FIELD
    if loc == ("series",) and kind == "string_pattern_mismatch":
        return _series_problem(error["input"])
    if loc == ("timestamp",):
        if kind in ("less_than", "greater_than_equal"):
            return _timestamp_problem(error["input"])
        given = error["input"]  # a number too large for a datetime (e.g. milliseconds): say why
        if isinstance(given, str) and _NUMBER.fullmatch(given):
            given = float(given)
        if isinstance(given, (int, float)) and not isinstance(given, bool) and not 0 <= given < LATEST.timestamp():
            return _timestamp_problem(error["input"])
    return None


_timestamps = {unit: TypeAdapter(Timestamp, config=ConfigDict(val_temporal_unit=unit))
               for unit in ("seconds", "milliseconds")}


def parse_timestamp(value, unit: TimestampUnit = "seconds") -> float | None:
    """A timestamp field of any message -> epoch seconds, read exactly as a metric's timestamp is
    (ISO 8601, naive = UTC, or a number of epoch `unit`, in 1970..2200); None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return epoch_seconds(_timestamps[unit].validate_python(value))
    except ValidationError:
        return None


def _explain_labelled(error: dict) -> str | None:
    if error["loc"][:1] == ("metric",):
        return _explain(error | {"loc": ("series",)})
    if error["loc"][:1] == ("labels",) and error["type"] == "string_pattern_mismatch" and error["loc"][-1] == "[key]":
        return (f"{printable(str(error['input']))}: a label name is letters, digits and _ and does not start "
                "with a digit")
    return _explain(error)


@dataclass
class DecodedBatch:
    """Good messages as columns (positions into the original batch in `index`), bad ones with reasons."""

    index: list[int] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    timestamps: np.ndarray = field(default_factory=lambda: np.empty(0))  # epoch seconds, UTC
    values: np.ndarray = field(default_factory=lambda: np.empty(0))
    errors: list[tuple[int, str]] = field(default_factory=list)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _duplicate_key(payload: bytes) -> str | None:
    """The first key an object of `payload` holds twice (JSON parsers keep the last silently)."""
    # Two cheap proofs that an object which passes validation (so has "series", "timestamp" and
    # "value", and no other key) holds no key twice. An object of n members has n - 1 commas between
    # them (a comma inside a string only adds to the count): at most 2 commas, at most 3 members.
    # Or, without a backslash no key is escaped, so each member's key appears verbatim: each of the
    # three once, each member once.
    if payload.count(b",") <= 2 or (b"\\" not in payload and all(payload.count(key) == 1 for key in _KEYS)):
        return None
    try:
        json.loads(payload, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as dup:
        return dup.args[0]
    except (ValueError, RecursionError):  # not JSON: the validation names what is wrong
        pass
    return None


def _decode(payload: bytes | None, max_bytes: int, max_abs_value: float, fmt: MetricInput = MetricInput()) -> dict:
    """One message, validated alone; raises ValueError with the reason."""
    check_size(payload, max_bytes)
    key = _duplicate_key(payload)
    if key is not None:
        raise ValueError(f"{printable(key)}: duplicate key (the key appears more than once; a JSON parser "
                         "would keep only the last)")
    if fmt.plain(payload):
        try:
            fields = _metric_fields[fmt.timestamp_unit].validate_json(payload)
        except ValidationError as exc:
            raise ValueError(describe_errors(exc, _explain)) from None
    else:
        fields = _decode_labelled(payload, fmt)
    value = fields["value"]
    if not -max_abs_value <= value <= max_abs_value:
        raise ValueError(bounded(f"value: {value:.6g} is outside the accepted range "
                                 f"[-{max_abs_value:g}, {max_abs_value:g}] (setting ANOMSTREAM_MAX_ABS_VALUE)"))
    return fields


def decode_metric(payload: bytes | None, max_bytes: int, max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
                  fmt: MetricInput = MetricInput()) -> MetricRecord:
    """Validate one message; raises ValueError with a reason a person can act on (`field: what is
    wrong`, bounded in size). A labelled message gives its series identity as `series`."""
    fields = _decode(payload, max_bytes, max_abs_value, fmt)
    return MetricRecord.model_construct(series=fields["series"], timestamp=fields["timestamp"], value=fields["value"])


def decode_metric_fields(payload: bytes | None, max_bytes: int, max_abs_value: float = DEFAULT_MAX_ABS_VALUE,
                         fmt: MetricInput = MetricInput()) -> dict:
    """One message as the fields a rule filters and groups on: series (the identity), metric,
    timestamp (ISO 8601, UTC: read alike whatever the timestamp unit), value and each label by its
    name; raises ValueError as decode_metric."""
    fields = _decode(payload, max_bytes, max_abs_value, fmt)
    ts = fields["timestamp"]
    out = {"series": fields["series"], "metric": fields.get("metric", fields["series"]),
           "timestamp": (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).isoformat(), "value": fields["value"]}
    out.update(fields.get("labels", {}))
    return out


def decode_metrics(payloads: list[bytes | None], max_bytes: int,
                   max_abs_value: float = DEFAULT_MAX_ABS_VALUE, fmt: MetricInput = MetricInput()) -> DecodedBatch:
    """Decode a batch, each message validated on its own (exactly as decode_metric): no message can
    run on into its neighbour or carry two records, whatever bytes it holds."""
    out = DecodedBatch()
    records = []
    for i, payload in enumerate(payloads):
        try:
            records.append(_decode(payload, max_bytes, max_abs_value, fmt))
        except ValueError as exc:
            out.errors.append((i, str(exc)))
        else:
            out.index.append(i)
    out.series = [r["series"] for r in records]
    out.timestamps = np.fromiter((epoch_seconds(r["timestamp"]) for r in records), np.float64, len(records))
    out.values = np.fromiter((r["value"] for r in records), np.float64, len(records))
    return out


class Explanation(Record):
    """Why a scored point is an anomaly (on records with is_anomaly): `deciding`, the outputs whose
    alarms made the decision; `tail_probability`, how unusual it is (the probability of recent
    behaviour this far from the series' history, from the deciding likelihood: 1e-5 at the alarm
    threshold, 1e-10 the rarest it says); and what was expected, from the first deciding output
    that has an expectation (`expected_from`): `observed` (what it compared, `observed_what`: the
    value or a recent average), `expected` and the range [`expected_low`, `expected_high`] inside
    which that output alone would not have flagged."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    deciding: list[str]
    tail_probability: float | None = None
    expected_from: str | None = None
    observed_what: str | None = None
    observed: float | None = None
    expected: float | None = None
    expected_low: float | None = None
    expected_high: float | None = None


class ScoreRecord(Record):
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
    why: Explanation | None = None  # on anomalies
    kind: Literal["score"] = "score"


def encode_metric_frame(frame) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of MetricRecord messages for a frame of series, epoch_s, value."""
    stamps = iso_utc(frame["epoch_s"].to_numpy())
    keys = [s.encode() for s in frame["series"]]
    values = [
        orjson.dumps({"series": s, "timestamp": t, "value": v})
        for s, t, v in zip(frame["series"].tolist(), stamps, frame["value"].tolist())
    ]
    return keys, values


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x if np.isfinite(x).all() else np.nan_to_num(x)


def encode_score_records(series: list[str], epoch_s: np.ndarray, values: np.ndarray, is_anomaly: np.ndarray,
                         scores: dict[str, np.ndarray], flags: dict[str, np.ndarray], decision: list[str],
                         model_version: str, source_topic: str,
                         sources: list[tuple[int, int, int]], why: dict[int, dict] | None = None) -> list[bytes]:
    """One ScoreRecord JSON per scored point, built column-wise (pydantic per record would cost
    more than the scoring). `sources` is (partition, offset, timestamp ms) of each input message;
    `why`, row -> Explanation fields, for the anomalous rows.
    The isolation_forest / lstm_autoencoder fields are the design card's named outputs.

    A ScoreRecord holds finite numbers only (JSON has no NaN): should a detector ever return a
    non-finite score, it is written as numpy.nan_to_num writes it (NaN as 0.0, +-inf as the
    largest finite float, +-1.7976931348623157e308). The detectors keep their scores finite
    whatever the input; this is the last guard, not the fix."""
    scores = {n: _finite(s) for n, s in scores.items()}
    values = _finite(values)
    stamps = iso_utc(epoch_s)
    n = len(values)
    # A model set without IsolationForest / the LSTM (or scoring "lean") writes them unflagged, 0.
    off, zero = [False] * n, [0.0] * n
    if_flag = flags["isolation_forest"].tolist() if "isolation_forest" in flags else off
    lstm_flag = flags["lstm_autoencoder"].tolist() if "lstm_autoencoder" in flags else off
    if_score = scores["isolation_forest"].tolist() if "isolation_forest" in scores else zero
    recon = scores["lstm_autoencoder"].tolist() if "lstm_autoencoder" in scores else zero
    # What every record of the batch shares is serialised once and appended to each record's own
    # fields (half the cost of one dict per record with everything in it).
    shared_tail = b"," + orjson.dumps({
        "model_version": model_version, "source_topic": source_topic,
        "detected_at": datetime.now(timezone.utc).isoformat(), "decision": decision, "kind": "score"})[1:]
    names = list(scores)
    score_rows = [dict(zip(names, row)) for row in zip(*(scores[k].tolist() for k in names))] if names else [{}] * n
    flag_rows = [dict(zip(names, row)) for row in zip(*(flags[k].tolist() for k in names))] if names else [{}] * n
    why = why or {}
    dumps = orjson.dumps
    out = []
    for j, (series_j, stamp, value, anomalous, (partition, offset, ts_ms)) in enumerate(
            zip(series, stamps, values.tolist(), is_anomaly.tolist(), sources)):
        record = {"series": series_j, "timestamp": stamp, "value": value, "is_anomaly": anomalous,
                  "if_anomaly": if_flag[j], "lstm_anomaly": lstm_flag[j], "reconstruction_error": recon[j],
                  "if_score": if_score[j], "source_partition": partition, "source_offset": offset,
                  "source_timestamp_ms": ts_ms, "scores": score_rows[j], "flags": flag_rows[j]}
        if j in why:
            record["why"] = why[j]
        out.append(dumps(record)[:-1] + shared_tail)
    return out
