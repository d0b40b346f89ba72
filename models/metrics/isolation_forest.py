"""IsolationForest over the scaled (value, hour, day_of_week) rows (the seed model)."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
from sklearn.ensemble import IsolationForest

from models.base import ArtifactError, Detector, read_json, write_json
from models.metrics.features import FeatureBatch


class IsolationForestDetector(Detector):
    name = "isolation_forest"
    uses_features = True

    def __init__(self, n_estimators: int = 100, contamination: float = 0.1, random_state: int = 42):
        self.params = {"n_estimators": n_estimators, "contamination": contamination,
                       "random_state": random_state}
        self.model: IsolationForest | None = None

    def fit(self, history: FeatureBatch) -> "IsolationForestDetector":
        self.model = IsolationForest(**self.params).fit(history.X)
        # sklearn flags a row when score_samples < offset_; with scores negated, that is > -offset_.
        self.threshold = float(-self.model.offset_)
        return self

    def score(self, batch: FeatureBatch) -> np.ndarray:
        # batch.X is finite and bounded (features.FEATURE_LIMIT): sklearn refuses inf, it would
        # stop the whole batch.
        return -self.model.score_samples(batch.X)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.model, folder / "isolation_forest.joblib")
        write_json(folder / "isolation_forest.json", {"params": self.params, "threshold": self.threshold})

    @classmethod
    def load(cls, folder: Path) -> "IsolationForestDetector":
        meta = read_json(folder / "isolation_forest.json")
        path = folder / "isolation_forest.joblib"
        if not path.exists():
            raise ArtifactError(f"model artifact not found: {path}")
        det = cls(**meta["params"])
        det.model = joblib.load(path)
        if not isinstance(det.model, IsolationForest):
            raise ArtifactError(f"{path} does not hold an IsolationForest")
        det.threshold = meta["threshold"]
        return det
