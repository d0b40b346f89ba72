"""compare kmeans: warm-started Real-Time K-Means against cold-start streaming K-Means (Spark MLlib
StreamingKMeans semantics, and Spark itself when pyspark is installed), over several seeds, on a
recorded, labelled broker-metrics scenario (`anomstream scenario kafka-load`).

Every model learns from the first --train-fraction of the rows (the history), then scores the rest
as a stream, updating as it goes. Writes metrics.json, results.csv (per row, seed 0), elbow.png and
scores.png to --out, and prints TPR/TNR/PPV/NPV per model with their spread across seeds.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

from models.base import write_json
from models.kmeans import RECORDING
from models.kmeans.streaming_kmeans import RealTimeKMeans
from models.metrics.features import VectorBatch
from shared.cli import CONTEXT, PATH, run_command, verbatim

DEFAULT_DATA = RECORDING
METRICS = ("TPR", "TNR", "PPV", "NPV")


def confusion_rates(truth: np.ndarray, flags: np.ndarray) -> dict[str, float]:
    """TPR (recall), TNR (specificity), PPV (precision), NPV; a rate with an empty denominator is
    1.0 when nothing could be wrong (e.g. PPV with no flag raised and no anomaly present)."""
    truth, flags = np.asarray(truth, bool), np.asarray(flags, bool)
    tp, tn = int((truth & flags).sum()), int((~truth & ~flags).sum())
    fp, fn = int((~truth & flags).sum()), int((truth & ~flags).sum())

    def rate(num: int, den: int) -> float:
        return num / den if den else 1.0

    return {"TPR": rate(tp, tp + fn), "TNR": rate(tn, tn + fp), "PPV": rate(tp, tp + fp),
            "NPV": rate(tn, tn + fn), "TP": tp, "TN": tn, "FP": fp, "FN": fn}


def center_spread(centers: list[np.ndarray]) -> dict[str, float]:
    """Mean distance between matched centers (Hungarian matching) over every pair of seeds."""
    from scipy.optimize import linear_sum_assignment

    pairs = []
    for a, b in itertools.combinations(centers, 2):
        cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
        rows, cols = linear_sum_assignment(cost)
        pairs.append(float(cost[rows, cols].mean()))
    if not pairs:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": float(np.mean(pairs)), "max": float(np.max(pairs))}


def model_factories(spark: bool, params: dict) -> dict:
    factories = {
        "warm_realtime_kmeans": lambda seed: RealTimeKMeans(seed=seed, **params),
        "cold_streaming_kmeans": lambda seed: RealTimeKMeans(seed=seed, init="random", update_with="all", **params),
    }
    if spark:
        from models.kmeans.spark_baseline import SparkStreamingKMeans

        factories["spark_mllib_streaming_kmeans"] = lambda seed: SparkStreamingKMeans(seed=seed, **params)
    return factories


def weaken(frame: pd.DataFrame, strength: float) -> pd.DataFrame:
    """The labelled rows moved towards the normal median in log space: a row at ratio r to the
    median becomes r ** strength (1 = as recorded, 0 = normal), to see how small an injected
    anomaly each model still catches."""
    out = frame.copy()
    metrics = [c for c in frame.columns if c not in ("timestamp", "interval_s", "is_anomaly", "anomaly")]
    anomalous = out["is_anomaly"].astype(bool)
    median = frame.loc[~anomalous, metrics].median()
    ratio = (frame.loc[anomalous, metrics] + 1.0) / (median + 1.0)
    out.loc[anomalous, metrics] = (median + 1.0) * ratio ** strength - 1.0
    return out


def split(frame: pd.DataFrame, train_fraction: float) -> tuple[VectorBatch, VectorBatch, np.ndarray, int]:
    n_train = int(len(frame) * train_fraction)
    history = VectorBatch.from_frame(frame.iloc[:n_train])
    live = VectorBatch.from_frame(frame.iloc[n_train:], history.columns)
    return history, live, frame["is_anomaly"].to_numpy(bool)[n_train:], n_train


def compare(frame: pd.DataFrame, seeds: list[int], train_fraction: float, spark: bool,
            params: dict) -> tuple[dict, dict[str, list], VectorBatch, np.ndarray]:
    """(report, each model's runs per seed, the scored rows, their labels)."""
    history, live, truth, n_train = split(frame, train_fraction)
    report: dict = {"rows": len(frame), "train_rows": n_train, "test_rows": len(live),
                    "test_anomalies": int(truth.sum()),
                    "train_anomalies": int(frame["is_anomaly"].to_numpy(bool)[:n_train].sum()),
                    "seeds": seeds, "params": params, "models": {}}
    runs: dict[str, list] = {}
    for name, make in model_factories(spark, params).items():
        runs[name] = []
        for seed in seeds:
            started = time.perf_counter()
            det = make(seed).fit(history)
            scores = det.score(live)
            runs[name].append({"seed": seed, "det": det, "scores": scores, "flags": det.decide(scores),
                               "seconds": time.perf_counter() - started})
        per_seed = [confusion_rates(truth, r["flags"]) for r in runs[name]]
        summary = {m: {"mean": float(np.mean([p[m] for p in per_seed])),
                       "std": float(np.std([p[m] for p in per_seed])),
                       "min": float(np.min([p[m] for p in per_seed])),
                       "max": float(np.max([p[m] for p in per_seed]))} for m in METRICS}
        first = runs[name][0]
        report["models"][name] = {
            **summary,
            "per_seed": [{"seed": r["seed"], **p, "k": r["det"].elbow["chosen"],
                          "threshold": r["det"].threshold, "seconds": round(r["seconds"], 3)}
                         for r, p in zip(runs[name], per_seed)],
            "score_max_abs_diff_across_seeds": float(max(
                (np.abs(r["scores"] - first["scores"]).max() for r in runs[name][1:]), default=0.0)),
            "center_distance_across_seeds": center_spread([r["det"].state.centers for r in runs[name]]),
            "features": first["det"].preprocessor.columns,
            "dropped": first["det"].preprocessor.dropped,
        }
    return report, runs, live, truth


def table(report: dict) -> str:
    lines = [f"{'model':<30} " + " ".join(f"{m:>15}" for m in METRICS)
             + f" {'scores Δ seeds':>15} {'centers Δ seeds':>16}"]
    for name, r in report["models"].items():
        cells = " ".join(f"{r[m]['mean']:>7.4f}±{r[m]['std']:<7.4f}" for m in METRICS)
        lines.append(f"{name:<30} {cells} {r['score_max_abs_diff_across_seeds']:>15.2e} "
                     f"{r['center_distance_across_seeds']['mean']:>16.3e}")
    return "\n".join(lines)


def write_outputs(report: dict, runs: dict[str, list], live: VectorBatch, truth: np.ndarray, frame: pd.DataFrame,
                  out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", report)
    n_train = report["train_rows"]
    rows = pd.DataFrame({"timestamp": live.timestamps, "is_anomaly": truth.astype(int),
                         "anomaly": frame["anomaly"].iloc[n_train:].fillna("").to_numpy()})
    for name, model_runs in runs.items():
        rows[f"{name}_score"] = model_runs[0]["scores"]
        rows[f"{name}_threshold"] = model_runs[0]["det"].threshold
        rows[f"{name}_flag"] = model_runs[0]["flags"].astype(int)
    rows.to_csv(out / "results.csv", index=False)

    warm = runs["warm_realtime_kmeans"][0]["det"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(warm.elbow["k"], warm.elbow["inertia"], marker="o")
    ax.axvline(warm.elbow["chosen"], color="tab:red", linestyle="--", label=f"elbow: k = {warm.elbow['chosen']}")
    ax.set(xlabel="k", ylabel="inertia (training rows)", title="Batch K-Means elbow")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "elbow.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.6 * len(runs)), sharex=True, squeeze=False)
    t = live.timestamps - live.timestamps[0]
    for ax, (name, model_runs) in zip(axes[:, 0], runs.items()):
        r = model_runs[0]
        ax.plot(t, r["scores"], lw=0.8, label="distance to nearest center")
        ax.axhline(r["det"].threshold, color="tab:red", lw=0.8, linestyle="--", label="threshold")
        ax.scatter(t[truth], r["scores"][truth], color="tab:orange", s=18, zorder=3, label="injected anomaly")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds into the test stream")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)


@click.command("compare", help=verbatim(__doc__), context_settings=CONTEXT)
@click.argument("what", type=click.Choice(["kmeans"]))
@click.option("--data", type=PATH, default=DEFAULT_DATA, help="labelled scenario CSV (default: the recorded one)")
@click.option("--seeds", type=int, default=10, show_default=True, help="number of random seeds (0..N-1)")
@click.option("--train-fraction", type=float, default=0.4, show_default=True)
@click.option("--mini-batch", type=int, default=10, show_default=True, help="rows per streaming update")
@click.option("--half-life", type=float, default=None, help="in mini-batches (default: no forgetting)")
@click.option("--spark", "spark_mode", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="also run pyspark's StreamingKMeans (auto: when pyspark is installed)")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="scale the injected anomalies towards normal (1 = as recorded; see weaken())")
@click.option("--out", type=PATH, default=Path("evaluation_results") / "kmeans", show_default=True)
def command(what: str, data: Path, seeds: int, train_fraction: float, mini_batch: int, half_life: float | None,
            spark_mode: str, strength: float, out: Path) -> int:
    from models.kmeans.spark_baseline import spark_available

    spark = spark_mode == "yes" or (spark_mode == "auto" and spark_available())
    if spark_mode == "yes" and not spark_available():
        raise click.UsageError("pyspark is not installed (pip install 'anomstream[spark]')")
    frame = pd.read_csv(data)
    if strength != 1.0:
        frame = weaken(frame, strength)
    params = {"mini_batch": mini_batch, "half_life": half_life}
    report, runs, live, truth = compare(frame, list(range(seeds)), train_fraction, spark, params)
    report["strength"] = strength
    print(f"{data}: {report['rows']} rows, trained on {report['train_rows']}, "
          f"scored {report['test_rows']} ({report['test_anomalies']} labelled anomalous), "
          f"{len(report['seeds'])} seeds")
    print(table(report))
    write_outputs(report, runs, live, truth, frame, out)
    print(f"wrote {out}/metrics.json, results.csv, elbow.png, scores.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream compare")


if __name__ == "__main__":
    sys.exit(main())
