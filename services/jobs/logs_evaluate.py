"""logs evaluate: session-level log anomaly detection on a sessions CSV (HDFS by default).

Models: the next-event LSTM (unsupervised, trained on normal sessions only; also reported with
every event ranked, i.e. without accepting the transitions seen in training), transition novelty
(unsupervised: a transition never seen in the normal sessions of the same fitting slice), the
two-input (window, next event) classifier and the count-vector baselines (logistic regression,
decision tree), the last three supervised with the session labels.

No test-split tuning. Each model sees only the training split. A window model is fitted on a
stratified 80% of it (normal sessions only for the next-event model) and makes its one choice on
the other 20%, the validation slice: k and min_prob of the next-event model, the threshold of the
pair classifier, whichever gives the best validation F1 AT THE STATED RATIO (ties: fewer alarms).
That fitted model is the one scored on the test split (a refit on the whole split would move the
probabilities the choice was made on). The count baselines decide at probability 0.5 and are
fitted on the whole training split.

In production normal sessions far outnumber anomalous ones (HDFS: about 33 to 1), while a labelled
file is often anomaly-heavy, so its F1 flatters a detector that flags normal sessions. Every model
is therefore reported by its false-positive rate on the normal sessions (FPR) and its recall on
the anomalous ones, and by the precision and F1 those imply at --ratio normal sessions per
anomalous one, beside the plain precision/recall/F1 on the file; the validation choice maximises
that implied F1.

Also reported: F1 at every k on the test split (not used to choose anything) and the "ceiling",
the best F1 that ANY function of the event sequence could reach on that test split (an oracle that
flags exactly the sequences worth flagging, using the test labels): on the HDFS 100k sample many
anomalous blocks have sequences identical to normal ones, because the sample cuts every block's
log at line 100,000 while the label comes from its whole life.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

from models.evaluation.metrics import point_metrics, rate_metrics
from models.logs.sessions import read_sessions_csv
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, PATH, run_command, verbatim
from shared.config import load_settings

K_VALUES = list(range(1, 17))  # up to the event ids of a small vocabulary (hdfs_deeplog: 14 + 3 special)
MIN_PROBS = [0.0, 1e-5, 1e-4, 1e-3]  # next-event model: an event below this probability is anomalous at any k
PAIR_THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 1.0, 0.05)]
UNSUPERVISED = "next_event_lstm"
ALL_RANKED = "next_event_lstm_all_ranked"  # the same network, every event ranked (seen transitions never accepted)
MODEL_NAMES = [UNSUPERVISED, ALL_RANKED, "transition_novelty", "pair_classifier", "count_logistic_regression",
               "count_decision_tree"]
RATIO = 33.0  # normal sessions per anomalous one in the full HDFS_v1 log (DeepLog's split: 553,366 / 16,838)


def stratified_split(labels: np.ndarray, seed: int, test_size: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, test) of one stratified shuffle split."""
    from sklearn.model_selection import StratifiedShuffleSplit

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    return next(splitter.split(np.zeros(len(labels)), labels))


def detection_metrics(alarms: np.ndarray, truth: np.ndarray, ratio: float) -> dict:
    """Plain precision/recall/F1 on these sessions, and FPR, recall and implied precision/F1 at `ratio`."""
    return {**point_metrics(alarms, truth), **rate_metrics(alarms, truth, ratio)}


def best_threshold(scores: np.ndarray, truth: np.ndarray, candidates,
                   ratio: float = RATIO) -> tuple[float, dict[float, float]]:
    """The candidate with the best implied F1 at `ratio` of `scores > candidate` (ties: the
    larger) and every implied F1."""
    f1 = {c: rate_metrics(scores > c, truth, ratio)["implied_f1"] for c in candidates}
    best = max(f1, key=lambda c: (f1[c], c))
    return best, f1


def sequence_ceiling(sequences: list[str], truth: np.ndarray) -> dict:
    """Best F1 any function of the event sequence can reach on these sessions. F1 of a set of
    flagged sequences is 2A / (A + N + P); by Dinkelbach's argument the best set holds the sequences
    whose anomalous fraction is above some level, so the best prefix by fraction is the optimum."""
    frame = pd.DataFrame({"seq": sequences, "y": truth.astype(int)})
    groups = frame.groupby("seq")["y"].agg(["sum", "count"])
    groups = groups[groups["sum"] > 0]
    groups = groups.assign(frac=groups["sum"] / groups["count"]).sort_values(["frac", "sum"], ascending=False)
    positives = int(truth.sum())
    tp, flagged = groups["sum"].cumsum().to_numpy(), groups["count"].cumsum().to_numpy()
    if not positives or not len(tp):
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    f1 = 2 * tp / (flagged + positives)
    i = int(np.argmax(f1))
    return {"f1": float(f1[i]), "precision": float(tp[i] / flagged[i]), "recall": float(tp[i] / positives)}


