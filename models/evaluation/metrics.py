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
