"""Features shared by training, the detector service and evaluation.

timestamp -> hour, day_of_week (UTC); scaled (value, hour, day_of_week) rows; and per-series
sliding windows for sequence models, carried across batches so a stream is windowed exactly as
a whole series is in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

import numpy as np
import pandas as pd
from numba import njit

from models.state import SeriesState, private_slots

FEATURES = ("value", "hour", "day_of_week")
SEQ_LEN = 10
# Scaled features are clipped to +-this (standard deviations of the training data) before they
# become float32 for IsolationForest and the LSTM: an input of 1e308 would overflow float32 to inf
# (NaN in the network). Far beyond any real point (IsolationForest sees no difference past its
# training range), and small enough that the network's activations stay finite.
FEATURE_LIMIT = 1e3


def time_features(epoch_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seconds = np.floor(np.asarray(epoch_s, dtype=np.float64)).astype(np.int64)
    hour = (seconds // 3600) % 24
    day_of_week = (seconds // 86400 + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return hour, day_of_week


def raw_features(epoch_s: np.ndarray, values: np.ndarray) -> np.ndarray:
    hour, dow = time_features(epoch_s)
    return np.column_stack([np.asarray(values, dtype=np.float64), hour, dow])


class Scaler:
    """StandardScaler kept as plain numbers, so the artifact is JSON, not a pickle."""

    def __init__(self, mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)

    def fit(self, X: np.ndarray) -> "Scaler":
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale = np.where(std > 0, std, 1.0)  # a constant column scales to 0, not inf
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scaled rows as float32, each feature clipped to +-FEATURE_LIMIT (finite for any finite X)."""
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (X - self.mean) / self.scale
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=FEATURE_LIMIT, neginf=-FEATURE_LIMIT)
        return np.clip(scaled, -FEATURE_LIMIT, FEATURE_LIMIT).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaler":
        return cls(d["mean"], d["scale"])


@dataclass
class FeatureBatch:
    """What every detector sees: raw columns plus the scaled rows and their windows, and where the
    rows' series keep their streaming state (a streaming detector updates its fields there)."""

    series: np.ndarray  # per-row series id (object array of str)
    timestamps: np.ndarray  # epoch seconds
    values: np.ndarray
    X: np.ndarray | None  # (n, len(FEATURES)) scaled (None: no detector of the Scorer reads it)
    windows: np.ndarray | None  # (n, SEQ_LEN, len(FEATURES)) scaled; row i's window ends at row i
    store: SeriesState | None = None  # the per-series state store ...
    slots: np.ndarray | None = None  # ... and each row's slot in it

    def __len__(self) -> int:
        return len(self.values)


class SeriesWindows:
    """The per-series window component: the last seq_len-1 points (raw value and time) of each
    series, in the state store. A series' first window is padded with its first point repeated, so
    every point is scored, in training and in the stream alike. Raw points, not scaled rows: the
    state stays valid when the model set (its scaler) is retrained."""

    prefix = "window"

    def __init__(self, seq_len: int = SEQ_LEN):
        self.seq_len = seq_len

    def state_fields(self) -> dict:
        past = (self.seq_len - 1,)
        return {"window.values": (np.float64, past), "window.times": (np.float64, past),
                "window.n": (np.int64, ())}

    def schema(self) -> str:
        return f"seq_len={self.seq_len}"

    def raw(self, store: SeriesState, slots: np.ndarray, epoch_s, values) -> tuple[np.ndarray, np.ndarray]:
        """(values, times) of each row's window, (n, seq_len) each, oldest first; updates the state."""
        n = len(slots)
        out_v, out_t = np.empty((n, self.seq_len)), np.empty((n, self.seq_len))
        a = store.arrays
        _window_rows(np.asarray(slots, np.int64), np.asarray(values, np.float64),
                     np.asarray(epoch_s, np.float64), out_v, out_t,
                     a["window.values"], a["window.times"], a["window.n"])
        return out_v, out_t

    def scaled(self, scaler: Scaler, store: SeriesState, slots, epoch_s, values) -> np.ndarray:
        win_v, win_t = self.raw(store, slots, epoch_s, values)
        rows = scaler.transform(raw_features(win_t.ravel(), win_v.ravel()))
        return rows.reshape(len(win_v), self.seq_len, len(FEATURES))


