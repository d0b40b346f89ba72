"""The protocol every log detector follows, and what the window models share.

A log detector works on sessions (each a sequence of event ids): fit(sessions, labels=None) learns
(unsupervised detectors use only the sessions labelled normal, or all when no labels are given);
score_sessions(sessions) returns one float per session, higher = more anomalous; decide(scores)
compares with `threshold` (for the next-event model the threshold is k: a session scores the
smallest k that would accept every one of its events); save/load write and read one folder.
Window models also give window_scores(sessions): one score per window of each session (the
session score is their maximum).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.base import read_json, write_json
from models.inference import SequentialNetwork, import_keras, load_keras_model
from models.logs.sessions import END, PAD, UNKNOWN, windows

Sessions = Sequence[Sequence[str]]


class LogDetector(ABC):
    name: str = "log_detector"
    supervised: bool = False
    threshold: float = 0.5

    @abstractmethod
    def fit(self, sessions: Sessions, labels: Sequence[int] | None = None) -> "LogDetector": ...

    @abstractmethod
    def score_sessions(self, sessions: Sessions) -> np.ndarray: ...

    def window_scores(self, sessions: Sessions) -> list[np.ndarray] | None:
        """Per-window scores of each session (window models); None for session-level models."""
        return None

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def predict(self, sessions: Sessions) -> np.ndarray:
        return self.decide(self.score_sessions(sessions))

    @abstractmethod
    def save(self, folder: Path) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, folder: Path) -> "LogDetector": ...


def normal_only(sessions: Sessions, labels: Sequence[int] | None) -> list:
    """The sessions an unsupervised model learns from: the normal ones (all when unlabelled)."""
    if labels is None:
        return list(sessions)
    if len(labels) != len(sessions):
        raise ValueError(f"{len(labels)} labels for {len(sessions)} sessions")
    return [s for s, y in zip(sessions, labels) if not y]


def require_labels(name: str, sessions: Sessions, labels: Sequence[int] | None) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} is supervised: fit() needs labels")
    y = np.asarray(labels, dtype=int)
    if len(y) != len(sessions):
        raise ValueError(f"{len(y)} labels for {len(sessions)} sessions")
    return y


class Vocabulary:
    """Event id -> integer: 0 PAD, 1 UNKNOWN, 2 END, then the training events, sorted."""

    SPECIAL = (PAD, UNKNOWN, END)

    def __init__(self, events):
        self.tokens = list(self.SPECIAL) + sorted(set(events) - set(self.SPECIAL))
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_sessions(cls, sessions: Sessions) -> "Vocabulary":
        return cls(e for s in sessions for e in s)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unknown_id(self) -> int:
        return self.index[UNKNOWN]

    def encode(self, events) -> list[int]:
        unknown = self.unknown_id
        return [self.index.get(e, unknown) for e in events]


def encode_windows(sessions: Sessions, vocab: Vocabulary, h: int,
                   end: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every padded window of every session: contexts (n, h), targets (n,), session index (n,)."""
    contexts, targets, owner = [], [], []
    for i, seq in enumerate(sessions):
        for context, target in windows(vocab.encode(seq), h, pad=vocab.index[PAD],
                                       end=vocab.index[END] if end else None):
            contexts.append(context)
            targets.append(target)
            owner.append(i)
    return (np.asarray(contexts, dtype=np.int32).reshape(-1, h), np.asarray(targets, dtype=np.int32),
            np.asarray(owner, dtype=np.int64))


def dedupe(contexts: np.ndarray, targets: np.ndarray, values: np.ndarray | None = None):
    """Identical (window, target) rows merged: unique contexts, targets, their counts as sample
    weights and, with `values` (e.g. labels), each row's mean value (a soft label)."""
    rows = np.column_stack([contexts, targets])
    unique, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    mean = None
    if values is not None:
        mean = np.bincount(inverse, weights=np.asarray(values, float), minlength=len(unique)) / counts
    return unique[:, :-1], unique[:, -1], counts.astype(np.float32), mean


def per_session_max(window_values: np.ndarray, owner: np.ndarray, n_sessions: int, empty: float = 0.0) -> np.ndarray:
    out = np.full(n_sessions, -np.inf)
    np.maximum.at(out, owner, window_values)
    out[np.isneginf(out)] = empty
    return out


