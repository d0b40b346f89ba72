"""Raw log lines (`logs`) and the anomalous sessions the log detector finds in them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Strict, ValidationError

from shared.records.common import Record, check_size, describe_errors


class LogLineRecord(Record):
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
            raise ValueError(describe_errors(exc)) from None
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


class LogSessionRecord(Record):
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
