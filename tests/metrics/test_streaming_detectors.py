"""The anomaly-likelihood stage and the rolling robust z-score, on hand-made streams."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from models.metrics.features import FeatureBatch
from models.metrics.likelihood import AnomalyLikelihood
from models.metrics.robust_zscore import RobustZScoreDetector


def loglik(tail: float) -> float:  # Numenta's log scale, written out independently
    return math.log(tail + 1e-10) / math.log(1e-10)


def one_series(n: int) -> np.ndarray:
    return np.array(["s"] * n, dtype=object)


def test_learning_period_reports_no_anomaly():
    stage = AnomalyLikelihood(learning_period=100)
    out = stage.update(one_series(100), np.r_[np.zeros(99), 1e6])
    assert out == pytest.approx(loglik(0.5))
    assert (out < stage.threshold).all()


def test_likelihood_matches_the_gaussian_tail_by_hand():
    # Alternating 0/1 raw scores averaged over 2 points: the averages are all 0.5 except the first
    # (0.0); then one raw 5.0 makes the average (1 + 5) / 2 = 3.
    raw = np.r_[[0.0, 1.0] * 30, 5.0]
    stage = AnomalyLikelihood(avg_window=2, learning_period=0, min_history=10)
    out = stage.update(one_series(len(raw)), raw)
    past_avgs = [0.0] + [0.5] * 59
    mean, std = statistics.fmean(past_avgs), statistics.stdev(past_avgs)
    tail = 0.5 * math.erfc(abs(3.0 - mean) / std / math.sqrt(2))
    assert out[-1] == pytest.approx(loglik(tail), rel=1e-9)
    assert out[-1] >= stage.threshold  # a jump of many sigmas is an alarm


def test_a_run_of_red_points_raises_one_alarm():
    rng = np.random.default_rng(0)
    raw = np.r_[rng.normal(0, 1, 400), np.full(30, 50.0)]  # a level shift: many red points in a row
    stage = AnomalyLikelihood(learning_period=100)
    out = stage.update(one_series(len(raw)), raw)
    alarms = np.flatnonzero(out >= stage.threshold)
    assert len(alarms) >= 1 and alarms[0] >= 400
    # The first red point keeps its value; the red points right after it are lowered to yellow.
    assert out[alarms[0] + 1] == pytest.approx(loglik(1e-3))


def test_likelihood_stream_in_chunks_equals_one_call_and_series_are_independent():
    rng = np.random.default_rng(1)
    series = rng.choice(np.array(["a", "b", "c"], dtype=object), 900)
    raw = rng.gamma(2.0, 1.0, 900)
    raw[700] = 40
    whole = AnomalyLikelihood(learning_period=50).update(series, raw)
    stage = AnomalyLikelihood(learning_period=50)
    cuts = [0, 1, 2, 90, 91, 400, 777, 900]
    parts = np.concatenate([stage.update(series[a:b], raw[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-9, atol=1e-12)
    only_a = AnomalyLikelihood(learning_period=50).update(series[series == "a"], raw[series == "a"])
    np.testing.assert_allclose(whole[series == "a"], only_a, rtol=1e-9)


def batch(series, values) -> FeatureBatch:
    n = len(values)
    return FeatureBatch(np.asarray(series, dtype=object), np.arange(n, dtype=float),
                        np.asarray(values, dtype=float), np.zeros((n, 3)), np.zeros((n, 10, 3)))


def test_robust_zscore_by_hand():
    values = [10, 12, 11, 13, 12, 11, 10, 12, 11, 12, 13, 11, 10, 12, 40]
    det = RobustZScoreDetector(window=9, min_points=5)
    z = det.score(batch(["s"] * len(values), values))
    assert (z[:5] == 0).all()  # fewer than min_points values before them

    def median_before(xs, i):
        prev = [x for x in xs[max(0, i - 9):i] if x is not None]
        return statistics.median(prev) if len(prev) >= 5 else None

    medians = [median_before(values, i) for i in range(len(values))]
    devs = [None if m is None else abs(v - m) for v, m in zip(values, medians)]
    last = len(values) - 1
    mad = median_before(devs, last)
    assert z[-1] == pytest.approx(min(abs(40 - medians[last]) / (1.4826 * mad + 1e-9), 50.0), rel=1e-9)
    assert det.decide(z)[-1] and not det.decide(z)[:-1].any()


def test_robust_zscore_stream_equals_batch_and_streams_do_not_share_state():
    rng = np.random.default_rng(2)
    series = rng.choice(np.array(["a", "b"], dtype=object), 1500)
    values = rng.normal(5, 1, 1500)
    fitted = RobustZScoreDetector(window=100)
    whole = fitted.for_stream().score(batch(series, values))
    stream = fitted.for_stream()
    assert stream is not fitted
    cuts = [0, 3, 150, 151, 990, 1500]
    parts = np.concatenate([stream.score(batch(series[a:b], values[a:b])) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-12)


def test_a_daily_recurring_alarm_is_lowered_but_a_new_one_is_not():
    rng = np.random.default_rng(3)
    step = 300.0  # 5-minute points, 288 a day
    n = 288 * 6
    t = 1_600_000_000.0 + np.arange(n) * step
    raw = rng.normal(0, 1, n)
    spike_days = [2, 3, 4, 5]
    for day in spike_days:  # the same 03:00 spike every day from day 2 on
        raw[day * 288 + 36: day * 288 + 40] = 30.0
    raw[5 * 288 + 200: 5 * 288 + 210] = 60.0  # and an incident at another hour of the last day
    stage = AnomalyLikelihood(learning_period=300)
    out = stage.update(one_series(n), raw, t)
    alarms = np.flatnonzero(out >= stage.threshold)
    assert any(2 * 288 + 36 <= i < 2 * 288 + 46 for i in alarms), "the first 03:00 spike is an incident"
    for day in (3, 4, 5):  # the repeats are lowered just below the threshold
        assert not any(day * 288 + 30 <= i < day * 288 + 50 for i in alarms)
        assert out[day * 288 + 36: day * 288 + 46].max() > 0.49
    assert any(5 * 288 + 200 <= i < 5 * 288 + 210 for i in alarms), "a spike at a new hour still alarms"
    assert alarms[0] >= 2 * 288
    # Streaming in chunks keeps the recurrence memory.
    stage2 = AnomalyLikelihood(learning_period=300)
    cuts = [0, 500, 577, 900, 1300, n]
    parts = np.concatenate([stage2.update(one_series(b - a), raw[a:b], t[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_allclose(parts, out, rtol=1e-9, atol=1e-12)
