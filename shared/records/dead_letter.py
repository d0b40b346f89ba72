"""Dead letters on `dead_letter`: the original key and bytes, unchanged, with why and where from in
headers (`dlq.error`, `dlq.topic`, `dlq.partition`, `dlq.offset`, `dlq.service`)."""

from __future__ import annotations


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int, service: str) -> list[tuple[str, bytes]]:
    return [
        ("dlq.error", reason.encode()),
        ("dlq.topic", topic.encode()),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
        ("dlq.service", service.encode()),
    ]

