"""The four rule condition types, each evaluated once per check on the check's aggregated values.

Every condition keeps its own small state per group key (a streak, the previous results, an EMA),
so that `times`, `previous` and `points` count checks of that group only. State is a plain dict
(`state()` / `restore()`), stored with each check in the run history so a restart resumes.
A check with no data does not reach a condition at all under the `ignore` policy: a streak is
neither broken nor extended by a check that saw nothing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from models.rules.definitions import (
    BollingerCondition,
    Condition,
    MetricCondition,
    RateCondition,
    RatioCondition,
)


@dataclass
class ConditionOutcome:
    index: int
    type: str
    text: str  # e.g. "average(value) above 80 for 3 times"
    metric: str  # the aggregated value it reads, e.g. "average(value)" or "ratio[1]"
    value: float | None  # None: no value this check (no data, or no message had the field)
    holds: bool  # the condition, including its `times` / warm-up; all must hold for a firing
    detail: dict = field(default_factory=dict)  # threshold, streak, reference, ema, upper, lower...


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class _Streak:
    """`for N times`: holds when the last N checks with a value all satisfied the comparison."""

    def __init__(self, times: int):
        self.times = times
        self.streak = 0

    def update(self, satisfied: bool) -> bool:
        self.streak = self.streak + 1 if satisfied else 0
        return self.streak >= self.times


def _compare(value: float, operator: str, bound: float) -> bool:
    if operator == "above":
        return value > bound
    if operator == "below":
        return value < bound
    return math.isclose(value, bound, rel_tol=1e-9, abs_tol=1e-12)


class MetricState:
    """`<aggregation> of FIELD above|below|equal VALUE for N times`."""

    def __init__(self, index: int, cond: MetricCondition | RatioCondition):
        self.index, self.cond = index, cond
        self.streak = _Streak(cond.times)

    def reads(self, values: dict) -> tuple[str, float, dict]:
        """The value's key, the bound it is compared with, and what else to record."""
        return self.cond.metric, self.cond.value, {}

    def evaluate(self, values: dict) -> ConditionOutcome:
        c = self.cond
        key, bound, extra = self.reads(values)
        value = values.get(key)
        out = ConditionOutcome(self.index, c.type, c.describe(), key, value, False,
                               {"threshold": bound, "times": c.times} | extra)
        if value is None:  # no data, or no message had the field (a ratio: an empty denominator)
            out.detail["no_value"] = True
            return out
        satisfied = _compare(value, c.operator, bound)
        out.holds = self.streak.update(satisfied)
        out.detail |= {"satisfied": satisfied, "streak": self.streak.streak}
        return out

    def state(self) -> dict:
        return {"streak": self.streak.streak}

    def restore(self, state: dict) -> None:
        self.streak.streak = int(state.get("streak", 0))


class RatioState(MetricState):
    """Reads `ratio[i]` (percent), computed by the engine from its own numerator and the window count."""

    def reads(self, values: dict) -> tuple[str, float, dict]:
        key = f"ratio[{self.index}]"
        return key, self.cond.percent, {"numerator": values.get(f"{key}.numerator"),
                                        "denominator": values.get("count")}


class RateState:
    """Change of this check's value against the average/min/max of the previous N results."""

    def __init__(self, index: int, cond: RateCondition):
        self.index, self.cond = index, cond
        self.previous: deque[float] = deque(maxlen=cond.previous)

    def evaluate(self, values: dict) -> ConditionOutcome:
        c = self.cond
        value = values.get(c.metric)
        out = ConditionOutcome(self.index, c.type, c.describe(), c.metric, value, False,
                               {"percent": c.percent, "previous": c.previous})
        if value is None:
            out.detail["no_value"] = True
            return out
        if len(self.previous) == c.previous:
            ref = {"average": sum(self.previous) / len(self.previous), "min": min(self.previous),
                   "max": max(self.previous)}[c.compare_with]
            if ref != 0:
                change = (value - ref) / abs(ref) * 100
            else:  # from zero, any rise is an unbounded increase
                change = math.inf if value > 0 else -math.inf if value < 0 else 0.0
            out.holds = change > c.percent if c.direction == "increased" else -change > c.percent
            out.detail |= {"reference": ref, "change_pct": _finite(change),
                           "change": "rise from zero" if change == math.inf else None}
        else:
            out.detail["warming_up"] = f"{len(self.previous)}/{c.previous} previous results"
        self.previous.append(value)
        return out

    def state(self) -> dict:
        return {"previous": list(self.previous)}

    def restore(self, state: dict) -> None:
        self.previous.extend(float(v) for v in state.get("previous", []))


class BollingerState:
    """Exponential moving average and variance (alpha = 2 / (points + 1)) of the check values.
    The band tested is the one from the checks before, and only after `points` checks."""

    def __init__(self, index: int, cond: BollingerCondition):
        self.index, self.cond = index, cond
        self.alpha = 2.0 / (cond.points + 1)
        self.n = 0
        self.ema = 0.0
        self.var = 0.0

    def evaluate(self, values: dict) -> ConditionOutcome:
        c = self.cond
        value = values.get(c.metric)
        out = ConditionOutcome(self.index, c.type, c.describe(), c.metric, value, False, {"k": c.k, "points": c.points})
        if value is None:
            out.detail["no_value"] = True
            return out
        if self.n >= c.points:
            sd = math.sqrt(self.var)
            upper, lower = self.ema + c.k * sd, self.ema - c.k * sd
            above, below = value > upper, value < lower
            out.holds = above if c.band == "upper" else below if c.band == "lower" else (above or below)
            out.detail |= {"ema": self.ema, "upper": upper, "lower": lower,
                           "breach": "above" if above else "below" if below else None}
        else:
            out.detail["warming_up"] = f"{self.n}/{c.points} points"
        # Update after testing: EW variance (West 1979 / pandas ewm(adjust=False) recursion).
        if self.n == 0:
            self.ema, self.var = value, 0.0
        else:
            diff = value - self.ema
            incr = self.alpha * diff
            self.ema += incr
            self.var = (1 - self.alpha) * (self.var + diff * incr)
        self.n += 1
        return out

    def state(self) -> dict:
        return {"n": self.n, "ema": self.ema, "var": self.var}

    def restore(self, state: dict) -> None:
        self.n, self.ema, self.var = int(state.get("n", 0)), float(state.get("ema", 0)), float(state.get("var", 0))


STATES = {MetricCondition: MetricState, RateCondition: RateState, BollingerCondition: BollingerState,
          RatioCondition: RatioState}


def condition_state(index: int, cond: Condition):
    return STATES[type(cond)](index, cond)


def no_data_outcome(index: int, cond: Condition) -> ConditionOutcome:
    metric = f"ratio[{index}]" if isinstance(cond, RatioCondition) else cond.metric
    return ConditionOutcome(index, cond.type, cond.describe(), metric, None, False, {"no_data": True})
