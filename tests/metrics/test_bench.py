"""`anomstream bench`, the parts that need no broker: the messages spread over exactly the series
asked (--series), and the cardinality sweep (--sweep-only) at small series counts, its JSON keys
and figures. The full run (broker, detectors in both delivery modes) is `make bench`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import orjson
import pytest
from helpers import NAB_DIR, REPO_ROOT

from services.jobs.bench import bench_frame
from shared.config import load_settings


@pytest.fixture
def settings():
    return load_settings(data_dir=NAB_DIR.parents[2])


@pytest.mark.parametrize(("n", "series"), [(3000, 1), (3000, 64), (3000, 1000), (10_000, 2), (500, 2000)])
def test_bench_frame_spreads_over_the_series_asked(settings, n, series):
    frame = bench_frame(settings, n, "t", series)
    assert len(frame) == n
    counts = frame["series"].value_counts()
    assert len(counts) == min(series, n), "every series asked holds points (all of them when n >= series)"
    assert counts.max() - counts.min() <= 1, "interleaved evenly"
    # Each series in time order, also where it wraps around its NAB series (n=10000 over 2 series).
    assert frame.groupby("series", sort=False)["epoch_s"].apply(lambda t: bool(np.all(np.diff(t) > 0))).all()


def run_bench(args: list[str], tmp_path, model_dir=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMSTREAM_")}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env |= {"ANOMSTREAM_HOME": str(tmp_path / "home"), "ANOMSTREAM_DATA_DIR": str(NAB_DIR.parents[2]),
            "PYTHONPATH": str(REPO_ROOT)}
    extra = ["--model-dir", str(model_dir)] if model_dir else []
    return subprocess.run([sys.executable, "-m", "services.jobs.bench", *args, *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_sweep_only_reports_each_series_count(model_dir, tmp_path):
    result = run_bench(["--sweep-only", "--sweep-series", "300,8"], tmp_path, model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert out == orjson.loads((tmp_path / "bench_results" / "sweep.json").read_bytes())
    for key in ("us_per_msg_by_series", "wall_us_per_msg_by_series"):
        assert set(out[key]) == {"8", "300"}, key
        assert all(v > 0 for v in out[key].values()), out[key]
    assert 0 < out["state_bytes_per_series"] <= 2048  # the default set (README, "Detection quality")
    assert out["rss_series"] == 300 and out["rss_bytes_per_series"] is not None
    assert out["sweep_cost_ratio"] == pytest.approx(out["us_per_msg_by_series"]["300"]
                                                    / out["us_per_msg_by_series"]["8"], rel=0.01)
    assert "cost at 300 series / at 8" in result.stderr and "target <= 1.5x" in result.stderr


@pytest.mark.parametrize("args", [["--series", "0"], ["--series", "11", "--msgs", "10"],
                                  ["--sweep-series", "8,x"], ["--sweep-series", "0"]])
def test_bad_options_are_refused(tmp_path, args):
    result = run_bench(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--series" in result.stderr or "--sweep-series" in result.stderr
