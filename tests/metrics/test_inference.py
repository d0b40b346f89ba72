"""Inference without TensorFlow (issue 16): the exported networks equal Keras's within 1e-5, and
the services' scoring paths never import TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from helpers import HDFS_DIR, NAB_DIR, REPO_ROOT

from models.base import ArtifactError
from models.inference import SequentialNetwork
from models.logs.base import encode_windows
from models.logs.next_event import NextEventDetector
from models.logs.sessions import read_sessions_csv
from models.metrics.features import (
    Scaler,
    SeriesWindows,
    build_batch,
    raw_features,
    read_series_csv,
)
from models.metrics.lstm_autoencoder import LSTMAutoencoderDetector
from models.metrics.model_set import train_model_set


@pytest.fixture(scope="module")
def ec2() -> pd.DataFrame:
    """All eight NAB EC2 CPU series, as the ec2_cpu model set is trained."""
    frames = []
    for path in sorted(NAB_DIR.glob("ec2_cpu_utilization_*.csv")):
        f = read_series_csv(path)
        frames.append(pd.DataFrame({"series": path.stem, "epoch_s": f["epoch_s"], "value": f["value"]}))
    return pd.concat(frames, ignore_index=True)


def batch_of(frame: pd.DataFrame):
    scaler = Scaler().fit(raw_features(frame["epoch_s"].to_numpy(), frame["value"].to_numpy()))
    return build_batch(scaler, SeriesWindows(), frame["series"].to_numpy(), frame["epoch_s"].to_numpy(),
                       frame["value"].to_numpy())


def test_exported_lstm_autoencoder_equals_tensorflow_on_the_ec2_data(ec2):
    batch = batch_of(ec2)
    assert len(batch) > 30_000
    det = LSTMAutoencoderDetector(epochs=2, progress=False).fit(batch)
    windows = np.ascontiguousarray(batch.windows, dtype=np.float32)
    recon = det.model.predict(windows, batch_size=4096, verbose=0).astype(np.float64)
    tensorflow_errors = np.mean((recon - windows[:, -1, :]) ** 2, axis=1)
    errors = det.score(batch)  # the numpy export
    assert np.abs(errors - tensorflow_errors).max() <= 1e-5
    assert np.abs(recon - det.network(windows)).max() <= 1e-5
    # Same flags at the threshold, but for errors within 1e-5 of it.
    near = np.abs(tensorflow_errors - det.threshold) <= 1e-5
    np.testing.assert_array_equal(det.decide(errors)[~near], (tensorflow_errors > det.threshold)[~near])


def test_exported_next_event_model_equals_keras_on_hdfs_sessions():
    frame = read_sessions_csv(HDFS_DIR / "hdfs_100k_sessions.csv")
    normal = [s for s, y in zip(frame["events"], frame["y"]) if y == 0][:2000]
    det = NextEventDetector(epochs=2).fit(normal)
    ids, _, _ = encode_windows(frame["events"][:3000].tolist(), det.vocab, det.params["h"], det.params["end"])
    ids = np.unique(ids, axis=0).astype(np.int32)
    assert len(ids) > 500
    keras_probs = det.model.predict(ids, batch_size=4096, verbose=0)
    assert np.abs(keras_probs - det.network(ids)).max() <= 1e-5


def test_an_unsupported_layer_or_activation_is_refused_with_its_name():
    with pytest.raises(ArtifactError, match="Conv1D"):
        SequentialNetwork([{"type": "Conv1D"}], [[]])
    with pytest.raises(ArtifactError, match="hard_sigmoid"):
        SequentialNetwork([{"type": "LSTM", "units": 2, "activation": "tanh", "recurrent_activation": "hard_sigmoid",
                            "return_sequences": False, "use_bias": True}], [[]])


def test_the_services_score_without_importing_tensorflow(tmp_path, ec2):
    """A model set and a next-event model trained here (with TensorFlow), then loaded and scored in a
    fresh process as the detector and log detector services do: no tensorflow or keras module."""
    train_model_set("ec2_cpu", ec2.groupby("series").head(600), tmp_path, epochs=1, progress=False)
    NextEventDetector(epochs=1).fit([["A", "B", "C", "D"]] * 30).save(tmp_path / "next_event")
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import services.detector.service, services.logdetector.service  # the services' own imports
        from models.logs.next_event import NextEventDetector
        from models.metrics.model_set import ModelSet
        from models.metrics.scorer import Scorer
        from shared.records.metrics import encode_score_records
        scorer = Scorer(ModelSet.load({str(tmp_path)!r}, "ec2_cpu"))
        n = 500
        t = 1.6e9 + 300.0 * np.arange(n)
        r = scorer.score(["s"] * n, t, np.sin(t / 5e3))
        encode_score_records(["s"] * n, t, np.sin(t / 5e3), r.is_anomaly, r.scores, r.flags, scorer.decision,
                             "v", "input_data", [(0, i, 0) for i in range(n)], r.why)
        assert r.scores["lstm_autoencoder"].shape == (n,)
        nxt = NextEventDetector.load(__import__("pathlib").Path({str(tmp_path / "next_event")!r}))
        assert len(nxt.score_sessions([["A", "B", "C", "D"], ["A", "C"]])) == 2
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
