"""Rolling robust z-score: distance of a point from the median of the previous `window` points of
its series, in units of their median absolute deviation (x 1.4826, so it matches sigma for normal
data). Median and MAD ignore the outliers they are meant to find, unlike mean and std. Streaming,
per series; it learns nothing in fit()."""

from __future__ import annotations

from pathlib import Path

import bottleneck as bn
import numpy as np
import pandas as pd

from models.base import Detector, read_json, write_json
from models.metrics.features import FeatureBatch


class RobustZScoreDetector(Detector):
    name = "robust_zscore"

    def __init__(self, window: int = 576, min_points: int = 20, cap: float = 50.0, threshold: float = 6.0,
                 max_series: int = 100_000):
        self.params = {"window": window, "min_points": min_points, "cap": cap, "threshold": threshold}
        self.threshold = threshold
        self.max_series = max_series
        self.past: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # series -> last values, deviations

    def fit(self, history: FeatureBatch) -> "RobustZScoreDetector":
        return self

    def for_stream(self) -> "RobustZScoreDetector":
        return type(self)(**self.params, max_series=self.max_series)

    def score(self, batch: FeatureBatch) -> np.ndarray:
        out = np.zeros(len(batch))
        window, cap = self.params["window"], self.params["cap"]
        codes, names = pd.factorize(batch.series)
        for code, name in enumerate(names):
            idx = np.flatnonzero(codes == code)
            # The past values and their deviations are both kept, so a stream scored in pieces gets
            # exactly the scores of the whole series scored at once.
            past_values, past_devs = self.past.pop(name, (np.empty(0), np.empty(0)))
            new = batch.values[idx]
            values = np.concatenate([past_values, new])
            median = self._median_before(values, len(past_values))
            with np.errstate(over="ignore", invalid="ignore"):  # |1e308 - -1e308| is inf: z = cap
                deviation = np.abs(new - median)
                devs = np.concatenate([past_devs, deviation])
                mad = self._median_before(devs, len(past_devs))
                z = deviation / (1.4826 * mad + 1e-9)
            # One extreme point is one of `window` values and deviations: the medians do not move.
            out[idx] = np.minimum(np.nan_to_num(z, nan=0.0, posinf=cap), cap)
            self.past[name] = (values[max(0, len(values) - window):], devs[max(0, len(devs) - window):])
        while len(self.past) > self.max_series:
            del self.past[next(iter(self.past))]
        return out

    def _median_before(self, x: np.ndarray, start: int) -> np.ndarray:
        """For x[start:], the median of the `window` points before each (bottleneck's C moving
        median, not pandas rolling: this runs per series per batch in the detector service)."""
        window, min_points = self.params["window"], self.params["min_points"]
        if len(x) < min_points:
            return np.full(len(x) - start, np.nan)
        # A window longer than the data means "every point so far" (bottleneck wants it to fit).
        moving = bn.move_median(x, min(window, len(x)), min_count=min_points)
        return np.concatenate([[np.nan], moving])[start:len(x)]

    def save(self, folder: Path) -> None:
        write_json(folder / "robust_zscore.json", {"params": self.params})

    @classmethod
    def load(cls, folder: Path) -> "RobustZScoreDetector":
        return cls(**read_json(folder / "robust_zscore.json")["params"])
