"""The per-series state store: the streaming state of every series, held as a struct of arrays.

Each streaming component (the feature windows, the robust z-score, each anomaly-likelihood stage)
declares its fields (name -> dtype and shape per series); the store keeps one array per field with
one row ("slot") per series, so a batch updates all of its series in one compiled loop over its
rows (numba kernels in the components), with no Python work per series.

A series' state is exportable on its own (`export` -> bytes, `load` <- bytes): a header with the
format version and a fingerprint of the field layout and the components' hyper-parameters, then
the slot's row of every field. A state written under another layout or other hyper-parameters is
refused (counted), never read as garbage. The detector service writes the exports of the series a
batch changed to a changelog topic and reads them back on partition assignment.

Memory per series is the record size (`bytes_per_series`) plus the key and index overhead.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pandas as pd

STATE_FORMAT = 1
HEADER = struct.Struct("<4sH8s")  # magic, format version, layout fingerprint
MAGIC = b"ASST"
# New keys wait in a small dict until this many gather, then the hashed index is rebuilt: a series
# that appears now and then does not cost a rebuild of a 100,000-key index per batch.
PENDING_KEYS = 4096
# Up to this many keys are looked up one by one (a dict, the index's hash table) rather than
# through a vectorised get_indexer, whose set-up costs more than a few lookups (the Spark detector
# looks up one series at a time).
FEW_KEYS = 8

Fields = dict[str, tuple[np.dtype, tuple[int, ...]]]


class StateError(ValueError):
    """A state blob that cannot be loaded (other format, layout or hyper-parameters)."""


class SeriesState:
    """One slot per series for every field; slots are reused after a series is dropped."""

    def __init__(self, fields: Fields, schema: str = "", capacity: int = 1024):
        # Every series also keeps the event time of its last point: idle series are evicted by it.
        fields = {"last_time": (np.float64, ()), **fields}
        self.fields = {name: (np.dtype(dt), tuple(shape)) for name, (dt, shape) in fields.items()}
        self.record = np.dtype([(name, dt, shape) for name, (dt, shape) in self.fields.items()])
        layout = repr([(n, dt.str, sh) for n, (dt, sh) in self.fields.items()]) + "|" + schema
        self.fingerprint = hashlib.sha256(layout.encode()).digest()[:8]
        self.header = HEADER.pack(MAGIC, STATE_FORMAT, self.fingerprint)
        self.arrays = {name: np.zeros((capacity, *shape), dt) for name, (dt, shape) in self.fields.items()}
        self.keys = np.full(capacity, None, dtype=object)
        self.partition = np.full(capacity, -1, np.int32)
        # Where the series' last durable copy is (its changelog record's offset; -1: none yet).
        # Not part of the exported state: it says where the export went.
        self.stored_at = np.full(capacity, -1, np.int64)
        self.dirty = np.zeros(capacity, bool)  # changed since the last `take_dirty`
        self.free = list(range(capacity - 1, -1, -1))
        self._index = pd.Index([], dtype=object)  # key -> position in _index_slots (hashed)
        self._index_slots = np.empty(0, np.int64)
        self._pending: dict[str, int] = {}  # keys added since the index was built
        self.stats = {"series_added": 0, "series_dropped": 0, "states_loaded": 0, "states_refused": 0}

    # -- slots ---------------------------------------------------------------------------------
    @property
    def last_seen(self) -> np.ndarray:
        return self.arrays["last_time"]

    def __len__(self) -> int:
        return len(self.keys) - len(self.free)

    @property
    def bytes_per_series(self) -> int:
        """Bytes of streaming state one series holds (the exported record, without the header)."""
        return self.record.itemsize

    def find(self, keys) -> np.ndarray:
        """Slot of each key, -1 where the store has none (vectorised: one hash lookup per key in C)."""
        keys = np.asarray(keys, dtype=object)
        slots = np.full(len(keys), -1, np.int64)
        if len(keys) <= FEW_KEYS:
            for i, key in enumerate(keys.tolist()):
                slot = self._pending.get(key)
                if slot is None and len(self._index):
                    try:
                        slot = self._index_slots[self._index.get_loc(key)]
                    except KeyError:
                        continue
                if slot is not None:
                    slots[i] = slot
            return slots
        if len(self._index):
            found = self._index.get_indexer(keys)
            slots[found >= 0] = self._index_slots[found[found >= 0]]
        if self._pending:
            missing = np.flatnonzero(slots < 0)
            if len(missing):  # only keys added since the last rebuild, at most PENDING_KEYS of them
                pending = pd.Index(list(self._pending))
                hit = pending.get_indexer(keys[missing])
                pend_slots = np.fromiter(self._pending.values(), np.int64, len(self._pending))
                slots[missing[hit >= 0]] = pend_slots[hit[hit >= 0]]
        return slots

    def slots(self, keys, partition=None, event_time=None) -> np.ndarray:
        """Slot of each row's series, adding the series not held yet (fresh, zeroed state); marks
        them changed, and records their partition and last event time."""
        codes, uniques = pd.factorize(np.asarray(keys, dtype=object))
        unique_slots = self.find(uniques)
        new = np.flatnonzero(unique_slots < 0)
        if len(new):
            unique_slots[new] = self._add(uniques[new])
        slots = unique_slots[codes]
        self.dirty[slots] = True
        if partition is not None:
            self.partition[slots] = partition
        if event_time is not None:
            np.maximum.at(self.last_seen, slots, np.asarray(event_time, dtype=np.float64))
        return slots

    def _add(self, keys: np.ndarray) -> np.ndarray:
        while len(self.free) < len(keys):
            self._grow()
        new = np.array([self.free.pop() for _ in range(len(keys))], np.int64)
        self._reset(new)
        self.keys[new] = keys
        self._pending.update(zip(keys.tolist(), new.tolist()))
        if len(self._pending) > PENDING_KEYS:
            self._rebuild_index()
        self.stats["series_added"] += len(keys)
        return new

    def _grow(self) -> None:
        old = len(self.keys)
        size = old * 2
        for name, arr in self.arrays.items():
            grown = np.zeros((size, *arr.shape[1:]), arr.dtype)
            grown[:old] = arr
            self.arrays[name] = grown
        self.keys = np.concatenate([self.keys, np.full(size - old, None, dtype=object)])
        self.partition = np.concatenate([self.partition, np.full(size - old, -1, np.int32)])
        self.stored_at = np.concatenate([self.stored_at, np.full(size - old, -1, np.int64)])
        self.dirty = np.concatenate([self.dirty, np.zeros(size - old, bool)])
        self.free.extend(range(size - 1, old - 1, -1))

    def _reset(self, slots: np.ndarray) -> None:
        for arr in self.arrays.values():
            arr[slots] = 0
        self.partition[slots] = -1
        self.stored_at[slots] = -1
        self.dirty[slots] = False

    def _rebuild_index(self) -> None:
        used = np.flatnonzero(self.keys != None)  # noqa: E711 (element-wise)
        self._index = pd.Index(self.keys[used], dtype=object)
        self._index_slots = used
        self._pending = {}

    def drop(self, slots) -> None:
        """Forget these series (their partition moved away, or they were idle)."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return
        keys = self.keys[slots].tolist()
        self._reset(slots)
        self.keys[slots] = None
        self.free.extend(slots.tolist())
        self.stats["series_dropped"] += len(slots)
        if all(key in self._pending for key in keys):  # added since the last rebuild: not in the index
            for key in keys:
                del self._pending[key]
        else:
            self._rebuild_index()

    def in_partitions(self, partitions) -> np.ndarray:
        return np.flatnonzero(np.isin(self.partition, list(partitions)) & (self.keys != None))  # noqa: E711

    def idle(self, before: float) -> np.ndarray:
        """Slots whose last point is older than `before` (event time) and whose state is stored
        (taken since its last change, and its copy acknowledged)."""
        return np.flatnonzero((self.keys != None) & (self.last_seen < before) & ~self.dirty  # noqa: E711
                              & (self.stored_at >= 0))

    def take_dirty(self) -> np.ndarray:
        """Slots changed since the last call (to write to the changelog); clears the marks."""
        slots = np.flatnonzero(self.dirty)
        self.dirty[slots] = False
        return slots

    # -- export / import -------------------------------------------------------------------------
    def export(self, slots) -> list[bytes]:
        """One self-describing blob per slot: header + the slot's row of every field."""
        slots = np.asarray(slots, np.int64)
        rec = np.empty(len(slots), self.record)
        for name, arr in self.arrays.items():
            rec[name] = arr[slots]
        raw, size, head = rec.tobytes(), self.record.itemsize, self.header
        return [head + raw[i * size:(i + 1) * size] for i in range(len(slots))]

    def load(self, keys: list[str], blobs: list[bytes], partition: int | None = None) -> int:
        """Put exported states back (replacing what is held for those keys); returns how many were
        loaded. Blobs of another format or layout are refused and counted, not raised: a changelog
        written by an older version must not stop a worker."""
        ok = [i for i, b in enumerate(blobs) if len(b) == HEADER.size + self.record.itemsize
              and b[:HEADER.size] == self.header]
        self.stats["states_refused"] += len(blobs) - len(ok)
        if not ok:
            return 0
        rec = np.frombuffer(b"".join(blobs[i][HEADER.size:] for i in ok), self.record)
        slots = self.slots(np.array([keys[i] for i in ok], dtype=object), partition)
        for name, arr in self.arrays.items():
            arr[slots] = rec[name]
        self.dirty[slots] = False  # as in the changelog already
        self.stats["states_loaded"] += len(ok)
        return len(ok)

    def check(self, blob: bytes) -> str | None:
        """Why a blob cannot be loaded, or None."""
        if len(blob) < HEADER.size:
            return "too short"
        magic, version, fingerprint = HEADER.unpack(blob[:HEADER.size])
        if magic != MAGIC or version != STATE_FORMAT:
            return f"state format {version}, this code reads {STATE_FORMAT}"
        if fingerprint != self.fingerprint:
            return "written under another state layout or other detector hyper-parameters"
        if len(blob) != HEADER.size + self.record.itemsize:
            return "wrong size"
        return None


def private_slots(owner, fields: Fields, schema: str, series) -> tuple[SeriesState, np.ndarray]:
    """For a component used on its own (tests, notebooks): a store of its own, made on first use."""
    store = getattr(owner, "_own_store", None)
    if store is None:
        store = owner._own_store = SeriesState(fields, schema)
    return store, store.slots(series)
