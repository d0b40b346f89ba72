"""What every record family shares: strict numbers, the size check, readable validation errors,
epoch <-> ISO 8601."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import numpy as np
from pydantic import BaseModel, Strict, ValidationError


class Record(BaseModel):
    """A record written to a topic: `encode()` is its one serialisation."""

    def encode(self) -> bytes:
        return self.__pydantic_serializer__.to_json(self)


StrictFloat = Annotated[float, Strict()]  # a JSON number; "1.5" (a string) or true are refused


def epoch_seconds(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def describe_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
    )


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
