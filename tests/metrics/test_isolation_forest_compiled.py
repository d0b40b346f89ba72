"""The compiled IsolationForest scoring path gives scikit-learn's scores: on the NAB EC2 series,
on random and extreme rows, on an empty batch, after save/load."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from helpers import NAB_DIR
from sklearn.ensemble import IsolationForest

from models.metrics.features import (
    Scaler,
    SeriesWindows,
    build_batch,
    raw_features,
    read_series_csv,
)
from models.metrics.isolation_forest import CompiledForest, IsolationForestDetector

TOLERANCE = 1e-6  # on the max abs difference; in practice the scores are equal to the bit


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b), initial=0.0))


@pytest.fixture(scope="module")
def nab():
    """All 8 ec2_cpu_utilization series, as tests/metrics/test_models.py's history_batch builds them."""
    paths = sorted(NAB_DIR.glob("ec2_cpu_utilization_*.csv"))
    assert len(paths) == 8
    frame = pd.concat([read_series_csv(p) for p in paths], ignore_index=True)
    frame = frame.sort_values("epoch_s", kind="stable", ignore_index=True)
    scaler = Scaler().fit(raw_features(frame["epoch_s"].to_numpy(), frame["value"].to_numpy()))
    return build_batch(scaler, SeriesWindows(), frame["series"].to_numpy(), frame["epoch_s"].to_numpy(),
                       frame["value"].to_numpy())


@pytest.fixture(scope="module")
def detector(nab):
    return IsolationForestDetector().fit(nab)


def extreme_rows(n_features: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [rng.normal(0.0, 3.0, (2000, n_features)), rng.uniform(-1e3, 1e3, (500, n_features)),
            np.zeros((1, n_features)), np.full((1, n_features), 1e3), np.full((1, n_features), -1e3),
            np.full((1, n_features), 1e30), np.full((1, n_features), -1e30),  # beyond float32: +-inf
            np.full((1, n_features), 5e-45), np.full((1, n_features), np.finfo(np.float32).max)]
    return np.concatenate(rows)


def test_scores_equal_sklearn_on_nab(detector, nab):
    ref = -detector.model.score_samples(nab.X)
    got = detector.score(nab)
    assert max_abs_diff(got, ref) <= TOLERANCE
    np.testing.assert_array_equal(detector.decide(got), detector.decide(ref))
    np.testing.assert_array_equal(detector.decide(got), detector.model.predict(nab.X) == -1)


def test_scores_equal_sklearn_on_random_and_extreme_rows(detector, nab):
    rows = extreme_rows(nab.X.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the float32 cast overflows, in both
        ref = -detector.model.score_samples(rows)
        got = detector.forest.anomaly_score(rows)
    assert max_abs_diff(got, ref) <= TOLERANCE
    np.testing.assert_array_equal(got > detector.threshold, detector.model.predict(rows) == -1)
    # rows at the training rows' thresholds, and just either side, as float32 values
    thresholds = detector.forest.threshold[np.isfinite(detector.forest.threshold)]
    edge = np.concatenate([thresholds, np.nextafter(thresholds, np.float32(np.inf)),
                           np.nextafter(thresholds, np.float32(-np.inf))])
    edge_rows = np.stack([np.random.default_rng(1).permutation(edge) for _ in range(nab.X.shape[1])], axis=1)
    assert max_abs_diff(detector.forest.anomaly_score(edge_rows), -detector.model.score_samples(edge_rows)) <= TOLERANCE


@pytest.mark.parametrize("params", [{"max_features": 2}, {"max_samples": 17, "n_estimators": 13},
                                    {"max_features": 0.5, "bootstrap": True}])
def test_forest_matches_sklearn_with_feature_subsets_and_missing_values(params):
    rng = np.random.default_rng(2)
    X = rng.normal(0.0, 1.0, (1500, 4))
    X[::7, 1] = np.nan  # trees learn where missing values go
    model = IsolationForest(random_state=3, **params).fit(X)
    rows = extreme_rows(4, seed=4)
    rows[::5, 2] = np.nan
    rows[::11, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert max_abs_diff(CompiledForest(model).anomaly_score(rows), -model.score_samples(rows)) <= TOLERANCE


def test_empty_batch(detector, nab):
    empty = dataclasses.replace(nab, series=nab.series[:0], timestamps=nab.timestamps[:0], values=nab.values[:0],
                                X=nab.X[:0], windows=nab.windows[:0])
    scores = detector.score(empty)
    assert scores.shape == (0,) and scores.dtype == np.float64
    assert detector.decide(scores).shape == (0,)


def test_wrong_width_is_refused(detector, nab):
    with pytest.raises(ValueError, match="features"):
        detector.forest.anomaly_score(nab.X[:, :2])


def test_scores_after_save_load(tmp_path, detector, nab):
    detector.save(tmp_path / "if")
    assert sorted(p.name for p in (tmp_path / "if").iterdir()) == ["isolation_forest.joblib", "isolation_forest.json"]
    again = IsolationForestDetector.load(tmp_path / "if")
    assert again.forest is not None  # rebuilt from the loaded trees
    ref = -again.model.score_samples(nab.X)
    got = again.score(nab)
    assert max_abs_diff(got, ref) <= TOLERANCE
    np.testing.assert_array_equal(got, detector.score(nab))
    np.testing.assert_array_equal(again.decide(got), detector.decide(detector.score(nab)))
