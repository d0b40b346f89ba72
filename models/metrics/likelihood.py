"""Anomaly likelihood: Numenta's post-processing stage that turns a raw anomaly score into how
unlikely the recent scores are under the score distribution seen so far (Ahmad et al. 2017,
"Unsupervised real-time anomaly detection for streaming data").

Per series, streaming: the raw score is averaged over the last `avg_window` points; the averages
seen before (the last `history` of them) give a mean and standard deviation; the likelihood is
1 - the two-sided Gaussian tail probability of the current average. Only the first point of a run
of 'red' tails (<= 1e-5) keeps its value; the rest of the run is lowered to 'yellow' (1e-3), so one
change raises one alarm. The output is Numenta's log scale in [0, 1], where 0.5 means a tail
probability of 1e-5 -- the published alarm threshold, used here as is.

Defaults that differ from Numenta's (issue 15, chosen by leave-one-category-out on nab_dev, README
"Detection quality"): the average is over 12 points, and over 25 for the seasonal residual score
(AVG_WINDOWS, by the source of the raw score; `for_source`); the history is 20000 averages instead of 8640,
so a months-long series keeps a steadier mean and deviation; the daily recurrence below allows
+- 1 h instead of 30 min.

Bounded state (issue 14): the history of averages is kept as sufficient statistics, the sums of
(average - ref) and of its square in `blocks` blocks of history/blocks averages each, not as the
averages themselves. Up to `history` points this is exactly Numenta's window; past it, the oldest
block leaves whole, so the window holds between history - history/blocks and history averages.
About 420 bytes per series instead of up to 70 KB.

One addition to Numenta's stage: an alarm that recurs at the same time of day as a (raw) alarm
one `recurrence_period_s` earlier (+- `recurrence_tolerance_s`) is a daily pattern, not an
incident -- a nightly batch job, a backup -- and is lowered just below the threshold. It needs
timestamps; without them the stage is Numenta's as published. The last `recent_alarms` raw alarm
times are kept per series for it.

And one for robustness (issue 13): what the state keeps of a raw score, for the later points'
moving averages and through them the history, is clipped to `clip_sigmas` (20) standard
deviations of the past averages around their mean; the point itself is scored with its raw score.
One extreme point (1e308, or 1e12 in a series around 50) is then a one-point outlier that raises
its alarm, instead of overflowing the sums of squares (NaN for every later point) or swelling the
history's deviation so that the series is blind for its `history` points. A series adapts to a
real level shift all the same: each clipped point widens the bound.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numba import njit

from models.base import Expectation
from models.state import SeriesState, private_slots

LOG_1E_10 = math.log(1e-10)
# The moving average's length by the source of the raw score (issue 15); any other source averages
# AVG_WINDOW points. The seasonal detector's score, |residual| / mean
# absolute error, is skewed and heavy-tailed point by point, so its short averages are far from
# the Gaussian the tail probability assumes and their red tails are mostly noise: it is averaged
# over 25 points. The metric's own value is smoother and keeps a short average (12), which finds
# short incidents (chosen by leave-one-category-out on nab_dev, README "Detection quality").
AVG_WINDOW = 12
AVG_WINDOWS = {"seasonal": 25}
# Raw scores are read as at most this in magnitude (NaN as 0): squares and sums of a whole history
# of them stay finite. Any raw score this large is an alarm anyway.
RAW_LIMIT = 1e150


class AnomalyLikelihood:
    threshold = 0.5

    def __init__(self, avg_window: int = AVG_WINDOW, history: int = 20000, learning_period: int = 300,
                 min_history: int = 50, red: float = 1e-5, yellow: float = 1e-3,
                 recurrence_period_s: float | None = 86400.0, recurrence_tolerance_s: float = 3600.0,
                 clip_sigmas: float = 20.0, clip_after: int = 2, blocks: int = 16, recent_alarms: int = 8,
                 prefix: str = "likelihood"):
        self.avg_window = avg_window
        self.history = history
        self.learning_period = learning_period
        self.min_history = min_history
        self.red = red
        self.yellow = yellow
        self.recurrence_period_s = recurrence_period_s
        self.recurrence_tolerance_s = recurrence_tolerance_s
        self.clip_sigmas = clip_sigmas
        self.clip_after = clip_after
        self.blocks = blocks
        self.block_size = -(-history // blocks)  # averages per block
        self.recent_alarms = recent_alarms
        self.prefix = prefix

    @classmethod
    def for_source(cls, source: str) -> "AnomalyLikelihood":
        """The stage for one raw score ("value" = the metric itself): output `<source>_likelihood`,
        averaged over that source's AVG_WINDOWS length."""
        return cls(avg_window=AVG_WINDOWS.get(source, AVG_WINDOW), prefix=f"{source}_likelihood")

    def state_fields(self) -> dict:
        p, f8 = self.prefix, np.float64
        return {
            f"{p}.seen": (np.int64, ()),  # points seen (one average each)
            f"{p}.raw": (f8, (max(self.avg_window - 1, 1),)),  # last avg_window-1 kept raw scores, a ring
            f"{p}.ref": (f8, ()),  # the averages are summed as (average - ref), against cancellation
            f"{p}.sum": (f8, (self.blocks,)),  # per block: sum of (average - ref)
            f"{p}.sumsq": (f8, (self.blocks,)),  # per block: sum of its square
            f"{p}.red": (np.bool_, ()),  # the last raw tail was red
            f"{p}.alarms": (f8, (self.recent_alarms,)),  # times of the last raw alarms, a ring
            f"{p}.n_alarms": (np.int64, ()),
        }

    def schema(self) -> str:
        return repr(sorted((k, v) for k, v in vars(self).items() if not k.startswith("_")))

    def update(self, series, raw, epoch_s=None, store: SeriesState | None = None,
               slots: np.ndarray | None = None) -> np.ndarray:
        """Log-likelihood in [0, 1] for each row, in row order within each series. `store`/`slots`:
        the shared store and each row's slot (the Scorer's); without them, a store of its own."""
        return self.update_expected(series, raw, epoch_s, store, slots)[0]

    def update_expected(self, series, raw, epoch_s=None, store: SeriesState | None = None,
                        slots: np.ndarray | None = None) -> tuple[np.ndarray, Expectation]:
        """update(), and per row the moving average of the raw scores it tested, the mean of the
        history's averages and the range around it that is not a red tail (mean +- z * std, with
        z the normal quantile of the red tail: 4.26 for 1e-5); NaN while learning. For the "value"
        source this is the series' normal range of its recent average."""
        raw = np.clip(np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0), -RAW_LIMIT, RAW_LIMIT)
        if store is None:
            store, slots = private_slots(self, self.state_fields(), self.schema(),
                                         np.asarray(series, dtype=object))
        a, p = store.arrays, self.prefix
        times = np.zeros(len(raw)) if epoch_s is None else np.asarray(epoch_s, dtype=np.float64)
        period = self.recurrence_period_s if (epoch_s is not None and self.recurrence_period_s) else 0.0
        out = np.empty(len(raw))
        average, mean, std = (np.full(len(raw), np.nan) for _ in range(3))
        _likelihood_rows(np.asarray(slots, np.int64), raw, times, out, average, mean, std,
                         a[f"{p}.seen"], a[f"{p}.raw"], a[f"{p}.ref"], a[f"{p}.sum"], a[f"{p}.sumsq"],
                         a[f"{p}.red"], a[f"{p}.alarms"], a[f"{p}.n_alarms"],
                         self.avg_window, self.block_size, self.learning_period, self.min_history,
                         self.red, self.yellow, self.clip_sigmas, self.clip_after, float(period),
                         float(self.recurrence_tolerance_s), self.threshold)
        z = NormalDist().inv_cdf(1.0 - self.red)
        return out, Expectation(average, mean, mean - z * std, mean + z * std, f"{self.avg_window}-point average")


