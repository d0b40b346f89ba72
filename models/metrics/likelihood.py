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

And one for robustness (issue 13): what the state keeps of a raw score, for the later points'
moving averages and through them the history, is clipped to `clip_sigmas` (20) standard
deviations of the past averages around their mean; the point itself is scored with its raw score.
One extreme point (1e308, or 1e12 in a series around 50) is then a one-point outlier that raises
its alarm, instead of overflowing the sums of squares (NaN for every later point) or swelling the
history's deviation so that the series is blind for its `history` points. A series adapts to a
real level shift all the same: each clipped point widens the bound.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import erfc

LOG_1E_10 = np.log(1e-10)
# Raw scores are read as at most this in magnitude (NaN as 0): squares and sums of a whole history
# of them stay finite. Any raw score this large is an alarm anyway.
RAW_LIMIT = 1e150


class AnomalyLikelihood:
    threshold = 0.5

    def __init__(self, avg_window: int = 10, history: int = 8640, learning_period: int = 300,
                 min_history: int = 50, red: float = 1e-5, yellow: float = 1e-3,
                 recurrence_period_s: float | None = 86400.0, recurrence_tolerance_s: float = 1800.0,
                 clip_sigmas: float = 20.0, clip_after: int = 2, max_series: int = 100_000):
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
        self.max_series = max_series
        # series -> (last avg_window-1 raw scores, last `history` averages, points seen, last raw tail
        # was red, times of the raw alarms of the last recurrence period)
        self.state: dict[str, tuple[np.ndarray, np.ndarray, int, bool, np.ndarray]] = {}

    def update(self, series: np.ndarray, raw: np.ndarray, epoch_s: np.ndarray | None = None) -> np.ndarray:
        """Log-likelihood in [0, 1] for each row, in row order within each series."""
        raw = np.clip(np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0), -RAW_LIMIT, RAW_LIMIT)
        out = np.empty(len(raw))
        codes, names = pd.factorize(np.asarray(series, dtype=object))
        for code, name in enumerate(names):
            idx = np.flatnonzero(codes == code)
            out[idx] = self._update_one(name, raw[idx], None if epoch_s is None else np.asarray(epoch_s)[idx])
        return out

    def _update_one(self, name: str, raw: np.ndarray, epoch_s: np.ndarray | None) -> np.ndarray:
        past_raw, past_avg, seen, prev_red, past_alarms = self.state.pop(
            name, (np.empty(0), np.empty(0), 0, False, np.empty(0)))
        m, w, h, R, P = len(raw), self.avg_window, self.history, len(past_raw), len(past_avg)
        # Moving averages over <= w raw scores, from prefix sums.
        raw_all = np.concatenate([past_raw, raw])
        c = np.concatenate([[0.0], np.cumsum(raw_all)])
        ends = np.arange(R, R + m) + 1
        starts = np.maximum(ends - w, 0)
        counts = ends - starts
        avg = (c[ends] - c[starts]) / counts
        # Mean and std of the (up to h) averages *before* each point, from prefix sums (numpy, not
        # pandas rolling: this runs per series per batch in the detector service).
        seq = np.concatenate([past_avg, avg])
        ref = seq[0]  # centre before summing squares, against cancellation
        scaled = seq - ref
        p1 = np.concatenate([[0.0], np.cumsum(scaled)])
        p2 = np.concatenate([[0.0], np.cumsum(scaled * scaled)])
        pos = np.arange(P, P + m)
        lo_pos = np.maximum(pos - h, 0)
        n = pos - lo_pos
        mean, std = self._before(p1[pos] - p1[lo_pos], p2[pos] - p2[lo_pos], n, ref)
        # What the state keeps of a raw score (for the later points' moving averages, and through
        # them the history) is clipped to the bound its past gives: clip_sigmas standard deviations
        # of the past averages around their mean. One extreme point then cannot blow up the
        # history's mean and deviation (and blind the series for `history` points, or overflow).
        # A point is judged once the points before it are settled, so a batch keeps the state of
        # the same points in pieces. Clips are rare (about 1 point in 100 of the NAB EC2 series,
        # raw values or robust z-scores): each one brings the sums after it up to date.
        judged = n >= self.clip_after
        start = 0  # points before it are settled
        while True:
            with np.errstate(invalid="ignore", over="ignore"):
                spread = self.clip_sigmas * std[start:]
                x = raw_all[R + start:] - mean[start:]
                beyond = np.flatnonzero((np.abs(x) > spread) & judged[start:])
            if len(beyond) == 0:
                break
            j = start + beyond[0]
            bound = spread[beyond[0]]
            old = raw_all[R + j]
            raw_all[R + j] = mean[j] + min(max(old - mean[j], -bound), bound)
            # The sums after it are summed again from the settled ones (not corrected by a
            # difference, which would cancel badly when what was clipped was huge).
            first = starts[j]
            cs = np.concatenate([[0.0], np.cumsum(raw_all[first:])])
            avg[j:] = (cs[ends[j:] - first] - cs[starts[j:] - first]) / counts[j:]
            centred = avg[j:] - ref
            p1[P + j + 1:] = p1[P + j] + np.cumsum(centred)
            p2[P + j + 1:] = p2[P + j] + np.cumsum(centred * centred)
            after = slice(j + 1, m)
            mean[after], std[after] = self._before(p1[pos[after]] - p1[lo_pos[after]],
                                                   p2[pos[after]] - p2[lo_pos[after]], n[after], ref)
            start = j + 1
        kept = raw_all[R:]
        # A point itself is scored with its raw score, so an extreme point still raises its alarm;
        # only what the later points see of it is clipped.
        with np.errstate(invalid="ignore", over="ignore"):
            z = np.abs(avg + (raw / counts - kept / counts) - mean) / std
        tail = 0.5 * erfc(z / np.sqrt(2))
        tail[np.isnan(tail) | (n < self.min_history) | (seen + np.arange(m) < self.learning_period)] = 0.5
        red = tail <= self.red
        prev = np.concatenate([[prev_red], red[:-1]])
        filtered = np.where(red & prev, self.yellow, tail)
        score = np.clip(np.log(filtered + 1e-10) / LOG_1E_10, 0.0, 1.0)
        if epoch_s is not None and self.recurrence_period_s:
            score, past_alarms = self._lower_recurring(score, epoch_s, past_alarms)
        seq[P:] = avg
        self.state[name] = (raw_all[max(0, len(raw_all) - (w - 1)):], seq[max(0, len(seq) - h):], seen + m,
                            bool(red[-1]), past_alarms)
        if len(self.state) > self.max_series:  # bounded memory: forget the least recently seen series
            del self.state[next(iter(self.state))]
        return score

    @staticmethod
    def _before(s1: np.ndarray, s2: np.ndarray, n: np.ndarray, ref: float):
        """Mean and standard deviation (floored) of n averages from the sums of (average - ref) and
        of its square."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mean = ref + s1 / n
            std = np.sqrt(np.maximum(s2 - s1 * s1 / n, 0.0) / (n - 1))
        return mean, np.maximum(std, 1e-6 * np.maximum(1.0, np.abs(mean)))

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
