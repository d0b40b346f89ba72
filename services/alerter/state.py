"""The alerter's durable state, per partition of `anomalies`, on its changelog topic
(shared.changelog: `<state_topic_prefix>-alerter-<anomalies topic>`, partition p for input partition p):

- `posted`: the offset of the last record posted to Slack from that partition, and the targets
  (channels) that accepted it so far: `{"offset": 17, "done": ["#ops"]}`. Written, and waited for,
  right after Slack accepted a post and before the record's offset is committed, so that a record
  read again after a crash is not posted again.
- `cooldown:<key>`: the event time (seconds) of the last alert of that cooldown key, in the
  partition of the record that set it.
- `sent:<offset>` (grouping on): the targets (channels) whose group notification listed that record
  of the partition: `["#ops"]`. Grouped records are held back from the commit until notified, so
  more than one record past the committed offset may be posted; each says so itself. Written with
  the notification, before the commit moves past the record; deleted (tombstone) once the
  committed offset is past it.
- `firing:["#ops", "metric:cpu-1"]` (grouping on): a series notified as firing to that channel,
  `{"seen": <wall time of its last anomaly>, "labels": {...}}`, in the partition of its last
  record; deleted when its resolved notice went out. Restored, it resolves after a restart too.

Writes go through a producer of their own, idempotent with acks=all and never transactional, and
are flushed at once: a marker must be durable before the commit, whatever the stream loop's own
producer does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from shared.changelog import changelog_topic, ensure_changelog, restore, write
from shared.config import Settings
from shared.kafka import DeliveryTracker, make_admin, make_producer

POSTED = b"posted"
COOLDOWN = b"cooldown:"
SENT = b"sent:"
FIRING = b"firing:"


@dataclass
class Posted:
    """The last record of a partition that Slack accepted, and the targets that accepted it."""

    offset: int = -1
    done: list[str | None] = field(default_factory=list)

    def encode(self) -> bytes:
        return json.dumps({"offset": self.offset, "done": self.done}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Posted:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(int(data["offset"]), list(data.get("done", [])))


def cooldown_entry(key: str, event_time: float) -> tuple[bytes, bytes]:
    return COOLDOWN + key.encode(), repr(float(event_time)).encode()


def parse_partition(entries: dict[bytes, bytes]) -> tuple[Posted, dict[str, float]]:
    """(posted marker, cooldown key -> event time) of one partition's restored entries."""
    cooldowns = {k[len(COOLDOWN):].decode(errors="replace"): float(v) for k, v in entries.items()
                 if k.startswith(COOLDOWN)}
    return Posted.decode(entries.get(POSTED)), cooldowns


def sent_entry(offset: int, targets: list[str | None] | None) -> tuple[bytes, bytes | None]:
    """The targets that have a record's group notification (None: a tombstone)."""
    return SENT + str(offset).encode(), None if targets is None else json.dumps(targets).encode()


def parse_sent(entries: dict[bytes, bytes]) -> dict[int, list[str | None]]:
    """offset -> targets notified, of one partition's restored entries."""
    return {int(k[len(SENT):]): list(json.loads(v)) for k, v in entries.items() if k.startswith(SENT) and v}


def firing_entry(channel: str | None, fingerprint: str, seen: float | None = None,
                 labels: dict | None = None) -> tuple[bytes, bytes | None]:
    """A series firing at `channel` since its last anomaly at `seen` (None: resolved, a tombstone)."""
    key = FIRING + json.dumps([channel, fingerprint]).encode()
    return key, None if seen is None else json.dumps({"seen": seen, "labels": labels or {}}).encode()


def parse_firing(entries: dict[bytes, bytes]) -> list[tuple[str | None, str, float, dict]]:
    """(channel, fingerprint, seen, labels) of the series firing, of one partition's restored entries."""
    out = []
    for k, v in entries.items():
        if k.startswith(FIRING) and v:
            channel, fingerprint = json.loads(k[len(FIRING):])
            data = json.loads(v)
            out.append((channel, fingerprint, float(data["seen"]), dict(data.get("labels", {}))))
    return out


class ChangelogStore:
    """The state on Kafka: restored per assigned partition, each write acknowledged before it returns."""

    def __init__(self, settings: Settings, log):
        self.settings = settings
        self.log = log
        self.name = changelog_topic(settings, "alerter", settings.topic_anomalies)
        self.producer = None
        self.tracker = DeliveryTracker()
        self.ensured = False

    def ensure(self) -> None:
        if self.ensured:
            return
        topic = self.settings.topic_anomalies
        partitions = len(make_admin(self.settings).list_topics(topic, timeout=30).topics[topic].partitions)
        ensure_changelog(self.settings, self.name, partitions)
        self.ensured = True

    def load(self, partitions: list[int]) -> dict[int, dict[bytes, bytes]]:
        self.ensure()
        return restore(self.settings, self.name, partitions, timeout=self.settings.state_restore_timeout_s)

    def save(self, partition: int, entries: list[tuple[bytes, bytes | None]]) -> None:
        """Write and wait until the broker acknowledged (as long as the broker is away; raises if refused)."""
        if self.producer is None:
            # Not transactional, whatever the stream loop's producer is: durable at the acknowledgement.
            self.producer = make_producer(self.settings, **{"linger.ms": 0})
        for key, value in entries:
            write(self.producer, self.name, partition, key, value, on_delivery=self.tracker)
        self.tracker.flush(self.producer, self.log)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush(10)


class MemoryStore:
    """The same state in memory (unit tests; survives a new Alerter given the same store)."""

    def __init__(self) -> None:
        self.partitions: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        self.writes = 0

    def load(self, partitions: list[int]) -> dict[int, dict[bytes, bytes]]:
        return {p: dict(self.partitions[p]) for p in partitions}

    def save(self, partition: int, entries: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in entries:
            if value:
                self.partitions[partition][key] = value
            else:
                self.partitions[partition].pop(key, None)
        self.writes += 1

    def close(self) -> None:
        pass
