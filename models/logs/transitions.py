"""Transition novelty: the unsupervised yardstick the next-event model is measured against.

A session's transitions are its (event, next event) pairs, with PAD before its first event and END
after its last. Fitted on normal sessions only (all when unlabelled), a session scores the number
of its transitions that never occur in them and is anomalous when that is above 0 (`threshold`).
No network and no choice to make: what remembering every normal transition gives on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.base import read_json, write_json
from models.logs.base import LogDetector, Sessions, normal_only
from models.logs.sessions import END, PAD


def transitions(session: Sequence[str]) -> list[tuple[str, str]]:
    """(previous, event) pairs of one session: (PAD, first), ..., (last, END)."""
    events = list(session)
    return list(zip([PAD] + events, events + [END]))


class TransitionNoveltyDetector(LogDetector):
    name = "transition_novelty"
    threshold = 0.0

    def __init__(self):
        self.params: dict = {}
        self.transitions: set[tuple[str, str]] | None = None  # learned

    def fit(self, sessions: Sessions, labels: Sequence[int] | None = None) -> "TransitionNoveltyDetector":
        self.transitions = {pair for session in normal_only(sessions, labels) for pair in transitions(session)}
        return self

    def score_sessions(self, sessions: Sessions) -> np.ndarray:
        if self.transitions is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return np.array([sum(pair not in self.transitions for pair in transitions(s)) for s in sessions], float)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{self.name}.json", {"transitions": sorted(self.transitions)})

    @classmethod
    def load(cls, folder: Path) -> "TransitionNoveltyDetector":
        det = cls()
        det.transitions = {tuple(pair) for pair in read_json(folder / f"{cls.name}.json")["transitions"]}
        return det
