"""Point-wise detection figures shared by the metric and log evaluations."""

from __future__ import annotations

import numpy as np


def point_metrics(alarms: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((alarms & truth).sum())
    fp = int((alarms & ~truth).sum())
    fn = int((~alarms & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def implied_at_ratio(fpr: float, recall: float, ratio: float) -> dict:
    """Precision and F1 a detector with this false-positive rate (on normal sessions) and recall (on
    anomalous ones) would have where normal sessions outnumber anomalous ones `ratio` to 1: per
    anomaly it finds `recall` of them and flags `ratio * fpr` normal ones."""
    flagged = recall + ratio * fpr
    precision = recall / flagged if flagged else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"implied_precision": precision, "implied_f1": f1, "ratio": ratio}


def rate_metrics(alarms: np.ndarray, truth: np.ndarray, ratio: float) -> dict:
    """False-positive rate on the normal sessions, recall on the anomalous ones, and the precision
    and F1 they imply at `ratio` normal sessions per anomalous one (not at this file's mix)."""
    alarms, truth = np.asarray(alarms, bool), np.asarray(truth, bool)
    normals, anomalies = int((~truth).sum()), int(truth.sum())
    fp, tp = int((alarms & ~truth).sum()), int((alarms & truth).sum())
    fpr = fp / normals if normals else 0.0
    recall = tp / anomalies if anomalies else 0.0
    return {"fpr": fpr, "fp": fp, "normals": normals, "recall": recall, "tp": tp, "anomalies": anomalies,
            **implied_at_ratio(fpr, recall, ratio)}
