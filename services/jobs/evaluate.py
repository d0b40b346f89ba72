"""evaluate: score labelled NAB-layout series with every detector and write metrics.json, one
per-point CSV and one PNG per series.

No leakage: for each series a model set is fitted on its probationary period only (the first 15%,
which NAB does not score), and the whole series then goes through the same Scorer as the detector
service, in time order; streaming detectors and the likelihood stage learn only from points
before the one they score.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np
import pandas as pd
from tqdm import tqdm

from models.evaluation.categories import (
    category_table,
    format_category_rows,
    format_loco,
    loco_from_tables,
)
from models.evaluation.metrics import point_metrics
from models.evaluation.nab import (
    PROFILES,
    load_windows,
    nab_score_fixed,
    nab_scores_all_profiles,
    probation_length,
    window_indices,
    window_metrics,
)
from models.metrics.ensemble import Ensemble
from models.metrics.features import read_series_csv
from models.metrics.model_set import SEED_DECISION
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, PATH, run_command
from shared.config import load_settings

# Ensembles reported beside the single outputs: name -> (outputs, rule) over the members' flags.
ENSEMBLES: dict[str, tuple[list[str], str]] = {
    "combined": (SEED_DECISION, "or"),  # the seed's IF-or-LSTM
    "likelihood_or": (["value_likelihood", "robust_zscore_likelihood"], "or"),
    "likelihood_majority": (["value_likelihood", "robust_zscore_likelihood", "isolation_forest_likelihood",
                             "lstm_autoencoder_likelihood"], "majority"),
}
# Likelihood sources the ensemble grid combines, with the letter that names them in an ensemble.
GRID_SHOWN = 15
GRID_SOURCES = {"v": "value", "s": "seasonal", "r": "robust_zscore", "c": "contextual", "a": "art", "k": "knn"}


# Sparse detectors whose raw output (not its likelihood) joins an ensemble, at their deployed
# threshold: the contextual (CAD OSE-like) and adaptive-resonance (ARTime-like) alarms.
RAW_SOURCES = {"C": ("contextual", 0.75), "A": ("art", 0.001)}


def _named(letters: str, threshold: float, quiet: int, rule: str = "or", **kw) -> Ensemble:
    members = {(RAW_SOURCES[x][0] if x in RAW_SOURCES else f"{GRID_SOURCES[x]}_likelihood"):
               (RAW_SOURCES[x][1] if x in RAW_SOURCES else threshold) for x in letters}
    tag = rule if rule != "vote" else f"vote{kw.get('votes', 2)}"
    return Ensemble(f"{tag}[{'+'.join(letters)}]@{threshold}q{quiet}", members, rule, threshold, quiet=quiet, **kw)


def named_ensembles() -> dict[str, Ensemble]:
    """Score ensembles with a quiet period (models/metrics/ensemble.py) reported in every run."""
    ens = [_named("vs", 0.5, 100), _named("vsr", 0.5, 100), _named("vsr", 0.55, 100),
           _named("vs", 0.45, 100, "mean"), _named("vsrcak", 0.5, 100, "vote", votes=2), *loco_candidates()]
    return {e.name: e for e in ens}


def loco_candidates() -> list[Ensemble]:
    """The small candidate set for the leave-one-category-out choice of the default (declared
    before their scores were seen; with value_likelihood itself): OR of the value and seasonal
    likelihoods (+ robust z-score), with the sparse CAD OSE-like (C) and ARTime-like (A) alarms
    added, at 0.5, quiet 100 (and 50 once); a two-of-five vote."""
    return [_named("vsr", 0.5, 50), _named("vsC", 0.5, 100), _named("vsA", 0.5, 100), _named("vsrC", 0.5, 100),
            _named("vsrA", 0.5, 100), _named("vsrCA", 0.5, 100), _named("vsrCA", 0.5, 100, "vote", votes=2)]


def ensemble_grid() -> dict[str, Ensemble]:
    """The candidates `--ensembles grid` adds, fixed before looking at any score: OR of one to three
    of the GRID_SOURCES likelihoods at a common threshold, with a quiet period; the mean of two or
    three of value/seasonal/robust_zscore; two-of-n votes."""
    from itertools import combinations

    grid = []
    for size in (1, 2, 3):
        for letters in combinations(GRID_SOURCES, size):
            for threshold in (0.45, 0.5, 0.55):
                for quiet in (0, 50, 100, 200):
                    grid.append(_named("".join(letters), threshold, quiet))
    for letters in ("vs", "vr", "sr", "vsr"):
        for threshold in (0.35, 0.4, 0.45):
            for quiet in (0, 100):
                grid.append(_named(letters, threshold, quiet, "mean"))
    for letters in ("vsr", "vsrcak"):
        for threshold in (0.4, 0.5):
            for quiet in (0, 100):
                grid.append(_named(letters, threshold, quiet, "vote", votes=2))
    return {e.name: e for e in grid}


def plan(outputs: list[str] | None, grid: bool = False) -> tuple[list[str], list[str], list[str], list[Ensemble]]:
    """What to run for the outputs asked (None: everything): (detectors to fit, likelihood
    sources, flag ensembles, score ensembles). The "default" decision is always reported; `grid`
    adds the ensemble grid."""
    from models.metrics.model_set import (
        ALL_LIKELIHOOD_SOURCES,
        CANDIDATE_DETECTORS,
        DEFAULT_DECISION,
        DEFAULT_ENSEMBLES,
        DETECTORS,
        FITTED_BY_DEFAULT,
    )

    scored = {**named_ensembles(), **(ensemble_grid() if grid else {}), **DEFAULT_ENSEMBLES}
    if outputs is None:
        outputs = [*FITTED_BY_DEFAULT, *CANDIDATE_DETECTORS,
                   *(f"{src}_likelihood" for src in [*ALL_LIKELIHOOD_SOURCES, *CANDIDATE_DETECTORS]),
                   *ENSEMBLES, *named_ensembles()]
    wanted, flag_ens, score_ens = [], [], []
    if grid:
        outputs = [*outputs, *ensemble_grid()]
    for name in [*outputs, *DEFAULT_DECISION]:
        if name in ENSEMBLES:
            flag_ens.append(name)
            wanted.extend(ENSEMBLES[name][0])
        elif name in scored:
            score_ens.append(scored[name])
            wanted.extend(scored[name].members)
        else:
            wanted.append(name)
    detectors, sources = [], []
    for name in wanted:
        src = name[:-len("_likelihood")] if name.endswith("_likelihood") else None
        if src is not None and (src == "value" or src in DETECTORS):
            sources.append(src)
            det = None if src == "value" else src
        elif name in DETECTORS:
            det = name
        else:
            known = sorted([*DETECTORS, *(f"{d}_likelihood" for d in ["value", *DETECTORS]), *ENSEMBLES,
                            *named_ensembles()])
            raise click.UsageError(f"unknown output {name!r}; known: {', '.join(known)} (and the --ensembles grid)")
        if det is not None:
            detectors.append(det)
    unique = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    return unique(detectors), unique(sources), unique(flag_ens), list({e.name: e for e in score_ens}.values())


def score_series(frame: pd.DataFrame, epochs: int, outputs: list[str] | None = None, grid: bool = False
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], object]:
    """(scores, flags) for the outputs asked (None: every output and ensemble) of a model set
    fitted on the probation rows."""
    from models.metrics.model_set import DEFAULT_DECISION, fit_model_set
    from models.metrics.scorer import Scorer, combine

    detectors, sources, flag_ens, score_ens = plan(outputs, grid)
    probation = probation_length(len(frame))
    model_set = fit_model_set(frame["series"].iloc[0], frame.iloc[:probation], epochs, progress=False,
                              likelihood_sources=sources, detectors=detectors, ensembles={})
    series = frame["series"].to_numpy()
    result = Scorer(model_set).score(series, frame["epoch_s"].to_numpy(), frame["value"].to_numpy())
    scores, flags = dict(result.scores), dict(result.flags)
    for name in flag_ens:
        members, rule = ENSEMBLES[name]
        flags[name] = combine({m: flags[m] for m in members}, rule)
    for ens in score_ens:
        scores[ens.name], flags[ens.name] = ens.decide(series, scores)
    flags["default"] = combine({m: flags[m] for m in DEFAULT_DECISION}, "or")
    return scores, flags, model_set


def evaluate_one(args: tuple) -> tuple:
    """One series, in a worker process: (key, frame, truth, window rows, probation, scores, flags)."""
    key, path, windows, epochs, outputs, grid = args
    if "lstm_autoencoder" in plan(outputs, grid)[0]:
        from models.inference import limit_threads

        limit_threads(1)
    frame = read_series_csv(path)
    probation = probation_length(len(frame))
    widx = window_indices(frame["timestamp"], windows)
    truth = np.zeros(len(frame), bool)
    for lo, hi in widx:
        truth[lo:hi + 1] = True
    scores, flags, _ = score_series(frame, epochs, outputs, grid)
    return key, frame, truth, widx, probation, scores, flags


def run_all(tasks: list[tuple], jobs: int):
    """evaluate_one over the tasks, in `jobs` processes (spawned: no TensorFlow state is forked),
    yielding results in task order."""
    if jobs <= 1:
        yield from map(evaluate_one, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(evaluate_one, tasks)


def plot_series(path: Path, key: str, frame: pd.DataFrame, windows, probation: int, flags: dict[str, np.ndarray],
                shown: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = frame["timestamp"].dt.tz_localize(None)
    fig, (ax, rug) = plt.subplots(2, 1, figsize=(14, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ax.plot(ts, frame["value"], lw=0.8, color="#1f4e79")
    ax.axvspan(ts.iloc[0], ts.iloc[probation - 1], color="#bbbbbb", alpha=0.35, label="probation (training)")
    for i, (lo, hi) in enumerate(windows):
        ax.axvspan(ts.iloc[lo], ts.iloc[hi], color="#e8a33d", alpha=0.3, label="labelled window" if i == 0 else None)
    alarms = flags["default"]
    ax.scatter(ts[alarms], frame["value"][alarms], color="#c0392b", s=30, zorder=3, label="alarm (default)")
    ax.set_title(key)
    ax.set_ylabel("value")
    ax.legend(loc="upper left", fontsize=8)
    for row, name in enumerate(shown):
        hits = ts[flags[name]]
        rug.scatter(hits, np.full(len(hits), row), marker="|", s=120, color="#c0392b" if name == "default" else "#444")
    for lo, hi in windows:
        rug.axvspan(ts.iloc[lo], ts.iloc[hi], color="#e8a33d", alpha=0.3)
    rug.set_yticks(range(len(shown)), shown, fontsize=8)
    rug.set_ylim(-0.7, len(shown) - 0.3)
    rug.set_title("alarms per detector", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("evaluate", help=__doc__, context_settings=CONTEXT)
@click.option("--data-dir", type=PATH, default=None,
              help="NAB layout: CATEGORY/FILE.csv (default: <data_dir>/nab_ec2/data, setting ANOMSTREAM_DATA_DIR)")
@click.option("--windows", "windows_path", type=PATH, default=None,
              help="default: <data_dir>/nab_ec2/labels/combined_windows.json")
@click.option("--labels", "labels_path", type=PATH, default=None,
              help="default: <data_dir>/nab_ec2/labels/combined_labels.json")
@click.option("--out", "out_dir", type=PATH, default=Path("evaluation_results"), show_default=True)
@click.option("--epochs", type=int, default=50, show_default=True, help="LSTM epochs (on each probation period)")
@click.option("--detectors", "outputs", default=None, metavar="A,B,...",
              help="only these outputs (detectors, <source>_likelihood, ensembles), plus the default "
                   "decision; default: the seed detectors, the streaming candidates, every likelihood of "
                   "ALL_LIKELIHOOD_SOURCES and of the candidates, and the ensembles")
@click.option("--jobs", type=int, default=None, help="series scored in parallel processes [default: min(2, cpus)]")
@click.option("--loco/--no-loco", default=True, show_default=True,
              help="report the leave-one-category-out choice between the outputs run")
@click.option("--plots/--no-plots", default=True, show_default=True, help="one PNG per series")
@click.option("--ensembles", type=click.Choice(["named", "grid"]), default="named", show_default=True,
              help="grid: also the ensemble grid (ensemble_grid(), a few hundred candidates for the "
                   "leave-one-category-out choice; in metrics.json, not in the CSVs)")
def command(data_dir: Path | None, windows_path: Path | None, labels_path: Path | None, out_dir: Path,
            epochs: int, outputs: str | None, jobs: int | None, loco: bool, plots: bool, ensembles: str) -> int:
    settings = load_settings()
    default_data = settings.data_dir / "nab_ec2"
    data_dir = data_dir or default_data / "data"
    windows_path = windows_path or default_data / "labels" / "combined_windows.json"
    labels_path = labels_path or default_data / "labels" / "combined_labels.json"
    log = setup_logging(settings, "evaluate")
    asked = None if outputs is None else [o.strip() for o in outputs.split(",") if o.strip()]
    grid = ensembles == "grid"
    plan(asked, grid)  # an unknown output fails here, before any work
    in_grid = set(ensemble_grid()) - set(named_ensembles()) if grid else set()
    jobs = jobs or min(2, os.cpu_count() or 1)

    windows = load_windows(windows_path)
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else {}
    keys = [k for k in windows if (data_dir / k).exists()]
    if not keys:
        raise click.UsageError(f"no series of {windows_path} found under {data_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled: dict[str, dict] = {}  # output -> {"alarms": [...], "truth": [...], "nab_flags": {...}, "nab_scores": {...}}
    tasks = [(key, data_dir / key, windows[key], epochs, asked, grid) for key in keys]
    for key, frame, truth, widx, probation, scores, flags in tqdm(run_all(tasks, jobs), total=len(keys),
                                                                  desc="evaluate", unit="series"):
        scored = np.arange(len(frame)) >= probation
        for name, alarms in flags.items():
            entry = pooled.setdefault(name, {"alarms": [], "truth": [], "window": [], "flags": {}, "scores": {}})
            entry["alarms"].append(alarms[scored])
            entry["truth"].append(truth[scored])
            entry["window"].append(window_metrics(alarms, widx, probation))
            entry["flags"][key] = (alarms, widx)
            if name in scores and (name.endswith("_likelihood") or name in ENSEMBLES):  # in [0, 1]: NAB's sweep
                entry["scores"][key] = (scores[name], widx)
        out = pd.DataFrame({
            "timestamp": frame["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"), "value": frame["value"],
            "label": truth, "probation": ~scored, "is_anomaly": flags["default"],
        })
        if "isolation_forest" in flags and "lstm_autoencoder" in flags:  # the seed's columns
            out["if_anomaly"], out["lstm_anomaly"] = flags["isolation_forest"], flags["lstm_autoencoder"]
            out["reconstruction_error"], out["if_score"] = scores["lstm_autoencoder"], scores["isolation_forest"]
        for name in scores:
            if name not in in_grid:
                out[f"{name}_score"] = scores[name]
        for name in flags:
            if name not in in_grid:
                out[f"{name}_anomaly"] = flags[name]
        stem = Path(key).stem
        out.to_csv(out_dir / f"{stem}.csv", index=False)
        if plots:
            shown = [n for n in ["isolation_forest", "lstm_autoencoder", "combined", "robust_zscore_likelihood",
                                 "value_likelihood", *(asked or [])] if n in flags]
            plot_series(out_dir / f"{stem}.png", key, frame, widx, probation, flags,
                        [*dict.fromkeys(shown), "default"])

    metrics, categories = {}, {}
    for name, entry in pooled.items():
        tw = sum(w["tp"] for w in entry["window"])
        fw = sum(w["fp"] for w in entry["window"])
        nw = sum(w["fn"] for w in entry["window"])
        wp = tw / (tw + fw) if tw + fw else 0.0
        wr = tw / (tw + nw) if tw + nw else 0.0
        metrics[name] = {
            **point_metrics(np.concatenate(entry["alarms"]), np.concatenate(entry["truth"])),
            "window": {"precision": wp, "recall": wr, "f1": 2 * wp * wr / (wp + wr) if wp + wr else 0.0,
                       "found": tw, "missed": nw, "false_alarms": fw},
            # At the detector's own (deployed) threshold; the leaderboard's swept figure is below.
            "nab": {p: nab_score_fixed(entry["flags"], p)["score"] for p in PROFILES},
        }
        if entry["scores"]:
            best = nab_scores_all_profiles(entry["scores"])
            metrics[name]["nab_optimized_threshold"] = {p: {"score": r["score"], "threshold": r["threshold"]}
                                                        for p, r in best.items()}
        categories[name] = category_table(entry["flags"])
        metrics[name]["categories"] = categories[name]
    summary = {
        "series": keys, "labelled_points": sum(len(labels.get(k, [])) for k in keys),
        "windows": sum(len(windows[k]) for k in keys), "epochs": epochs,
        "training": "per series, on its probationary period only (NAB's first 15%)",
        "detectors": metrics,
    }
    # The seed's IF and LSTM flag about a tenth of all points: not candidates for a default.
    candidates = {n: e["flags"] for n, e in pooled.items() if n != "default" and metrics[n]["nab"]["standard"] > -100}
    if loco and candidates:
        tables = {n: categories[n] for n in candidates}
        summary["loco"] = {p: loco_from_tables(tables, p) for p in PROFILES}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    order = [name for name, _ in sorted(metrics.items(), key=lambda kv: -kv[1]["nab"]["standard"])]
    if in_grid:  # the grid's best few, beside every other output
        best_grid = [n for n in order if n in in_grid][:GRID_SHOWN]
        order = [n for n in order if n not in in_grid or n in best_grid]
        print(f"(ensemble grid: {len(in_grid)} candidates, the best {len(best_grid)} shown; all in metrics.json)")
    width = max(len(n) for n in metrics)
    print(f"{'detector':<{width}}  point_f1  window_f1 found/missed/false  NAB std  low_fp  low_fn")
    for name in order:
        m = metrics[name]
        w, nab = m["window"], m["nab"]
        print(f"{name:<{width}}  {m['f1']:8.3f}  {w['f1']:9.3f} {w['found']:5d}/{w['missed']}/{w['false_alarms']:<6d}"
              f" {nab['standard']:7.1f} {nab['reward_low_fp']:7.1f} {nab['reward_low_fn']:7.1f}")
    print()
    print("\n".join(format_category_rows(categories, order)))
    if "loco" in summary:
        print()
        print("\n".join(format_loco(summary["loco"]["standard"])))
    log.info("evaluation written", out=str(out_dir), series=len(keys))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream evaluate")


if __name__ == "__main__":
    sys.exit(main())
