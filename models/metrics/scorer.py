"""The one scoring path: columns of a batch -> features -> every detector -> combined decision.

The detector service calls it on each consumed batch and `anomstream evaluate` on whole series;
both get the same numbers for the same points in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.base import Expectation
from models.metrics.ensemble import Ensemble
from models.metrics.explain import explain
from models.metrics.features import FeatureBatch, SeriesWindows, build_batch
from models.metrics.likelihood import AnomalyLikelihood
from models.metrics.model_set import SEED_DECISION, ModelSet
from models.state import SeriesState


@dataclass
class ScoreResult:
    scores: dict[str, np.ndarray]  # detector name -> raw score (higher = more anomalous)
    flags: dict[str, np.ndarray]  # detector name -> bool
    is_anomaly: np.ndarray
    # Anomalous row -> why (deciding outputs, how unusual, what was expected): models.metrics.explain.
    why: dict[int, dict]


def combine(flags: dict[str, np.ndarray], rule: str) -> np.ndarray:
    stacked = np.vstack(list(flags.values()))
    if rule == "or":
        return stacked.any(axis=0)
    if rule == "and":
        return stacked.all(axis=0)
    if rule == "majority":
        return stacked.sum(axis=0) * 2 > len(stacked)
    raise ValueError(f"unknown combine rule {rule!r} (or, and, majority)")


# The outputs the design card names (the seed's detectors): computed on every message unless
# scoring is "lean".
DESIGN_OUTPUTS = tuple(SEED_DECISION)
SCORING = ("design", "lean", "all")


def needed_outputs(ensembles: dict[str, list[str]], detectors, wanted: list[str]) -> set[str]:
    """`wanted` and everything they are computed from: an ensemble's members (`ensembles`: name ->
    members), a likelihood's source detector (one of `detectors`)."""
    needed, todo = set(), list(wanted)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in ensembles:
            todo += list(ensembles[name])
        elif name.endswith("_likelihood") and name.removesuffix("_likelihood") in detectors:
            todo.append(name.removesuffix("_likelihood"))
    return needed


def wanted_outputs(decision: list[str], detectors, all_outputs: list[str], scoring: str,
                   outputs: list[str] | None) -> list[str]:
    """What `scoring` and `outputs` ask for besides the decision (see Scorer)."""
    if scoring not in SCORING:
        raise ValueError(f"unknown scoring {scoring!r} ({', '.join(SCORING)})")
    wanted = [*decision, *(outputs or ())]
    if scoring == "design":
        wanted += [d for d in DESIGN_OUTPUTS if d in detectors]
    elif scoring == "all":
        wanted += all_outputs
    return wanted


def load_scorer(model_dir, name: str, rule: str = "or", decision: list[str] | None = None,
                scoring: str = "all", outputs: list[str] | None = None) -> "Scorer":
    """A Scorer of the model set `name`, loading only the detectors it computes (lean scoring does
    not load IsolationForest nor the LSTM, nor import scikit-learn: about 90 MB per worker)."""
    manifest = ModelSet.read_manifest(model_dir, name)
    detectors = list(manifest["detectors"])
    ensembles = {e: list(p["members"]) for e, p in manifest.get("ensembles", {}).items()}
    decided = list(decision or manifest["decision"])
    # Only detectors are loaded, so "all" needs every detector, not every output.
    needed = needed_outputs(ensembles, detectors, wanted_outputs(decided, detectors, detectors, scoring, outputs))
    model_set = ModelSet.load(model_dir, name, detectors=[d for d in detectors if d in needed])
    return Scorer(model_set, rule, decision, scoring, outputs)


