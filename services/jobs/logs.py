"""anomstream logs: log anomaly detection.

  anomstream logs parse FILE [--out CSV] [--state PATH] [--truth STRUCTURED_CSV] [--sessions CSV]
  anomstream logs evaluate [--sessions CSV] [--out DIR] [--splits N] [--epochs E] [--quick]
  anomstream logs train [--sessions CSV] [--templates CSV] [--epochs E] [--name NAME] [--if-missing]
  anomstream logs render [--split test] [--out FILE] [--open-sessions N] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from shared.app_logging import setup_logging
from shared.config import REPO_ROOT, load_settings

DEFAULT_STATE = REPO_ROOT / ".cache" / "logs" / "drain3_state.bin"


def parse_main(argv: list[str]) -> int:
    from models.logs.sessions import BLOCK_KEY, group_sessions, write_sessions_csv
    from models.logs.templates import (
        STRUCTURED_COLUMNS,
        LogTemplateMiner,
        grouping_agreement,
        parse_hdfs_file,
    )

    parser = argparse.ArgumentParser(prog="anomstream logs parse",
                                     description="raw HDFS_v1 log -> structured CSV with an event id per line (drain3)")
    parser.add_argument("file", type=Path)
    parser.add_argument("--out", type=Path, help="structured CSV (default: FILE's name + _structured.csv, here)")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help="drain3 snapshot: reloaded at start, so event ids stay the same across runs")
    parser.add_argument("--no-state", action="store_true", help="start from no template and save none")
    parser.add_argument("--max-clusters", type=int, default=None, help="cap on templates (least recently used go)")
    parser.add_argument("--truth", type=Path, help="loghub structured CSV (EventId column) to compare with")
    parser.add_argument("--sessions", type=Path, help="also write the sessions (events per block id) as a sessions CSV")
    parser.add_argument("--session-key", default=BLOCK_KEY, help="regex of a session key in a line")
    args = parser.parse_args(argv)
    if not args.file.exists():
        parser.error(f"no such file: {args.file}")
    log = setup_logging(load_settings(), "logs-parse")

    miner = LogTemplateMiner(None if args.no_state else args.state, max_clusters=args.max_clusters)
    known = miner.cluster_count
    rows = pd.DataFrame(list(parse_hdfs_file(args.file, miner)), columns=STRUCTURED_COLUMNS)
    out = args.out or Path(f"{args.file.name}_structured.csv")
    rows.to_csv(out, index=False)
    print(f"{len(rows)} lines, {rows['event_id'].nunique()} events ({miner.cluster_count} templates in the miner, "
          f"{miner.cluster_count - known} new) -> {out}")
    if args.sessions:
        sessions = group_sessions(zip(rows["content"], rows["event_id"]), args.session_key)
        write_sessions_csv(args.sessions, sessions)
        print(f"{len(sessions)} sessions -> {args.sessions}")
    if args.truth:
        truth = pd.read_csv(args.truth)
        result = grouping_agreement(list(rows["event_id"]), list(truth["EventId"].astype(str)))
        print(f"against {args.truth.name}: {result['matched_events']} of {result['true_events']} templates matched "
              f"one-to-one ({result['our_events']} found), grouping accuracy {result['grouping_accuracy']:.4f}"
              + (f"; unmatched: {' '.join(result['unmatched'])}" if result["unmatched"] else ""))
    log.info("parsed", file=str(args.file), lines=len(rows), templates=miner.cluster_count, out=str(out))
    return 0


def render_main(argv: list[str]) -> int:
    from models.logs.render import render_sessions
    from models.logs.sessions import read_sessions_csv

    settings = load_settings()
    parser = argparse.ArgumentParser(prog="anomstream logs render",
                                     description="raw HDFS_v1 lines of labelled sessions (for a replay whose "
                                                 "answers are known); the labels go to FILE.labels.csv")
    parser.add_argument("--sessions", type=Path, default=settings.data_dir / "hdfs" / "hdfs_100k_sessions.csv")
    parser.add_argument("--split", default="test", help="rows of this Split value ('all': every row)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".cache" / "logs" / "hdfs_test.log")
    parser.add_argument("--open-sessions", type=int, default=20, help="sessions interleaved at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    frame = read_sessions_csv(args.sessions)
    if args.split != "all":
        frame = frame[frame["Split"] == args.split]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = list(render_sessions(list(frame["BlockId"]), list(frame["events"]), args.seed, args.open_sessions))
    args.out.write_text("\n".join(lines) + "\n")
    frame[["BlockId", "Label"]].to_csv(labels_path(args.out), index=False)
    print(f"{len(lines)} lines of {len(frame)} sessions ({int(frame['y'].sum())} anomalous) -> {args.out}")
    return 0


def labels_path(log_file: Path) -> Path:
    return log_file.with_name(log_file.name + ".labels.csv")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "parse":
        return parse_main(argv[1:])
    if argv and argv[0] == "train":
        from services.jobs.logs_train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "render":
        return render_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from services.jobs.logs_evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    print(__doc__.strip())
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
