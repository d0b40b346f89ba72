"""`anomstream runs` and `anomstream chart`: a detector definition's checks, from the run history.

    anomstream runs NAME [--group G] [--limit N] [--db URL]
    anomstream chart NAME --out FILE.png [--group G] [--last N] [--db URL]
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import click
import numpy as np
import pandas as pd
from sqlalchemy.engine import make_url

from models.rules.run_history import RunHistory
from shared.cli import CONTEXT, PATH, run_command

STATUS = {"fired": "FIRED", "ok": "ok", "no_data": "no data"}
MAX_GROUPS = 6  # chart without --group: the groups with most checks, one subplot each


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v) -> str:
    return "–" if v is None else f"{v:.6g}"


def _open(db_url: str | None) -> RunHistory | None:
    """The run history, or None (with a message) when its SQLite file does not exist: a read-only
    command should not leave an empty database behind."""
    if db_url is None:
        from shared.config import load_settings

        db_url = load_settings().rules_db_url
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not Path(url.database).expanduser().exists():
        print(f"no run history at {url.database} (the rules service creates it; or pass --db URL)", file=sys.stderr)
        return None
    return RunHistory(db_url)


def _no_checks(history: RunHistory, name: str, group: str | None) -> int:
    names = history.definitions()
    if name in names and group is not None:
        groups = ", ".join(history.groups(name)) or "(none)"
        print(f"no checks of {name!r} for group {group!r}; its groups: {groups}", file=sys.stderr)
    else:
        print(f"no checks recorded for {name!r}; definitions with checks: {', '.join(names) or '(none)'}",
              file=sys.stderr)
    return 1


def format_table(checks: list[dict]) -> str:
    """Aligned plain-text table of checks (as `RunHistory.recent` returns them), one line each."""
    versions = {c["version"] for c in checks}
    n_conds = max(len(c["conditions"]) for c in checks)
    header = ["window (UTC)", "group"] + (["version"] if len(versions) > 1 else []) + ["status", "msgs"]
    header += [f"[{i}]" for i in range(n_conds)] + ["actions"]
    rows = []
    for c in checks:
        row = [f"{_iso(c['window_start'])} – {_iso(c['window_end'])}", c["group"]]
        row += [c["version"]] if len(versions) > 1 else []
        row += [STATUS.get(c["status"], c["status"]), str(c["messages"])]
        conds = {o["index"]: o for o in c["conditions"]}
        for i in range(n_conds):
            o = conds.get(i)
            row.append("" if o is None else "–" if (o.get("detail") or {}).get("no_data")
                       else f"{_num(o['value'])} {'✓' if o['holds'] else '✗'}")
        row.append(", ".join(f"{a.get('type')} {a.get('target') or ''}: {a.get('outcome')}".replace(" :", ":")
                             for a in c["actions"]) or "–")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    numeric = {header.index("msgs")} | {i for i, h in enumerate(header) if h.startswith("[")}
    lines = []
    for r in [header] + rows:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@click.command("runs", help="recent checks of a detector definition; NAME: the definition's name",
               context_settings=CONTEXT)
@click.argument("name")
@click.option("--group", help="only this group key")
@click.option("--limit", type=int, default=50, help="checks shown, newest first (default 50)")
@click.option("--db", help="run history URL (default: setting ANOMSTREAM_RULES_DB_URL)")
def runs_command(name: str, group: str | None, limit: int, db: str | None) -> int:
    history = _open(db)
    if history is None:
        return 1
    try:
        checks = history.recent(name, limit=limit, group=group)
        if not checks:
            return _no_checks(history, name, group)
        # The condition texts of the newest version name the table's [i] columns.
        print(f"{name}: {len(checks)} most recent checks, newest first")
        for o in checks[0]["conditions"]:
            print(f"  [{o['index']}] {o['text']}")
        print()
        print(format_table(checks))
        return 0
    finally:
        history.close()


def runs_main(argv: list[str] | None = None) -> int:
    return run_command(runs_command, argv, "anomstream runs")


# ---------------------------------------------------------------- chart

def build_figure(frame: pd.DataFrame, name: str, group: str | None = None, last: int | None = None):
    """One subplot per group (the given one, or the MAX_GROUPS with most checks): each condition's
    metric over window end; Bollinger EMA and band; metric/ratio thresholds; fired checks in red;
    no-data checks as grey ticks at the bottom. Only the newest version's checks (a new version
    starts its conditions afresh, so its band does not continue the old one's)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    version = frame.sort_values("window_end")["version"].iloc[-1]
    frame = frame[frame["version"] == version]
    groups = [group] if group is not None else list(frame["group"].value_counts(sort=True).index[:MAX_GROUPS])
    conds = sorted({int(c[4:].split(".")[0]) for c in frame.columns if c.startswith("cond") and c.endswith(".type")})
    fig = Figure(figsize=(11, 3.2 * len(groups) + 0.8), layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    texts = [f"[{i}] {frame[f'cond{i}.text'].dropna().iloc[-1]}" for i in conds]
    fig.suptitle(f"{name} (version {version})\n" + "\n".join(texts), fontsize=10)

    def col(df, name):
        return pd.to_numeric(df[name], errors="coerce").to_numpy(float) if name in df else np.full(len(df), np.nan)

    for ax, key in zip(axes, groups):
        df = frame[frame["group"] == key].sort_values("window_end")
        if last:
            df = df.tail(last)
        x = df["window_end"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
        fired = df["fired"].to_numpy(bool)
        # The first metric on the left axis, any other metric (e.g. a ratio in %) on a right one.
        metrics = list(dict.fromkeys(df[f"cond{i}.metric"].dropna().iloc[-1] for i in conds
                                     if df[f"cond{i}.metric"].notna().any()))
        right = ax.twinx() if len(metrics) > 1 else None
        handles = []
        for i in conds:
            if not df[f"cond{i}.metric"].notna().any():
                continue
            ctype, metric = df[f"cond{i}.type"].dropna().iloc[-1], df[f"cond{i}.metric"].dropna().iloc[-1]
            target = ax if metric == metrics[0] else right
            value = col(df, f"cond{i}.value")
            if metric not in [h.get_label() for h in handles]:
                handles += target.plot(x, value, marker=".", lw=1.2, label=metric)
                if fired.any():
                    target.plot(x[fired], value[fired], "o", color="red", ms=7, zorder=5)
            if ctype == "bollinger":
                ema, lower, upper = col(df, f"cond{i}.ema"), col(df, f"cond{i}.lower"), col(df, f"cond{i}.upper")
                handles += target.plot(x, ema, color="tab:orange", lw=1, label=f"[{i}] EMA")
                handles.append(target.fill_between(x, lower, upper, color="tab:orange", alpha=0.2,
                                                   label=f"[{i}] band"))
            elif ctype in ("metric", "ratio"):
                threshold = col(df, f"cond{i}.threshold")
                if np.isfinite(threshold).any():
                    handles.append(target.axhline(threshold[np.isfinite(threshold)][-1], ls="--", color="tab:red",
                                                  lw=1, label=f"[{i}] threshold"))
            elif ctype == "rate":
                handles += target.plot(x, col(df, f"cond{i}.reference"), ls=":", color="tab:green",
                                       label=f"[{i}] reference")
        if fired.any():
            handles.append(Line2D([], [], marker="o", color="red", ls="", label="fired"))
        no_data = (df["status"] == "no_data").to_numpy()
        if no_data.any():
            # Ticks in axes coordinates: at the bottom whatever the metric's scale.
            ax.plot(x[no_data], np.full(no_data.sum(), 0.03), "|", color="grey", ms=12, mew=2,
                    transform=ax.get_xaxis_transform())
            handles.append(Line2D([], [], marker="|", color="grey", ls="", ms=10, mew=2, label="no data"))
        ax.set_title(f"{name} — group {key}", fontsize=10, loc="left")
        ax.set_ylabel(metrics[0] if metrics else "")
        if right is not None:
            right.set_ylabel(", ".join(metrics[1:]))
        ax.legend(handles=handles, fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("window end (UTC)")
    return fig


@click.command("chart", help="PNG chart of a detector definition's checks; NAME: the definition's name",
               context_settings=CONTEXT)
@click.argument("name")
@click.option("--out", required=True, type=PATH, help="PNG file to write")
@click.option("--group", help=f"only this group key (default: the {MAX_GROUPS} with most checks)")
@click.option("--last", type=int, help="only the last N checks of each group")
@click.option("--db", help="run history URL (default: setting ANOMSTREAM_RULES_DB_URL)")
def chart_command(name: str, out: Path, group: str | None, last: int | None, db: str | None) -> int:
    history = _open(db)
    if history is None:
        return 1
    try:
        frame = history.frame(name, group=group)
        if frame.empty:
            return _no_checks(history, name, group)
    finally:
        history.close()
    fig = build_figure(frame, name, group, last)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    print(out)
    return 0


def chart_main(argv: list[str] | None = None) -> int:
    return run_command(chart_command, argv, "anomstream chart")
