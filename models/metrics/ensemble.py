"""Ensembles: one decision from several outputs' scores, then a quiet period per series.

Rules (each member is an output name and its threshold):
- "or": a point is an alarm when any member's score reaches its threshold; the ensemble's score is
  the largest member score over its threshold, times `threshold` (so it reaches `threshold` exactly
  when the decision does);
- "vote": when at least `votes` members reach their thresholds; score = the number that do;
- "max" / "mean": of the members' scores (likelihoods, in [0, 1]), an alarm at `threshold`.

Then the gate: after an alarm a series stays quiet (no alarm) for `quiet` points. An event that
several members (or one member, several times) flag raises one alarm, as NAB and an operator want;
the state is one counter per series in the state store, so the gate streams like the detectors
(it only ever looks back).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.state import SeriesState, private_slots

RULES = ("or", "vote", "max", "mean")


class Ensemble:
    def __init__(self, name: str, members: dict[str, float], rule: str = "or", threshold: float = 0.5,
                 votes: int = 2, quiet: int = 0):
        if rule not in RULES:
            raise ValueError(f"unknown ensemble rule {rule!r} ({', '.join(RULES)})")
        self.name = name
        self.members = dict(members)
        self.rule = rule
        self.threshold = threshold
        self.votes = votes
        self.quiet = quiet
        self.prefix = f"ensemble.{name}"

    def to_dict(self) -> dict:
        """The parameters as the manifest keeps them (`from_dict` reads them back)."""
        return {"members": dict(self.members), "rule": self.rule, "threshold": self.threshold,
                "votes": self.votes, "quiet": self.quiet}

    @classmethod
    def from_dict(cls, name: str, params: dict) -> "Ensemble":
        return cls(name, {str(m): float(t) for m, t in params["members"].items()}, params.get("rule", "or"),
                   float(params.get("threshold", 0.5)), int(params.get("votes", 2)), int(params.get("quiet", 0)))

    def state_fields(self) -> dict:
        return {f"{self.prefix}.quiet": (np.int32, ())}  # points left in the quiet period

    def schema(self) -> str:
        return repr((sorted(self.members.items()), self.rule, self.threshold, self.votes, self.quiet))

    def combine(self, scores: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(score, alarm) per row before the gate."""
        stacked = np.vstack([np.asarray(scores[m], np.float64) for m in self.members])
        limits = np.array(list(self.members.values()), np.float64)[:, None]
        if self.rule == "or":
            score = (stacked / limits).max(axis=0) * self.threshold
            return score, (stacked >= limits).any(axis=0)
        if self.rule == "vote":
            count = (stacked >= limits).sum(axis=0).astype(np.float64)
            return count, count >= self.votes
        score = stacked.max(axis=0) if self.rule == "max" else stacked.mean(axis=0)
        return score, score >= self.threshold

    def decide(self, series, scores: dict[str, np.ndarray], store: SeriesState | None = None,
               slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(score, alarm) per row, rows in time order within each series; the gate's state in
        `store` (the Scorer's) or in a store of its own."""
        score, alarm = self.combine(scores)
        if store is None or f"{self.prefix}.quiet" not in store.arrays:
            store, slots = private_slots(self, self.state_fields(), self.schema(), np.asarray(series, dtype=object))
        gated = alarm.copy()
        _gate_rows(np.asarray(slots, np.int64), gated, store.arrays[f"{self.prefix}.quiet"], self.quiet)
        return score, gated


@njit(cache=True, nogil=True)
def _gate_rows(slots, alarm, quiet_left, quiet):
    for i in range(len(slots)):
        s = slots[i]
        if quiet_left[s] > 0:
            quiet_left[s] -= 1
            alarm[i] = False
        elif alarm[i]:
            quiet_left[s] = quiet
