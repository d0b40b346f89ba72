"""Seasonal forecasting residual: a per-series additive exponential-smoothing forecast (a level
plus one seasonal offset per time-of-day bin, in the manner of Holt-Winters without the trend),
scored by the size of the forecast error in units of the mean absolute error so far. The score is
meant for the anomaly-likelihood stage (`seasonal_likelihood`), which turns it into how unusual
the recent errors are.

Per point, before it is learnt: forecast = level + season[bin(t)], residual = x - forecast,
score = |residual| / (mae + tiny). Then level, the bin's offset and mae move towards the point
with their smoothing factors. Without timestamps (or with a one-bin season) it is simple
exponential smoothing. What the state keeps of a point is clipped to `clip` mean absolute errors
around the forecast, so one extreme point (1e308) raises its score but does not blow the state
up; a real level shift is still followed (each clipped point moves the level by alpha * clip mae).

Its expectation (for an alert): the forecast, and the range of `threshold` mean absolute errors
around it inside which the detector alone would not flag (for its likelihood, the range the recent
errors must stay within on average: see Expectation.widened).

State per series: 48 float32 offsets and 4 float64s, about 230 bytes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from models.base import Expectation
from models.metrics.streaming import StreamingDetector, skipped


class SeasonalResidualDetector(StreamingDetector):
    name = "seasonal"
    threshold = 8.0
    defaults = {"bins": 48, "period_s": 86400.0, "alpha": 0.05, "gamma": 0.1, "beta": 0.01,
                "min_points": 20, "clip": 20.0, "cap": 1000.0, "threshold": 8.0}

    def state_fields(self) -> dict:
        return {self.field("season"): (np.float32, (self.params["bins"],)),
                self.field("level"): (np.float64, ()), self.field("mae"): (np.float64, ()),
                self.field("n"): (np.int64, ())}

    def _score(self, a, slots, batch, out):
        p = self.params
        values = np.asarray(batch.values, np.float64)
        forecast, mae = np.full(len(out), np.nan), np.full(len(out), np.nan)
        _seasonal_rows(slots, values, np.asarray(batch.timestamps, np.float64),
                       out, forecast, mae, a["season"], a["level"], a["mae"], a["n"], float(p["period_s"]),
                       float(p["alpha"]), float(p["gamma"]), float(p["beta"]), int(p["min_points"]),
                       float(p["clip"]), float(p["cap"]))
        return Expectation(values, forecast, forecast - self.threshold * mae, forecast + self.threshold * mae,
                           spread=mae)


@njit(cache=True, nogil=True)
def _seasonal_rows(slots, values, times, out, forecast_out, mae_out, season, level, mae, n, period, alpha,
                   gamma, beta, min_points, clip, cap):
    bins = season.shape[1]
    for i in range(len(slots)):
        s = slots[i]
        x = values[i]
        if skipped(out, i, x):
            continue
        t = times[i]
        b = 0
        if bins > 1 and math.isfinite(t):
            b = int(math.floor((t % period) / period * bins)) % bins
        k = n[s]
        if k == 0:
            level[s] = x
            mae[s] = 0.0
            n[s] = 1
            out[i] = 0.0
            continue
        forecast = level[s] + season[s, b]
        r = x - forecast
        score = 0.0
        if k >= min_points:
            score = min(abs(r) / (mae[s] + 1e-9 * (1.0 + abs(level[s]))), cap)
            forecast_out[i] = forecast
            mae_out[i] = mae[s]
        out[i] = score
        # Learn the point, clipped to clip mean errors around the forecast (module doc).
        if k >= min_points and mae[s] > 0.0:
            bound = clip * mae[s]
            r = min(max(r, -bound), bound)
        kept = forecast + r
        mae[s] += (beta if k >= min_points else 1.0 / (k + 1)) * (abs(r) - mae[s])
        new_level = level[s] + alpha * (kept - season[s, b] - level[s])
        season[s, b] += gamma * (kept - new_level - season[s, b])
        level[s] = new_level
        n[s] = k + 1
