"""Per-category NAB tables and leave-one-category-out (LOCO) choice between candidates.

A NAB key is `CATEGORY/FILE.csv`. A category's score is NAB's normalised score over that
category's series alone (its windows give the perfect and the null detector); a category without
windows (artificialNoAnomaly) has no normalised score, only false alarms and the raw penalty they
cost, which counts in every pooled figure.

LOCO: for each category, the candidate with the best pooled score on the other categories is
chosen and scored on the held-out one; the held-out raw scores of all folds, pooled and normalised
over every window, give one figure for the choice procedure itself (what a candidate chosen
without a category scores on it), beside each fold's winner.
"""

from __future__ import annotations

import numpy as np

from models.evaluation.nab import PROFILES, score_series

Flags = dict[str, tuple[np.ndarray, list[tuple[int, int]]]]  # key -> (alarms, window rows)


def category(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else "."


def raw_by_series(flags: Flags, profile: str) -> dict[str, dict]:
    return {key: score_series(np.asarray(alarms, bool), widx, profile) for key, (alarms, widx) in flags.items()}


def normalised(raw: float, n_windows: int, profile: str) -> float | None:
    w = PROFILES[profile]
    if n_windows == 0:
        return None
    perfect, null = w["tp"] * n_windows, -w["fn"] * n_windows
    return 100.0 * (raw - null) / (perfect - null)


def category_table(flags: Flags) -> dict[str, dict]:
    """category -> {series, windows, found, false_alarms, and per profile its normalised score
    (None without windows) and raw score}."""
    table: dict[str, dict] = {}
    per_profile = {p: raw_by_series(flags, p) for p in PROFILES}
    for key, (_, widx) in flags.items():
        row = table.setdefault(category(key), {"series": 0, "windows": 0, "found": 0, "false_alarms": 0,
                                               "raw": dict.fromkeys(PROFILES, 0.0)})
        r = per_profile["standard"][key]
        row["series"] += 1
        row["windows"] += len(widx)
        row["found"] += r["tp"]
        row["false_alarms"] += r["fp"]
        for p in PROFILES:
            row["raw"][p] += per_profile[p][key]["score"]
    for row in table.values():
        for p in PROFILES:
            row[p] = normalised(row["raw"][p], row["windows"], p)
    return dict(sorted(table.items()))


def loco(candidates: dict[str, Flags], profile: str = "standard") -> dict:
    """Leave-one-category-out choice between candidates (name -> flags of every series); see
    loco_from_tables."""
    return loco_from_tables({name: category_table(flags) for name, flags in candidates.items()}, profile)


def loco_from_tables(tables: dict[str, dict], profile: str = "standard") -> dict:
    """Leave-one-category-out choice between candidates given their category_table()s.

    Returns {"folds": {held-out category: {"chosen", "train_score", "held_out_score",
    "held_out_raw", "held_out_false_alarms", "best_on_held_out", "best_held_out_score"}}, "score":
    the pooled normalised score of the held-out choices, "wins": candidate -> folds won}."""
    candidates = list(tables)
    cats = sorted({c for t in tables.values() for c in t})
    windows = {c: next(t[c]["windows"] for t in tables.values() if c in t) for c in cats}
    folds, pooled_raw, wins = {}, 0.0, {}
    for held in cats:
        train = [c for c in cats if c != held]
        train_windows = sum(windows[c] for c in train)

        def train_raw(name, train=train):
            return sum(tables[name][c]["raw"][profile] for c in train)

        # Ranked by raw score (normalisation is monotone; it also ranks where no window is left).
        chosen = sorted(candidates, key=lambda n: (-train_raw(n), n))[0]
        held_raw = tables[chosen][held]["raw"][profile]
        pooled_raw += held_raw
        on_held = sorted(candidates, key=lambda n: (-tables[n][held]["raw"][profile], n))[0]
        folds[held] = {"chosen": chosen, "train_score": normalised(train_raw(chosen), train_windows, profile),
                       "held_out_score": tables[chosen][held][profile], "held_out_raw": held_raw,
                       "held_out_false_alarms": tables[chosen][held]["false_alarms"],
                       "best_on_held_out": on_held, "best_held_out_score": tables[on_held][held][profile]}
        wins[chosen] = wins.get(chosen, 0) + 1
    return {"profile": profile, "folds": folds, "score": normalised(pooled_raw, sum(windows.values()), profile),
            "wins": dict(sorted(wins.items(), key=lambda kv: -kv[1]))}


def short(cat: str) -> str:
    """A column heading: realAWSCloudwatch -> AWSCloudwatch, artificialNoAnomaly -> artNoAnomaly."""
    return cat.replace("real", "", 1) if cat.startswith("real") else cat.replace("artificial", "art", 1)


def format_category_rows(tables: dict[str, dict], order: list[str]) -> list[str]:
    """Printed table: one row per output, one column per category, standard/low_fp/low_fn (or the
    false alarms of a category without windows)."""
    cats = sorted({c for t in tables.values() for c in t})
    width = max(len(n) for n in order)
    cols = [max(len(short(c)), 17) for c in cats]
    lines = [f"{'per category':<{width}}  " + "  ".join(f"{short(c):>{w}}" for c, w in zip(cats, cols)),
             f"{'(std/low_fp/low_fn)':<{width}}"]
    for name in order:
        cells = []
        for c, w in zip(cats, cols):
            row = tables[name].get(c)
            if row is None:
                cell = "-"
            elif row["windows"] == 0:
                cell = f"{row['false_alarms']} FP"
            else:
                cell = f"{row['standard']:.1f}/{row['reward_low_fp']:.1f}/{row['reward_low_fn']:.1f}"
            cells.append(f"{cell:>{w}}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return lines


def format_loco(result: dict) -> list[str]:
    pooled = "n/a" if result["score"] is None else f"{result['score']:.1f}"
    lines = [f"leave-one-category-out ({result['profile']}): pooled held-out score {pooled}"]
    for held, f in result["folds"].items():
        held_score = "n/a" if f["held_out_score"] is None else f"{f['held_out_score']:.1f}"
        best = "n/a" if f["best_held_out_score"] is None else f"{f['best_held_out_score']:.1f}"
        train = "n/a" if f["train_score"] is None else f"{f['train_score']:.1f}"
        lines.append(f"  held out {short(held):<16} chose {f['chosen']} (train {train}) -> "
                     f"{held_score} ({f['held_out_false_alarms']} FP); best there: {f['best_on_held_out']} {best}")
    return lines
