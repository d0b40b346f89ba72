"""The one scoring path: columns of a batch -> features -> every detector -> combined decision.

The detector service calls it on each consumed batch and `anomstream evaluate` on whole series;
both get the same numbers for the same points in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.model_set import ModelSet
from shared.features import SeriesWindows, build_batch


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray]  # detector name -> raw score (higher = more anomalous)
    flags: dict[str, np.ndarray]  # detector name -> bool
    is_anomaly: np.ndarray


def combine(flags: dict[str, np.ndarray], rule: str) -> np.ndarray:
    stacked = np.vstack(list(flags.values()))
    if rule == "or":
        return stacked.any(axis=0)
    if rule == "and":
        return stacked.all(axis=0)
    if rule == "majority":
        return stacked.sum(axis=0) * 2 > len(stacked)
    raise ValueError(f"unknown combine rule {rule!r} (or, and, majority)")


class Scorer:
    """Keeps the per-series windows between calls, so it must see each series in time order."""

    def __init__(self, model_set: ModelSet, rule: str = "or"):
        combine({"x": np.zeros(1, bool)}, rule)  # reject a bad rule at start, not on the first batch
        self.model_set = model_set
        self.rule = rule
        self.windows = SeriesWindows()

    def score(self, series, epoch_s, values) -> ScoreResult:
        batch = build_batch(self.model_set.scaler, self.windows, series, epoch_s, values)
        scores = {name: det.score(batch) for name, det in self.model_set.detectors.items()}
        flags = {name: self.model_set.detectors[name].decide(s) for name, s in scores.items()}
        return ScoreResult(scores, flags, combine(flags, self.rule))
