"""Alerts say why (issue 15, item 4): an anomaly record carries the outputs that decided, how
unusual the point is and what was expected of it, and the Slack message shows them instead of
scores that did not decide."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pandas as pd
import pytest

from models.metrics.ensemble import Ensemble
from models.metrics.explain import deciding_outputs, tail_probability
from models.metrics.model_set import fit_model_set
from models.metrics.scorer import Scorer
from services.alerter.formatting import format_alert, one_in
from shared.records.metrics import ScoreRecord, encode_score_records

STEP = 300.0


def daily_series(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    t = 1.6e9 + np.arange(n) * STEP
    return t, 50 + 10 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 1, n)


def scorer_for(t, v, **kw):
    frame = pd.DataFrame({"series": "s", "epoch_s": t[:400], "value": v[:400]})
    return Scorer(fit_model_set("t", frame, detectors=["robust_zscore", "seasonal"], progress=False, **kw))


def test_a_shift_in_a_daily_series_is_explained_by_the_seasonal_forecast():
    t, v = daily_series()
    v[2700:] += 25  # 25 above a daily sine of amplitude 10, noise 1
    result = scorer_for(t, v).score(["s"] * len(v), t, v)
    assert set(result.why) == set(np.flatnonzero(result.is_anomaly).tolist())  # every anomaly, nothing else
    first = min(result.why)
    assert 2700 <= first < 2730
    why = result.why[first]
    assert "seasonal_likelihood" in why["deciding"]
    assert why["tail_probability"] <= 1e-5  # the likelihood's alarm threshold
    assert why["expected_from"] == "seasonal" and why["observed"] == v[first]
    # The forecast is near the sine's value at that time (it has begun to follow the shift), and the
    # value is above the range the forecast errors keep to on average.
    assert v[first] - 29 <= why["expected"] <= v[first] - 5
    assert why["expected_low"] < why["expected"] < why["expected_high"] < why["observed"]


def test_a_level_shift_decided_by_the_value_likelihood_gives_the_normal_range_of_the_recent_average():
    rng = np.random.default_rng(1)
    n = 2000
    t = 1.6e9 + np.arange(n) * STEP
    v = 20 + rng.normal(0, 1, n)
    v[1500:] += 30
    scorer = scorer_for(t, v, likelihood_sources=["value"], ensembles={}, decision=["value_likelihood"])
    result = scorer.score(["s"] * n, t, v)
    first = min(result.why)
    assert 1500 <= first < 1512  # found within the moving average's 12 points
    why = result.why[first]
    assert why["deciding"] == ["value_likelihood"] and why["expected_from"] == "value_likelihood"
    assert why["observed_what"] == "12-point average"
    assert why["expected"] == pytest.approx(20, abs=0.5)
    assert why["expected_low"] < 20 < why["expected_high"] < why["observed"]


def test_an_ensemble_names_only_the_members_that_reached_their_threshold():
    ens = Ensemble("e", {"a": 0.5, "b": 0.5})
    scores = {"a": np.array([0.7, 0.2]), "b": np.array([0.1, 0.6])}
    assert deciding_outputs("e", 0, scores, {"e": ens}) == ["a"]
    assert deciding_outputs("e", 1, scores, {"e": ens}) == ["b"]
    mean = Ensemble("m", {"a": 0.5, "b": 0.5}, "mean", 0.4)  # decided together, neither alone
    assert deciding_outputs("m", 0, {"a": np.array([0.45]), "b": np.array([0.45])}, {"m": mean}) == ["a", "b"]


def test_tail_probability_inverts_the_likelihood_log_scale():
    assert tail_probability(0.5) == pytest.approx(1e-5, rel=1e-4)
    assert tail_probability(0.3) == pytest.approx(1e-3, rel=1e-4)
    assert tail_probability(1.0) == 1e-10  # the rarest the scale says
    assert one_in(1e-5) == "1 in 100,000" and one_in(2.34e-7) == "1 in 4,300,000"


def records_of(result, t, v):
    return [ScoreRecord.model_validate_json(b) for b in encode_score_records(
        ["s"] * len(v), t, v, result.is_anomaly, result.scores, result.flags, ["or[v+s]@0.5q100"], "m1",
        "input_data", [(0, i, 0) for i in range(len(v))], result.why)]


def test_records_carry_why_on_anomalies_only_and_the_alert_shows_it():
    t, v = daily_series()
    v[2700:] += 25
    scorer = scorer_for(t, v)
    result = scorer.score(["s"] * len(v), t, v)
    first = min(result.why)
    records = records_of(result, t, v)
    assert all((r.why is not None) == r.is_anomaly for r in records)
    raw = encode_score_records(["s"], t[:1], v[:1], np.zeros(1, bool), {k: s[:1] for k, s in result.scores.items()},
                               {k: f[:1] for k, f in result.flags.items()}, [], "m1", "input_data", [(0, 0, 0)])
    assert "why" not in orjson.loads(raw[0])  # no bytes spent on the scores of normal points

    text, blocks = format_alert(records[first])
    fields = " ".join(f["text"] for f in blocks[1]["fields"])
    why = records[first].why
    assert "seasonal forecast likelihood" in text and "unusual" in text
    assert f"{why.expected:g}" in fields and f"{why.expected_low:g}" in fields and f"{why.expected_high:g}" in fields
    assert one_in(why.tail_probability) in fields and "alert at 1 in 100,000" in fields
    # Scores of detectors that did not decide are not shown as if they had.
    assert "IF" not in fields and "LSTM" not in fields and "LSTM" not in text


def test_an_explanation_is_finite_whatever_the_values():
    t, v = daily_series(n=1200)
    v[1100] = 1e12
    result = scorer_for(t, v).score(["s"] * len(v), t, v)
    assert result.is_anomaly[1100]
    assert all(math.isfinite(x) for x in result.why[1100].values() if isinstance(x, float))
    records_of(result, t, v)  # valid ScoreRecords (allow_inf_nan=False)
