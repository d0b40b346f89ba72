"""Dead letters on `dead_letter`: the original key and bytes, unchanged, with why and where from in
headers (`dlq.error`, `dlq.topic`, `dlq.partition`, `dlq.offset`, `dlq.service`). A message too
large to write again goes there as a bounded JSON summary instead (header `dlq.summary: true`)."""

from __future__ import annotations

import base64
import hashlib

import orjson

MAX_REASON_CHARS = 1000  # a reason quoting a 10 KB key name stays a reason
PREFIX_BYTES = 1024
DEAD_LETTER_OVERHEAD = 4096  # headers and record framing beside a dead letter's key and value


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int, service: str) -> list[tuple[str, bytes]]:
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + f"... ({len(reason)} characters)"
    return [
        ("dlq.error", reason.encode()),
        ("dlq.topic", topic.encode()),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
        ("dlq.service", service.encode()),
    ]


def dead_letter_summary(value: bytes | None, key: bytes | None, reason: str, topic: str, partition: int,
                        offset: int) -> bytes:
    """What stands for a message too large to write again: enough to find it (origin), recognise
    it (size, SHA-256, its first bytes) and know why it was refused."""
    value = value or b""
    return orjson.dumps({
        "reason": reason[:MAX_REASON_CHARS], "topic": topic, "partition": partition, "offset": offset,
        "size": len(value), "key_size": len(key or b""), "sha256": hashlib.sha256(value).hexdigest(),
        "prefix_base64": base64.b64encode(value[:PREFIX_BYTES]).decode(),
    })


def dead_letter_record(value: bytes | None, key: bytes | None, reason: str, topic: str, partition: int,
                       offset: int, service: str, max_produce_bytes: int
                       ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]], bool]:
    """(value, key, headers, summarised) of one dead letter: the original bytes and key, unchanged,
    with where they came from and why in headers; a message too large to write again (over
    `max_produce_bytes`) as a bounded summary (dead_letter_summary, header `dlq.summary: true`).
    Every runner builds its dead letters here (the stream core, the Spark detector)."""
    headers = dead_letter_headers(reason, topic, partition, offset, service)
    if len(value or b"") + len(key or b"") + DEAD_LETTER_OVERHEAD <= max_produce_bytes:
        return value, key, headers, False
    summary = dead_letter_summary(value, key, reason, topic, partition, offset)
    return summary, (key or b"")[:256] or None, headers + [("dlq.summary", b"true")], True
