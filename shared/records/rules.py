"""Rule firings: what the rules service writes to `anomalies` (its input is any JSON object)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shared.records.common import Record


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
