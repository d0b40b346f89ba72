"""Rolling robust z-score: distance of a point from the median of the previous `window` points of
its series, in units of their median absolute deviation (x 1.4826, so it matches sigma for normal
data). Median and MAD ignore the outliers they are meant to find, unlike mean and std. Streaming,
per series; it learns nothing in fit().

Bounded state (issue 14): the moving median is a remedian (Rousseeuw & Bassett 1990): the points
fill blocks of `block` values; each full block is replaced by its median, and the median of the
last window/block block medians stands for the median of the last `window` points. Until the first
block is full the median of the points so far is used (exact). The same for the deviations. About
600 bytes per series instead of two 576-value windows (9 KB).

Its expectation (for an alert): the moving median, and the range of `threshold` scaled MADs
around it inside which the detector would not flag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba import njit

from models.base import Detector, Expectation, read_json, write_json
from models.metrics.features import FeatureBatch
from models.state import private_slots


class RobustZScoreDetector(Detector):
    name = "robust_zscore"

    def __init__(self, window: int = 576, min_points: int = 20, cap: float = 50.0, threshold: float = 6.0,
                 block: int = 24):
        self.params = {"window": window, "min_points": min_points, "cap": cap, "threshold": threshold,
                       "block": block}
        self.threshold = threshold
        self.block = min(block, window)
        self.n_blocks = max(1, window // self.block)

    def fit(self, history: FeatureBatch) -> "RobustZScoreDetector":
        return self

    def for_stream(self) -> "RobustZScoreDetector":
        return type(self)(**self.params)

    def state_fields(self) -> dict:
        p, L, K = self.name, self.block, self.n_blocks
        fields = {}
        for part, dt in (("value", np.float64), ("deviation", np.float32)):
            fields |= {f"{p}.{part}.open": (dt, (L,)),  # values of the block being filled
                       f"{p}.{part}.n_open": (np.int16, ()),
                       f"{p}.{part}.medians": (dt, (K,)),  # medians of the last K full blocks, a ring
                       f"{p}.{part}.n_full": (np.int64, ()),
                       f"{p}.{part}.median": (np.float64, ())}  # median of those medians
        return fields

    def schema(self) -> str:
        return repr(sorted(self.params.items()))

    def score(self, batch: FeatureBatch) -> np.ndarray:
        return self.score_expected(batch)[0]

    def score_expected(self, batch: FeatureBatch) -> tuple[np.ndarray, Expectation]:
        store, slots = batch.store, batch.slots
        if store is None or f"{self.name}.value.open" not in store.arrays:
            store, slots = private_slots(self, self.state_fields(), self.schema(), batch.series)
        a, p = store.arrays, self.name
        out = np.empty(len(batch))
        values = np.asarray(batch.values, np.float64)
        median, scale = np.full(len(out), np.nan), np.full(len(out), np.nan)
        _robust_z_rows(np.asarray(slots, np.int64), values, out, median, scale,
                       a[f"{p}.value.open"], a[f"{p}.value.n_open"], a[f"{p}.value.medians"],
                       a[f"{p}.value.n_full"], a[f"{p}.value.median"],
                       a[f"{p}.deviation.open"], a[f"{p}.deviation.n_open"], a[f"{p}.deviation.medians"],
                       a[f"{p}.deviation.n_full"], a[f"{p}.deviation.median"],
                       self.params["min_points"], float(self.params["cap"]))
        return out, Expectation(values, median, median - self.threshold * scale, median + self.threshold * scale,
                                spread=scale)

    def save(self, folder: Path) -> None:
        write_json(folder / "robust_zscore.json", {"params": self.params})

    @classmethod
    def load(cls, folder: Path) -> "RobustZScoreDetector":
        return cls(**read_json(folder / "robust_zscore.json")["params"])


@njit(cache=True, nogil=True)
def _median_before(s, open_, n_open, medians, n_full, median, min_points):
    if n_full[s] > 0:
        return median[s]
    if n_open[s] >= min_points:
        return np.median(open_[s, :n_open[s]].astype(np.float64))
    return np.nan


@njit(cache=True, nogil=True)
def _push(s, x, open_, n_open, medians, n_full, median):
    open_[s, n_open[s]] = x
    n_open[s] += 1
    if n_open[s] == open_.shape[1]:
        k = medians.shape[1]
        medians[s, n_full[s] % k] = np.median(open_[s])
        n_full[s] += 1
        n_open[s] = 0
        median[s] = np.median(medians[s, :min(n_full[s], k)].astype(np.float64))


@njit(cache=True, nogil=True)
def _robust_z_rows(slots, values, out, median_out, scale_out, v_open, v_n, v_med, v_full, v_median,
                   d_open, d_n, d_med, d_full, d_median, min_points, cap):
    for i in range(len(slots)):
        s = slots[i]
        x = values[i]
        median = _median_before(s, v_open, v_n, v_med, v_full, v_median, min_points)
        _push(s, x, v_open, v_n, v_med, v_full, v_median)
        z = 0.0
        if not np.isnan(median):
            deviation = abs(x - median)  # |1e308 - -1e308| is inf: z = cap
            mad = _median_before(s, d_open, d_n, d_med, d_full, d_median, min_points)
            _push(s, deviation, d_open, d_n, d_med, d_full, d_median)
            if not np.isnan(mad):
                median_out[i] = median
                scale_out[i] = 1.4826 * mad + 1e-9
                z = deviation / scale_out[i]
                if np.isnan(z):
                    z = 0.0
        # One extreme point is one of `window` values and deviations: the medians do not move.
        out[i] = min(z, cap)
