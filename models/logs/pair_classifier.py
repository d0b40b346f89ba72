"""Two-input classifier: (window of h events, next event) -> probability that the session is anomalous.

Supervised with session labels: every window of a session carries its session's label, so a
(window, next event) pair common in normal sessions learns a low probability and one that occurs
only in anomalous sessions a high one. Identical pairs are merged: the target is their fraction of
anomalous sessions (a soft label) and the weight the square root of their count, so the rare pairs,
where the anomalies are, are not drowned by the common ones (a network that can fit every distinct
pair still reaches each pair's fraction; with the plain count the rare pairs stayed underfitted).
A session's score is its largest window probability; an event id never seen in training scores 1
(as in the next-event model). The threshold is 0.5 unless the caller sets one (evaluation picks it
on a validation slice of the training split).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.logs.base import (
    KerasWindowModel,
    Sessions,
    Vocabulary,
    dedupe,
    encode_windows,
    per_session_max,
    require_labels,
    split_per_session,
)


class PairClassifierDetector(KerasWindowModel):
    name = "pair_classifier"
    supervised = True

    def __init__(self, h: int = 10, embedding_dim: int = 16, units: int = 64, epochs: int = 30,
                 batch_size: int = 128, learning_rate: float = 0.01, seed: int = 42, end: bool = True,
                 threshold: float = 0.5):
        super().__init__(h=h, embedding_dim=embedding_dim, units=units, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, seed=seed, end=end, threshold=threshold)
        self.threshold = float(threshold)

    def build_network(self, vocab_size: int):
        import keras
        from keras import layers

        window = keras.Input((self.params["h"],), dtype="int32", name="window")
        nxt = keras.Input((1,), dtype="int32", name="next_event")
        embed = layers.Embedding(vocab_size, self.params["embedding_dim"])
        context = layers.LSTM(self.params["units"])(embed(window))
        joined = layers.Concatenate()([context, layers.Flatten()(embed(nxt))])
        hidden = layers.Dense(32, activation="relu")(joined)
        return keras.Model([window, nxt], layers.Dense(1, activation="sigmoid")(hidden))

    def fit(self, sessions: Sessions, labels: Sequence[int] | None = None) -> "PairClassifierDetector":
        y = require_labels(self.name, sessions, labels)
        self.vocab = Vocabulary.from_sessions(sessions)
        contexts, targets, owner = encode_windows(sessions, self.vocab, self.params["h"], self.params["end"])
        contexts, targets, counts, soft = dedupe(contexts, targets, y[owner])
        self._train([contexts, targets[:, None]], soft.astype(np.float32), np.sqrt(counts), "binary_crossentropy")
        return self

    def _probs(self, sessions: Sessions) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        contexts, targets, owner = encode_windows(sessions, self.vocab, self.params["h"], self.params["end"])
        pairs, inverse = np.unique(np.column_stack([contexts, targets]), axis=0, return_inverse=True)
        probs = self._predict([pairs[:, :-1], pairs[:, -1:]])[:, 0][inverse.reshape(-1)].astype(np.float64)
        probs[targets == self.vocab.unknown_id] = 1.0
        return probs, owner

    def window_scores(self, sessions: Sessions) -> list[np.ndarray]:
        probs, owner = self._probs(sessions)
        return split_per_session(probs, owner, len(sessions))

    def score_sessions(self, sessions: Sessions) -> np.ndarray:
        probs, owner = self._probs(sessions)
        return per_session_max(probs, owner, len(sessions))
