"""Numenta Anomaly Benchmark (NAB) scorer, re-implemented from the published method (summarised in ../shared/docs/nab-scoring.md).

Windows are given as inclusive row-index bounds ``(L, R)``, sorted and non-overlapping, as
produced by :func:`window_indices` from ``combined_windows.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0, "tn": 1.0},
    "reward_low_fp": {"tp": 1.0, "fp": 0.22, "fn": 1.0, "tn": 1.0},
    "reward_low_fn": {"tp": 1.0, "fp": 0.11, "fn": 2.0, "tn": 1.0},
}

# Threshold reported when firing nowhere is best; NAB's own sweep starts here too, which is
# what lets a detector that never crosses any useful threshold score exactly 0.
NO_ALARM_THRESHOLD = 1.1


def _scaled_sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    # Clip before exp only to avoid overflow warnings; x > 3 maps to -1 anyway.
    return np.where(x > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * np.minimum(x, 4.0))) - 1.0)


MAX_TP = float(_scaled_sigmoid(-1.0))


def load_windows(path: str | Path) -> dict[str, list[tuple[pd.Timestamp, pd.Timestamp]]]:
    raw = json.loads(Path(path).read_text())
    return {name: [(pd.Timestamp(s), pd.Timestamp(e)) for s, e in wins] for name, wins in raw.items()}


def window_indices(timestamps: pd.Series | np.ndarray, windows) -> list[tuple[int, int]]:
    """Inclusive row bounds ``(L, R)`` of each window; timestamps must be sorted ascending."""
    idx = pd.DatetimeIndex(pd.to_datetime(timestamps))
    if idx.tz is not None:  # NAB's label times are UTC without an offset
        idx = idx.tz_convert("UTC").tz_localize(None)
    bounds = []
    for start, end in windows:
        lo = int(idx.searchsorted(pd.Timestamp(start), side="left"))
        hi = int(idx.searchsorted(pd.Timestamp(end), side="right")) - 1
        if hi < lo:  # a label that misses the data is a data error, not a zero-width window
            raise ValueError(f"window {start}..{end} holds no rows of this series")
        bounds.append((lo, hi))
    return bounds


def probation_length(n_rows: int, probationary_percent: float = 0.15) -> int:
    return min(math.floor(probationary_percent * n_rows), math.floor(probationary_percent * 5000))


def _row_values(n: int, window_idx, w: dict[str, float]) -> np.ndarray:
    """Value each row would contribute if it were a detection (before the per-window max)."""
    values = np.full(n, -w["fp"])  # before the first window, or no windows at all
    rows = np.arange(n, dtype=float)
    for k, (lo, hi) in enumerate(window_idx):
        width = hi - lo + 1
        values[lo : hi + 1] = w["tp"] * _scaled_sigmoid(-(hi - rows[lo : hi + 1] + 1) / width) / MAX_TP
        # FPs are measured from the most recent preceding window only, up to the next window.
        stop = window_idx[k + 1][0] if k + 1 < len(window_idx) else n
        after = rows[hi + 1 : stop]
        # W' = 1 would divide by zero; any row past a 1-row window is "infinitely" far from it.
        pos = (after - hi) / (width - 1) if width > 1 else np.full(after.shape, np.inf)
        values[hi + 1 : stop] = w["fp"] * _scaled_sigmoid(pos)
    return values


def _inside_mask(n: int, window_idx) -> np.ndarray:
    inside = np.zeros(n, dtype=bool)
    for lo, hi in window_idx:
        inside[lo : hi + 1] = True
    return inside


def score_series(alarms: np.ndarray, window_idx, profile: str) -> dict:
    """Raw NAB score of one series for fixed boolean detections."""
    w = PROFILES[profile]
    alarms = np.asarray(alarms, dtype=bool).copy()
    n = len(alarms)
    alarms[: probation_length(n)] = False
    values = _row_values(n, window_idx, w)
    score, found = 0.0, 0
    for lo, hi in window_idx:
        hits = values[lo : hi + 1][alarms[lo : hi + 1]]
        if hits.size:
            score += float(hits.max())
            found += 1
        else:
            score -= w["fn"]
    false_pos = alarms & ~_inside_mask(n, window_idx)
    score += float(values[false_pos].sum())
    return {"score": score, "tp": found, "fn": len(window_idx) - found, "fp": int(false_pos.sum())}


def _sweep_events(scores: np.ndarray, window_idx, w: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(score, delta) pairs: the series total at threshold t is -A_FN*windows + sum(delta | score >= t)."""
    n = len(scores)
    values = _row_values(n, window_idx, w)
    active = np.arange(n) >= probation_length(n)
    outside = active & ~_inside_mask(n, window_idx)
    ev_scores, ev_deltas = [scores[outside]], [values[outside]]
    for lo, hi in window_idx:
        s = scores[lo : hi + 1][active[lo : hi + 1]]
        v = values[lo : hi + 1][active[lo : hi + 1]]
        if not s.size:
            continue
        # Values fall along a window, so at threshold t the window is worth the value of its
        # earliest row with score >= t. That row changes only at running-max records of the score.
        record = np.ones(s.size, dtype=bool)
        record[1:] = s[1:] > np.maximum.accumulate(s)[:-1]
        rec_s, rec_v = s[record], v[record]
        ev_scores.append(rec_s)
        ev_deltas.append(rec_v - np.append(rec_v[1:], -w["fn"]))
    return np.concatenate(ev_scores), np.concatenate(ev_deltas)


