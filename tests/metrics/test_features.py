"""Features: calendar columns, the JSON scaler, per-series windows carried across batches, CSV input."""

from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone

import numpy as np
import pytest

from models.metrics.features import (
    FEATURES,
    SEQ_LEN,
    Scaler,
    SeriesWindows,
    build_batch,
    raw_features,
    read_series_csv,
    time_features,
)
from models.state import SeriesState

UTC = timezone.utc


def test_time_features_match_datetime():
    rng = np.random.default_rng(11)
    epochs = np.concatenate([
        rng.uniform(-1e9, 4e9, 500),  # fractions, before 1970 too
        [0.0, -0.5, -1.0, 86_399.999, 86_400.0, 1_709_251_200.0],  # edges; 2024-03-01 00:00 is a Friday
    ])
    hour, dow = time_features(epochs)
    for e, h, d in zip(epochs.tolist(), hour.tolist(), dow.tolist()):
        dt = datetime.fromtimestamp(e, UTC)
        assert (h, d) == (dt.hour, dt.weekday()), e


def test_known_days():
    monday_9am = datetime(2024, 1, 1, 9, 30, tzinfo=UTC).timestamp()  # 2024-01-01 was a Monday
    sunday_23h = datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    hour, dow = time_features(np.array([monday_9am, sunday_23h]))
    assert hour.tolist() == [9, 23] and dow.tolist() == [0, 6]


def test_raw_features_columns():
    epoch = datetime(2024, 1, 3, 17, 0, tzinfo=UTC).timestamp()  # a Wednesday
    X = raw_features(np.array([epoch]), np.array([42.5]))
    assert FEATURES == ("value", "hour", "day_of_week")
    assert X.tolist() == [[42.5, 17.0, 2.0]]


def test_scaler_fit_transform_matches_hand_computation():
    rng = np.random.default_rng(5)
    X = np.column_stack([rng.normal(50, 10, 300), rng.integers(0, 24, 300), rng.integers(0, 7, 300)]).astype(float)
    scaler = Scaler().fit(X)
    for c in range(3):
        col = X[:, c].tolist()
        assert scaler.mean[c] == pytest.approx(statistics.fmean(col), rel=1e-12)
        assert scaler.scale[c] == pytest.approx(statistics.pstdev(col), rel=1e-12)
    Z = scaler.transform(X)
    assert Z.dtype == np.float32 and Z.shape == X.shape
    np.testing.assert_allclose(Z[7], (X[7] - X.mean(axis=0)) / X.std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-5)


def test_scaler_constant_column_does_not_divide_by_zero():
    X = np.column_stack([np.arange(10.0), np.full(10, 3.0), np.zeros(10)])
    scaler = Scaler().fit(X)
    assert scaler.scale[1] == 1.0 and scaler.scale[2] == 1.0
    Z = scaler.transform(X)
    assert np.isfinite(Z).all()
    assert (Z[:, 1] == 0).all() and (Z[:, 2] == 0).all()
    # a new value in a column that was constant in training still maps to a finite number
    assert scaler.transform(np.array([[0.0, 5.0, 1.0]]))[0].tolist()[1:] == [2.0, 1.0]


def test_scaler_dict_round_trip_through_json():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3)) * [1, 100, 0.01]
    scaler = Scaler().fit(X)
    again = Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert set(scaler.to_dict()) == {"mean", "scale"}
    np.testing.assert_array_equal(again.mean, scaler.mean)
    np.testing.assert_array_equal(again.scale, scaler.scale)
    np.testing.assert_array_equal(again.transform(X), scaler.transform(X))


def expected_windows(series: list[str], X: np.ndarray, seq_len: int) -> np.ndarray:
    """The windows of the whole stream, built the slow, obvious way: each series padded in front with
    its first row, then the last seq_len rows of that series ending at each row."""
    out = np.empty((len(series), seq_len, X.shape[1]), dtype=np.float32)
    rows_of: dict[str, list[int]] = {}
    for i, s in enumerate(series):
        rows_of.setdefault(s, []).append(i)
    for rows in rows_of.values():
        padded = [X[rows[0]]] * (seq_len - 1) + [X[r] for r in rows]
        for k, r in enumerate(rows):
            out[r] = np.array(padded[k:k + seq_len])
    return out


