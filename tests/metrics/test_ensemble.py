"""Ensembles of outputs and their quiet period (models/metrics/ensemble.py)."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics.ensemble import Ensemble


def test_rules_combine_scores_and_thresholds():
    scores = {"a": np.array([0.1, 0.6, 0.3, 0.6]), "b": np.array([0.2, 0.1, 0.7, 0.7])}
    _, alarm = Ensemble("or", {"a": 0.5, "b": 0.65}).combine(scores)
    np.testing.assert_array_equal(alarm, [False, True, True, True])
    count, alarm = Ensemble("v", {"a": 0.5, "b": 0.65}, "vote", votes=2).combine(scores)
    np.testing.assert_array_equal(count, [0, 1, 1, 2])
    np.testing.assert_array_equal(alarm, [False, False, False, True])
    score, alarm = Ensemble("m", {"a": 0.5, "b": 0.5}, "mean", threshold=0.45).combine(scores)
    np.testing.assert_allclose(score, [0.15, 0.35, 0.5, 0.65])
    np.testing.assert_array_equal(alarm, [False, False, True, True])
    score, alarm = Ensemble("x", {"a": 0.5, "b": 0.5}, "max").combine(scores)
    np.testing.assert_allclose(score, [0.2, 0.6, 0.7, 0.7])
    with pytest.raises(ValueError):
        Ensemble("bad", {"a": 0.5}, "median")


def test_quiet_period_after_an_alarm_per_series_streams_in_chunks():
    rng = np.random.default_rng(0)
    n = 600
    series = rng.choice(np.array(["p", "q"], dtype=object), n)
    scores = {"a": (rng.random(n) > 0.9).astype(float)}
    ens = Ensemble("g", {"a": 0.5}, quiet=10)
    _, whole = ens.decide(series, scores)
    for name in ("p", "q"):  # by hand: an alarm, then 10 quiet points of that series
        rows = np.flatnonzero(series == name)
        raw = scores["a"][rows] >= 0.5
        expected, last = np.zeros(len(rows), bool), -(10 ** 9)
        for i in np.flatnonzero(raw):
            if i - last > 10:
                expected[i], last = True, i
        np.testing.assert_array_equal(whole[rows], expected)
    chunked = Ensemble("g", {"a": 0.5}, quiet=10)
    cuts = [0, 7, 300, 301, n]
    parts = np.concatenate([chunked.decide(series[a:b], {"a": scores["a"][a:b]})[1] for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_array_equal(parts, whole)


def _ensemble_model_set():
    import pandas as pd

    from models.metrics.model_set import fit_model_set

    rng = np.random.default_rng(1)
    n = 6000
    series = np.array([f"s{i % 4}" for i in range(n)], dtype=object)
    t = 1.7e9 + (np.arange(n) // 4) * 300.0
    values = 50 + 10 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 1, n)
    values[4000:4040] += 40  # an event in every series
    values[5200:5210] -= 30
    frame = pd.DataFrame({"series": series, "epoch_s": t, "value": values})
    ens = {"alarm": Ensemble("alarm", {"value_likelihood": 0.5, "seasonal_likelihood": 0.5,
                                       "robust_zscore_likelihood": 0.5}, "or", 0.5, quiet=100)}
    model_set = fit_model_set("ens", frame.iloc[:800], progress=False, detectors=["robust_zscore", "seasonal"],
                              likelihood_sources=["value", "seasonal", "robust_zscore"], decision=["alarm"],
                              ensembles=ens)
    return model_set, series, t, values


def test_scorer_ensemble_output_streams_in_batches_and_across_export_and_load(tmp_path):
    from models.metrics.model_set import ModelSet
    from models.metrics.scorer import Scorer

    model_set, series, t, values = _ensemble_model_set()
    assert model_set.outputs()[-1] == "alarm"
    whole = Scorer(model_set).score(series, t, values)
    assert whole.is_anomaly.any() and (whole.flags["alarm"] == whole.is_anomaly).all()
    # The gate: after an alarm, that series stays quiet for 100 of its points.
    for name in np.unique(series):
        rows = np.flatnonzero(whole.flags["alarm"][series == name])
        assert (np.diff(rows) > 100).all()
    # Two batches == one.
    scorer = Scorer(model_set)
    cut = 4030  # mid-event: the alarms are at rows 4022-4027 (the seasonal likelihood averages 25 points)
    a = scorer.score(series[:cut], t[:cut], values[:cut])
    b = scorer.score(series[cut:], t[cut:], values[cut:])
    for name in ("alarm", "value_likelihood"):
        np.testing.assert_array_equal(np.concatenate([a.scores[name], b.scores[name]]), whole.scores[name])
        np.testing.assert_array_equal(np.concatenate([a.flags[name], b.flags[name]]), whole.flags[name])
    # Saved and loaded model set, state exported mid-event and loaded into a new Scorer: identical.
    model_set.save(tmp_path, "x" * 64, len(series))
    loaded = ModelSet.load(tmp_path, "ens")
    assert loaded.ensembles["alarm"].to_dict() == model_set.ensembles["alarm"].to_dict()
    first = Scorer(loaded)
    first.score(series[:cut], t[:cut], values[:cut])
    assert first.store.arrays["ensemble.alarm.quiet"].any(), "mid-event: a quiet period is running"
    keys = first.store.keys[first.store.find(np.unique(series))].tolist()
    second = Scorer(loaded)
    assert second.store.load(keys, first.store.export(first.store.find(keys))) == len(keys)
    rest = second.score(series[cut:], t[cut:], values[cut:])
    np.testing.assert_array_equal(rest.flags["alarm"], whole.flags["alarm"][cut:])
    np.testing.assert_array_equal(rest.is_anomaly, whole.is_anomaly[cut:])


def test_model_set_rejects_an_ensemble_of_unknown_outputs():
    from models.base import ArtifactError
    from models.metrics.model_set import check_ensembles

    with pytest.raises(ArtifactError, match="unknown output"):
        check_ensembles(["value_likelihood"], {"e": Ensemble("e", {"seasonal_likelihood": 0.5})})
    check_ensembles(["a"], {"e": Ensemble("e", {"a": 0.5}), "f": Ensemble("f", {"e": 0.5, "a": 0.5})})