def nab_score(series: dict[str, tuple[np.ndarray, list[tuple[int, int]]]], profile: str) -> dict:
    """Best pooled NAB score over all thresholds (detection = score >= t), normalised to 0..100."""
    w = PROFILES[profile]
    n_windows = sum(len(win) for _, win in series.values())
    if n_windows == 0:
        raise ValueError("normalisation needs at least one window")
    s_perfect, s_null = w["tp"] * n_windows, -w["fn"] * n_windows

    ev_s, ev_d = [], []
    for name, (scores, window_idx) in series.items():
        scores = np.asarray(scores, dtype=float)
        if not np.all((scores >= 0.0) & (scores <= 1.0)):  # also rejects NaN
            raise ValueError(f"{name}: anomaly scores must lie in [0, 1]")
        s, d = _sweep_events(scores, window_idx, w)
        ev_s.append(s)
        ev_d.append(d)
    all_s, all_d = np.concatenate(ev_s), np.concatenate(ev_d)

    # One descending sort, then the total at each distinct score is a cumulative sum read at
    # the last event of that score. Distinct scores without events can never win: they tie
    # with a higher threshold.
    order = np.argsort(-all_s, kind="stable")
    sorted_s, cum = all_s[order], np.cumsum(all_d[order])
    last_of_group = np.append(sorted_s[1:] != sorted_s[:-1], True)
    thresholds = np.concatenate(([NO_ALARM_THRESHOLD], sorted_s[last_of_group]))
    totals = s_null + np.concatenate(([0.0], cum[last_of_group]))
    # Thresholds are descending and argmax returns the first maximum: ties go to the highest.
    best = int(np.argmax(totals))
    threshold = float(thresholds[best])

    # Re-score at the chosen threshold so raw and counts come from one definition.
    per_series = [score_series(np.asarray(sc) >= threshold, win, profile) for sc, win in series.values()]
    raw = sum(r["score"] for r in per_series)
    return {
        "score": 100.0 * (raw - s_null) / (s_perfect - s_null),
        "threshold": threshold,
        "raw": raw,
        "perfect": s_perfect,
        "null": s_null,
        "tp": sum(r["tp"] for r in per_series),
        "fp": sum(r["fp"] for r in per_series),
        "fn": sum(r["fn"] for r in per_series),
    }


def nab_score_fixed(series: dict[str, tuple[np.ndarray, list[tuple[int, int]]]], profile: str) -> dict:
    """Normalised NAB score of fixed boolean alarms (a deployed decision): no threshold sweep, so
    a detector that alarms too often scores below 0 instead of being swept to 'never fire'."""
    w = PROFILES[profile]
    n_windows = sum(len(widx) for _, widx in series.values())
    if n_windows == 0:
        raise ValueError("no windows in the series given: the score cannot be normalised")
    s_perfect, s_null = w["tp"] * n_windows, -w["fn"] * n_windows
    raw = sum(score_series(np.asarray(alarms, bool), widx, profile)["score"] for alarms, widx in series.values())
    return {"score": 100.0 * (raw - s_null) / (s_perfect - s_null), "raw": raw, "perfect": s_perfect, "null": s_null}


def nab_scores_all_profiles(series) -> dict[str, dict]:
    return {profile: nab_score(series, profile) for profile in PROFILES}


def window_metrics(alarms: np.ndarray, window_idx, probation: int = 0) -> dict:
    """Window-wise precision/recall: precision = found windows / (found windows + alarms outside windows)."""
    alarms = np.asarray(alarms, dtype=bool).copy()
    alarms[:probation] = False
    tp = sum(bool(alarms[lo : hi + 1].any()) for lo, hi in window_idx)
    fp = int((alarms & ~_inside_mask(len(alarms), window_idx)).sum())
    fn = len(window_idx) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
