"""What every record family shares: strict numbers, the size check, readable and bounded validation
errors, epoch <-> ISO 8601."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated

import numpy as np
import orjson
from pydantic import BaseModel, Strict, ValidationError


class Record(BaseModel):
    """A record written to a topic: `encode()` is its one serialisation."""

    def encode(self) -> bytes:
        return self.__pydantic_serializer__.to_json(self)


StrictFloat = Annotated[float, Strict()]  # a JSON number; "1.5" (a string) or true are refused


def epoch_seconds(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


# A dead letter's reason (a Kafka header, a log field) stays small and printable whatever the
# message holds: a 10 KB key name or thousands of unknown keys are not copied into it whole.
MAX_NAME_CHARS = 200  # of one field name (or other text quoted from the message)
MAX_ERRORS_LISTED = 5
MAX_REASON_CHARS = 1000


def printable(text: str, limit: int = MAX_NAME_CHARS) -> str:
    """`text` for a reason: control, bidirectional-text and other unprintable characters escaped
    (\\x0a, \\u202e), at most `limit` characters, a longer text cut and its length said."""
    if len(text) <= limit and text.isprintable():
        return text
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                    for c in text[:limit])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(text)} characters)"


def describe_errors(exc: ValidationError, explain: Callable[[dict], str | None] | None = None) -> str:
    """`field: what is wrong` for each error (the first few), bounded in size. `explain(error)` may
    word an error better than pydantic (it sees the error's type, loc and input)."""
    errors = exc.errors(include_url=False, include_input=explain is not None, include_context=False)
    parts = [f"{'.'.join(printable(str(p)) for p in e['loc']) or 'payload'}: "
             f"{printable((explain and explain(e)) or e['msg'], 300)}" for e in errors[:MAX_ERRORS_LISTED]]
    if len(errors) > MAX_ERRORS_LISTED:
        parts.append(f"and {len(errors) - MAX_ERRORS_LISTED} more errors")
    return bounded("; ".join(parts))


def bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


def check_size(payload: bytes | None, max_bytes: int) -> bytes:
    if payload is None:
        raise ValueError("empty message (null value)")
    if len(payload) > max_bytes:
        raise ValueError(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    return payload


def iso_utc(epoch_s: np.ndarray) -> list[str]:
    """Vectorised epoch seconds -> ISO 8601 strings with a Z suffix."""
    stamps = np.datetime_as_string(np.asarray(epoch_s * 1000, dtype="int64").astype("datetime64[ms]"), unit="s")
    return [s + "Z" for s in stamps.tolist()]


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
