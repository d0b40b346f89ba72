"""Adaptive-resonance anomaly detection, in the manner of ARTime (Hampton's NAB leader, built on
fuzzy ART): recent windows of the series are clustered on line by a fuzzy ART network; a window
that resonates with no learnt category (matches none to the vigilance) is new, and the less it
matches the best category, the more anomalous.

Ours, written from the fuzzy ART method (Carpenter, Grossberg & Rosen 1991): the input is the last
`dim` values, each normalised by the series' range so far (learnt from past points, slowly
forgetting as in the contextual detector) with a margin of `margin` of the range on each side
(a value beyond the range still maps inside [0, 1], distinct from the values inside it), then
complement-coded (2 x dim components, |I| = dim). Each of at most `categories` categories holds a
weight vector w; match M_j = |I ^ w_j| / |I| (^: component-wise min), choice
T_j = |I ^ w_j| / (alpha + |w_j|). Score = 1 - max_j M_j, before learning (0 until `min_points`).
Learning: among the categories that resonate (M_j >= rho) the one of highest choice moves towards
I ^ w_j by `beta`; if none resonates, a new category starts at I, replacing the least used one
when all are taken (usage decays by `usage_decay` per point, so stale categories go first).

With `step` > 1 the window holds the means of the last dim blocks of `step` points (the last block
the part filled so far), so it spans dim x step points at the cost of dim values: slower patterns.
`novelty_only`: a point that resonates scores 0 (only a new category scores), as ARTime reports an
anomaly only when its network meets an input it has no category for.

State per series: categories x 2 x dim float32 weights, their usage, the last dim values and the
range: about 900 bytes with the defaults.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.metrics.streaming import (
    StreamingDetector,
    range_learn,
    range_start,
    skipped,
)


class AdaptiveResonanceDetector(StreamingDetector):
    name = "art"
    threshold = 0.2
    defaults = {"dim": 8, "step": 1, "categories": 12, "rho": 0.9, "beta": 0.1, "alpha": 0.001, "margin": 0.25,
                "shrink": 2e-4, "usage_decay": 0.999, "min_points": 50, "novelty_only": False, "threshold": 0.2}

    def state_fields(self) -> dict:
        p = self.params
        return {self.field("w"): (np.float32, (p["categories"], 2 * p["dim"])),
                self.field("usage"): (np.float32, (p["categories"],)),
                self.field("recent"): (np.float64, (p["dim"],)),
                self.field("block"): (np.float64, ()),  # sum of the block being filled

                self.field("lo"): (np.float64, ()), self.field("hi"): (np.float64, ()),
                self.field("n"): (np.int64, ())}

    def _score(self, a, slots, batch, out):
        p = self.params
        _art_rows(slots, np.asarray(batch.values, np.float64), out, a["w"], a["usage"], a["recent"], a["block"],
                  a["lo"], a["hi"], a["n"], int(p["step"]), float(p["rho"]), float(p["beta"]), float(p["alpha"]),
                  float(p["margin"]), float(p["shrink"]), float(p["usage_decay"]), int(p["min_points"]),
                  bool(p["novelty_only"]))


@njit(cache=True, nogil=True)
def _art_rows(slots, values, out, w, usage, recent, block, lo, hi, n, step, rho, beta, alpha, margin, shrink,
              decay, min_points, novelty_only):
    n_cat = w.shape[1]
    dim = recent.shape[1]
    inp = np.empty(2 * dim)
    for i in range(len(slots)):
        s = slots[i]
        x = values[i]
        if skipped(out, i, x):
            continue
        k = n[s]
        range_start(s, x, lo, hi, k)
        if k == 0:
            recent[s, :] = x
        # The window, oldest first: the means of the last dim-1 full blocks of `step` points, then
        # the mean of the block this point is in so far.
        if k % step == 0:
            if k > 0:
                for j in range(dim - 1):
                    recent[s, j] = recent[s, j + 1]
            block[s] = 0.0
        block[s] += x
        recent[s, dim - 1] = block[s] / (k % step + 1)
        width = hi[s] - lo[s]
        base = lo[s] - margin * width
        span = (1.0 + 2.0 * margin) * width
        for j in range(dim):
            u = 0.5 if span <= 0.0 else (recent[s, j] - base) / span
            u = min(max(u, 0.0), 1.0)
            inp[j] = u
            inp[dim + j] = 1.0 - u
        best_m = 0.0
        best_t = -1.0
        chosen = -1
        for c in range(n_cat):
            if usage[s, c] <= 0.0:
                continue
            inter = 0.0
            norm = 0.0
            for j in range(2 * dim):
                inter += min(inp[j], w[s, c, j])
                norm += w[s, c, j]
            m = inter / dim
            best_m = max(best_m, m)
            t = inter / (alpha + norm)
            if m >= rho and t > best_t:
                best_t = t
                chosen = c
        score = 1.0 - best_m if k >= min_points else 0.0
        if novelty_only and chosen >= 0:
            score = 0.0
        out[i] = score
        for c in range(n_cat):
            usage[s, c] *= decay
        if chosen >= 0:
            for j in range(2 * dim):
                w[s, chosen, j] = beta * min(inp[j], w[s, chosen, j]) + (1.0 - beta) * w[s, chosen, j]
            usage[s, chosen] += 1.0
        else:
            worst = 0
            for c in range(1, n_cat):
                if usage[s, c] < usage[s, worst]:
                    worst = c
            for j in range(2 * dim):
                w[s, worst, j] = inp[j]
            usage[s, worst] = 1.0
        range_learn(s, x, lo, hi, shrink)
        n[s] = k + 1
