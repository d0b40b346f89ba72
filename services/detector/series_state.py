"""The detector's per-series state on Kafka: the state store of one input topic's Scorer, backed by
a compacted changelog topic (as Kafka Streams backs its state stores).

- At each checkpoint the state of every series the batches changed is written to the changelog,
  keyed by series, to the partition of the input message it came from (input partition p ->
  changelog partition p); under exactly-once it goes in the same transaction as the outputs and
  the input offsets, so state, outputs and offsets move together.
- On assignment of input partition p its series are read back from changelog partition p before
  p's first message is scored; on revocation they are dropped.
- Series idle for `state_idle_s` (event time) are evicted from memory, counted, and read back
  from the changelog (by the offset of their last record) if they come back.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from shared.changelog import (
    RESTORE_BATCH,
    changelog_topic,
    ensure_changelog,
    restore,
    write,
)
from shared.config import Settings
from shared.kafka import client_config
from shared.telemetry import STATE_RESTORE_SECONDS

EVICT_EVERY_S = 30.0


class SeriesChangelog:
    def __init__(self, settings: Settings, topic: str, store, log):
        self.settings = settings
        self.topic = topic
        self.store = store  # models.state.SeriesState
        self.log = log
        self.name = changelog_topic(settings, "detector", topic)
        self.evicted: dict[str, tuple[int, int]] = {}  # series -> (partition, changelog offset)
        self.stats = Counter()
        self._fetcher: Consumer | None = None
        self._last_evict = time.monotonic()

    def ensure(self, partitions: int) -> None:
        ensure_changelog(self.settings, self.name, partitions)

    # -- assignment ----------------------------------------------------------------------------
    def restore(self, partitions: list[int]) -> None:
        """Read the series of these input partitions back, before their first message is scored."""
        if not partitions:
            return
        start = time.monotonic()
        records = restore(self.settings, self.name, partitions, with_offsets=True)
        idle_before = self._idle_before()
        for p, by_key in records.items():
            keys = [k.decode() for k in by_key]
            blobs = [v for v, _off in by_key.values()]
            offsets = np.array([off for _v, off in by_key.values()], np.int64)
            refused = [k for k, b in zip(keys, blobs) if self.store.check(b)]
            if refused:
                self.log.warning("changelog states written by another model version or layout are ignored; "
                                 "those series learn again", changelog=self.name, partition=p,
                                 series=len(refused), example=refused[0], why=self.store.check(by_key[refused[0].encode()][0]))
            self.store.load(keys, blobs, partition=p)
            slots = self.store.find(keys)
            ok = slots >= 0
            self.store.stored_at[slots[ok]] = offsets[ok]
            self.stats["series_restored"] += int(ok.sum())
        self.evict(idle_before)  # series long idle go back to the changelog at once
        STATE_RESTORE_SECONDS.labels("detector").observe(time.monotonic() - start)
        self.log.info("series state restored", changelog=self.name, partitions=partitions,
                      series=sum(len(r) for r in records.values()), seconds=round(time.monotonic() - start, 3))

    def drop(self, partitions: list[int]) -> None:
        slots = self.store.in_partitions(partitions)
        self.store.drop(slots)
        gone = {p for p in partitions}
        self.evicted = {k: v for k, v in self.evicted.items() if v[0] not in gone}
        self.stats["series_dropped_on_revoke"] += len(slots)

    # -- scoring -------------------------------------------------------------------------------
    def bring_back(self, series: np.ndarray) -> None:
        """Before scoring: series evicted as idle that come back are read from the changelog. All of
        a batch's returning series at once, one sequential read per changelog partition from the
        lowest of their offsets to the highest (after a gap in the data, thousands of series come
        back together: one fetch per series took minutes)."""
        if not self.evicted:
            return
        uniques = np.unique(np.asarray(series, dtype=object))
        missing = uniques[self.store.find(uniques) < 0]
        back = [k for k in missing.tolist() if k in self.evicted]  # only series not in memory
        if not back:
            return
        wanted: dict[int, dict[int, str]] = defaultdict(dict)  # partition -> offset -> series
        for key in back:
            p, off = self.evicted.pop(key)
            wanted[p][off] = key
        consumer = self._consumer()
        for p, by_offset in wanted.items():
            found = self._read_offsets(consumer, p, by_offset)
            if found:
                keys = list(found)
                self.store.load(keys, [found[k][0] for k in keys], partition=p)
                self.store.stored_at[self.store.find(keys)] = [found[k][1] for k in keys]
                self.stats["series_brought_back"] += len(found)
            lost = [k for k in by_offset.values() if k not in found]
            if lost:
                self.log.warning("evicted series not found in the changelog; they learn again", series=len(lost),
                                 example=lost[0], changelog=self.name, partition=p)

    def _read_offsets(self, consumer: Consumer, partition: int, by_offset: dict[int, str]) -> dict[str, tuple]:
        """series -> (state record, offset) of the records at these offsets of one changelog
        partition, read in one pass from the lowest to the highest."""
        first, last = min(by_offset), max(by_offset)
        consumer.assign([TopicPartition(self.name, partition, first)])
        found: dict[str, tuple] = {}
        deadline = time.monotonic() + self.settings.state_restore_timeout_s
        while len(found) < len(by_offset) and time.monotonic() < deadline:
            msgs = consumer.consume(RESTORE_BATCH, 1.0)
            if not msgs:  # a second without a record: past the partition's end
                break
            for m in msgs:
                if m.error():
                    continue
                key = by_offset.get(m.offset())
                if key is not None and m.key() == key.encode():
                    found[key] = (m.value(), m.offset())
            if max((m.offset() for m in msgs if not m.error()), default=-1) >= last:
                break
        return found

    # -- checkpoint ----------------------------------------------------------------------------
    def write_changed(self, producer, on_delivery) -> int:
        """The state of every series changed since the last call, to its partition's changelog."""
        slots = self.store.take_dirty()
        if not len(slots):
            return 0
        blobs = self.store.export(slots)
        keys, parts = self.store.keys[slots].tolist(), self.store.partition[slots].tolist()
        store = self.store

        for slot, key, part, blob in zip(slots.tolist(), keys, parts, blobs):
            def delivered(err, msg, slot=slot):
                if err is None:
                    store.stored_at[slot] = msg.offset()
                on_delivery(err, msg)
            write(producer, self.name, part, key.encode(), blob, on_delivery=delivered)
        self.stats["states_written"] += len(slots)
        return len(slots)

    def maybe_evict(self) -> None:
        if time.monotonic() - self._last_evict >= EVICT_EVERY_S:
            self._last_evict = time.monotonic()
            self.evict(self._idle_before())

    def evict(self, before: float) -> None:
        """Series whose last point is older than `before` leave memory; their state is in the
        changelog (only series written and acknowledged are evicted)."""
        slots = self.store.idle(before)
        if not len(slots):
            return
        for key, part, off in zip(self.store.keys[slots].tolist(), self.store.partition[slots].tolist(),
                                  self.store.stored_at[slots].tolist()):
            self.evicted[key] = (part, off)
        self.store.drop(slots)
        self.stats["series_evicted"] += len(slots)

    def _idle_before(self) -> float:
        used = self.store.keys != None  # noqa: E711
        newest = float(self.store.last_seen[used].max()) if used.any() else 0.0
        return newest - self.settings.state_idle_s

    def _consumer(self) -> Consumer:
        if self._fetcher is None:
            self._fetcher = Consumer(client_config(self.settings) | {
                "group.id": "anomstream-state-fetch", "enable.auto.commit": False,
                "isolation.level": "read_committed"})
        return self._fetcher

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None


def by_topic(partitions) -> dict[str, list[int]]:
    out = defaultdict(list)
    for tp in partitions:
        out[tp.topic].append(tp.partition)
    return out
