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

Seen transitions (`seen_transitions`): with "rank" (the default, DeepLog's decision) every event
is ranked; with "accept" an event whose transition from the event before it (PAD at a session's
start, END at its end) occurs in the normal training sessions is accepted at any k, and the
network judges only transitions never seen in normal operation. The network alone can rank a rare
but normal transition after an unusual longer context (HDFS: the replication events, in 0.5% of
normal blocks) as low as a fault; "accept" loses an anomaly made only of normal transitions in an
abnormal order or number. `logs evaluate` and `logs train` choose on the validation slice.

Training is fast: identical (window, target) pairs are merged with their counts as sample weights
(HDFS: ~87,000 windows, ~2,000 distinct). The weights are counts ** `weight_power`: 1 leaves the
loss as it is over every window; below 1 a rare but normal transition (HDFS: the replication
events, in 0.5% of normal blocks) keeps more probability, so top-k does not push it out, which is
what the false alarms on normal sessions were made of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from models.logs.transitions import transitions

UNKNOWN_RANK = 1_000_000.0  # rank given to an event never seen in training: above every k
WEIGHT_POWER = 0.5  # sample weight of a distinct (window, target) pair = its count ** this
SESSION_ENDS = ("length", "rank")
SEEN_TRANSITIONS = ("accept", "rank")


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


@dataclass
class ScoredWindows:
    """Windows through the network: what every decision of the model reads."""

    probs: np.ndarray  # (n, vocabulary) next-event probabilities
    targets: np.ndarray  # (n,) target ids
    previous: np.ndarray  # (n,) id of the event before each target (PAD at a session's start)
    lengths: np.ndarray  # (n,) events of the target's session (for an END: the session's length)
    owner: np.ndarray  # (n,) the session of each window


class NextEventDetector(KerasWindowModel):
    name = "next_event_lstm"

    learned_attributes = ("min_events", "transitions")

    def __init__(self, h: int = 10, k: int = 9, min_prob: float = 0.0, embedding_dim: int = 16, units: int = 64,
                 epochs: int = 30, batch_size: int = 256, learning_rate: float = 0.005, seed: int = 42,
                 end: bool = True, weight_power: float = WEIGHT_POWER, session_end: str = "length",
                 seen_transitions: str = "rank"):
        if session_end not in SESSION_ENDS:
            raise ValueError(f"session_end must be one of {SESSION_ENDS}, not {session_end!r}")
        if seen_transitions not in SEEN_TRANSITIONS:
            raise ValueError(f"seen_transitions must be one of {SEEN_TRANSITIONS}, not {seen_transitions!r}")
        super().__init__(h=h, k=k, min_prob=min_prob, embedding_dim=embedding_dim, units=units, epochs=epochs,
                         batch_size=batch_size, learning_rate=learning_rate, seed=seed, end=end,
                         weight_power=weight_power, session_end=session_end, seen_transitions=seen_transitions)
        self.threshold = float(k)
        self.min_events: int | None = None  # learned: the shortest normal training session
        self.transitions: list | None = None  # learned: the (previous event, event) pairs of normal training
        self._seen_codes = None  # (transitions, their pair codes), computed once

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
        self.transitions = sorted({pair for session in normal for pair in transitions(session)})
        contexts, targets, _ = encode_windows(normal, self.vocab, self.params["h"], self.params["end"])
        contexts, targets, counts, _ = dedupe(contexts, targets)
        weights = counts ** self.params.get("weight_power", 1.0)
        self._train(contexts, targets, weights, "sparse_categorical_crossentropy")
        return self

    def seen_transition(self, previous: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Whether each (previous event, target) id pair occurs in the normal training sessions."""
        if self._seen_codes is None or self._seen_codes[0] is not self.transitions:
            pairs = np.asarray([self.vocab.encode(pair) for pair in self.transitions or []], dtype=np.int64)
            codes = pairs[:, 0] * len(self.vocab) + pairs[:, 1] if len(pairs) else np.empty(0, np.int64)
            self._seen_codes = (self.transitions, codes)
        return np.isin(np.asarray(previous, np.int64) * len(self.vocab) + np.asarray(targets, np.int64),
                       self._seen_codes[1])

    def ranks(self, windows: ScoredWindows, min_prob: float | None = None, session_end: str | None = None,
              seen_transitions: str | None = None) -> np.ndarray:
        """Each window's rank (target_ranks at min_prob); a transition seen in training accepted
        (rank 1) under seen_transitions "accept"; session ends by the session-end rule. Each
        decision defaults to the model's own."""
        min_prob = self.params["min_prob"] if min_prob is None else min_prob
        ranks = target_ranks(windows.probs, windows.targets, self.vocab.unknown_id, min_prob)
        if (seen_transitions or self.params.get("seen_transitions", "rank")) == "accept" and self.transitions:
            ranks = np.where(self.seen_transition(windows.previous, windows.targets), 1.0, ranks)
        session_end = session_end or self.params.get("session_end", "rank")
        if session_end == "length" and self.min_events is not None:  # a model saved before min_events ranks ends
            is_end = windows.targets == self.vocab.index[END]
            early = is_end & (windows.lengths < self.min_events)
            ranks = np.where(early, UNKNOWN_RANK, np.where(is_end, 1.0, ranks))
        return ranks

    def _score(self, encoded: np.ndarray) -> np.ndarray:
        # Each distinct window through the network once.
        unique, inverse = np.unique(encoded, axis=0, return_inverse=True)
        return self._predict(unique)[inverse.reshape(-1)]

    def scored_windows(self, sessions: Sessions) -> ScoredWindows:
        """Every window of the sessions through the network."""
        self._check_fitted()
        contexts, targets, owner = encode_windows(sessions, self.vocab, self.params["h"], self.params["end"])
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        return ScoredWindows(self._score(contexts), targets.astype(np.int64), contexts[:, -1].astype(np.int64),
                             lengths[owner], owner)

    def window_scores(self, sessions: Sessions) -> list[np.ndarray]:
        windows = self.scored_windows(sessions)
        return split_per_session(self.ranks(windows), windows.owner, len(sessions))

    def score_sessions(self, sessions: Sessions, min_prob: float | None = None, session_end: str | None = None,
                       seen_transitions: str | None = None) -> np.ndarray:
        """Per session, the smallest k that accepts all its events (UNKNOWN_RANK when an event is
        unknown or below min_prob, or the session ends too early; every decision defaults to the
        model's own)."""
        windows = self.scored_windows(sessions)
        ranks = self.ranks(windows, min_prob, session_end, seen_transitions)
        return per_session_max(ranks, windows.owner, len(sessions), empty=1.0)

    def rank_windows(self, contexts: Sequence[Sequence[str]], targets: Sequence[str],
                     lengths: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Streaming use: (rank, probability) of each target event after its window of h event ids
        (PAD on the left of a young session, END as the target that closes one), in one network
        call, decided as `ranks` decides. `lengths`: the events of each window's session before
        its target; without them an END is ranked like an event."""
        self._check_fitted()
        if not len(targets):
            return np.empty(0), np.empty(0)
        encoded = np.asarray([self.vocab.encode(c) for c in contexts], dtype=np.int64).reshape(-1, self.params["h"])
        target_ids = np.asarray(self.vocab.encode(targets), dtype=np.int64)
        probs = self._score(encoded.astype(np.int32))
        windows = ScoredWindows(probs, target_ids, encoded[:, -1],
                                np.asarray(lengths if lengths is not None else [0] * len(target_ids)),
                                np.zeros(len(target_ids), np.int64))
        ranks = self.ranks(windows, session_end=None if lengths is not None else "rank")
        return ranks, probs[np.arange(len(target_ids)), target_ids]
