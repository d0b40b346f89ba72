"""Metric points (`input_data`, `transactions`) and their scores (`scores`, `anomalies`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Literal

import numpy as np
import orjson
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError

from shared.records.common import (
    Record,
    StrictFloat,
    check_size,
    describe_errors,
    epoch_seconds,
    iso_utc,
)


class MetricRecord(Record):
    """One point of a metric series: the payload of `input_data` and `transactions`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    series: Annotated[str, Strict()] = Field(min_length=1, max_length=256)
    timestamp: datetime  # ISO 8601 string or epoch seconds; naive means UTC
    value: StrictFloat


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

def decode_metric(payload: bytes | None, max_bytes: int) -> MetricRecord:
    """Validate one message; raises ValueError with a reason a person can act on."""
    check_size(payload, max_bytes)
    try:
        return MetricRecord.model_validate_json(payload)
    except ValidationError as exc:
        raise ValueError(describe_errors(exc)) from None


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
    out.timestamps = np.fromiter((epoch_seconds(r.timestamp) for r in records), np.float64, len(records))
    out.values = np.fromiter((r.value for r in records), np.float64, len(records))
    return out


def encode_metric_frame(frame) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of MetricRecord messages for a frame of series, epoch_s, value."""
    stamps = iso_utc(frame["epoch_s"].to_numpy())
    keys = [s.encode() for s in frame["series"]]
    values = [
        orjson.dumps({"series": s, "timestamp": t, "value": v})
        for s, t, v in zip(frame["series"].tolist(), stamps, frame["value"].tolist())
    ]
    return keys, values


def encode_score_records(series: list[str], epoch_s: np.ndarray, values: np.ndarray, is_anomaly: np.ndarray,
                         scores: dict[str, np.ndarray], flags: dict[str, np.ndarray], decision: list[str],
                         model_version: str, source_topic: str,
                         sources: list[tuple[int, int, int]]) -> list[bytes]:
    """One ScoreRecord JSON per scored point, built column-wise (pydantic per record would cost
    more than the scoring). `sources` is (partition, offset, timestamp ms) of each input message.
    The isolation_forest / lstm_autoencoder fields are the design card's named outputs."""
    stamps = iso_utc(epoch_s)
    detected_at = datetime.now(timezone.utc).isoformat()
    anomalous = is_anomaly.tolist()
    if_flag, lstm_flag = flags["isolation_forest"].tolist(), flags["lstm_autoencoder"].tolist()
    if_score, recon = scores["isolation_forest"].tolist(), scores["lstm_autoencoder"].tolist()
    names = list(scores)
    all_scores = [scores[n].tolist() for n in names]
    all_flags = [flags[n].tolist() for n in names]
    out = []
    for j, (value, (partition, offset, ts_ms)) in enumerate(zip(values.tolist(), sources)):
        out.append(orjson.dumps({
            "series": series[j], "timestamp": stamps[j], "value": value,
            "is_anomaly": anomalous[j], "if_anomaly": if_flag[j], "lstm_anomaly": lstm_flag[j],
            "reconstruction_error": recon[j], "if_score": if_score[j], "model_version": model_version,
            "source_topic": source_topic, "source_partition": partition, "source_offset": offset,
            "source_timestamp_ms": ts_ms, "detected_at": detected_at,
            "scores": {n: col[j] for n, col in zip(names, all_scores)},
            "flags": {n: col[j] for n, col in zip(names, all_flags)},
            "decision": decision, "kind": "score",
        }))
    return out
