"""Next-event model (DeepLog-style): which event normally follows the last h events.

Embedding -> LSTM -> softmax over the event ids seen in training plus PAD, UNKNOWN and END.
Trained on normal sessions only, left-padded (every event is a target) and with the end of the
session as a last target, so a session that stops early is as unexpected as a wrong event.
An event is anomalous when it is not among the model's top-k predictions for its window, when its
probability is below `min_prob` (0 by default: top-k alone), or when its id was never seen in
training (UNKNOWN); a session is anomalous when any of its events is. With few event ids (HDFS: 12
in normal sessions) the order of the many near-zero probabilities is arbitrary, so an event never
seen after a window can still land inside a large k; a small `min_prob` catches it at any k.

Score of a window = the rank (1 = most likely) of its actual next event, UNKNOWN scoring
`unknown_rank`; the session score is its largest rank, i.e. the smallest k that would accept the
whole session, and the decision at k is score > k, so one scoring serves every k.

Session ends (`session_end`): with "length" a session that ends with fewer events than the
shortest normal training session (`min_events`, learned) is anomalous and any longer one may end;
the END target's rank is not used, because where a long normal session stops varies more than a
few thousand training sessions show (on hdfs_deeplog's validation slices, END ranks added false
alarms on normal sessions). With "rank" the END target is ranked like an event, which suits logs
cut short (the HDFS 100k sample cuts every block at line 100,000, so its shortest normal session
is no guide). `logs evaluate` and `logs train` choose between them on the validation slice.

Training is fast: identical (window, target) pairs are merged with their counts as sample weights
(HDFS: ~87,000 windows, ~2,000 distinct). The weights are counts ** `weight_power`: 1 leaves the
loss as it is over every window; below 1 a rare but normal transition (HDFS: the replication
events, in 0.5% of normal blocks) keeps more probability, so top-k does not push it out, which is
what the false alarms on normal sessions were made of.
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
    normal_only,
    per_session_max,
    split_per_session,
)
from models.logs.sessions import END

UNKNOWN_RANK = 1_000_000.0  # rank given to an event never seen in training: above every k
WEIGHT_POWER = 0.5  # sample weight of a distinct (window, target) pair = its count ** this
SESSION_ENDS = ("length", "rank")


def target_ranks(probs: np.ndarray, targets: np.ndarray, unknown_id: int | None = None,
                 min_prob: float = 0.0) -> np.ndarray:
    """1-based rank of each row's target in its probability row (1 = the most likely; ties count
    in the target's favour). A target equal to unknown_id, or whose probability is below
    min_prob, scores UNKNOWN_RANK (anomalous at every k). The event is accepted at k exactly
    when its rank <= k."""
    probs = np.asarray(probs)
    targets = np.asarray(targets)
    own = probs[np.arange(len(targets)), targets]
    ranks = (probs > own[:, None]).sum(axis=1).astype(np.float64) + 1.0
    ranks[own < min_prob] = UNKNOWN_RANK
    if unknown_id is not None:
        ranks[targets == unknown_id] = UNKNOWN_RANK
    return ranks


class NextEventDetector(KerasWindowModel):
    name = "next_event_lstm"

    learned_attributes = ("min_events",)

    def __init__(self, h: int = 10, k: int = 9, min_prob: float = 0.0, embedding_dim: int = 16, units: int = 64,
                 epochs: int = 30, batch_size: int = 256, learning_rate: float = 0.005, seed: int = 42,
                 end: bool = True, weight_power: float = WEIGHT_POWER, session_end: str = "length"):
        if session_end not in SESSION_ENDS:
            raise ValueError(f"session_end must be one of {SESSION_ENDS}, not {session_end!r}")
        super().__init__(h=h, k=k, min_prob=min_prob, embedding_dim=embedding_dim, units=units, epochs=epochs,
                         batch_size=batch_size, learning_rate=learning_rate, seed=seed, end=end,
                         weight_power=weight_power, session_end=session_end)
        self.threshold = float(k)
        self.min_events: int | None = None  # learned: the shortest normal training session

    @property
    def k(self) -> int:
        return int(self.threshold)

    @k.setter
    def k(self, value: int) -> None:
        self.threshold = float(value)
        self.params["k"] = int(value)

    def build_network(self, vocab_size: int):
        import keras
        from keras import layers

        return keras.Sequential([
            keras.Input((self.params["h"],), dtype="int32"),
            layers.Embedding(vocab_size, self.params["embedding_dim"]),
            layers.LSTM(self.params["units"]),
            layers.Dense(vocab_size, activation="softmax"),
        ])

    def fit(self, sessions: Sessions, labels: Sequence[int] | None = None) -> "NextEventDetector":
        normal = normal_only(sessions, labels)
        if not normal:
            raise ValueError("no normal session to learn from")
        self.vocab = Vocabulary.from_sessions(normal)
        self.min_events = min(len(s) for s in normal)
        contexts, targets, _ = encode_windows(normal, self.vocab, self.params["h"], self.params["end"])
        contexts, targets, counts, _ = dedupe(contexts, targets)
        weights = counts ** self.params.get("weight_power", 1.0)
        self._train(contexts, targets, weights, "sparse_categorical_crossentropy")
        return self

    def apply_session_end(self, ranks: np.ndarray, targets: np.ndarray, lengths: np.ndarray,
                          session_end: str | None = None) -> np.ndarray:
        """Ranks with the session-end rule (the model's unless given) applied to the END targets
        (`lengths`: each window's session length): under "length", UNKNOWN_RANK for a session
        shorter than min_events, else 1 (an end is accepted at every k)."""
        session_end = session_end or self.params.get("session_end", "rank")
        if session_end != "length" or self.min_events is None:  # a model saved before min_events ranks ends
            return ranks
        is_end = np.asarray(targets) == self.vocab.index[END]
        early = is_end & (np.asarray(lengths) < self.min_events)
        return np.where(early, UNKNOWN_RANK, np.where(is_end, 1.0, ranks))

    def next_event_probs(self, sessions: Sessions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probability rows, target ids, session index) of every window of the sessions."""
        self._check_fitted()
        contexts, targets, owner = encode_windows(sessions, self.vocab, self.params["h"], self.params["end"])
        # Each distinct window through the network once.
        unique, inverse = np.unique(contexts, axis=0, return_inverse=True)
        return self._predict(unique)[inverse.reshape(-1)], targets, owner

    def session_ranks(self, probs: np.ndarray, targets: np.ndarray, owner: np.ndarray, sessions: Sessions,
                      min_prob: float, session_end: str | None = None) -> np.ndarray:
        """Each window's rank at min_prob, session ends decided by the session-end rule."""
        ranks = target_ranks(probs, targets, self.vocab.unknown_id, min_prob)
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        return self.apply_session_end(ranks, targets, lengths[owner] if len(owner) else owner, session_end)

    def _ranks(self, sessions: Sessions, min_prob: float | None = None,
               session_end: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        probs, targets, owner = self.next_event_probs(sessions)
        min_prob = self.params["min_prob"] if min_prob is None else min_prob
        return self.session_ranks(probs, targets, owner, sessions, min_prob, session_end), owner

    def window_scores(self, sessions: Sessions) -> list[np.ndarray]:
        ranks, owner = self._ranks(sessions)
        return split_per_session(ranks, owner, len(sessions))

    def score_sessions(self, sessions: Sessions, min_prob: float | None = None,
                       session_end: str | None = None) -> np.ndarray:
        """Per session, the smallest k that accepts all its events (UNKNOWN_RANK when an event is
        unknown or below min_prob, or the session ends too early; min_prob and the session-end rule
        default to the model's own)."""
        ranks, owner = self._ranks(sessions, min_prob, session_end)
        return per_session_max(ranks, owner, len(sessions), empty=1.0)

    def rank_windows(self, contexts: Sequence[Sequence[str]], targets: Sequence[str],
                     lengths: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Streaming use: (rank, probability) of each target event after its window of h event ids
        (PAD on the left of a young session, END as the target that closes one), in one network
        call. Ranks follow target_ranks at the model's min_prob: UNKNOWN_RANK for an event never
        seen in training or below min_prob; an END target follows the session-end rule, given
        `lengths` (the events of each window's session so far; without them ENDs are ranked)."""
        self._check_fitted()
        if not len(targets):
            return np.empty(0), np.empty(0)
        encoded = np.asarray([self.vocab.encode(c) for c in contexts], dtype=np.int32).reshape(-1, self.params["h"])
        target_ids = np.asarray(self.vocab.encode(targets), dtype=np.int64)
        unique, inverse = np.unique(encoded, axis=0, return_inverse=True)
        probs = self._predict(unique)[inverse.reshape(-1)]
        ranks = target_ranks(probs, target_ids, self.vocab.unknown_id, self.params["min_prob"])
        if lengths is not None:
            ranks = self.apply_session_end(ranks, target_ids, np.asarray(lengths))
        return ranks, probs[np.arange(len(target_ids)), target_ids]
