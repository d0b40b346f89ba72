"""Adaptive-resonance anomaly detection, in the manner of ARTime (Mark Hampton's NAB leader, built
on a dual-vigilance fuzzy ART): the series is downsampled, windows of the downsampled series are
clustered on line by fuzzy ART, and an anomaly is reported only when a window resonates with no
learnt category (a new category is created) after the probation, outside a mask after the last
anomaly; every other point scores 0. The output is sparse, like ARTime's.

Ours, written from ARTime's method description (no code copied):
- Downsampling: every `step` points one value, the block's max or min, whichever lies farther
  from the block mean, or the mean when that spike is within 10% of it (ARTime: spikes survive
  the downsampling, noise does not). Normalised by the series' range so far (learnt from past
  points only, slowly forgetting: no future range, no leakage), quantised to `levels` levels, and
  a value within `chomp` of a running median level is replaced by it (ARTime's noise chomp).
- Features: the last `window` downsampled values (normalised by the range), complement coded;
  with `shape`, min-max normalised within the window instead (ARTime's window normalisation;
  on nab_dev the levels score better: standard 22.6 against 6.1, so the default keeps them). "Energy" of a window: its mean level; a category keeps the mean
  energy of its members.
- Fuzzy ART: match M_j = |I ^ w_j| / |I|, choice T_j = |I ^ w_j| / (alpha + |w_j|). Two
  vigilances as in ARTime's DVFA: M >= rho_ub resonates (fast learning, w = I ^ w); rho_lb <= M <
  rho_ub creates a category of the same class (no anomaly); M < rho_lb everywhere creates a
  category of a new class: the anomaly candidate. At most `categories` categories per series
  (bounded state): a new one replaces the least used.
- Probation: the first `probation` downsampled points (ARTime: 13 windows) learn with vigilance
  `initial_rho`; both vigilances are then set to the mean best match of the probation's second
  half (ARTime's initial rho). After it, rho_ub = the running mean of the best match (at most
  0.97) and rho_lb adapts every probation/2 points and `mask` points after an anomaly: up by 19%
  of the gap to the lowest match seen since, or down by the mean of the clipped excesses of
  rho_ub over the matches (at least 0.01), never below the mean match of past anomalies.
- Decision: a new-class window after the probation is an anomaly unless masked (within `mask`
  downsampled points of the last anomaly, or after a vigilance update until `mask` points pass
  without a new category), in which case it must also match less than 0.9 (in the anomaly mask)
  or 0.7 (otherwise) of the last anomaly's match. Score (ARTime's confidence):
  0.35 (rho_ub - M)/(1 - M) + 0.65 (rho_lb - M)/(1 - M) + 1.5 (1 - energy similarity), at most 1,
  at least a small positive floor so that any reported anomaly reaches the deployed threshold.

State per series: categories x (2 x window + 2) float32, the window, the block, the range and a
few scalars: about 1.1 KB with the defaults.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from models.metrics.streaming import (
    StreamingDetector,
    range_learn,
    range_start,
    skipped,
)

# Scalars per series, one float64 array (indices below).
LO, HI, BSUM, BMAX, BMIN, MED, RHO_LB, RHO_UB, SIM_SUM, SIM_N, PROB_SUM, PROB_N, LAST_SIM, MIN_SIM, \
    DIFF_SUM, DIFF_N, ANOM_SUM, ANOM_N = range(18)
# Counters per series, one int64 array.
N, DSI, LAST_ANOM, LAST_UPDATE, MASK_CAT, NO_NEW = range(6)


class AdaptiveResonanceDetector(StreamingDetector):
    name = "art"
    threshold = 0.001
    defaults = {"window": 8, "step": 6, "categories": 12, "probation": 104, "levels": 80, "chomp": 0.075,
                "initial_rho": 0.8, "mask": 12, "alpha": 0.001, "shrink": 2e-4, "usage_decay": 0.999,
                "shape": False, "threshold": 0.001}

    def state_fields(self) -> dict:
        p = self.params
        return {self.field("w"): (np.float32, (p["categories"], 2 * p["window"])),
                self.field("energy"): (np.float32, (p["categories"],)),
                self.field("usage"): (np.float32, (p["categories"],)),
                self.field("recent"): (np.float32, (p["window"],)),
                self.field("f"): (np.float64, (18,)),
                self.field("c"): (np.int64, (6,))}

    def _score(self, a, slots, batch, out):
        p = self.params
        _art_rows(slots, np.asarray(batch.values, np.float64), out, a["w"], a["energy"], a["usage"], a["recent"],
                  a["f"], a["c"], int(p["step"]), int(p["probation"]), int(p["levels"]), float(p["chomp"]),
                  float(p["initial_rho"]), int(p["mask"]), float(p["alpha"]), float(p["shrink"]),
                  float(p["usage_decay"]), bool(p["shape"]))


@njit(cache=True, nogil=True)
def _art_rows(slots, values, out, w, energy, usage, recent, f, c, step, probation, levels, chomp, initial_rho,
              mask, alpha, shrink, decay, shape):
    window = recent.shape[1]
    lo = f[:, LO]
    hi = f[:, HI]
    for i in range(len(slots)):
        s = slots[i]
        x = values[i]
        if skipped(out, i, x):
            continue
        out[i] = 0.0
        k = c[s, N]
        # The range (ours: past and present points only), as the other detectors keep it.
        range_start(s, x, f[:, LO], f[:, HI], k)
        j = k % step
        if j == 0:
            f[s, BSUM] = 0.0
            f[s, BMAX] = x
            f[s, BMIN] = x
        f[s, BSUM] += x
        f[s, BMAX] = max(f[s, BMAX], x)
        f[s, BMIN] = min(f[s, BMIN], x)
        range_learn(s, x, lo, hi, shrink)
        c[s, N] = k + 1
        if j != step - 1:
            continue
        # One downsampled value: the block's spike, or its mean when the spike is small.
        mean = f[s, BSUM] / step
        rep = f[s, BMAX] if f[s, BMAX] - mean >= mean - f[s, BMIN] else f[s, BMIN]
        if abs(rep - mean) < 0.1 * abs(mean):
            rep = mean
        width = hi[s] - lo[s]
        u = 0.5
        if width > 0.0 and math.isfinite(width):
            u = min(max((rep - lo[s]) / width, 0.0), 1.0)
        if not math.isfinite(u):
            u = 0.5
        u = round(u * levels) / levels
        med = f[s, MED]
        if c[s, DSI] == 0:
            med = u
        if abs(u - med) < chomp:
            u_kept = med
        else:
            u_kept = u
        f[s, MED] = med + (1.0 / levels if u > med else (-1.0 / levels if u < med else 0.0))
        for q in range(window - 1):
            recent[s, q] = recent[s, q + 1]
        recent[s, window - 1] = u_kept
        dsi = c[s, DSI] + 1
        c[s, DSI] = dsi
        if dsi < window:
            continue
        out[i] = _classify(s, dsi, w, energy, usage, recent, f, c, probation, initial_rho, mask, alpha, decay, shape)


@njit(cache=True, nogil=True)
def _classify(s, dsi, w, energy, usage, recent, f, c, probation, initial_rho, mask, alpha, decay, shape):
    window = recent.shape[1]
    n_cat = w.shape[1]
    wmin = recent[s, 0]
    wmax = recent[s, 0]
    level = 0.0
    for q in range(window):
        wmin = min(wmin, recent[s, q])
        wmax = max(wmax, recent[s, q])
        level += recent[s, q]
    level /= window
    inp = np.empty(2 * window)
    for q in range(window):
        v = recent[s, q]
        if shape:
            v = (v - wmin) / (wmax - wmin) if wmax > wmin else 0.0
        inp[q] = v
        inp[window + q] = 1.0 - v
    learning = dsi - window < probation  # ARTime's probation, in downsampled points
    if dsi == window:
        f[s, RHO_LB] = initial_rho
        f[s, RHO_UB] = initial_rho
    rho_lb = f[s, RHO_LB]
    rho_ub = f[s, RHO_UB]
    # Fuzzy ART: the best match, and the resonating category of highest choice.
    best_m = 0.0
    best_c = -1
    chosen = -1
    best_t = -1.0
    for cat in range(n_cat):
        if usage[s, cat] <= 0.0:
            continue
        inter = 0.0
        norm = 0.0
        for q in range(2 * window):
            inter += min(inp[q], w[s, cat, q])
            norm += w[s, cat, q]
        m = inter / window
        if m > best_m:
            best_m = m
            best_c = cat
        t = inter / (alpha + norm)
        if m >= rho_ub and t > best_t:
            best_t = t
            chosen = cat
    for cat in range(n_cat):
        usage[s, cat] *= decay
    new_class = best_m < rho_lb
    if chosen >= 0:
        for q in range(2 * window):
            w[s, chosen, q] = min(inp[q], w[s, chosen, q])
        usage[s, chosen] += 1.0
        energy[s, chosen] += (level - energy[s, chosen]) / usage[s, chosen]
    else:
        worst = 0
        for cat in range(1, n_cat):
            if usage[s, cat] < usage[s, worst]:
                worst = cat
        for q in range(2 * window):
            w[s, worst, q] = inp[q]
        usage[s, worst] = 1.0
        energy[s, worst] = level
    # ARTime counts the points since the last new class (a category of the same class is no news).
    c[s, NO_NEW] = 0 if new_class else c[s, NO_NEW] + 1
    sim = best_m
    if learning:
        if dsi - window >= probation // 2:
            f[s, PROB_SUM] += sim
            f[s, PROB_N] += 1.0
        if dsi - window == probation - 1 and f[s, PROB_N] > 0:
            rho = min(f[s, PROB_SUM] / f[s, PROB_N], 0.97)
            f[s, RHO_LB] = rho
            f[s, RHO_UB] = rho
            c[s, LAST_UPDATE] = dsi
            f[s, MIN_SIM] = 1.0
        return 0.0
    # Running figures for the vigilance updates.
    f[s, SIM_SUM] += sim
    f[s, SIM_N] += 1.0
    f[s, MIN_SIM] = min(f[s, MIN_SIM], sim)
    d = rho_ub - sim
    if d > 0.05:
        f[s, DIFF_SUM] += min(d, 0.37)
        f[s, DIFF_N] += 1.0
    if c[s, MASK_CAT] == 1 and c[s, NO_NEW] >= mask:
        c[s, MASK_CAT] = 0
    since = dsi - c[s, LAST_ANOM]
    mask_anom = c[s, LAST_ANOM] > 0 and since <= mask
    score = 0.0
    if new_class and chosen < 0:
        masked = mask_anom or c[s, MASK_CAT] == 1
        below = sim < f[s, LAST_SIM] * (0.9 if mask_anom else 0.7)
        if not masked or below:
            fs = min(sim, 0.999)
            e_sim = 1.0 - abs(level - energy[s, best_c]) if best_c >= 0 else 0.0
            ub = ((1.0 - fs) - (1.0 - rho_ub)) / (1.0 - fs)
            lb = ((1.0 - fs) - (1.0 - rho_lb)) / (1.0 - fs)
            score = min(1.0, max(ub * 0.35 + lb * 0.65 + (1.0 - e_sim) * 1.5, 1e-3))
            c[s, LAST_ANOM] = dsi
            f[s, LAST_SIM] = sim
            f[s, ANOM_SUM] += sim
            f[s, ANOM_N] += 1.0
            since = 0
    # Vigilance updates: `mask` points after an anomaly, and every probation/2 points.
    if (c[s, LAST_ANOM] > 0 and since == mask) or dsi - c[s, LAST_UPDATE] >= max(probation // 2, 1):
        new_ub = min(f[s, SIM_SUM] / f[s, SIM_N], 0.97)
        low = f[s, MIN_SIM]
        if rho_lb <= low:
            new_lb = rho_lb + 0.19 * (low - rho_lb)
        else:
            drop = f[s, DIFF_SUM] / f[s, DIFF_N] if f[s, DIFF_N] > 0 else 0.0
            new_lb = rho_lb - max(drop, 0.01)
            if f[s, ANOM_N] > 0:
                new_lb = max(new_lb, f[s, ANOM_SUM] / f[s, ANOM_N])
        f[s, RHO_UB] = new_ub
        f[s, RHO_LB] = min(new_lb, new_ub)
        c[s, LAST_UPDATE] = dsi
        c[s, MASK_CAT] = 1
        c[s, NO_NEW] = 0
        f[s, MIN_SIM] = 1.0
        f[s, DIFF_SUM] = 0.0
        f[s, DIFF_N] = 0.0
    return score