def interleaved_stream(n: int = 200, n_series: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    series = [f"s{rng.integers(0, n_series)}" for _ in range(n)]
    X = rng.normal(size=(n, 3)).astype(np.float32)
    return series, X


def raw_windows(sw: SeriesWindows, store: SeriesState, series, X) -> np.ndarray:
    """Windows of the rows (value, time) = X's two columns, stacked like X."""
    slots = store.slots(np.array(series, dtype=object))
    win_v, win_t = sw.raw(store, slots, X[:, 1], X[:, 0])
    return np.stack([win_v, win_t], axis=-1)


def new_store(sw: SeriesWindows) -> SeriesState:
    return SeriesState(sw.state_fields(), sw.schema(), capacity=2)  # tiny: growing is exercised too


@pytest.mark.parametrize("seq_len", [SEQ_LEN, 3, 1])
def test_windows_of_chunks_equal_windows_of_whole(seq_len):
    series, X = interleaved_stream()
    X = X[:, :2].astype(np.float64)
    sw = SeriesWindows(seq_len=seq_len)
    whole = raw_windows(sw, new_store(sw), series, X)
    np.testing.assert_array_equal(whole, expected_windows(series, X, seq_len))
    rng = np.random.default_rng(seq_len)
    cuts = np.sort(rng.choice(np.arange(1, len(series)), 15, replace=False))
    cuts = np.concatenate([[0, 1, 2], cuts[cuts > 2], [len(series)]])  # chunks of one row too
    store = new_store(sw)
    parts = [raw_windows(sw, store, series[a:b], X[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_first_window_padded_with_first_row():
    X = np.arange(8, dtype=np.float64).reshape(4, 2)
    sw = SeriesWindows(seq_len=3)
    w = raw_windows(sw, new_store(sw), ["a"] * 4, X)
    assert w.shape == (4, 3, 2)
    np.testing.assert_array_equal(w[0], [X[0], X[0], X[0]])
    np.testing.assert_array_equal(w[1], [X[0], X[0], X[1]])
    np.testing.assert_array_equal(w[3], [X[1], X[2], X[3]])


def test_each_window_ends_at_its_row():
    series, X = interleaved_stream(50)
    X = X[:, :2].astype(np.float64)
    sw = SeriesWindows()
    np.testing.assert_array_equal(raw_windows(sw, new_store(sw), series, X)[:, -1, :], X)


def test_a_dropped_series_starts_again_from_a_padded_window():
    sw = SeriesWindows(seq_len=3)
    store = new_store(sw)
    row = np.ones((1, 2))
    for i in range(5):
        raw_windows(sw, store, ["a"], row * i)
    store.drop(store.find(["a"]))
    assert len(store) == 0 and store.find(["a"])[0] == -1
    w = raw_windows(sw, store, ["a"], row * 100)
    np.testing.assert_array_equal(w[0], np.full((3, 2), 100.0))


def test_state_holds_seq_len_minus_one_points():
    sw = SeriesWindows(seq_len=4)
    store = new_store(sw)
    X = np.arange(20, dtype=np.float64).reshape(10, 2)
    raw_windows(sw, store, ["a"] * 10, X)
    slot = store.find(["a"])[0]
    np.testing.assert_array_equal(store.arrays["window.times"][slot], X[-3:, 1])
    np.testing.assert_array_equal(store.arrays["window.values"][slot], X[-3:, 0])


def test_build_batch():
    rng = np.random.default_rng(2)
    epochs = 1_700_000_000 + np.arange(30) * 3600.0
    values = rng.normal(10, 2, 30)
    series = ["a", "b"] * 15
    scaler = Scaler().fit(raw_features(epochs, values))
    batch = build_batch(scaler, SeriesWindows(), series, epochs, values)
    assert len(batch) == 30
    assert batch.X.shape == (30, len(FEATURES)) and batch.windows.shape == (30, SEQ_LEN, len(FEATURES))
    np.testing.assert_array_equal(batch.X, scaler.transform(raw_features(epochs, values)))
    np.testing.assert_array_equal(batch.windows, expected_windows(series, batch.X, SEQ_LEN))
    assert batch.series.tolist() == series


def test_read_series_csv(tmp_path):
    path = tmp_path / "ec2_cpu_utilization_abc.csv"
    path.write_text("timestamp,value\n2014-02-14 14:27:00,51.846\n2014-02-14 14:32:00,44.508\n"
                    "2014-02-14 14:37:00,7\n")
    df = read_series_csv(path)
    assert df["series"].tolist() == ["ec2_cpu_utilization_abc"] * 3
    expected = [datetime(2014, 2, 14, 14, m, tzinfo=UTC).timestamp() for m in (27, 32, 37)]
    assert df["epoch_s"].tolist() == expected
    assert df["value"].tolist() == [51.846, 44.508, 7.0]
    assert df["value"].dtype == np.float64


def test_read_series_csv_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,value\n2014-02-14 14:27:00,1\n")
    with pytest.raises(ValueError) as info:
        read_series_csv(path)
    assert "timestamp" in str(info.value) and "bad.csv" in str(info.value)
