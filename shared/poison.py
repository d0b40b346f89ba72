"""Poison pills that kill the process: a message whose processing crashes the interpreter or
exhausts memory cannot be caught as an exception, and would crash-loop its partition (restart,
re-read, die again). The stream loop notes on disk which offsets of each partition it has in hand
(from the first uncommitted one to the last read); a note left by a process that died counts a
death. After `max_deaths` deaths within the same offsets, the next attempt takes the messages one
at a time, noting each before it starts, and the attempt after that dead-letters the message the
process died on and goes on.

Notes are files under the data directory, one per partition, so this works where the replacement
process runs on the same host and data directory (the detector's supervisor, a restart policy).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson


class PoisonGuard:
    def __init__(self, folder: Path, max_deaths: int = 2):
        self.folder = Path(folder)
        self.max_deaths = max_deaths
        self.token = f"{os.getpid()}-{time.time_ns()}"  # this process; a note with another one outlived it

    def _path(self, topic: str, partition: int) -> Path:
        return self.folder / f"{topic}.{partition}.json"

    def _read(self, topic: str, partition: int) -> dict | None:
        try:
            return orjson.loads(self._path(topic, partition).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None

    def _write(self, topic: str, partition: int, note: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(topic, partition)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(note))
        os.replace(tmp, path)

    def begin(self, messages: list) -> tuple[bool, dict[tuple[str, int, int], int]]:
        """Note the batch about to be processed. Returns whether to take it one message at a time,
        and the messages a process died on, (topic, partition, offset) -> deaths, to dead-letter."""
        ranges: dict[tuple[str, int], list[int]] = {}
        for m in messages:
            r = ranges.setdefault((m.topic(), m.partition()), [m.offset(), m.offset()])
            r[0], r[1] = min(r[0], m.offset()), max(r[1], m.offset())
        careful, poison = False, {}
        for (topic, partition), (first, last) in ranges.items():
            note, deaths = self._read(topic, partition), 0
            if note is not None and note["first"] <= last and note["last"] >= first:
                if note["token"] == self.token:
                    deaths, first = note["deaths"], min(first, note["first"])
                else:  # the process that wrote it died with these offsets in hand
                    deaths = note["deaths"] + 1
                    if note.get("at") is not None:
                        poison[(topic, partition, note["at"])] = deaths
            careful |= deaths >= self.max_deaths
            self._write(topic, partition, {"token": self.token, "first": first, "last": last, "deaths": deaths,
                                           "at": None})
        return careful, poison

    def at(self, msg) -> None:
        """Processing this message alone starts now."""
        note = self._read(msg.topic(), msg.partition()) or {"token": self.token, "first": msg.offset(),
                                                              "last": msg.offset(), "deaths": 0}
        self._write(msg.topic(), msg.partition(), note | {"at": msg.offset()})

    def clear_at(self, messages: list) -> None:
        """The messages taken one at a time all came through."""
        for topic, partition in {(m.topic(), m.partition()) for m in messages}:
            note = self._read(topic, partition)
            if note is not None and note.get("at") is not None:
                self._write(topic, partition, note | {"at": None})

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        """Offsets committed (next to read): a note wholly below is done with."""
        for (topic, partition), next_offset in offsets.items():
            note = self._read(topic, partition)
            if note is not None and note["last"] < next_offset:
                self._path(topic, partition).unlink(missing_ok=True)
