"""producer: replays NAB-style CSVs into `input_data`, generates synthetic `transactions`, or
replays a raw log file line by line into `logs`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from models.logs.sessions import encode_log_lines
from models.metrics.features import replay_frame
from models.metrics.synthetic import transactions
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, PATH, run_command
from shared.config import load_settings
from shared.kafka import send
from shared.records.metrics import encode_metric_frame


@click.command("produce", context_settings=CONTEXT,
               help=__doc__ + "\n\nPATHS: CSV files (default: the 8 NAB EC2 CPU series); --source log: raw log "
                              "files (default: the HDFS_2k sample).")
@click.option("--source", type=click.Choice(["csv", "synthetic", "log"]), default="csv", show_default=True)
@click.argument("paths", nargs=-1, type=PATH)
@click.option("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
@click.option("--topic", default=None, help="override the target topic")
@click.option("--count", type=int, default=10_000, show_default=True, help="synthetic: number of transactions")
@click.option("--outlier-prob", type=float, default=0.01, show_default=True, help="synthetic: outlier probability")
@click.option("--seed", type=int, default=0, show_default=True)
def command(source: str, paths: tuple[Path, ...], rate: float | None, topic: str | None, count: int,
            outlier_prob: float, seed: int) -> int:
    settings = load_settings()
    log = setup_logging(settings, "producer")
    if source == "log":
        paths = list(paths) or [settings.data_dir / "hdfs" / "HDFS_2k.log"]
        topic, keys, values = topic or settings.topic_logs, [], []
        for path in paths:
            if not path.exists():
                raise click.UsageError(f"no such file: {path}")
            k, v = encode_log_lines(path, settings.log_session_key)
            keys, values = keys + k, values + v
    elif source == "csv":
        paths = list(paths) or settings.nab_csvs()
        if not paths:
            raise click.UsageError(f"no CSV files given and none found under {settings.data_dir}")
        topic = topic or settings.topic_input
        keys, values = encode_metric_frame(replay_frame(paths))
    else:
        topic = topic or settings.topic_transactions
        keys, values = encode_metric_frame(transactions(count, outlier_prob, seed=seed))
    try:
        send(settings, topic, keys, values, rate, log)
    except Exception as exc:  # delivery failures: report and exit non-zero, never silently
        log.error("produce failed", topic=topic, error=str(exc))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream produce")


if __name__ == "__main__":
    sys.exit(main())