def split_per_session(window_values: np.ndarray, owner: np.ndarray, n_sessions: int) -> list[np.ndarray]:
    bounds = np.searchsorted(owner, np.arange(n_sessions + 1))
    return [window_values[bounds[i]:bounds[i + 1]] for i in range(n_sessions)]


class KerasWindowModel(LogDetector):
    """What the two Keras window models share: vocabulary, network file, params, threshold and
    the learned attributes a model names in `learned_attributes` (saved beside them).

    A Sequential network (the next-event model) is exported after training and predicts in numpy
    (models/inference.py), so the log detector service does not import TensorFlow; the pair
    classifier (two inputs, an evaluation baseline) predicts with Keras."""

    learned_attributes: tuple[str, ...] = ()

    def __init__(self, **params):
        self.params = params
        self.vocab: Vocabulary | None = None
        self.model = None  # the Keras network (training; the pair classifier)
        self.network: SequentialNetwork | None = None  # its export, when it is Sequential
        self._infer = None

    def _check_fitted(self) -> None:
        if (self.model is None and self.network is None) or self.vocab is None:
            raise RuntimeError(f"{self.name} is not fitted")

    def _train(self, inputs, targets, weights, loss: str) -> None:
        keras = import_keras()

        keras.utils.set_random_seed(self.params["seed"])
        self.model = self.build_network(len(self.vocab))
        self.model.compile(optimizer=keras.optimizers.Adam(self.params["learning_rate"]), loss=loss)
        self.model.fit(inputs, targets, sample_weight=weights / weights.mean(), epochs=self.params["epochs"],
                       batch_size=self.params["batch_size"], shuffle=True, verbose=0)
        self._infer = None
        self.network = SequentialNetwork.from_keras(self.model) if isinstance(self.model, keras.Sequential) else None

    def build_network(self, vocab_size: int):  # pragma: no cover - each model defines it
        raise NotImplementedError

    def _predict(self, inputs) -> np.ndarray:
        """The network's output for inputs: the export in numpy, else one traced Keras graph for
        every batch size."""
        if self.network is not None:
            return self.network(inputs[0] if isinstance(inputs, (list, tuple)) else inputs)
        if self._infer is None:
            import tensorflow as tf

            specs = [tf.TensorSpec([None, *shape[1:]], tf.int32)
                     for shape in (self.model.input_shape if isinstance(self.model.input_shape, list)
                                   else [self.model.input_shape])]
            self._infer = tf.function(lambda *x: self.model(list(x) if len(x) > 1 else x[0], training=False),
                                      input_signature=specs)
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if len(inputs[0]) == 0:
            return np.empty((0,) + tuple(self.model.output_shape[1:]), dtype=np.float32)
        return self._infer(*[np.ascontiguousarray(x, dtype=np.int32) for x in inputs]).numpy()

    def save(self, folder: Path) -> None:
        self._check_fitted()
        folder.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            self.model.save(folder / f"{self.name}.keras")
        if self.network is not None:
            self.network.save(folder, self.name)
        write_json(folder / f"{self.name}.json", {"params": self.params, "threshold": self.threshold,
                                                  "vocabulary": self.vocab.tokens,
                                                  **{a: getattr(self, a) for a in self.learned_attributes}})

    @classmethod
    def load(cls, folder: Path) -> "KerasWindowModel":
        meta = read_json(folder / f"{cls.name}.json")
        det = cls(**meta["params"])
        if SequentialNetwork.exists(folder, cls.name):
            det.network = SequentialNetwork.load(folder, cls.name)
        else:  # the pair classifier, or a model saved before the export (TensorFlow needed)
            keras = import_keras()

            det.model = load_keras_model(folder / f"{cls.name}.keras")
            if isinstance(det.model, keras.Sequential):
                det.network = SequentialNetwork.from_keras(det.model)
        det.vocab = Vocabulary(meta["vocabulary"])
        det.threshold = meta["threshold"]
        for attribute in cls.learned_attributes:  # absent from a model saved before it was learned
            setattr(det, attribute, meta.get(attribute))
        return det
