"""anomstream logs: log anomaly detection.

  anomstream logs parse FILE [--out CSV] [--state PATH] [--truth STRUCTURED_CSV] [--sessions CSV]
  anomstream logs evaluate [--sessions CSV] [--out DIR] [--splits N] [--epochs E] [--ratio R] [--quick]
  anomstream logs train [--sessions CSV] [--templates CSV] [--epochs E] [--ratio R] [--name NAME] [--if-missing]
  anomstream logs render [--split test] [--out FILE] [--open-sessions N] [--seed S]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import pandas as pd

from models.logs.sessions import BLOCK_KEY
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, PATH, LazyGroup, run_command, verbatim
from shared.config import anomstream_home, load_settings


def default_state() -> Path:
    """The drain3 snapshot `logs parse` keeps between runs: <ANOMSTREAM_HOME>/logs/drain3_state.bin."""
    return anomstream_home() / "logs" / "drain3_state.bin"


@click.command("parse", context_settings=CONTEXT,
               help="raw HDFS_v1 log -> structured CSV with an event id per line (drain3)")
@click.argument("file", type=PATH)
@click.option("--out", type=PATH, help="structured CSV (default: FILE's name + _structured.csv, here)")
@click.option("--state", type=PATH, default=None,
              help="drain3 snapshot: reloaded at start, so event ids stay the same across runs "
                   "(default: <ANOMSTREAM_HOME>/logs/drain3_state.bin)")
@click.option("--no-state", is_flag=True, help="start from no template and save none")
@click.option("--max-clusters", type=int, default=None, help="cap on templates (least recently used go)")
@click.option("--truth", type=PATH, help="loghub structured CSV (EventId column) to compare with")
@click.option("--sessions", type=PATH, help="also write the sessions (events per block id) as a sessions CSV")
@click.option("--session-key", default=BLOCK_KEY, show_default=True, help="regex of a session key in a line")
def parse_command(file: Path, out: Path | None, state: Path | None, no_state: bool, max_clusters: int | None,
                  truth: Path | None, sessions: Path | None, session_key: str) -> int:
    from models.logs.sessions import group_sessions, write_sessions_csv
    from models.logs.templates import (
        STRUCTURED_COLUMNS,
        LogTemplateMiner,
        grouping_agreement,
        parse_hdfs_file,
    )

    if not file.exists():
        raise click.UsageError(f"no such file: {file}")
    log = setup_logging(load_settings(), "logs-parse")

    miner = LogTemplateMiner(None if no_state else state or default_state(), max_clusters=max_clusters)
    known = miner.cluster_count
    rows = pd.DataFrame(list(parse_hdfs_file(file, miner)), columns=STRUCTURED_COLUMNS)
    out = out or Path(f"{file.name}_structured.csv")
    rows.to_csv(out, index=False)
    print(f"{len(rows)} lines, {rows['event_id'].nunique()} events ({miner.cluster_count} templates in the miner, "
          f"{miner.cluster_count - known} new) -> {out}")
    if sessions:
        grouped = group_sessions(zip(rows["content"], rows["event_id"]), session_key)
        write_sessions_csv(sessions, grouped)
        print(f"{len(grouped)} sessions -> {sessions}")
    if truth:
        result = grouping_agreement(list(rows["event_id"]), list(pd.read_csv(truth)["EventId"].astype(str)))
        print(f"against {truth.name}: {result['matched_events']} of {result['true_events']} templates matched "
              f"one-to-one ({result['our_events']} found), grouping accuracy {result['grouping_accuracy']:.4f}"
              + (f"; unmatched: {' '.join(result['unmatched'])}" if result["unmatched"] else ""))
    log.info("parsed", file=str(file), lines=len(rows), templates=miner.cluster_count, out=str(out))
    return 0


@click.command("render", context_settings=CONTEXT,
               help="raw HDFS_v1 lines of labelled sessions (for a replay whose answers are known); the labels "
                    "go to FILE.labels.csv")
@click.option("--sessions", type=PATH, default=None,
              help="sessions CSV (default: <data_dir>/hdfs/hdfs_100k_sessions.csv, setting ANOMSTREAM_DATA_DIR)")
@click.option("--split", default="test", show_default=True, help="rows of this Split value ('all': every row)")
@click.option("--out", type=PATH, default=None, help="log file (default: <ANOMSTREAM_HOME>/logs/hdfs_test.log)")
@click.option("--open-sessions", type=int, default=20, show_default=True, help="sessions interleaved at once")
@click.option("--seed", type=int, default=0, show_default=True)
def render_command(sessions: Path | None, split: str, out: Path | None, open_sessions: int, seed: int) -> int:
    from models.logs.render import render_sessions
    from models.logs.sessions import read_sessions_csv

    settings = load_settings()
    sessions = sessions or settings.data_dir / "hdfs" / "hdfs_100k_sessions.csv"
    out = out or settings.home / "logs" / "hdfs_test.log"
    frame = read_sessions_csv(sessions)
    if split != "all":
        frame = frame[frame["Split"] == split]
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = list(render_sessions(list(frame["BlockId"]), list(frame["events"]), seed, open_sessions))
    out.write_text("\n".join(lines) + "\n")
    frame[["BlockId", "Label"]].to_csv(labels_path(out), index=False)
    print(f"{len(lines)} lines of {len(frame)} sessions ({int(frame['y'].sum())} anomalous) -> {out}")
    return 0


def labels_path(log_file: Path) -> Path:
    return log_file.with_name(log_file.name + ".labels.csv")


# `logs train` and `logs evaluate` live in their own modules, imported when they run.
@click.group("logs", cls=LazyGroup, help=verbatim(__doc__), context_settings=CONTEXT, lazy_commands={
    "parse": ("services.jobs.logs:parse_command", "raw HDFS_v1 log -> structured CSV with an event id per line"),
    "evaluate": ("services.jobs.logs_evaluate:command", "session-level log anomaly detection, every model"),
    "train": ("services.jobs.logs_train:command", "the next-event model the log detector service loads"),
    "render": ("services.jobs.logs:render_command", "raw HDFS_v1 lines of labelled sessions, for a replay"),
})
def command() -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream logs")


if __name__ == "__main__":
    sys.exit(main())
