"""What the per-series streaming detectors share: hyper-parameters kept as a dict (saved as JSON,
part of the state fingerprint), nothing learnt in fit(), a fresh instance per stream, and their
state fields in the batch's state store (or a store of their own when used alone).

A subclass sets `name`, `defaults` (hyper-parameter -> default) and `threshold`, and implements
`state_fields()` and `_score(arrays, slots, batch, out)`, a call of its numba kernel over the
batch's rows, which returns the rows' Expectation if the detector has one (else None).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from numba import njit

from models.base import Detector, Expectation, read_json, write_json
from models.metrics.features import FeatureBatch
from models.state import private_slots


class StreamingDetector(Detector):
    defaults: dict = {}

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hyper-parameter(s) {sorted(unknown)}")
        self.params = {**self.defaults, **params}
        self.threshold = float(self.params.get("threshold", self.threshold))

    def fit(self, history: FeatureBatch) -> "StreamingDetector":
        return self

    def for_stream(self) -> "StreamingDetector":
        return type(self)(**self.params)

    def state_fields(self) -> dict:
        raise NotImplementedError

    def schema(self) -> str:
        return repr(sorted(self.params.items()))

    def field(self, part: str) -> str:
        return f"{self.name}.{part}"

    def score(self, batch: FeatureBatch) -> np.ndarray:
        return self.score_expected(batch)[0]

    def score_expected(self, batch: FeatureBatch) -> tuple[np.ndarray, Expectation | None]:
        store, slots = batch.store, batch.slots
        first = next(iter(self.state_fields()))
        if store is None or first not in store.arrays:
            store, slots = private_slots(self, self.state_fields(), self.schema(), batch.series)
        arrays = {name[len(self.name) + 1:]: store.arrays[name] for name in self.state_fields()}
        out = np.empty(len(batch))
        expectation = self._score(arrays, np.asarray(slots, np.int64), batch, out)
        return out, expectation

    def _score(self, arrays: dict, slots: np.ndarray, batch: FeatureBatch,
               out: np.ndarray) -> Expectation | None:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        write_json(folder / f"{self.name}.json", {"params": self.params})

    @classmethod
    def load(cls, folder: Path) -> "StreamingDetector":
        return cls(**read_json(folder / f"{cls.name}.json")["params"])


@njit(cache=True, nogil=True)
def range_start(s, x, lo, hi, seen):
    """The range of a series' values starts at its first point."""
    if seen == 0:
        lo[s] = x
        hi[s] = x


@njit(cache=True, nogil=True)
def range_learn(s, x, lo, hi, shrink):
    """The range takes the point in, then forgets a little: both ends move in by `shrink` of its
    width, so one old spike does not keep it wide for ever."""
    lo[s] = min(lo[s], x)
    hi[s] = max(hi[s], x)
    pull = shrink * (hi[s] - lo[s])
    lo[s] += pull
    hi[s] -= pull


@njit(cache=True, nogil=True)
def skipped(out, i, x):
    """A non-finite value is not scored (0) and not learnt from."""
    if math.isfinite(x):
        return False
    out[i] = 0.0
    return True
