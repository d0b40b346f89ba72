"""Detectors, model sets and the scoring path, trained tiny (1 LSTM epoch, a few hundred rows)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import orjson
import pandas as pd
import pytest
from helpers import FakeMsg

from models.base import ArtifactError
from models.metrics.features import (
    FEATURES,
    SEQ_LEN,
    Scaler,
    SeriesWindows,
    build_batch,
    raw_features,
)
from models.metrics.isolation_forest import IsolationForestDetector
from models.metrics.lstm_autoencoder import LSTMAutoencoderDetector
from models.metrics.model_set import (
    DEFAULT_DECISION,
    MANIFEST_FORMAT,
    SEED_DECISION,
    ModelSet,
    data_hash,
    train_model_set,
)
from models.metrics.scorer import Scorer, combine, load_scorer
from models.metrics.synthetic import transactions
from shared.records.metrics import ScoreRecord, decode_metrics, encode_score_records


def history_batch(frame: pd.DataFrame):
    scaler = Scaler().fit(raw_features(frame["epoch_s"].to_numpy(), frame["value"].to_numpy()))
    return scaler, build_batch(scaler, SeriesWindows(), frame["series"].to_numpy(), frame["epoch_s"].to_numpy(),
                               frame["value"].to_numpy())


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return transactions(400, outlier_prob=0.02, accounts=3, seed=3)[["series", "epoch_s", "value"]]


@pytest.fixture(scope="module")
def history(frame):
    return history_batch(frame)[1]


@pytest.fixture(scope="module")
def lstm(history):
    return LSTMAutoencoderDetector(epochs=1, progress=False).fit(history)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, frame):
    folder = tmp_path_factory.mktemp("model_sets")
    model_set = train_model_set("unit", frame, folder, epochs=1, progress=False)
    return folder, model_set


# --- IsolationForest

def test_isolation_forest_flags_about_the_contamination_share(history):
    det = IsolationForestDetector(contamination=0.1).fit(history)
    scores = det.score(history)
    assert scores.shape == (len(history),) and np.isfinite(scores).all()
    flags = det.decide(scores)
    assert flags.dtype == bool
    assert 0.08 <= flags.mean() <= 0.11
    # the same rows sklearn itself calls outliers
    np.testing.assert_array_equal(flags, det.model.predict(history.X) == -1)


def test_isolation_forest_scores_an_obvious_outlier_higher(history):
    det = IsolationForestDetector().fit(history)
    far = history.X.copy()[:1]
    far[0, 0] = history.X[:, 0].max() + 20  # a value far beyond anything in training
    scores = det.model.score_samples(np.vstack([history.X[:1], far]))
    assert -scores[1] > -scores[0]
    assert det.decide(-scores[1:]).all()


def test_isolation_forest_save_load_round_trip(tmp_path, history):
    det = IsolationForestDetector(n_estimators=50, contamination=0.05, random_state=7).fit(history)
    det.save(tmp_path / "if")
    again = IsolationForestDetector.load(tmp_path / "if")
    assert again.params == {"n_estimators": 50, "contamination": 0.05, "random_state": 7}
    assert again.threshold == det.threshold
    np.testing.assert_array_equal(again.score(history), det.score(history))
    np.testing.assert_array_equal(again.decide(again.score(history)), det.decide(det.score(history)))


def test_isolation_forest_missing_artifacts(tmp_path, history):
    with pytest.raises(ArtifactError, match="isolation_forest.json"):
        IsolationForestDetector.load(tmp_path)
    IsolationForestDetector().fit(history).save(tmp_path)
    (tmp_path / "isolation_forest.joblib").unlink()
    with pytest.raises(ArtifactError, match="isolation_forest.joblib"):
        IsolationForestDetector.load(tmp_path)


def test_corrupt_json_artifact(tmp_path):
    (tmp_path / "isolation_forest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="isolation_forest.json"):
        IsolationForestDetector.load(tmp_path)


# --- LSTM autoencoder

def test_lstm_threshold_is_mean_plus_three_sigma(lstm, history):
    errors = lstm.score(history)
    assert errors.shape == (len(history),) and (errors >= 0).all()
    expected = float(np.mean(errors)) + 3 * float(np.std(errors))
    assert lstm.threshold == pytest.approx(expected, rel=1e-9)
    flags = lstm.decide(errors)
    np.testing.assert_array_equal(flags, errors > expected)
    assert flags.mean() < 0.5  # most training rows fit under mean + 3 sigma


def test_lstm_score_is_mse_of_the_last_row(lstm, history):
    recon = lstm.model.predict(history.windows[:5], verbose=0)
    expected = ((recon - history.windows[:5, -1, :]) ** 2).mean(axis=1)
    np.testing.assert_allclose(lstm.score(history)[:5], expected, rtol=1e-5, atol=1e-7)


def test_lstm_save_load_round_trip(tmp_path, lstm, history):
    lstm.save(tmp_path / "lstm")
    again = LSTMAutoencoderDetector.load(tmp_path / "lstm")
    assert again.threshold == lstm.threshold
    assert again.params == lstm.params
    np.testing.assert_allclose(again.score(history), lstm.score(history), rtol=1e-6, atol=1e-9)


def test_lstm_empty_batch(lstm, history):
    empty = build_batch(Scaler(np.zeros(3), np.ones(3)), SeriesWindows(), [], np.empty(0), np.empty(0))
    assert lstm.score(empty).shape == (0,)


def test_lstm_missing_artifacts(tmp_path, lstm):
    with pytest.raises(ArtifactError, match="lstm_autoencoder.json"):
        LSTMAutoencoderDetector.load(tmp_path)
    lstm.save(tmp_path)
    (tmp_path / "lstm_autoencoder.network.npz").write_bytes(b"not an npz file")
    with pytest.raises(ArtifactError, match="lstm_autoencoder.network"):
        LSTMAutoencoderDetector.load(tmp_path)
    # Without the export (a model saved before it), the Keras file is read instead: a bad one is named.
    (tmp_path / "lstm_autoencoder.network.npz").unlink()
    (tmp_path / "lstm_autoencoder.keras").write_bytes(b"not a keras file")
    with pytest.raises(ArtifactError, match="lstm_autoencoder.keras"):
        LSTMAutoencoderDetector.load(tmp_path)


def test_lstm_saved_before_the_export_is_exported_on_load(tmp_path, lstm, history):
    lstm.save(tmp_path)
    for suffix in (".network.npz", ".network.json"):
        (tmp_path / f"lstm_autoencoder{suffix}").unlink()
    again = LSTMAutoencoderDetector.load(tmp_path)
    np.testing.assert_allclose(again.score(history), lstm.score(history), rtol=1e-6, atol=1e-9)


# --- model sets

def test_load_from_empty_folder_names_the_manifest(tmp_path):
    with pytest.raises(ArtifactError) as info:
        ModelSet.load(tmp_path, "nothing")
    assert str(tmp_path / "nothing" / "manifest.json") in str(info.value)


def test_manifest_records_training_data_and_version(trained, frame):
    folder, model_set = trained
    manifest = json.loads((folder / "unit" / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["name"] == "unit"
    assert manifest["features"] == list(FEATURES) and manifest["seq_len"] == SEQ_LEN
    assert manifest["training_data"]["rows"] == len(frame)
    # sha256 over the series names, epochs and values in (series, time) order, computed here by hand
    ordered = frame.sort_values(["series", "epoch_s"], kind="stable")
    h = hashlib.sha256()
    h.update("\n".join(ordered["series"]).encode())
    h.update(np.asarray(ordered["epoch_s"], dtype="<f8").tobytes())
    h.update(np.asarray(ordered["value"], dtype="<f8").tobytes())
    assert manifest["training_data"]["sha256"] == h.hexdigest()
    assert manifest["version"] == model_set.version
    assert manifest["version"].startswith("unit-") and manifest["version"].endswith(h.hexdigest()[:8])
    assert set(manifest["detectors"]) == {"isolation_forest", "lstm_autoencoder", "robust_zscore", "seasonal"}
    for name, det in model_set.detectors.items():
        assert manifest["detectors"][name]["threshold"] == det.threshold
        assert (folder / "unit" / name).is_dir()
    assert manifest["decision"] == model_set.decision and manifest["likelihood_sources"] == model_set.likelihood_sources
    assert ModelSet.load(folder, "unit").decision == model_set.decision
    # The default decision is an ensemble the manifest declares (members, rule, threshold, quiet).
    assert set(manifest["ensembles"]) == set(model_set.decision) == set(DEFAULT_DECISION)
    assert ModelSet.load(folder, "unit").ensembles[DEFAULT_DECISION[0]].to_dict() == \
        manifest["ensembles"][DEFAULT_DECISION[0]]


def test_data_hash_ignores_row_order_of_sorted_input_but_not_values(frame):
    ordered = frame.sort_values(["series", "epoch_s"], kind="stable")
    changed = ordered.copy()
    changed.iloc[5, changed.columns.get_loc("value")] += 0.01
    assert data_hash(ordered) != data_hash(changed)
    assert data_hash(ordered) == data_hash(ordered.copy())


def test_model_set_load_round_trip(trained, frame):
    folder, model_set = trained
    loaded = ModelSet.load(folder, "unit")
    assert loaded.version == model_set.version
    np.testing.assert_array_equal(loaded.scaler.mean, model_set.scaler.mean)
    np.testing.assert_array_equal(loaded.scaler.scale, model_set.scaler.scale)
    assert {n: d.threshold for n, d in loaded.detectors.items()} == \
        {n: d.threshold for n, d in model_set.detectors.items()}
    a = Scorer(loaded).score(frame["series"], frame["epoch_s"].to_numpy(), frame["value"].to_numpy())
    b = Scorer(model_set).score(frame["series"], frame["epoch_s"].to_numpy(), frame["value"].to_numpy())
    for name in a.scores:
        np.testing.assert_allclose(a.scores[name], b.scores[name], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(a.is_anomaly, b.is_anomaly)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(features=["value", "hour"]), ["features", "retrain"]),
    (lambda m: m.update(seq_len=SEQ_LEN + 5), ["seq_len", str(SEQ_LEN + 5)]),
    (lambda m: m.update(format=MANIFEST_FORMAT + 1), ["format"]),
    (lambda m: m["detectors"].update(prophet={"threshold": 1}), ["prophet"]),
])
def test_read_manifest_rejects_a_mismatch(tmp_path, trained, edit, words):
    folder, _ = trained
    shutil.copytree(folder / "unit", tmp_path / "unit")
    path = tmp_path / "unit" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert ModelSet.read_manifest(tmp_path, "unit") == manifest  # unedited: fine
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as info:
        ModelSet.read_manifest(tmp_path, "unit")
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_detector_folder_is_named(tmp_path, trained):
    folder, _ = trained
    shutil.copytree(folder / "unit", tmp_path / "unit")
    shutil.rmtree(tmp_path / "unit" / "lstm_autoencoder")
    with pytest.raises(ArtifactError, match="lstm_autoencoder.json"):
        ModelSet.load(tmp_path, "unit")


# --- scoring

def test_stream_equals_batch(trained):
    _, model_set = trained
    data = transactions(240, outlier_prob=0.05, accounts=4, seed=9)  # interleaved series, unseen data
    series, epochs, values = data["series"].to_numpy(), data["epoch_s"].to_numpy(), data["value"].to_numpy()
    whole = Scorer(model_set).score(series, epochs, values)
    scorer = Scorer(model_set)
    cuts = [0, 1, 7, 50, 51, 130, 200, 240]
    parts = [scorer.score(series[a:b], epochs[a:b], values[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    for name in whole.scores:
        np.testing.assert_allclose(np.concatenate([p.scores[name] for p in parts]), whole.scores[name],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.concatenate([p.flags[name] for p in parts]), whole.flags[name])
    np.testing.assert_array_equal(np.concatenate([p.is_anomaly for p in parts]), whole.is_anomaly)


def test_scorer_flags_follow_thresholds_and_rule(trained):
    _, model_set = trained
    data = transactions(100, outlier_prob=0.1, accounts=2, seed=4)
    for rule in ("or", "and", "majority"):
        r = Scorer(model_set, rule, SEED_DECISION).score(data["series"], data["epoch_s"].to_numpy(), data["value"].to_numpy())
        f_if = r.scores["isolation_forest"] > model_set.detectors["isolation_forest"].threshold
        f_lstm = r.scores["lstm_autoencoder"] > model_set.detectors["lstm_autoencoder"].threshold
        np.testing.assert_array_equal(r.flags["isolation_forest"], f_if)
        np.testing.assert_array_equal(r.flags["lstm_autoencoder"], f_lstm)
        expected = {"or": f_if | f_lstm, "and": f_if & f_lstm, "majority": f_if & f_lstm}[rule]
        np.testing.assert_array_equal(r.is_anomaly, expected)


def test_default_decision_is_the_model_sets_and_unknown_names_are_refused(trained):
    _, model_set = trained
    data = transactions(400, outlier_prob=0.05, accounts=2, seed=5)
    r = Scorer(model_set).score(data["series"], data["epoch_s"].to_numpy(), data["value"].to_numpy())
    flags = np.vstack([r.flags[n] for n in model_set.decision])
    np.testing.assert_array_equal(r.is_anomaly, flags.any(axis=0))
    with pytest.raises(ValueError, match="unknown output"):
        Scorer(model_set, "or", ["no_such_detector"])


def test_combine_rules_on_hand_made_flags():
    a = np.array([0, 1, 0, 1, 0, 1, 0, 1], bool)
    b = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    c = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    three = {"a": a, "b": b, "c": c}
    assert combine(three, "or").tolist() == [False, True, True, True, True, True, True, True]
    assert combine(three, "and").tolist() == [False, False, False, False, False, False, False, True]
    # two or more of three
    assert combine(three, "majority").tolist() == [False, False, False, True, False, True, True, True]
    # of two detectors a majority is both; of one, that one
    assert combine({"a": a, "b": b}, "majority").tolist() == (a & b).tolist()
    assert combine({"a": a}, "majority").tolist() == a.tolist()


def test_bad_rule_rejected_at_construction(trained):
    _, model_set = trained
    with pytest.raises(ValueError, match="xor"):
        Scorer(model_set, "xor")
    with pytest.raises(ValueError):
        combine({"a": np.ones(2, bool)}, "any")


def test_score_records_validate_as_score_records(trained):
    _, model_set = trained
    base = 1_700_000_000
    payloads = [json.dumps({"series": f"acct-{i % 3}", "timestamp": base + 60 * i, "value": 10.0 + i}).encode()
                for i in range(12)]
    payloads[4] = b'{"series": "acct-1", "value": "oops"}'  # a bad one in the middle
    msgs = [FakeMsg(p, topic="transactions", partition=2, offset=100 + i, timestamp_ms=(base + i) * 1000)
            for i, p in enumerate(payloads)]
    decoded = decode_metrics([m.value() for m in msgs], 4096)
    assert [pos for pos, _ in decoded.errors] == [4]
    scorer = Scorer(model_set)
    result = scorer.score(decoded.series, decoded.timestamps, decoded.values)
    good = [msgs[i] for i in decoded.index]
    out = encode_score_records(decoded.series, decoded.timestamps, decoded.values, result.is_anomaly, result.scores,
                               result.flags, scorer.decision, model_set.version, "transactions",
                               [(m.partition(), m.offset(), m.timestamp()[1]) for m in good])
    assert len(out) == 11
    for j, value in enumerate(out):
        i = decoded.index[j]
        rec = ScoreRecord.model_validate_json(value)
        # every field, no other (`why` on anomalies only)
        assert set(orjson.loads(value)) == set(ScoreRecord.model_fields) - (set() if rec.is_anomaly else {"why"})
        assert rec.series == f"acct-{i % 3}"
        assert rec.timestamp.timestamp() == base + 60 * i
        assert rec.value == 10.0 + i
        assert (rec.source_topic, rec.source_partition, rec.source_offset) == ("transactions", 2, 100 + i)
        assert rec.source_timestamp_ms == (base + i) * 1000
        assert rec.model_version == model_set.version
        assert rec.is_anomaly == bool(result.is_anomaly[j])
        assert rec.if_anomaly == bool(result.flags["isolation_forest"][j])
        assert rec.decision == scorer.decision
        assert set(rec.scores) == set(rec.flags) == set(model_set.outputs())
        assert rec.scores["robust_zscore"] == pytest.approx(result.scores["robust_zscore"][j])
        assert rec.lstm_anomaly == bool(result.flags["lstm_autoencoder"][j])
        assert rec.if_score == pytest.approx(float(result.scores["isolation_forest"][j]))
        assert rec.reconstruction_error == pytest.approx(float(result.scores["lstm_autoencoder"][j]))
        assert rec.detected_at.tzinfo is not None and rec.kind == "score"


def test_detector_service_refuses_values_beyond_the_setting_max_abs_value(trained, tmp_path, monkeypatch):
    from services.detector.service import DetectorProcessor
    from shared.config import load_settings

    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    _, model_set = trained
    settings = load_settings(max_abs_value=1000.0, topic_transactions="transactions", home=str(tmp_path))
    processor = DetectorProcessor(settings, {"transactions": Scorer(model_set)})
    base = 1_700_000_000
    values = [10.0, 1000.0, -1000.5, 1e12, 20.0]
    msgs = [FakeMsg(json.dumps({"series": "acct-1", "timestamp": base + 60 * i, "value": v}).encode(),
                    topic="transactions", offset=i) for i, v in enumerate(values)]
    result = processor.process(msgs, 0.0)
    assert [m.offset() for m, _ in result.dead_letters] == [2, 3]
    for _, reason in result.dead_letters:
        assert reason.startswith("value:") and "ANOMSTREAM_MAX_ABS_VALUE" in reason
    scored = [orjson.loads(o.value) for o in result.outputs if o.topic == settings.topic_scores]
    assert [r["source_offset"] for r in scored] == [0, 1, 4]


# --- what is computed (issue 16: scoring "design" / "lean" / "all", outputs)

def test_lean_scoring_computes_only_what_the_decision_needs_and_decides_the_same(trained, frame):
    _, model_set = trained
    cols = (frame["series"].to_numpy(), frame["epoch_s"].to_numpy(), frame["value"].to_numpy())
    full = Scorer(model_set, scoring="all")
    lean = Scorer(model_set, scoring="lean")
    design = Scorer(model_set, scoring="design", outputs=["robust_zscore"])
    everything, few, card = full.score(*cols), lean.score(*cols), design.score(*cols)
    assert model_set.decision == DEFAULT_DECISION
    assert set(few.scores) == {*DEFAULT_DECISION, "value_likelihood", "seasonal_likelihood", "seasonal"}
    assert set(card.scores) == set(few.scores) | {"isolation_forest", "lstm_autoencoder", "robust_zscore"}
    assert set(everything.scores) == set(model_set.outputs())
    # Nothing the decision needs is computed differently; the feature windows are not even kept.
    np.testing.assert_array_equal(few.is_anomaly, everything.is_anomaly)
    np.testing.assert_array_equal(card.is_anomaly, everything.is_anomaly)
    for name in few.scores:
        np.testing.assert_array_equal(few.scores[name], everything.scores[name])
    assert "window.values" not in lean.store.arrays and "window.values" in design.store.arrays
    assert lean.store.bytes_per_series < full.store.bytes_per_series
    with pytest.raises(ValueError, match="scoring"):
        Scorer(model_set, scoring="fast")
    with pytest.raises(ValueError, match="nope"):
        Scorer(model_set, outputs=["nope"])


def test_load_scorer_loads_only_the_detectors_it_computes(trained, frame):
    folder, model_set = trained
    cols = (frame["series"].to_numpy(), frame["epoch_s"].to_numpy(), frame["value"].to_numpy())
    lean = load_scorer(folder, "unit", scoring="lean")
    assert set(lean.model_set.detectors) == {"seasonal"}  # no IsolationForest, no LSTM loaded
    design = load_scorer(folder, "unit", scoring="design")
    assert set(design.model_set.detectors) == {"seasonal", "isolation_forest", "lstm_autoencoder"}
    seed = load_scorer(folder, "unit", decision=SEED_DECISION, scoring="lean")
    assert set(seed.model_set.detectors) == set(SEED_DECISION)
    full = Scorer(model_set, scoring="lean").score(*cols)
    np.testing.assert_array_equal(lean.score(*cols).is_anomaly, full.is_anomaly)
