"""Conformal k-nearest-neighbour anomaly detection, in the manner of KNN CAD (Burnaev & Ishimtsev,
"Conformalized density- and distance-based anomaly detection in time-series data", a NAB entry).

The series is embedded as windows of its last `dim` values. The non-conformity of the current
window is its mean distance to its `k` nearest windows among the windows of the last `history`
values (windows overlapping the current one excluded). The score is conformal: the fraction of the
last `calibration` non-conformities (of earlier points, each computed the same way when its point
came) that are below this one, ties counted half. So a point is as anomalous as its window is
far from anything recent, relative to how far windows usually are: scale-free, no distribution
assumed. A fraction of 1 is frequent by construction (about 1 point in `calibration`), so beyond
the largest calibration value the score goes on as 1 + log(ncm / that largest value): a window
twice as far as anything recent scores 1.69. The likelihood stage (`knn_likelihood`) on it is the
intended decision.

State per series: the last `history` values and the last `calibration` non-conformities, as
float32 (values are stored relative to the series' first value, so float32 keeps their
differences), about 900 bytes with the defaults.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from models.metrics.streaming import StreamingDetector, skipped


class KnnConformalDetector(StreamingDetector):
    name = "knn"
    threshold = 1.7
    defaults = {"dim": 8, "k": 5, "history": 160, "calibration": 64, "threshold": 1.7}

    def state_fields(self) -> dict:
        p = self.params
        return {self.field("values"): (np.float32, (p["history"],)),
                self.field("ncm"): (np.float32, (p["calibration"],)),
                self.field("origin"): (np.float64, ()), self.field("n"): (np.int64, ())}

    def _score(self, a, slots, batch, out):
        p = self.params
        _knn_rows(slots, np.asarray(batch.values, np.float64), out, a["values"], a["ncm"], a["origin"], a["n"],
                  int(p["dim"]), int(p["k"]))


@njit(cache=True, nogil=True)
def _knn_rows(slots, values, out, ring, ncm, origin, n, dim, k):
    hist = ring.shape[1]
    n_cal = ncm.shape[1]
    best = np.empty(k)
    cur = np.empty(dim)
    for i in range(len(slots)):
        s = slots[i]
        x = values[i]
        if skipped(out, i, x):
            continue
        m = n[s]
        if m == 0:
            origin[s] = x
        v = min(max(x - origin[s], -3e38), 3e38)  # float32 range
        ring[s, m % hist] = v
        m += 1
        n[s] = m
        # The current window: values m-dim .. m-1 (this point last).
        if m < 2 * dim + k:
            out[i] = 0.0
            continue
        for j in range(dim):
            cur[j] = ring[s, (m - dim + j) % hist]
        # Candidate windows end at e = m-dim-1 down to max(dim-1, m-hist+dim-1) (whole windows
        # still in the ring, none overlapping the current one).
        first_end = max(dim - 1, m - hist + dim - 1)
        for j in range(k):
            best[j] = np.inf
        for e in range(first_end, m - dim):
            d = 0.0
            for j in range(dim):
                diff = cur[j] - ring[s, (e - dim + 1 + j) % hist]
                d += diff * diff
            if d < best[k - 1]:
                p = k - 1
                while p > 0 and best[p - 1] > d:
                    best[p] = best[p - 1]
                    p -= 1
                best[p] = d
        total = 0.0
        found = 0
        for j in range(k):
            if best[j] < np.inf:
                total += math.sqrt(best[j])
                found += 1
        a = np.float32(min(total / max(found, 1), 3e38))
        # Conformal score against the calibration non-conformities (the earlier points').
        done = m - (2 * dim + k)  # non-conformities recorded so far
        c = min(done, n_cal)
        score = 0.0
        if c > 0:
            below = 0.0
            top = 0.0
            for j in range(c):
                top = max(top, ncm[s, j])
                if ncm[s, j] < a:
                    below += 1.0
                elif ncm[s, j] == a:
                    below += 0.5
            score = below / c
            if a > top:  # beyond every calibration value: how far beyond, on a log scale
                score = 1.0 + math.log(a / top) if top > 0.0 else 1.0 + math.log1p(a)
                score = min(score, 100.0)
        if c < n_cal // 2:
            score = 0.0
        out[i] = score
        ncm[s, done % n_cal] = a
