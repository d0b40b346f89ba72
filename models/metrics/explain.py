"""Why a point is an anomaly, for its alert: the outputs that decided, how unusual the point is
(the tail probability of the deciding likelihood) and what was expected of it (the first deciding
output with an expectation: a forecast, a median, a normal range of the recent average).

Computed for the anomalous rows only, from what the Scorer already has: alarms are rare, so this
costs nothing per message.
"""

from __future__ import annotations

import math

import numpy as np

from models.base import Expectation
from models.metrics.ensemble import Ensemble
from models.metrics.likelihood import LOG_1E_10

LIKELIHOOD_SUFFIX = "_likelihood"
# The likelihood's log scale stops at a tail of 1e-10 (score 1.0): rarer is reported as this.
RAREST_TAIL = 1e-10


def tail_probability(likelihood: float) -> float:
    """The tail probability a likelihood output stands for (its log scale inverted): 1e-5 at the
    alarm threshold 0.5; at least RAREST_TAIL."""
    return max(math.exp(likelihood * LOG_1E_10) - 1e-10, RAREST_TAIL)


def deciding_outputs(name: str, j: int, scores: dict[str, np.ndarray], ensembles: dict[str, Ensemble]) -> list[str]:
    """The outputs that made output `name` alarm at row j: for an ensemble its members at or above
    their thresholds (an ensemble member expanded in turn), all its members if none is alone (a
    mean or a vote of members each below its own threshold); any other output is its own reason."""
    ensemble = ensembles.get(name)
    if ensemble is None:
        return [name]
    members = [m for m, limit in ensemble.members.items() if scores[m][j] >= limit] or list(ensemble.members)
    return [d for m in members for d in deciding_outputs(m, j, scores, ensembles)]


def _expecting(output: str, expectations: dict[str, Expectation]) -> str:
    """Who expected it: a detector's likelihood is explained by that detector's expectation."""
    source = output.removesuffix(LIKELIHOOD_SUFFIX)
    return source if output.endswith(LIKELIHOOD_SUFFIX) and source in expectations else output


def explain(rows: np.ndarray, decision: list[str], scores: dict[str, np.ndarray], flags: dict[str, np.ndarray],
            expectations: dict[str, Expectation], ensembles: dict[str, Ensemble]) -> dict[int, dict]:
    """row -> its explanation (the fields of shared.records.metrics.Explanation), for `rows`."""
    out = {}
    for j in np.asarray(rows).tolist():
        deciding = list(dict.fromkeys(d for name in decision if flags[name][j]
                                      for d in deciding_outputs(name, j, scores, ensembles)))
        why: dict = {"deciding": deciding}
        likelihoods = [d for d in deciding if d.endswith(LIKELIHOOD_SUFFIX)]
        if likelihoods:
            why["tail_probability"] = min(tail_probability(float(scores[d][j])) for d in likelihoods)
        for d in deciding:
            e = expectations.get(d)
            if e is None:
                continue
            seen = (float(e.observed[j]), float(e.center[j]), float(e.low[j]), float(e.high[j]))
            if all(math.isfinite(x) for x in seen):
                why.update(expected_from=_expecting(d, expectations), observed_what=e.what, observed=seen[0], expected=seen[1],
                           expected_low=seen[2], expected_high=seen[3])
                break
        out[j] = why
    return out
