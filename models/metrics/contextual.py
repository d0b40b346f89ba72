"""Contextual anomaly detector, in the manner of CAD OSE (Smirnov's Contextual Anomaly Detector,
open-source edition, a NAB leader): the value is quantised into a few levels, the recent levels
form contexts, each context learns which level follows it, and a point is anomalous in proportion
to the contexts that did not predict it.

Ours, written from that description: the value's level is one of `levels` equal bins of the range
of the series seen so far, or "below" / "above" it (so `levels` + 2 symbols). The range is learnt
from past points only and slowly forgets (each point pulls both ends in by `shrink` of its
width), so one old spike does not squash every later level into one bin. Contexts of order 1..3
(the last one, two, three symbols) each keep, per context, a count of every symbol that followed
it (order 1 directly; orders 2 and 3 hashed into `rows` rows), uint8 counters halved when one
saturates (old habits fade). Raw score of a point = among the orders whose context has been
seen (its counts sum to at least `min_context`), the fraction for which this symbol never
followed it.

How the raw score becomes an alarm, as CAD OSE does it: the raw score is computed from the first
point on, and the output is the raw score only when no raw score in the previous `rest` points
reached `base` (CAD OSE's rest period, there a fifth of NAB's probation, about 3% of a series;
here a fixed number of points); otherwise 0. The early points, when everything is new, keep
the output silent until the contexts settle (CAD OSE's implicit probation), and an event raises
one score, then silence. `threshold` is the deployed decision on that sparse output. The value
is quantised in `levels` = 8 bins (CAD OSE: 3 bits of the value over its range, i.e. 8 levels)
of the range seen so far (no future range: no leakage).

State per series: 3 x `rows` x (levels+2) uint8 counters, the range and the last three symbols:
about 1 KB with the defaults.
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


class ContextualDetector(StreamingDetector):
    name = "contextual"
    threshold = 0.99
    defaults = {"levels": 8, "rows": 32, "shrink": 2e-4, "min_points": 50, "min_context": 4, "rest": 120,
                "base": 0.75, "threshold": 0.75}

    def state_fields(self) -> dict:
        symbols = self.params["levels"] + 2
        return {self.field("counts"): (np.uint8, (3, self.params["rows"], symbols)),
                self.field("lo"): (np.float64, ()), self.field("hi"): (np.float64, ()),
                self.field("last"): (np.int8, (3,)), self.field("n"): (np.int64, ()),
                self.field("quiet"): (np.int32, ())}

    def _score(self, a, slots, batch, out):
        p = self.params
        _contextual_rows(slots, np.asarray(batch.values, np.float64), out, a["counts"], a["lo"], a["hi"],
                         a["last"], a["n"], a["quiet"], int(p["levels"]), float(p["shrink"]),
                         int(p["min_points"]), int(p["min_context"]), int(p["rest"]), float(p["base"]))


@njit(cache=True, nogil=True)
def symbol_of(x, lo, hi, levels):
    if x < lo:
        return 0
    if x > hi:
        return levels + 1
    width = hi - lo
    if width <= 0.0:
        return 1 + levels // 2
    return 1 + min(int((x - lo) / width * levels), levels - 1)


@njit(cache=True, nogil=True)
def _row(order, last, rows, symbols):
    """Row of the context of this order: the last `order` symbols (last[0] the most recent)."""
    if order == 0:
        return int(last[0]) % rows
    h = 2166136261
    for j in range(order + 1):
        h = ((h ^ (int(last[j]) + 1)) * 16777619) & 0xFFFFFFFF
    return (h >> 7) % rows


@njit(cache=True, nogil=True)
def _contextual_rows(slots, values, out, counts, lo, hi, last, n, quiet, levels, shrink, min_points,
                     min_context, rest, base):
    rows = counts.shape[2]
    symbols = counts.shape[3]
    for i in range(len(slots)):
        s = slots[i]
        x = values[i]
        if skipped(out, i, x):
            continue
        k = n[s]
        range_start(s, x, lo, hi, k)
        sym = symbol_of(x, lo[s], hi[s], levels)
        seen = 0
        missed = 0
        for order in range(3):
            if k <= order:
                break
            r = _row(order, last[s], rows, symbols)
            total = 0
            for c in range(symbols):
                total += counts[s, order, r, c]
            if total >= min_context:
                seen += 1
                if counts[s, order, r, sym] == 0:
                    missed += 1
            # learn: this symbol followed this context
            if counts[s, order, r, sym] == 255:
                for rr in range(rows):
                    for c in range(symbols):
                        counts[s, order, rr, c] = counts[s, order, rr, c] // 2
            counts[s, order, r, sym] += 1
        raw = missed / seen if seen > 0 else 1.0
        # CAD OSE's rest period: silent while a raw score of the last `rest` points reached `base`.
        score = raw if (quiet[s] == 0 and k >= min_points) else 0.0
        if quiet[s] > 0:
            quiet[s] -= 1
        if raw >= base:
            quiet[s] = rest
        out[i] = score
        last[s, 2] = last[s, 1]
        last[s, 1] = last[s, 0]
        last[s, 0] = sym
        # The range: include the point, then forget a little.
        range_learn(s, x, lo, hi, shrink)
        n[s] = k + 1
