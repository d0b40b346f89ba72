"""Features and every detector's state stay finite whatever the input (issue 13): one extreme point
(1e308, -1e308, 1e39, a denormal, or 1e12 in a series around 50) is a one-point outlier, never a
NaN, and a later real level shift in the same series is flagged as in an untouched control series."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FakeMsg

from models.metrics.features import (
    FEATURE_LIMIT,
    FeatureBatch,
    SeriesWindows,
    build_batch,
)
from models.metrics.likelihood import AnomalyLikelihood
from models.metrics.model_set import DEFAULT_DECISION, ModelSet
from models.metrics.robust_zscore import RobustZScoreDetector
from models.metrics.scorer import Scorer
from shared.records.metrics import ScoreRecord, encode_score_records

EXTREMES = [1e308, -1e308, 1e39, 5e-324, 1e12, -1e12]
N, SPIKE, SHIFT = 1000, 500, 850  # after the likelihood stage's learning period (300) and min_history (50)
STEP = 300.0  # 5-minute points; the spike and the shift are not at the same time of day (no recurrence)


def series_values(seed: int = 0) -> np.ndarray:
    """A series around 50 (sigma 1) with a real level shift of +15 at SHIFT."""
    values = 50 + np.random.default_rng(seed).normal(0, 1, N)
    values[SHIFT:] += 15
    return values


def two_series(extreme: float):
    """'spiked' (the extreme at SPIKE) and 'control' interleaved, as they would arrive."""
    clean = series_values()
    spiked = clean.copy()
    spiked[SPIKE] = extreme
    t = 1_600_000_000.0 + STEP * np.arange(N)
    series = np.array(["spiked", "control"] * N, dtype=object)
    return series, np.repeat(t, 2), np.column_stack([spiked, clean]).ravel()


def in_batches(n: int, size: int = 97):
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def first_alarm_from(flags: np.ndarray, start: int) -> int | None:
    hits = np.flatnonzero(flags[start:])
    return int(start + hits[0]) if len(hits) else None


@pytest.mark.parametrize("extreme", EXTREMES)
def test_likelihood_stage_one_extreme_point(extreme):
    series, t, values = two_series(extreme)
    stage = AnomalyLikelihood()
    out = np.concatenate([stage.update(series[a:b], values[a:b], t[a:b]) for a, b in in_batches(len(values))])
    assert np.isfinite(out).all() and ((0 <= out) & (out <= 1)).all()
    for field, arr in stage._own_store.arrays.items():  # every kept raw score, sum and square
        assert np.isfinite(arr).all(), field
    spiked, control = out[series == "spiked"] >= 0.5, out[series == "control"] >= 0.5
    assert spiked[SPIKE], "the extreme point itself raises an alarm"
    # Afterwards the spiked series alarms as the control does: the shift, at the same point.
    np.testing.assert_array_equal(spiked[SPIKE + 1:], control[SPIKE + 1:])
    assert SHIFT <= first_alarm_from(control, SPIKE + 1) < SHIFT + 10


@pytest.mark.parametrize("extreme", EXTREMES)
def test_likelihood_stage_extreme_first_point_stays_finite(extreme):
    values = series_values()
    values[0] = extreme
    stage = AnomalyLikelihood()
    n = len(values)
    out = np.concatenate([stage.update(np.array(["s"] * (b - a), dtype=object), values[a:b]) for a, b in in_batches(n)])
    assert np.isfinite(out).all() and ((0 <= out) & (out <= 1)).all()


def test_likelihood_stage_non_finite_raw_scores_stay_finite():
    raw = np.abs(np.random.default_rng(1).normal(0, 1, 600))
    raw[[400, 450, 451]] = [np.nan, np.inf, -np.inf]
    out = AnomalyLikelihood().update(np.array(["s"] * len(raw), dtype=object), raw)
    assert np.isfinite(out).all() and out[450] >= 0.5


@pytest.mark.parametrize("extreme", EXTREMES)
def test_robust_zscore_one_extreme_point(extreme):
    series, t, values = two_series(extreme)
    det = RobustZScoreDetector().for_stream()
    n = len(values)

    def batch(a, b):
        return FeatureBatch(series[a:b], t[a:b], values[a:b], np.zeros((b - a, 3)), np.zeros((b - a, 10, 3)))

    z = np.concatenate([det.score(batch(a, b)) for a, b in in_batches(n)])
    assert np.isfinite(z).all() and (z >= 0).all() and (z <= det.params["cap"]).all()
    spiked, control = z[series == "spiked"], z[series == "control"]
    assert det.decide(spiked)[SPIKE] and spiked[SPIKE] >= 40
    assert det.decide(spiked)[SHIFT] and det.decide(control)[SHIFT]
    for field, arr in det._own_store.arrays.items():
        assert not np.isnan(arr).any(), field


@pytest.mark.parametrize("extreme", EXTREMES)
def test_scaled_features_and_windows_are_bounded(extreme, model_dir):
    scaler = ModelSet.read_manifest(model_dir, "ec2_cpu")["scaler"]
    from models.metrics.features import Scaler

    series, t, values = two_series(extreme)
    batch = build_batch(Scaler.from_dict(scaler), SeriesWindows(), series, t, values)
    for x in (batch.X, batch.windows):
        assert x.dtype == np.float32 and np.isfinite(x).all() and (np.abs(x) <= FEATURE_LIMIT).all()


@pytest.fixture(scope="module")
def ec2_cpu(model_dir) -> ModelSet:
    return ModelSet.load(model_dir, "ec2_cpu")


@pytest.mark.parametrize("extreme", EXTREMES)
def test_full_scorer_one_extreme_point(extreme, ec2_cpu):
    """Every output of the tiny trained model set stays finite, every score record validates, and the
    default decision flags the later shift in the spiked series exactly when the control's."""
    series, t, values = two_series(extreme)
    scorer = Scorer(ec2_cpu)
    assert scorer.decision == DEFAULT_DECISION
    flags = []
    for a, b in in_batches(len(values)):
        r = scorer.score(series[a:b], t[a:b], values[a:b])
        for name, s in r.scores.items():
            assert np.isfinite(s).all(), (name, a)
        msgs = [FakeMsg(None, offset=i) for i in range(a, b)]
        records = encode_score_records(list(series[a:b]), t[a:b], values[a:b], r.is_anomaly, r.scores, r.flags,
                                       scorer.decision, ec2_cpu.version, "input_data",
                                       [(m.partition(), m.offset(), m.timestamp()[1]) for m in msgs])
        for rec in records:
            ScoreRecord.model_validate_json(rec)
        flags.append(r.is_anomaly)
    flags = np.concatenate(flags)
    spiked, control = flags[series == "spiked"], flags[series == "control"]
    assert spiked[SPIKE]
    np.testing.assert_array_equal(spiked[SPIKE + 1:], control[SPIKE + 1:])
    assert SHIFT <= first_alarm_from(control, SPIKE + 1) < SHIFT + 10
    # the other detectors see the point as an outlier too
    last = scorer.score(np.array(["spiked"], dtype=object), t[-1:] + STEP, np.array([extreme]))
    assert np.isfinite(last.scores["isolation_forest"]).all() and np.isfinite(last.scores["lstm_autoencoder"]).all()