class Scorer:
    """Keeps the per-series windows and streaming state between calls in one state store (`store`,
    one slot per series), so it must see each series in time order. `decision` (default: the model
    set's) names the outputs that decide. `scoring` says what else is computed (shared.config:
    "design" adds the design card's IsolationForest and LSTM, "lean" nothing, "all" every output
    of the set) and `outputs` adds named ones; the rest are not computed at all."""

    def __init__(self, model_set: ModelSet, rule: str = "or", decision: list[str] | None = None,
                 scoring: str = "all", outputs: list[str] | None = None):
        combine({"x": np.zeros(1, bool)}, rule)  # reject a bad rule at start, not on the first batch
        self.model_set = model_set
        self.rule = rule
        self.decision = list(decision or model_set.decision)
        unknown = (set(self.decision) | set(outputs or ())) - set(model_set.outputs())
        if unknown:
            raise ValueError(f"decision or outputs name unknown output(s) {sorted(unknown)}; "
                             f"model set {model_set.name} has {model_set.outputs()}")
        wanted = wanted_outputs(self.decision, model_set.detectors, model_set.outputs(), scoring, outputs)
        needed = needed_outputs({e: list(ens.members) for e, ens in model_set.ensembles.items()},
                                model_set.detectors, wanted)
        self.detectors = {name: det.for_stream() for name, det in model_set.detectors.items() if name in needed}
        # The feature windows only for detectors that read them (IsolationForest, the LSTM).
        self.windows = SeriesWindows() if any(d.uses_features for d in self.detectors.values()) else None
        self.likelihood = {src: AnomalyLikelihood.for_source(src)
                           for src in model_set.likelihood_sources if f"{src}_likelihood" in needed}
        # Ensembles: fresh copies (their quiet counters live in this Scorer's store).
        self.ensembles = {name: Ensemble.from_dict(name, ens.to_dict())
                          for name, ens in model_set.ensembles.items() if name in needed}
        # Every streaming component's fields in one store; its schema (the components'
        # hyper-parameters) goes into the fingerprint an exported state carries.
        parts = [*([self.windows] if self.windows else []), *self.detectors.values(), *self.likelihood.values(),
                 *self.ensembles.values()]
        stateful = [c for c in parts if hasattr(c, "state_fields")]
        self.store = SeriesState({k: v for c in stateful for k, v in c.state_fields().items()},
                                 "|".join(f"{type(c).__name__}:{c.schema()}" for c in stateful))

    def score(self, series, epoch_s, values, partition=None) -> ScoreResult:
        """`partition`: the input partition of each row (or one for all), kept with the series'
        state so that the state can be written to and dropped with that partition."""
        slots = self.store.slots(series, partition, epoch_s)
        if self.windows is not None:
            batch = build_batch(self.model_set.scaler, self.windows, series, epoch_s, values, self.store, slots)
        else:
            batch = FeatureBatch(np.asarray(series, dtype=object), np.asarray(epoch_s, np.float64),
                                 np.asarray(values, np.float64), None, None, self.store, slots)
        scores, expectations = {}, {}
        for name, det in self.detectors.items():
            scores[name], expected = det.score_expected(batch)
            if expected is not None:
                expectations[name] = expected
        flags = {name: self.detectors[name].decide(s) for name, s in scores.items()}
        for src, stage in self.likelihood.items():
            name = f"{src}_likelihood"
            scores[name], expected = stage.update_expected(
                batch.series, batch.values if src == "value" else scores[src], batch.timestamps, self.store, slots)
            flags[name] = scores[name] >= stage.threshold
            # The value's own likelihood expects a range of its recent average; a detector's
            # likelihood, what that detector expected (e.g. the seasonal forecast) with the range
            # its score must stay within on average (the likelihood's normal upper bound).
            detector: Expectation | None = expectations.get(src)
            if src == "value":
                expectations[name] = expected
            elif detector is not None and detector.spread is not None:
                expectations[name] = detector.widened(expected.high)
        for name, ens in self.ensembles.items():
            scores[name], flags[name] = ens.decide(batch.series, scores, self.store, slots)
        is_anomaly = combine({n: flags[n] for n in self.decision}, self.rule)
        why = explain(np.flatnonzero(is_anomaly), self.decision, scores, flags, expectations, self.ensembles)
        return ScoreResult(scores, flags, is_anomaly, why)
