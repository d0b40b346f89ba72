"""The broker's own metrics (`kafka_metrics`) and the Real-Time K-Means' scores of them."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

import orjson
from pydantic import ConfigDict, Field, Strict, ValidationError

from shared.records.common import Record, check_size, describe_errors

Rate = Annotated[float, Strict(), Field(ge=0)]


class BrokerMetricsRecord(Record):
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
        raise ValueError(describe_errors(exc)) from None


class ClusterScoreRecord(Record):
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


def encode_cluster_score_record(source: str, timestamp: datetime, metrics: dict[str, float], score: float,
                                threshold: float, is_anomaly: bool, nearest_cluster: int,
                                deviations: dict[str, float], model_version: str, source_topic: str,
                                source_partition: int, source_offset: int) -> bytes:
    """One ClusterScoreRecord JSON (one per scrape: a few a second, so a plain dict is enough)."""
    return orjson.dumps({
        "kind": "cluster", "series": source, "timestamp": timestamp.isoformat(), "score": float(score),
        "threshold": float(threshold), "is_anomaly": bool(is_anomaly), "nearest_cluster": int(nearest_cluster),
        "deviations": deviations, "metrics": metrics, "model_version": model_version,
        "source_topic": source_topic, "source_partition": source_partition, "source_offset": source_offset,
        "detected_at": datetime.now(timezone.utc).isoformat(),
    })