@njit(cache=True, nogil=True)
def _likelihood_rows(slots, raw, times, out, average_out, mean_out, std_out, seen, ring, ref, bsum, bsumsq,
                     prev_red, alarms, n_alarms, w, block_size, learning_period, min_history, red_tail, yellow, clip_sigmas, clip_after,
                     period, tol, threshold):
    n_blocks = bsum.shape[1]
    n_ring = ring.shape[1]
    n_recent = alarms.shape[1]
    full = n_blocks * block_size
    below = np.nextafter(threshold, 0.0)
    for i in range(len(slots)):
        s = slots[i]
        x = raw[i]
        k = seen[s]  # points (and averages) before this one
        # Mean and deviation of the averages in the window, before this point.
        n = k if k <= full else (n_blocks - 1) * block_size + (k - 1) % block_size + 1
        t1 = 0.0
        t2 = 0.0
        for b in range(n_blocks):
            t1 += bsum[s, b]
            t2 += bsumsq[s, b]
        mean = np.nan
        std = np.nan
        if n >= 1:
            mean = ref[s] + t1 / n
        if n >= 2:
            std = math.sqrt(max(t2 - t1 * t1 / n, 0.0) / (n - 1))
            std = max(std, 1e-6 * max(1.0, abs(mean)))
        # Moving average of the last w raw scores (this one included).
        m = min(k, w - 1)
        acc = 0.0
        for j in range(m):
            acc += ring[s, (k - 1 - j) % n_ring]
        cnt = m + 1
        # What the state keeps of x: clipped to clip_sigmas deviations of the history (module doc).
        kept = x
        if n >= clip_after:
            bound = clip_sigmas * std
            if abs(x - mean) > bound:
                kept = mean + min(max(x - mean, -bound), bound)
        avg_kept = (acc + kept) / cnt
        avg_raw = (acc + x) / cnt
        tail = 0.5
        if n >= min_history and k >= learning_period:
            z = abs(avg_raw - mean) / std
            average_out[i] = avg_raw
            mean_out[i] = mean
            std_out[i] = std
            tail = 0.5 * math.erfc(z / math.sqrt(2.0))
            if math.isnan(tail):
                tail = 0.5
        red = tail <= red_tail
        filtered = yellow if (red and prev_red[s]) else tail
        prev_red[s] = red
        score = min(max(math.log(filtered + 1e-10) / LOG_1E_10, 0.0), 1.0)
        if period > 0.0 and score >= threshold:
            t = times[i]
            recurring = False
            for r in range(min(n_alarms[s], n_recent)):
                if t - period - tol <= alarms[s, r] <= t - period + tol:
                    recurring = True
            alarms[s, n_alarms[s] % n_recent] = t
            n_alarms[s] += 1
            if recurring:
                score = below
        out[i] = score
        # The average joins the history: a new block starts every block_size averages; once the
        # window is full the block it reuses (the oldest) leaves, and the sums are re-centred on
        # the mean of what stays.
        blk = (k // block_size) % n_blocks
        if k % block_size == 0 and k >= full:
            bsum[s, blk] = 0.0
            bsumsq[s, blk] = 0.0
            kept_n = (n_blocks - 1) * block_size
            d = 0.0
            for b in range(n_blocks):
                d += bsum[s, b]
            d /= kept_n
            for b in range(n_blocks):
                if b != blk:
                    bsumsq[s, b] += -2.0 * d * bsum[s, b] + block_size * d * d
                    bsum[s, b] -= block_size * d
            ref[s] += d
        if k == 0:
            ref[s] = avg_kept
        c = avg_kept - ref[s]
        bsum[s, blk] += c
        bsumsq[s, blk] += c * c
        ring[s, k % n_ring] = kept
        seen[s] = k + 1