def test_encode_score_records_writes_non_finite_scores_as_finite(ec2_cpu):
    """The last guard: a NaN or inf score (no detector returns one) is written finite, as
    numpy.nan_to_num writes it, and the record validates."""
    n = 3
    scores = {name: np.array([np.nan, np.inf, -np.inf]) for name in ec2_cpu.outputs()}
    flags = {name: np.zeros(n, bool) for name in ec2_cpu.outputs()}
    records = encode_score_records(["s"] * n, np.full(n, 1.6e9), np.ones(n), np.zeros(n, bool), scores, flags,
                                   ["value_likelihood"], "v", "input_data", [(0, i, 0) for i in range(n)])
    parsed = [ScoreRecord.model_validate_json(r) for r in records]
    big = np.finfo(np.float64).max
    assert [p.if_score for p in parsed] == [0.0, big, -big]
    assert [p.scores["value_likelihood"] for p in parsed] == [0.0, big, -big]


def test_likelihood_stage_with_clips_streams_in_pieces_as_in_one_call():
    """A point is clipped only once the points before it are settled: the same points in any
    pieces give the same scores and the same state."""
    rng = np.random.default_rng(5)
    series = rng.choice(np.array(["a", "b"], dtype=object), 2000)
    raw = rng.gamma(2.0, 1.0, 2000)
    raw[[400, 401, 900, 1500]] = [1e12, -1e308, 1e39, 5e-324]
    raw[1200:] += 30  # a level shift: a run of clips while the bound widens
    whole_stage = AnomalyLikelihood(learning_period=100)
    whole = whole_stage.update(series, raw)
    stage = AnomalyLikelihood(learning_period=100)
    cuts = [0, 1, 2, 3, 399, 400, 401, 402, 777, 1199, 1200, 1201, 1260, 2000]
    parts = np.concatenate([stage.update(series[a:b], raw[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(parts >= 0.5, whole >= 0.5)
    piece_state, whole_state = stage._own_store, whole_stage._own_store
    for field in piece_state.arrays:
        np.testing.assert_allclose(piece_state.arrays[field][piece_state.find(["a", "b"])],
                                   whole_state.arrays[field][whole_state.find(["a", "b"])], rtol=1e-9)
    assert np.isfinite(whole).all()