def _report(flags: np.ndarray, truth: np.ndarray) -> dict:
    from sklearn.metrics import classification_report

    return classification_report(truth, flags, labels=[0, 1], target_names=["Normal", "Anomaly"], output_dict=True,
                                 zero_division=0)


def _window_report(model, sessions: list, truth: np.ndarray) -> dict:
    """Every window labelled with its session's label, flagged at the model's threshold."""
    per_session = model.window_scores(sessions)
    scores = np.concatenate(per_session)
    window_truth = np.repeat(truth, [len(s) for s in per_session])
    return _report(model.decide(scores), window_truth)


DECISION = ("seen_transitions", "session_end", "min_prob", "k")  # what the validation slice chooses


def choose_next_event(model, sessions: list, truth: np.ndarray, ratio: float = RATIO,
                      seen_options: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """The decision {seen_transitions, session_end, min_prob, k} with the best implied F1 at
    `ratio` on these (validation) sessions; ties: fewer alarms, then the larger k, the smaller
    min_prob, ranked ends and every event ranked. Also every implied F1, as
    {"<seen_transitions>/<session_end>": {min_prob: {k: F1}}}."""
    from models.logs.base import per_session_max
    from models.logs.next_event import SEEN_TRANSITIONS, SESSION_ENDS

    windows = model.scored_windows(sessions)
    seen_options = seen_options or (SEEN_TRANSITIONS if model.transitions else ("rank",))
    grid, f1 = {}, {}
    for seen in seen_options:
        for session_end in SESSION_ENDS if model.min_events is not None else ("rank",):
            for min_prob in MIN_PROBS:
                ranks = model.ranks(windows, min_prob, session_end, seen)
                scores = per_session_max(ranks, windows.owner, len(sessions), empty=1.0)
                for k in K_VALUES:
                    flags = scores > k
                    implied = rate_metrics(flags, truth, ratio)["implied_f1"]
                    grid[(seen, session_end, min_prob, k)] = (implied, -int(flags.sum()), k, -min_prob,
                                                              session_end == "rank", seen == "rank")
                    f1.setdefault(f"{seen}/{session_end}", {}).setdefault(min_prob, {})[k] = implied
    return dict(zip(DECISION, max(grid, key=grid.get))), f1


def apply_decision(model, decision: dict) -> None:
    model.params.update({key: decision[key] for key in DECISION if key != "k"})
    model.k = decision["k"]


def _next_event_result(model, val_sessions: list, val_truth: np.ndarray, test_sessions: list,
                       test_truth: np.ndarray, ratio: float, details: bool,
                       seen_options: tuple[str, ...] | None = None) -> tuple[np.ndarray, dict]:
    """The next-event model's choice on the validation slice, then its test scores and figures."""
    decision, val_f1 = choose_next_event(model, val_sessions, val_truth, ratio, seen_options)
    apply_decision(model, decision)
    scores = model.score_sessions(test_sessions)
    result = {
        **detection_metrics(model.decide(scores), test_truth, ratio), **decision,
        "validation_implied_f1": val_f1[f"{decision['seen_transitions']}/{decision['session_end']}"][
            decision["min_prob"]][decision["k"]],
        "validation_implied_f1_by_decision": val_f1,
        # Reported, never used to choose: the test F1 at every k (at the chosen min_prob, and top-k alone).
        "f1_by_k": {k_: point_metrics(scores > k_, test_truth)["f1"] for k_ in K_VALUES},
    }
    top_k_only = model.score_sessions(test_sessions, min_prob=0.0)
    result["f1_by_k_top_k_only"] = {k_: point_metrics(top_k_only > k_, test_truth)["f1"] for k_ in K_VALUES}
    if details:
        result["by_k"] = {k_: point_metrics(scores > k_, test_truth) for k_ in K_VALUES}
    return scores, result


def evaluate_split(train: pd.DataFrame, test: pd.DataFrame, seed: int, epochs: int, details: bool = False,
                   ratio: float = RATIO) -> dict:
    """Fit every model on `train` (window models on 80% of it, their choice on the other 20%) and
    score `test`."""
    from models.logs.count_baseline import CountVectorDetector
    from models.logs.next_event import NextEventDetector
    from models.logs.pair_classifier import PairClassifierDetector
    from models.logs.transitions import TransitionNoveltyDetector

    fit_pos, val_pos = stratified_split(train["y"].to_numpy(), seed)
    fit, val = train.iloc[fit_pos], train.iloc[val_pos]
    val_sessions, val_truth = list(val["events"]), val["y"].to_numpy().astype(bool)
    test_truth = test["y"].to_numpy().astype(bool)
    test_sessions = list(test["events"])
    results, scores, models = {}, {}, {}

    model = NextEventDetector(epochs=epochs, seed=seed).fit(list(fit["events"]), list(fit["y"]))
    # Beside it, the same network with every event ranked (DeepLog's decision), its own choice.
    ranked = copy.copy(model)
    ranked.params = dict(model.params)
    for name, variant, seen_options in ((UNSUPERVISED, model, None), (ALL_RANKED, ranked, ("rank",))):
        models[name] = variant
        scores[name], results[name] = _next_event_result(variant, val_sessions, val_truth, test_sessions,
                                                         test_truth, ratio, details, seen_options)

    model = TransitionNoveltyDetector().fit(list(fit["events"]), list(fit["y"]))
    models[model.name], scores[model.name] = model, model.score_sessions(test_sessions)
    results[model.name] = {**detection_metrics(model.decide(scores[model.name]), test_truth, ratio),
                           "threshold": model.threshold}

    model = PairClassifierDetector(epochs=epochs, seed=seed).fit(list(fit["events"]), list(fit["y"]))
    model.threshold, val_f1 = best_threshold(model.score_sessions(val_sessions), val_truth, PAIR_THRESHOLDS, ratio)
    models[model.name], scores[model.name] = model, model.score_sessions(test_sessions)
    results[model.name] = {**detection_metrics(model.decide(scores[model.name]), test_truth, ratio),
                           "threshold": model.threshold, "validation_implied_f1": val_f1[model.threshold],
                           "validation_implied_f1_by_threshold": val_f1}

    for kind in ("logistic_regression", "decision_tree"):
        model = CountVectorDetector(kind, seed=seed).fit(list(train["events"]), list(train["y"]))
        models[model.name], scores[model.name] = model, model.score_sessions(test_sessions)
        results[model.name] = {**detection_metrics(model.decide(scores[model.name]), test_truth, ratio),
                               "threshold": model.threshold}

    # Diagnostic, not the target metric: the same decisions on the test sessions without the
    # anomalies whose exact sequence is also a normal session's (no sequence rule can flag those).
    normal_sequences = set(pd.concat([train, test]).query("y == 0")["EventSequence"])
    separable = ~(test_truth & test["EventSequence"].isin(normal_sequences).to_numpy())
    for name, model in models.items():
        results[name]["separable"] = point_metrics(model.decide(scores[name])[separable], test_truth[separable])
    if details:
        for name, model in models.items():
            results[name]["classification_report"] = _report(model.decide(scores[name]), test_truth)
            if model.window_scores(test_sessions[:1]) is not None:
                results[name]["window_classification_report"] = _window_report(model, test_sessions, test_truth)
    return {
        "seed": seed, "train_sessions": len(train), "train_anomalies": int(train["y"].sum()),
        "fit_sessions": len(fit), "validation_sessions": len(val), "test_sessions": len(test),
        "test_anomalies": int(test_truth.sum()), "test_anomalies_with_a_normal_sequence": int((~separable).sum()),
        "ceiling": sequence_ceiling(list(test["EventSequence"].fillna("")), test_truth),
        "models": results, "_scores": scores, "_models": models,
    }


def _public(result: dict) -> dict:
    """A split's result without the fitted models and raw scores."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _spread(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


SPREAD_METRICS = ("precision", "recall", "f1", "fpr", "implied_precision", "implied_f1")


def summarise_splits(splits: list[dict], ratio: float = RATIO) -> dict:
    """Per model: the spread of each figure over the splits, and the figures of all the splits'
    test sessions pooled (false positives over all normal sessions, ...)."""
    from models.evaluation.metrics import implied_at_ratio

    summary = {name: {m: _spread([s["models"][name][m] for s in splits]) for m in SPREAD_METRICS}
               for name in MODEL_NAMES}
    for name in MODEL_NAMES:
        summary[name]["separable_f1"] = _spread([s["models"][name]["separable"]["f1"] for s in splits])
        fp, normals, tp, anomalies = (sum(s["models"][name][c] for s in splits)
                                      for c in ("fp", "normals", "tp", "anomalies"))
        summary[name]["pooled"] = {"fp": fp, "normals": normals, "tp": tp, "anomalies": anomalies,
                                   "fpr": fp / normals, "recall": tp / anomalies,
                                   **implied_at_ratio(fp / normals, tp / anomalies, ratio)}
    for name in (UNSUPERVISED, ALL_RANKED):
        for choice in DECISION:
            summary[name][f"chosen_{choice}"] = [s["models"][name][choice] for s in splits]
    summary["ceiling"] = {"f1": _spread([s["ceiling"]["f1"] for s in splits])}
    return summary


def plot_f1_by_k(path: Path, given: dict, splits: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, s in enumerate(splits):
        ax.plot(K_VALUES, [s["models"][UNSUPERVISED]["f1_by_k"][k] for k in K_VALUES], color="#9bb7d4", lw=1,
                label="test F1, random splits" if i == 0 else None)
    ne = given["models"][UNSUPERVISED]
    ax.plot(K_VALUES, [ne["f1_by_k"][k] for k in K_VALUES], "o-", color="#1f4e79", label="test F1 (given split)")
    ax.plot(K_VALUES, [ne["f1_by_k_top_k_only"][k] for k in K_VALUES], "^:", color="#1f4e79", alpha=0.6,
            label="test F1, top-k alone (min_prob 0)")
    chosen = ne["validation_implied_f1_by_decision"][f"{ne['seen_transitions']}/{ne['session_end']}"][ne["min_prob"]]
    ax.plot(K_VALUES, [chosen[k] for k in K_VALUES], "s--",
            color="#e8a33d", label=f"validation F1 at the ratio (train split), min_prob {ne['min_prob']:g}: "
                                   "chooses k")
    ax.axvline(ne["k"], color="#e8a33d", lw=1, ls=":")
    ax.axhline(given["ceiling"]["f1"], color="#c0392b", lw=1, ls="--", label="ceiling: best F1 of any sequence rule")
    for name, color in (("count_decision_tree", "#2e8b57"), ("pair_classifier", "#7d3c98")):
        ax.axhline(given["models"][name]["f1"], color=color, lw=1, label=f"{name} (test)")
    ax.set_xlabel("k (an event outside the top k predictions is anomalous)")
    ax.set_ylabel("session F1")
    ax.set_xticks(K_VALUES)
    ax.set_ylim(0, 1)
    ax.set_title("next-event LSTM: session F1 against k")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def given_split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    if "Split" in frame.columns and set(frame["Split"].unique()) == {"train", "test"}:
        return frame[frame["Split"] == "train"], frame[frame["Split"] == "test"], "the Split column"
    train_pos, test_pos = stratified_split(frame["y"].to_numpy(), seed=0)
    return frame.iloc[train_pos], frame.iloc[test_pos], "no Split column: a stratified 80/20 split, seed 0"


@click.command("evaluate", help=verbatim(__doc__), context_settings=CONTEXT)
@click.option("--sessions", type=PATH, default=None,
              help="sessions CSV: BlockId, Label (Normal/Anomaly), EventSequence, optional Split "
                   "(default: <data_dir>/hdfs/hdfs_100k_sessions.csv, setting ANOMSTREAM_DATA_DIR)")
@click.option("--out", type=PATH, default=Path("evaluation_results") / "logs", show_default=True)
@click.option("--splits", "n_splits", type=int, default=5, show_default=True,
              help="random stratified 80/20 splits besides the given one")
@click.option("--epochs", type=int, default=30, show_default=True, help="epochs of the two Keras models")
@click.option("--quick", is_flag=True, help="no random splits and 5 epochs (smoke test)")
@click.option("--threads", type=int, default=1, show_default=True, help="TensorFlow threads")
@click.option("--ratio", type=click.FloatRange(min=0, min_open=True), default=RATIO, show_default=True,
              help="normal sessions per anomalous one where the detector runs: the implied precision/F1 "
                   "are computed at it and the validation choice maximises that F1")
def command(sessions: Path | None, out: Path, n_splits: int, epochs: int, quick: bool, threads: int,
            ratio: float) -> int:
    settings = load_settings()
    sessions = sessions or settings.data_dir / "hdfs" / "hdfs_100k_sessions.csv"
    if quick:
        n_splits, epochs = 0, 5
    log = setup_logging(settings, "logs-evaluate")

    from models.inference import limit_threads

    limit_threads(threads)
    started = time.perf_counter()
    frame = read_sessions_csv(sessions)
    if frame["y"].nunique() < 2:
        raise click.UsageError(f"{sessions} needs both Normal and Anomaly sessions")
    train, test, split_source = given_split(frame)
    given = evaluate_split(train, test, seed=0, epochs=epochs, details=True, ratio=ratio)
    log.info("given split evaluated", seconds=round(time.perf_counter() - started, 1),
             **{n: round(m["implied_f1"], 3) for n, m in given["models"].items()})

    splits = []
    for seed in range(n_splits):
        if seed == 0 and split_source.startswith("no Split column"):
            splits.append(given)  # the given split is this one
            continue
        train_pos, test_pos = stratified_split(frame["y"].to_numpy(), seed)
        splits.append(evaluate_split(frame.iloc[train_pos], frame.iloc[test_pos], seed=seed, epochs=epochs,
                                     ratio=ratio))
        log.info("random split evaluated", seed=seed,
                 **{n: round(m["implied_f1"], 3) for n, m in splits[-1]["models"].items()})

    out.mkdir(parents=True, exist_ok=True)
    per_session = test[["BlockId", "Label", "NumEvents", "EventSequence"]].copy() if "NumEvents" in test else \
        test[["BlockId", "Label", "EventSequence"]].copy()
    for name, model_scores in given["_scores"].items():
        per_session[f"{name}_score"] = model_scores
        per_session[f"{name}_anomaly"] = given["_models"][name].decide(model_scores)
    per_session.to_csv(out / "sessions_test.csv", index=False)
    plot_f1_by_k(out / "f1_by_k.png", given, splits)

    metrics = {
        "sessions_csv": str(sessions), "sessions": len(frame), "anomalies": int(frame["y"].sum()),
        "window": given["_models"][UNSUPERVISED].params["h"], "k_values": K_VALUES, "epochs": epochs,
        "unsupervised_model": UNSUPERVISED, "unsupervised_params": given["_models"][UNSUPERVISED].params,
        "min_probs": MIN_PROBS, "ratio": ratio,
        "protocol": ("each model sees the training split only; the window models are fitted on a stratified 80% "
                     "of it and choose k and min_prob (next_event_lstm) or the threshold (pair_classifier) by F1 "
                     f"implied at {ratio:g} normal sessions per anomalous one on the other 20%; the count models "
                     "are fitted on all of it and decide at 0.5; f1_by_k on the test split is reported, never "
                     "used; ceiling = best F1 of any function of the event sequence on the test split (an "
                     "oracle bound)"),
        "test_split": {"source": split_source, **_public(given)},
        "random_splits": {"n": len(splits), "test_size": 0.2, "seeds": list(range(len(splits))),
                          "summary": summarise_splits(splits, ratio) if splits else {},
                          "per_split": [_public(s) for s in splits]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))

    print_table(given, metrics["random_splits"]["summary"], len(splits), ratio)
    ne = given["models"][UNSUPERVISED]
    print(f"next_event_lstm chose k={ne['k']}, min_prob={ne['min_prob']:g}, session ends by {ne['session_end']}, "
          f"seen transitions: {ne['seen_transitions']} on the validation slice; "
          f"written to {out} in {metrics['seconds']} s")
    return 0


def print_table(given: dict, summary: dict, n_splits: int, ratio: float) -> None:
    """Per model: the plain figures on the given split's test sessions, the rate figures and what
    they imply at `ratio`, and over the random splits the spread of the implied F1 and the FPR of
    all their normal test sessions pooled."""
    print(f"given split ({given['test_sessions']} test sessions, {given['test_anomalies']} anomalous); "
          f"'@{ratio:g}' = implied at {ratio:g} normal sessions per anomalous one")
    print(f"{'model':<27} {'P':>5} {'R':>5} {'F1':>5} | {'FPR':>6} {'(fp/normal)':>11} {'recall':>6} "
          f"{'P@':>5} {'F1@':>5} | {n_splits} splits: F1@ mean ± sd [min, max]; pooled FPR, recall")
    for name in MODEL_NAMES:
        m, spread = given["models"][name], summary.get(name)
        extra = "-"
        if spread:
            f1, pooled = spread["implied_f1"], spread["pooled"]
            extra = (f"{f1['mean']:.3f} ± {f1['std']:.3f} [{f1['min']:.3f}, {f1['max']:.3f}]; "
                     f"{pooled['fpr']:.2%} ({pooled['fp']}/{pooled['normals']}), {pooled['recall']:.3f}")
        print(f"{name:<27} {m['precision']:5.3f} {m['recall']:5.3f} {m['f1']:5.3f} | {m['fpr']:6.2%} "
              f"{m['fp']:>5}/{m['normals']:<5} {m['recall']:6.3f} {m['implied_precision']:5.3f} "
              f"{m['implied_f1']:5.3f} | {extra}")
    ceiling = given["ceiling"]
    print(f"{'ceiling (any sequence rule)':<27} {ceiling['precision']:5.3f} {ceiling['recall']:5.3f} "
          f"{ceiling['f1']:5.3f} | on the file's mix")


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream logs evaluate")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
