"""The protocol every detector follows (in the spirit of scikit-learn and River).

Hyper-parameters go in __init__; fit(history) learns from a FeatureBatch; score(batch) returns one
float per row, higher = more anomalous; decide(scores) applies the learned threshold; save/load
write and read one folder. A detector that has an idea of what each point should have been (a
forecast, a median) also returns it from score_expected(batch), so an alert can say why. Detectors that keep state across batches (streaming ones) update it
inside score(), in row order, and return a fresh instance from for_stream().
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the protocol does not depend on one feature's batches
    from models.metrics.features import FeatureBatch


class ArtifactError(RuntimeError):
    """A model artifact is missing or does not match what the code expects; names the file."""


@dataclass
class Expectation:
    """Per row: the quantity a detector compared (`observed`: the value, or a recent average), what
    it expected (`center`) and the range around it inside which the detector alone would not flag
    (`low`, `high`); NaN where it had no expectation yet (still learning). `what` names `observed`
    for a person ("value", "12-point average"). `spread`: the scale the detector's score divides
    the distance from `center` by (a mean absolute error, a scaled MAD), if it has one."""

    observed: np.ndarray
    center: np.ndarray
    low: np.ndarray
    high: np.ndarray
    what: str = "value"
    spread: np.ndarray | None = None

    def widened(self, limit: np.ndarray) -> "Expectation":
        """The range where the score (|observed - center| / spread) stays under `limit` per row:
        for the likelihood of this detector's score, whose alarm is a recent average of the score
        above the normal `limit` (so the value stays inside it on average)."""
        return Expectation(self.observed, self.center, self.center - limit * self.spread,
                           self.center + limit * self.spread, self.what, self.spread)


class Detector(ABC):
    name: str = "detector"
    threshold: float = float("inf")
    # Reads the scaled feature rows / windows of a batch (FeatureBatch.X, .windows); a Scorer
    # without such a detector does not build them (nor keep the windows' state).
    uses_features: bool = False

    @abstractmethod
    def fit(self, history: FeatureBatch) -> "Detector": ...

    @abstractmethod
    def score(self, batch: FeatureBatch) -> np.ndarray: ...

    def score_expected(self, batch: FeatureBatch) -> tuple[np.ndarray, Expectation | None]:
        """score(batch), and what the detector expected of each row where it has an expectation
        (None for a detector without one, e.g. IsolationForest)."""
        return self.score(batch), None

    def for_stream(self) -> "Detector":
        """The instance one stream (one Scorer) scores with. A detector that keeps per-series state
        between batches returns a fresh copy, so two streams never share state; a fitted,
        stateless one returns itself."""
        return self

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    @abstractmethod
    def save(self, folder: Path) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, folder: Path) -> "Detector": ...


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ArtifactError(f"model artifact not found: {path} (run `anomstream train` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"model artifact {path} is not valid JSON: {exc}") from None
