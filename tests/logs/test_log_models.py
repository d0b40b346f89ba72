"""Log models (models/log_*.py) and `anomstream logs evaluate` on a slice of the HDFS sessions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from models.evaluation.metrics import implied_at_ratio, rate_metrics
from models.inference import limit_threads
from models.logs.base import Vocabulary, dedupe, encode_windows
from models.logs.count_baseline import CountVectorDetector
from models.logs.next_event import UNKNOWN_RANK, NextEventDetector, target_ranks
from models.logs.sessions import END, PAD
from models.logs.transitions import TransitionNoveltyDetector
from services.jobs.logs_evaluate import K_VALUES, choose_next_event, sequence_ceiling
from services.jobs.logs_evaluate import main as log_evaluate
from services.jobs.logs_train import align_template_ids
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


def test_session_end_by_length_or_by_rank_on_known_outputs():
    model = StubNextEvent(k=2)
    model.min_events = 3  # learned at fit: the shortest normal training session
    sessions = [["A", "A", "A"], ["A", "A"], ["A"]]
    # Ranked, END (0.1) ranks 3 in every session; by length, an end after 3 events is accepted
    # (rank 1) and an earlier one is anomalous at every k.
    assert model.score_sessions(sessions).tolist() == [1, UNKNOWN_RANK, UNKNOWN_RANK]
    model.params["session_end"] = "rank"
    assert model.score_sessions(sessions).tolist() == [3, 3, 3]
    model.params["session_end"] = "length"
    # Streaming: the lengths come with the windows; without them the END is ranked.
    ranks, _ = model.rank_windows([(PAD, "A", "A"), (PAD, PAD, "A"), ("A", "A", "A")], [END, END, "B"], [2, 3, 3])
    assert ranks.tolist() == [UNKNOWN_RANK, 1, 2]
    assert model.rank_windows([(PAD, PAD, "A")], [END])[0].tolist() == [3]
    # A model saved before min_events was learned ranks its ends.
    model.min_events = None
    assert model.score_sessions(sessions).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="session_end"):
        NextEventDetector(session_end="never")


def test_seen_transitions_are_accepted_at_any_k_on_known_outputs():
    model = StubNextEvent(k=1, seen_transitions="accept")
    model.min_events = 1
    model.transitions = [(PAD, "A"), ("A", "C"), ("C", END)]
    # C ranks 3 after any window, but A -> C was seen in training; B ranks 2 and A -> B was not.
    assert model.score_sessions([["A", "C"], ["A", "B"], ["A", "C", "C"]]).tolist() == [1, 2, 3]
    assert model.score_sessions([["A", "C"]], seen_transitions="rank").tolist() == [3]
    ranks, _ = model.rank_windows([(PAD, PAD, PAD), (PAD, PAD, "A"), (PAD, "A", "C")], ["A", "C", "B"], [0, 1, 2])
    assert ranks.tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="seen_transitions"):
        NextEventDetector(seen_transitions="sometimes")


def test_transition_novelty_counts_transitions_never_seen_in_normal_sessions(tmp_path):
    normal = [["A", "B", "C"], ["A", "C"]]
    model = TransitionNoveltyDetector().fit(normal + [["A", "X"]], labels=[0, 0, 1])
    assert model.transitions == {(PAD, "A"), ("A", "B"), ("B", "C"), ("C", END), ("A", "C")}
    # B -> A and A -> END are new; X twice (A -> X, X -> END); a session that ends after A.
    assert model.score_sessions([["A", "B", "C"], ["A", "B", "A"], ["A", "X"], ["A"]]).tolist() == [0, 2, 2, 1]
    assert model.predict([["A", "C"], ["A"]]).tolist() == [False, True]
    model.save(tmp_path)
    assert TransitionNoveltyDetector.load(tmp_path).transitions == model.transitions
    with pytest.raises(RuntimeError, match="not fitted"):
        TransitionNoveltyDetector().score_sessions([["A"]])


def test_rate_metrics_give_deeplogs_published_precision_from_its_false_positive_rate():
    # DeepLog on HDFS: 833 false positives among 553,366 normal blocks, recall 0.96, precision 0.95
    # with 16,838 anomalous blocks (a ratio of 32.9).
    implied = implied_at_ratio(833 / 553_366, 0.96, 553_366 / 16_838)
    assert implied["implied_precision"] == pytest.approx(0.95, abs=0.005)
    assert implied["implied_f1"] == pytest.approx(0.955, abs=0.005)
    truth = np.array([0] * 100 + [1] * 10, bool)
    alarms = truth.copy()
    alarms[:2], alarms[100] = True, False  # 2 false positives, 9 of 10 anomalies found
    m = rate_metrics(alarms, truth, ratio=33)
    assert (m["fp"], m["normals"], m["tp"], m["anomalies"]) == (2, 100, 9, 10)
    assert m["fpr"] == pytest.approx(0.02) and m["recall"] == pytest.approx(0.9)
    # Per anomaly: 0.9 found, 33 * 0.02 = 0.66 normal sessions flagged.
    assert m["implied_precision"] == pytest.approx(0.9 / 1.56)
    assert rate_metrics(np.zeros(3, bool), np.array([0, 0, 1], bool), 33)["implied_f1"] == 0.0


def test_the_validation_choice_maximises_the_f1_implied_at_the_ratio():
    model = StubNextEvent()
    model.min_events = 1
    # Session scores: A A -> 1, A B -> 2, A C -> 3 (C ties with END at 0.1).
    sessions = [["A", "A"]] * 20 + [["A", "B"]] + [["A", "B"]] * 3 + [["A", "C"]] * 2
    truth = np.array([0] * 21 + [1] * 5, bool)
    # k=1 finds all 5 anomalies with 1 false positive in 21 normal sessions: F1 0.91 on this mix,
    # 0.56 at 33:1; k=2 finds 2 without a false positive: F1 0.57 at any mix.
    decision, f1 = choose_next_event(model, sessions, truth, ratio=33)
    assert decision == {"seen_transitions": "rank", "session_end": "length", "min_prob": 0.0, "k": 2}
    assert f1["rank/length"][0.0][2] == pytest.approx(0.4 * 2 / 1.4)
    assert f1["rank/length"][0.0][1] == pytest.approx(implied_at_ratio(1 / 21, 1.0, 33)["implied_f1"])
    assert choose_next_event(model, sessions, truth, ratio=1)[0]["k"] == 1
    # With the training transitions known, accepting the seen ones is a choice too: A -> B was seen
    # in training, so k=1 then flags the 2 anomalies ending in C and no normal session.
    model.transitions = [(PAD, "A"), ("A", "A"), ("A", "B"), ("A", END), ("B", END)]
    decision, f1 = choose_next_event(model, sessions, truth, ratio=33)
    assert decision == {"seen_transitions": "accept", "session_end": "rank", "min_prob": 0.0, "k": 2}  # ties: ranked ends
    assert f1["accept/length"][0.0][1] == f1["accept/length"][0.0][2] == pytest.approx(0.4 * 2 / 1.4)
    assert choose_next_event(model, sessions, truth, 33, seen_options=("rank",))[0]["seen_transitions"] == "rank"


def test_template_ids_are_written_as_the_sessions_write_them():
    vocabulary = ["<PAD>", "<UNK>", "<END>", "E01", "E05", "E22"]
    assert align_template_ids(["E1", "E5", "E22", "E29", "T01"], vocabulary) == ["E01", "E05", "E22", "E29", "T01"]


def test_sample_weights_are_the_pair_counts_to_the_weight_power(monkeypatch):
    seen = {}

    def train(self, inputs, targets, weights, loss):
        seen["weights"] = sorted(weights.tolist())

    monkeypatch.setattr(NextEventDetector, "_train", train)
    normal = [["A", "B"]] * 9 + [["A", "C"]]
    model = NextEventDetector(h=1, weight_power=0.5).fit(normal + [["A"]], labels=[0] * 10 + [1])
    # (PAD)->A 10 times, A->B 9, B->END 9, A->C 1, C->END 1; the anomalous session is not learned.
    assert seen["weights"] == pytest.approx([1, 1, 3, 3, 10 ** 0.5])
    assert model.min_events == 2
    NextEventDetector(h=1, weight_power=1.0).fit(normal)
    assert seen["weights"] == pytest.approx([1, 1, 9, 9, 10])


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
    # The less frequent branch: the network's second choice, accepted as a transition seen in training.
    assert model.score_sessions([["A", "B", "D", "C"]])[0] == 2
    assert model.score_sessions([["A", "B", "D", "C"]], seen_transitions="accept")[0] == 1
    assert ("B", "D") in model.transitions and ("D", END) in model.transitions and ("B", "A") not in model.transitions
    model.params["seen_transitions"] = "accept"
    model.save(tmp_path / "m")
    loaded = NextEventDetector.load(tmp_path / "m")
    assert loaded.k == 1 and loaded.vocab.tokens == model.vocab.tokens and loaded.min_events == 4
    assert [tuple(t) for t in loaded.transitions] == model.transitions
    assert loaded.score_sessions([["A", "B", "D", "C"]]).tolist() == [1]
    assert loaded.score_sessions([["A", "C", "B", "D"]]).tolist() == [scores[1]]
    assert loaded.score_sessions([["A", "B"]]).tolist() == [UNKNOWN_RANK]  # ended before any normal session
    # A model saved before min_events was learned loads and ranks its session ends.
    meta_path = tmp_path / "m" / f"{model.name}.json"
    meta = json.loads(meta_path.read_text())
    del meta["min_events"], meta["transitions"]
    meta_path.write_text(json.dumps(meta))
    old = NextEventDetector.load(tmp_path / "m")
    assert old.min_events is None and old.transitions is None
    assert old.score_sessions([["A", "B", "D", "C"]]).tolist() == [2]  # every event ranked
    assert old.score_sessions([["A", "B"]])[0] == model.score_sessions([["A", "B"]], session_end="rank")[0] > 2


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

    assert log_evaluate(["--sessions", str(path), "--out", str(out), "--splits", "1", "--epochs", "3",
                         "--ratio", "20"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    given = metrics["test_split"]
    assert given["test_sessions"] == int((part["Split"] == "test").sum())
    names = {"next_event_lstm", "next_event_lstm_all_ranked", "transition_novelty", "pair_classifier",
             "count_logistic_regression", "count_decision_tree"}
    assert set(given["models"]) == names
    assert metrics["ratio"] == 20
    test_truth = pd.read_csv(out / "sessions_test.csv")["Label"].eq("Anomaly")
    for name, m in given["models"].items():
        assert {"precision", "recall", "f1", "tp", "fp", "fn", "classification_report", "separable"} <= set(m)
        assert 0 <= m["f1"] <= 1
        # The rate figures: false positives over the normal test sessions, and what they imply at 20:1.
        assert m["normals"] == int((~test_truth).sum()) and m["fpr"] == pytest.approx(m["fp"] / m["normals"])
        assert m["implied_f1"] == pytest.approx(implied_at_ratio(m["fpr"], m["recall"], 20)["implied_f1"])
    ne = given["models"]["next_event_lstm"]
    assert ne["k"] in metrics["k_values"] and set(map(int, ne["f1_by_k"])) == set(K_VALUES)
    assert ne["session_end"] in ("length", "rank")
    assert ne["seen_transitions"] in ("accept", "rank")
    assert given["models"]["next_event_lstm_all_ranked"]["seen_transitions"] == "rank"
    assert ne["validation_implied_f1"] == max(f for by_mp in ne["validation_implied_f1_by_decision"].values()
                                             for by_k in by_mp.values() for f in by_k.values())
    assert set(ne["window_classification_report"]) >= {"Normal", "Anomaly", "accuracy"}
    assert "window_classification_report" not in given["models"]["count_decision_tree"]
    # The count baseline beats chance (flagging every session: F1 = 2p / (1 + p)).
    p = given["test_anomalies"] / given["test_sessions"]
    assert given["models"]["count_decision_tree"]["f1"] > max(0.3, 2 * p / (1 + p))
    assert given["models"]["count_decision_tree"]["f1"] <= given["ceiling"]["f1"] + 1e-9
    spread = metrics["random_splits"]
    assert spread["n"] == 1 and set(spread["summary"]["count_decision_tree"]["f1"]) == {"mean", "std", "min", "max"}
    pooled = spread["summary"]["next_event_lstm"]["pooled"]
    split = spread["per_split"][0]["models"]["next_event_lstm"]
    assert (pooled["fp"], pooled["normals"]) == (split["fp"], split["normals"])
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
    assert manifest["k"] in K_VALUES
    assert manifest["held_out_flagged_share"] <= 0.05 or manifest["k"] == K_VALUES[-1]
    assert manifest["fit_sessions"] == int(len(parsed) * 0.8)
    scorer = LogStreamScorer(tmp_path / "m", "mine", tmp_path / "state", r"blk_-?\d+")
    assert scorer.k == manifest["k"] and scorer.version == manifest["version"]


def test_the_make_run_logs_line_gives_the_false_positive_rate(tmp_path):
    from services.jobs.run import log_summary

    settings = load_settings().model_copy(update={"model_dir": tmp_path, "model_logs": "m"})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"test": {"f1": 0.9, "fpr": 0.002}}))
    raw = tmp_path / "raw.log"
    raw.write_text("081109 203615 148 INFO dfs.DataNode: Receiving block blk_1\n"
                   "081109 203616 148 INFO dfs.DataNode: Receiving block blk_2\n")
    labels = {"blk_a": False, "blk_b": False, "blk_c": False, "blk_d": True}
    line = log_summary(raw, labels, {"raw": {"blk_1"}, "labelled": {"blk_a", "blk_d"}}, settings)
    assert "raw_sample_sessions=2 raw_sample_flagged=1" in line
    assert "tp=1 fp=1 fn=0" in line and "fpr=33.33% (1/3 normal sessions)" in line
    assert line.endswith("(offline on the same split: f1=0.900 fpr=0.20%)")
    # A model trained before the rate figures were recorded: no offline FPR.
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"test": {"f1": 0.9}}))
    assert log_summary(raw, labels, {"raw": set(), "labelled": set()}, settings).endswith("f1=0.900)")


def test_logs_train_on_hdfs_deeplog_with_loghubs_templates_for_the_service(tmp_path):
    """hdfs_deeplog's sessions write DeepLog's template indices E01..E29, loghub's HDFS_templates.csv
    E1..E29: the model folder's reference templates take the sessions' spelling, so the service
    maps a raw HDFS line to the model's event."""
    from helpers import HDFS_DIR

    from models.logs.scorer import LogStreamScorer
    from services.jobs.logs import main as logs_main

    deeplog = load_settings().data_dir / "hdfs_deeplog" / "hdfs_deeplog_train_sessions.csv"
    assert logs_main(["train", "--sessions", str(deeplog), "--templates", str(HDFS_DIR / "HDFS_templates.csv"),
                      "--epochs", "2", "--model-dir", str(tmp_path / "m"), "--name", "deeplog"]) == 0
    manifest = json.loads((tmp_path / "m" / "deeplog" / "manifest.json").read_text())
    assert manifest["labelled"] and manifest["ratio"] == 33 and manifest["session_end"] in ("length", "rank")
    test = manifest["test"]
    assert test["normals"] > 600 and test["fpr"] == pytest.approx(test["fp"] / test["normals"])
    scorer = LogStreamScorer(tmp_path / "m", "deeplog", tmp_path / "state", r"blk_-?\d+")
    assert {"E05", "E22", "E29"} <= set(scorer.templates) and "E5" not in scorer.templates
    assert scorer.detector.min_events == 13  # the shortest normal session of the file's fitting slice
    event, _ = scorer.event_of("Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 "
                               "dest: /10.250.19.102:50010")
    assert event == "E05" and event in scorer.detector.vocab.index
