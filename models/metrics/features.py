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
from numpy.lib.stride_tricks import sliding_window_view

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
    """What every detector sees: raw columns plus the scaled rows and their windows."""

    series: np.ndarray  # per-row series id (object array of str)
    timestamps: np.ndarray  # epoch seconds
    values: np.ndarray
    X: np.ndarray  # (n, len(FEATURES)) scaled
    windows: np.ndarray  # (n, SEQ_LEN, len(FEATURES)) scaled; row i's window ends at row i

    def __len__(self) -> int:
        return len(self.values)


class SeriesWindows:
    """Last SEQ_LEN-1 scaled rows of each series. A series' first window is padded with its first
    row repeated, so every point is scored, in training and in the stream alike."""

    def __init__(self, seq_len: int = SEQ_LEN, max_series: int = 100_000):
        self.seq_len = seq_len
        self.max_series = max_series
        self.history: dict[str, np.ndarray] = {}

    def windows(self, series: np.ndarray, X: np.ndarray) -> np.ndarray:
        n, f = X.shape
        out = np.empty((n, self.seq_len, f), dtype=np.float32)
        codes, names = pd.factorize(series)
        for code, name in enumerate(names):
            idx = np.flatnonzero(codes == code)
            past = self.history.get(name)
            if past is None:
                past = np.repeat(X[idx[:1]], self.seq_len - 1, axis=0)
            seq = np.concatenate([past, X[idx]])
            out[idx] = sliding_window_view(seq, self.seq_len, axis=0).transpose(0, 2, 1)
            self.history.pop(name, None)  # re-insert: dict order is then least recently seen first
            self.history[name] = seq[len(seq) - (self.seq_len - 1):]
        if len(self.history) > self.max_series:  # bounded memory: forget the oldest series
            for name in list(self.history)[: len(self.history) - self.max_series]:
                del self.history[name]
        return out


def build_batch(scaler: Scaler, windows: SeriesWindows, series, epoch_s, values) -> FeatureBatch:
    series = np.asarray(series, dtype=object)
    X = scaler.transform(raw_features(epoch_s, values))
    return FeatureBatch(series, np.asarray(epoch_s), np.asarray(values, dtype=np.float64), X,
                        windows.windows(series, X))


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
