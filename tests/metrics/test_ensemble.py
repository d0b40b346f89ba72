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
