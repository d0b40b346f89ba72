"""Anomaly likelihood: Numenta's post-processing stage that turns a raw anomaly score into how
unlikely the recent scores are under the score distribution seen so far (Ahmad et al. 2017,
"Unsupervised real-time anomaly detection for streaming data").

Per series, streaming: the raw score is averaged over the last `avg_window` points; the averages
seen before (the last `history` of them) give a mean and standard deviation; the likelihood is
1 - the two-sided Gaussian tail probability of the current average. Only the first point of a run
of 'red' tails (<= 1e-5) keeps its value; the rest of the run is lowered to 'yellow' (1e-3), so one
change raises one alarm. The output is Numenta's log scale in [0, 1], where 0.5 means a tail
probability of 1e-5 -- the published alarm threshold, used here as is.

One addition to Numenta's stage: an alarm that recurs at the same time of day as a (raw) alarm
one `recurrence_period_s` earlier (+- `recurrence_tolerance_s`) is a daily pattern, not an
incident -- a nightly batch job, a backup -- and is lowered just below the threshold. It needs
timestamps; without them the stage is Numenta's as published.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import erfc

LOG_1E_10 = np.log(1e-10)


class AnomalyLikelihood:
    threshold = 0.5

    def __init__(self, avg_window: int = 10, history: int = 8640, learning_period: int = 300,
                 min_history: int = 50, red: float = 1e-5, yellow: float = 1e-3,
                 recurrence_period_s: float | None = 86400.0, recurrence_tolerance_s: float = 1800.0,
                 max_series: int = 100_000):
        self.avg_window = avg_window
        self.history = history
        self.learning_period = learning_period
        self.min_history = min_history
        self.red = red
        self.yellow = yellow
        self.recurrence_period_s = recurrence_period_s
        self.recurrence_tolerance_s = recurrence_tolerance_s
        self.max_series = max_series
        # series -> (last avg_window-1 raw scores, last `history` averages, points seen, last raw tail
        # was red, times of the raw alarms of the last recurrence period)
        self.state: dict[str, tuple[np.ndarray, np.ndarray, int, bool, np.ndarray]] = {}

    def update(self, series: np.ndarray, raw: np.ndarray, epoch_s: np.ndarray | None = None) -> np.ndarray:
        """Log-likelihood in [0, 1] for each row, in row order within each series."""
        raw = np.asarray(raw, dtype=np.float64)
        out = np.empty(len(raw))
        codes, names = pd.factorize(np.asarray(series, dtype=object))
        for code, name in enumerate(names):
            idx = np.flatnonzero(codes == code)
            out[idx] = self._update_one(name, raw[idx], None if epoch_s is None else np.asarray(epoch_s)[idx])
        return out

    def _update_one(self, name: str, raw: np.ndarray, epoch_s: np.ndarray | None) -> np.ndarray:
        past_raw, past_avg, seen, prev_red, past_alarms = self.state.pop(
            name, (np.empty(0), np.empty(0), 0, False, np.empty(0)))
        m, w, h = len(raw), self.avg_window, self.history
        raw_all = np.concatenate([past_raw, raw])
        c = np.concatenate([[0.0], np.cumsum(raw_all)])
        ends = np.arange(len(past_raw), len(raw_all)) + 1  # moving average over <= w points
        avg = (c[ends] - c[np.maximum(ends - w, 0)]) / (ends - np.maximum(ends - w, 0))
        # Mean and std of the (up to h) averages *before* each point, from prefix sums (numpy, not
        # pandas rolling: this runs per series per batch in the detector service).
        seq = np.concatenate([past_avg, avg])
        ref = seq[0]  # centre before summing squares, against cancellation
        p1 = np.concatenate([[0.0], np.cumsum(seq - ref)])
        p2 = np.concatenate([[0.0], np.cumsum((seq - ref) ** 2)])
        pos = np.arange(len(past_avg), len(seq))
        lo = np.maximum(pos - h, 0)
        n = pos - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            s1, s2 = p1[pos] - p1[lo], p2[pos] - p2[lo]
            mean = ref + s1 / n
            std = np.sqrt(np.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1))
        std = np.maximum(std, 1e-6 * np.maximum(1.0, np.abs(mean)))
        z = np.abs(avg - mean) / std
        tail = 0.5 * erfc(z / np.sqrt(2))
        tail[(n < self.min_history) | (seen + np.arange(m) < self.learning_period)] = 0.5
        red = tail <= self.red
        prev = np.concatenate([[prev_red], red[:-1]])
        filtered = np.where(red & prev, self.yellow, tail)
        score = np.clip(np.log(filtered + 1e-10) / LOG_1E_10, 0.0, 1.0)
        if epoch_s is not None and self.recurrence_period_s:
            score, past_alarms = self._lower_recurring(score, epoch_s, past_alarms)
        self.state[name] = (raw_all[max(0, len(raw_all) - (w - 1)):], seq[max(0, len(seq) - h):], seen + m,
                            bool(red[-1]), past_alarms)
        if len(self.state) > self.max_series:  # bounded memory: forget the least recently seen series
            del self.state[next(iter(self.state))]
        return score

    def _lower_recurring(self, score: np.ndarray, epoch_s: np.ndarray, past_alarms: np.ndarray):
        period, tol = self.recurrence_period_s, self.recurrence_tolerance_s
        alarm = score >= self.threshold
        times = np.concatenate([past_alarms, epoch_s[alarm]])  # raw alarms, in time order
        # An alarm recurs if some raw alarm lies within +-tol of the same time one period earlier.
        lo = np.searchsorted(times, epoch_s[alarm] - period - tol, side="left")
        hi = np.searchsorted(times, epoch_s[alarm] - period + tol, side="right")
        recurring = np.zeros(len(score), bool)
        recurring[np.flatnonzero(alarm)[hi > lo]] = True
        score = np.where(recurring, np.nextafter(self.threshold, 0.0), score)
        keep_from = epoch_s[-1] - period - tol if len(epoch_s) else -np.inf
        return score, times[times >= keep_from]
