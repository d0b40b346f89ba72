"""Rule firings: what the rules service writes to `anomalies` (its input is any JSON object)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

from shared.records.common import Record, check_size


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


class RuleFiringRecord(Record):
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
