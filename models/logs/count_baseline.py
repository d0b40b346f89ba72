"""Count-vector baselines (loglizer style): each session as the count of every event id
(+ one column for ids unseen in training), then logistic regression or a decision tree
(scikit-learn), supervised with the session labels. Score = probability of Anomaly; threshold 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import joblib
import numpy as np

from models.base import ArtifactError, read_json, write_json
from models.logs.base import LogDetector, Sessions, Vocabulary, require_labels

KINDS = ("logistic_regression", "decision_tree")


def count_matrix(sessions: Sessions, vocab: Vocabulary) -> np.ndarray:
    """(sessions, vocabulary) event counts; unseen ids count in the UNKNOWN column."""
    out = np.zeros((len(sessions), len(vocab)), dtype=np.float64)
    for i, seq in enumerate(sessions):
        np.add.at(out[i], vocab.encode(seq), 1.0)
    return out


class CountVectorDetector(LogDetector):
    supervised = True

    def __init__(self, kind: str = "logistic_regression", seed: int = 42, threshold: float = 0.5):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.params = {"kind": kind, "seed": seed, "threshold": threshold}
        self.name = f"count_{kind}"
        self.threshold = float(threshold)
        self.vocab: Vocabulary | None = None
        self.model = None

    def _new_model(self):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer, StandardScaler
        from sklearn.tree import DecisionTreeClassifier

        if self.params["kind"] == "decision_tree":
            return DecisionTreeClassifier(random_state=self.params["seed"])
        from sklearn.linear_model import LogisticRegression

        # log(1 + count), standardised: long sessions do not swamp the weights.
        return make_pipeline(FunctionTransformer(np.log1p), StandardScaler(),
                             LogisticRegression(max_iter=2000, random_state=self.params["seed"]))

    def fit(self, sessions: Sessions, labels: Sequence[int] | None = None) -> "CountVectorDetector":
        y = require_labels(self.name, sessions, labels)
        self.vocab = Vocabulary.from_sessions(sessions)
        self.model = self._new_model().fit(count_matrix(sessions, self.vocab), y)
        return self

    def score_sessions(self, sessions: Sessions) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.name} is not fitted")
        if len(sessions) == 0:
            return np.empty(0)
        proba = self.model.predict_proba(count_matrix(sessions, self.vocab))
        classes = list(self.model.classes_)
        return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(sessions))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.model, folder / f"{self.name}.joblib")
        write_json(folder / f"{self.name}.json", {"params": self.params, "threshold": self.threshold,
                                                  "vocabulary": self.vocab.tokens})

    @classmethod
    def load(cls, folder: Path, kind: str = "logistic_regression") -> "CountVectorDetector":
        det = cls(kind=kind)
        meta = read_json(folder / f"{det.name}.json")
        path = folder / f"{det.name}.joblib"
        if not path.exists():
            raise ArtifactError(f"model artifact not found: {path}")
        det = cls(**meta["params"])
        det.model = joblib.load(path)
        det.vocab = Vocabulary(meta["vocabulary"])
        det.threshold = meta["threshold"]
        return det