@njit(cache=True, nogil=True)
def _window_rows(slots, values, times, out_v, out_t, past_v, past_t, seen):
    m = past_v.shape[1]
    for i in range(len(slots)):
        s = slots[i]
        if seen[s] == 0:  # pad with the first point
            past_v[s, :] = values[i]
            past_t[s, :] = times[i]
        out_v[i, :m] = past_v[s]
        out_t[i, :m] = past_t[s]
        out_v[i, m] = values[i]
        out_t[i, m] = times[i]
        if m:
            past_v[s, :m - 1] = past_v[s, 1:].copy()
            past_t[s, :m - 1] = past_t[s, 1:].copy()
            past_v[s, m - 1] = values[i]
            past_t[s, m - 1] = times[i]
        seen[s] += 1


def build_batch(scaler: Scaler, windows: SeriesWindows, series, epoch_s, values,
                store: SeriesState | None = None, slots: np.ndarray | None = None) -> FeatureBatch:
    """Scaled rows and windows of a batch. `store`/`slots`: the per-series state store and each
    row's slot (the Scorer's); without them the windows keep a store of their own."""
    series = np.asarray(series, dtype=object)
    epoch_s = np.asarray(epoch_s, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if store is None:
        store, slots = private_slots(windows, windows.state_fields(), windows.schema(), series)
    win = windows.scaled(scaler, store, slots, epoch_s, values)
    return FeatureBatch(series, epoch_s, values, np.ascontiguousarray(win[:, -1, :]), win, store, slots)


def read_series_csv(path) -> pd.DataFrame:
    """A NAB-style CSV (timestamp,value) -> frame with series (file stem), epoch seconds, value."""
    df = pd.read_csv(path)
    missing = {"timestamp", "value"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    ts = pd.to_datetime(df["timestamp"], utc=True)
    return pd.DataFrame({
        "series": Path(path).stem,
        "timestamp": ts,
        "epoch_s": (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds(),
        "value": df["value"].astype(float),
    })


@dataclass
class VectorBatch:
    """Multivariate rows (one per scrape of a broker's metrics): what the K-Means detector sees.
    A column the batch lacks reads as 0.0, which for a rate means "no traffic"."""

    timestamps: np.ndarray  # epoch seconds
    columns: list[str]
    values: np.ndarray  # (n, len(columns)) raw, e.g. per-second rates

    def __len__(self) -> int:
        return len(self.timestamps)

    def matrix(self, columns: list[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.columns)}
        out = np.zeros((len(self), len(columns)), dtype=np.float64)
        for j, c in enumerate(columns):
            if c in index:
                out[:, j] = self.values[:, index[c]]
        return out

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, columns: list[str] | None = None) -> "VectorBatch":
        """A recorded metrics CSV (timestamp, interval_s, metric columns..., labels) -> batch."""
        skip = {"timestamp", "interval_s", "is_anomaly", "anomaly"}
        columns = columns or [c for c in frame.columns if c not in skip]
        return cls(frame["timestamp"].to_numpy(np.float64), list(columns),
                   frame[columns].fillna(0.0).to_numpy(np.float64))

    @classmethod
    def from_records(cls, records: list) -> "VectorBatch":
        """BrokerMetricsRecords -> batch; columns are the union of their metric names."""
        columns = sorted({name for r in records for name in r.metrics})
        values = np.array([[r.metrics.get(c, 0.0) for c in columns] for r in records], dtype=np.float64)
        stamps = np.array([(r.timestamp if r.timestamp.tzinfo else r.timestamp.replace(tzinfo=timezone.utc))
                           .timestamp() for r in records], dtype=np.float64)  # naive means UTC
        return cls(stamps, columns, values.reshape(len(records), len(columns)))


def replay_frame(paths: list[Path]) -> pd.DataFrame:
    """All series merged in time order, as they would have arrived live."""
    frame = pd.concat([read_series_csv(p) for p in paths], ignore_index=True)
    return frame.sort_values("epoch_s", kind="stable", ignore_index=True)
