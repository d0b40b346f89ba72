"""Log models (models/log_*.py) and `anomstream logs evaluate` on a slice of the HDFS sessions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from models.inference import limit_threads
from models.logs.base import Vocabulary, dedupe, encode_windows
from models.logs.count_baseline import CountVectorDetector
from models.logs.next_event import UNKNOWN_RANK, NextEventDetector, target_ranks
from services.jobs.logs_evaluate import main as log_evaluate
from services.jobs.logs_evaluate import sequence_ceiling
from shared.config import load_settings

limit_threads(1)
SESSIONS_CSV = load_settings().data_dir / "hdfs" / "hdfs_100k_sessions.csv"


def test_target_ranks_top_k_unknown_and_min_prob():
    probs = np.array([[0.0, 0.0, 0.1, 0.5, 0.3, 0.1],
                      [0.0, 0.0, 0.1, 0.5, 0.3, 0.1],
                      [0.0, 0.0, 0.1, 0.5, 0.3, 0.1],
                      [0.0, 0.9, 0.0, 0.1, 0.0, 0.0]])
    ranks = target_ranks(probs, np.array([3, 4, 5, 1]), unknown_id=1)
    # ties count in the target's favour: 0.1 is beaten by 0.5 and 0.3 only -> rank 3
    assert ranks.tolist() == [1, 2, 3, UNKNOWN_RANK]  # an unknown event is anomalous however likely
    assert target_ranks(probs, np.array([3, 4, 5, 2]), 1, min_prob=0.2).tolist() == [1, 2, UNKNOWN_RANK, UNKNOWN_RANK]


class StubNextEvent(NextEventDetector):
    """The next-event model with a fixed output: END .1, A .5, B .3, C .1 after any window."""

    def __init__(self, **params):
        super().__init__(h=3, **params)
        self.vocab = Vocabulary("ABC")
        self.model = object()

    def _predict(self, inputs):
        return np.tile([0.0, 0.0, 0.1, 0.5, 0.3, 0.1], (len(inputs), 1))


def test_top_k_decision_on_known_outputs():
    model = StubNextEvent(k=2)
    sessions = [["A", "A"], ["A", "B", "A"], ["A", "C"], ["A", "Z"], []]
    scores = model.score_sessions(sessions)
    # per session the largest rank: END (0.1) ranks 3 in every session
    assert scores.tolist() == [3, 3, 3, UNKNOWN_RANK, 3]
    assert model.window_scores([["A", "B", "Z"]])[0].tolist() == [1, 2, UNKNOWN_RANK, 3]
    model.k = 3
    assert model.predict(sessions).tolist() == [False, False, False, True, False]
    model.k = 2
    assert model.predict(sessions).tolist() == [True, True, True, True, True]
    model.k = 10
    assert model.predict([["Z"]]).tolist() == [True]  # unknown: anomalous at every k
    assert model.score_sessions([["A", "C"]], min_prob=0.2).tolist() == [UNKNOWN_RANK]


def test_encode_and_dedupe_windows():
    vocab = Vocabulary(["A", "B"])
    contexts, targets, owner = encode_windows([["A", "B"], ["A", "B"], ["A", "X"]], vocab, h=2)
    assert contexts.shape == (9, 2) and owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert targets[-2] == vocab.unknown_id
    unique, unique_targets, counts, mean = dedupe(contexts, targets, owner == 2)
    assert counts.sum() == 9 and len(unique) == len(unique_targets) == 5  # (PAD PAD)->A shared by all three
    shared = np.flatnonzero(counts == 3)[0]
    assert mean[shared] == pytest.approx(1 / 3)


def test_next_event_model_learns_a_fixed_order_and_round_trips(tmp_path):
    normal = [["A", "B", "C", "D"]] * 40 + [["A", "B", "D", "C"]] * 10
    model = NextEventDetector(h=3, k=1, epochs=60, units=16, batch_size=16, learning_rate=0.02).fit(normal)
    scores = model.score_sessions([["A", "B", "C", "D"], ["A", "C", "B", "D"], ["A", "B", "X", "D"], ["A", "B"]])
    assert scores[0] == 1  # the usual order: every event the most likely one
    assert scores[1] > 2 and scores[3] > 2  # swapped events; a session that stops after B
    assert scores[2] == UNKNOWN_RANK
    assert model.score_sessions([["A", "B", "D", "C"]])[0] == 2  # the less frequent branch: second choice
    model.save(tmp_path / "m")
    loaded = NextEventDetector.load(tmp_path / "m")
    assert loaded.k == 1 and loaded.vocab.tokens == model.vocab.tokens
    assert loaded.score_sessions([["A", "C", "B", "D"]]).tolist() == [scores[1]]


def test_count_baselines_separate_a_telltale_event(tmp_path):
    rng = np.random.default_rng(0)
    sessions = [list(rng.choice(["A", "B", "C"], 8)) for _ in range(200)]
    labels = [int(i % 10 == 0) for i in range(200)]
    for s, y in zip(sessions, labels):
        if y:
            s.append("ERR")
    for kind in ("logistic_regression", "decision_tree"):
        model = CountVectorDetector(kind).fit(sessions, labels)
        assert model.predict([["A", "B", "ERR"], ["A", "B", "C"]]).tolist() == [True, False]
        model.save(tmp_path)
        assert CountVectorDetector.load(tmp_path, kind).predict([["ERR"]]).tolist() == [True]
    with pytest.raises(ValueError, match="labels"):
        CountVectorDetector().fit(sessions)


def test_sequence_ceiling_cannot_flag_an_anomaly_that_looks_normal():
    sequences = ["A B", "A B", "A B", "A X", "A X"]
    truth = np.array([0, 0, 1, 1, 1], bool)
    ceiling = sequence_ceiling(sequences, truth)
    assert ceiling["recall"] == pytest.approx(2 / 3) and ceiling["precision"] == 1.0
    assert ceiling["f1"] == pytest.approx(0.8)


def test_logs_evaluate_on_a_slice_of_the_hdfs_sessions(tmp_path):
    frame = pd.read_csv(SESSIONS_CSV)
    # A quarter of each (split, label) group: about 2,000 sessions, 78 anomalous.
    part = pd.concat([g.sample(frac=0.25, random_state=0) for _, g in frame.groupby(["Split", "Label"])])
    path = tmp_path / "slice.csv"
    part.to_csv(path, index=False)
    out = tmp_path / "out"

    assert log_evaluate(["--sessions", str(path), "--out", str(out), "--splits", "1", "--epochs", "3"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    given = metrics["test_split"]
    assert given["test_sessions"] == int((part["Split"] == "test").sum())
    names = {"next_event_lstm", "pair_classifier", "count_logistic_regression", "count_decision_tree"}
    assert set(given["models"]) == names
    for name, m in given["models"].items():
        assert {"precision", "recall", "f1", "tp", "fp", "fn", "classification_report", "separable"} <= set(m)
        assert 0 <= m["f1"] <= 1
    ne = given["models"]["next_event_lstm"]
    assert ne["k"] in metrics["k_values"] and set(map(int, ne["f1_by_k"])) == set(range(1, 11))
    assert set(ne["window_classification_report"]) >= {"Normal", "Anomaly", "accuracy"}
    assert "window_classification_report" not in given["models"]["count_decision_tree"]
    # The count baseline beats chance (flagging every session: F1 = 2p / (1 + p)).
    p = given["test_anomalies"] / given["test_sessions"]
    assert given["models"]["count_decision_tree"]["f1"] > max(0.3, 2 * p / (1 + p))
    assert given["models"]["count_decision_tree"]["f1"] <= given["ceiling"]["f1"] + 1e-9
    spread = metrics["random_splits"]
    assert spread["n"] == 1 and set(spread["summary"]["count_decision_tree"]["f1"]) == {"mean", "std", "min", "max"}
    results = pd.read_csv(out / "sessions_test.csv")
    assert len(results) == given["test_sessions"]
    assert {"next_event_lstm_score", "next_event_lstm_anomaly", "count_decision_tree_anomaly"} <= set(results.columns)
    assert (out / "f1_by_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logs_train_fits_unlabelled_sessions_parsed_from_raw_logs(tmp_path):
    """Own data: `logs parse RAW --sessions CSV` writes sessions without labels; `logs train` fits the
    next-event model on them (as DeepLog: all taken as normal) and picks k by an alarm budget on
    held-out sessions, and the log detector's scorer loads the result."""
    from helpers import HDFS_DIR

    from models.logs.scorer import LogStreamScorer
    from models.logs.sessions import read_sessions_csv
    from services.jobs.logs import main as logs_main

    sessions = tmp_path / "mine.csv"
    assert logs_main(["parse", str(HDFS_DIR / "HDFS_2k.log"), "--sessions", str(sessions),
                      "--state", str(tmp_path / "drain3.json"), "--out", str(tmp_path / "lines.csv")]) == 0
    parsed = pd.read_csv(sessions)
    assert len(parsed) > 100 and parsed["Label"].isna().all()
    with pytest.raises(ValueError, match="no session is labelled"):
        read_sessions_csv(sessions)

    assert logs_main(["train", "--sessions", str(sessions), "--epochs", "2", "--model-dir", str(tmp_path / "m"),
                      "--name", "mine", "--alarm-rate", "0.05"]) == 0
    manifest = json.loads((tmp_path / "m" / "mine" / "manifest.json").read_text())
    assert manifest["labelled"] is False and manifest["test"] is None
    assert manifest["k"] in range(1, 11) and manifest["held_out_flagged_share"] <= 0.05 or manifest["k"] == 10
    assert manifest["fit_sessions"] == int(len(parsed) * 0.8)
    scorer = LogStreamScorer(tmp_path / "m", "mine", tmp_path / "state", r"blk_-?\d+")
    assert scorer.k == manifest["k"] and scorer.version == manifest["version"]
