"""`anomstream evaluate` on a NAB-layout folder made here: two series, one labelled level shift."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from models.metrics.model_set import DEFAULT_DECISION
from services.jobs.evaluate import main as evaluate


def write_series(path, values, start="2020-03-02 00:00:00"):
    ts = pd.date_range(start, periods=len(values), freq="5min")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "value": values}).to_csv(path, index=False)
    return ts


def test_evaluate_writes_metrics_csvs_and_plots_for_any_nab_folder(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    shifted = rng.normal(10, 0.5, n)
    shifted[1500:] += 8  # a level shift, labelled
    quiet = rng.normal(3, 0.2, n)  # no anomaly, no window
    data = tmp_path / "data"
    ts = write_series(data / "synthetic" / "shift.csv", shifted)
    write_series(data / "synthetic" / "quiet.csv", quiet)
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    windows = {"synthetic/shift.csv": [[ts[1480].strftime(fmt), ts[1580].strftime(fmt)]], "synthetic/quiet.csv": []}
    labels = {"synthetic/shift.csv": [ts[1500].strftime(fmt)], "synthetic/quiet.csv": []}
    (tmp_path / "windows.json").write_text(json.dumps(windows))
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    out = tmp_path / "out"

    assert evaluate(["--data-dir", str(data), "--windows", str(tmp_path / "windows.json"),
                     "--labels", str(tmp_path / "labels.json"), "--out", str(out), "--epochs", "1"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["windows"] == 1 and metrics["labelled_points"] == 1
    detectors = metrics["detectors"]
    for name in ("isolation_forest", "lstm_autoencoder", "combined", "value_likelihood", "default"):
        m = detectors[name]
        assert {"precision", "recall", "f1"} <= set(m) and {"precision", "recall", "f1"} <= set(m["window"])
        assert set(m["nab"]) == {"standard", "reward_low_fp", "reward_low_fn"}
    # A shift of 16 sigma is found early by the default detector, without a false alarm on the quiet series.
    default = detectors["default"]
    assert default["window"]["found"] == 1 and default["window"]["false_alarms"] == 0
    assert default["nab"]["standard"] > 80
    assert "nab_optimized_threshold" in detectors["value_likelihood"]

    for stem in ("shift", "quiet"):
        csv = pd.read_csv(out / f"{stem}.csv")
        assert len(csv) == n
        assert {"timestamp", "value", "is_anomaly", "if_anomaly", "lstm_anomaly", "reconstruction_error",
                "if_score", "value_likelihood_score"} <= set(csv.columns)
        assert csv["probation"].sum() == 300  # 15% of 2000 rows
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shift = pd.read_csv(out / "shift.csv")
    assert shift["label"].sum() == 101
    first = int(np.flatnonzero(shift["is_anomaly"].to_numpy())[0])
    assert 1500 <= first <= 1510


def test_evaluate_runs_only_the_outputs_asked_in_parallel_with_category_tables(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    windows = {}
    for cat in ("catA", "catB"):
        values = rng.normal(10, 0.5, 1500)
        values[1200:] += 8
        ts = write_series(data / cat / "shift.csv", values)
        windows[f"{cat}/shift.csv"] = [[ts[1180].strftime(fmt), ts[1260].strftime(fmt)]]
    (tmp_path / "windows.json").write_text(json.dumps(windows))
    out = tmp_path / "out"
    assert evaluate(["--data-dir", str(data), "--windows", str(tmp_path / "windows.json"), "--out", str(out),
                     "--detectors", "value_likelihood,robust_zscore_likelihood", "--jobs", "2", "--no-plots"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The outputs asked, what they need, and the default decision (an ensemble) with its members.
    assert set(metrics["detectors"]) == {"value_likelihood", "robust_zscore", "robust_zscore_likelihood", "default",
                                         "seasonal", "seasonal_likelihood", *DEFAULT_DECISION}
    cats = metrics["detectors"]["value_likelihood"]["categories"]
    assert set(cats) == {"catA", "catB"} and cats["catA"]["windows"] == 1
    assert set(cats["catA"]) >= {"standard", "reward_low_fp", "reward_low_fn", "false_alarms", "found"}
    assert set(metrics["loco"]["standard"]["folds"]) == {"catA", "catB"}
    assert not list(out.glob("*.png"))
