"""producer: replays NAB-style CSVs into `input_data`, generates synthetic `transactions`, or
replays a raw log file line by line into `logs`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.logs.sessions import encode_log_lines
from models.metrics.features import replay_frame
from models.metrics.synthetic import transactions
from shared.app_logging import setup_logging
from shared.config import load_settings
from shared.kafka import send
from shared.schemas import encode_metric_frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomstream produce", description=__doc__)
    parser.add_argument("--source", choices=["csv", "synthetic", "log"], default="csv")
    parser.add_argument("paths", nargs="*", type=Path,
                        help="CSV files (default: the 8 NAB EC2 CPU series); --source log: raw log files "
                             "(default: the HDFS_2k sample)")
    parser.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    parser.add_argument("--topic", default=None, help="override the target topic")
    parser.add_argument("--count", type=int, default=10_000, help="synthetic: number of transactions")
    parser.add_argument("--outlier-prob", type=float, default=0.01, help="synthetic: outlier probability")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = load_settings()
    log = setup_logging(settings, "producer")
    if args.source == "log":
        paths = args.paths or [settings.data_dir / "hdfs" / "HDFS_2k.log"]
        topic, keys, values = args.topic or settings.topic_logs, [], []
        for path in paths:
            if not path.exists():
                parser.error(f"no such file: {path}")
            k, v = encode_log_lines(path, settings.log_session_key)
            keys, values = keys + k, values + v
    elif args.source == "csv":
        paths = args.paths or settings.nab_csvs()
        if not paths:
            parser.error(f"no CSV files given and none found under {settings.data_dir}")
        topic = args.topic or settings.topic_input
        keys, values = encode_metric_frame(replay_frame(paths))
    else:
        topic = args.topic or settings.topic_transactions
        keys, values = encode_metric_frame(transactions(args.count, args.outlier_prob, seed=args.seed))
    try:
        send(settings, topic, keys, values, args.rate, log)
    except Exception as exc:  # delivery failures: report and exit non-zero, never silently
        log.error("produce failed", topic=topic, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
