"""producer: replays NAB-style CSVs into `input_data`, generates synthetic `transactions`, or
replays a raw log file line by line into `logs`."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import orjson
import pandas as pd

from shared.config import Settings, load_settings
from shared.features import read_series_csv
from shared.kafka import DeliveryTracker, ensure_topics, make_producer, produce
from shared.log import setup_logging
from shared.schemas import iso_utc
from shared.synthetic import transactions


def replay_frame(paths: list[Path]) -> pd.DataFrame:
    """All series merged in time order, as they would have arrived live."""
    frame = pd.concat([read_series_csv(p) for p in paths], ignore_index=True)
    return frame.sort_values("epoch_s", kind="stable", ignore_index=True)


def encode(frame: pd.DataFrame) -> tuple[list[bytes], list[bytes]]:
    stamps = iso_utc(frame["epoch_s"].to_numpy())
    keys = [s.encode() for s in frame["series"]]
    values = [
        orjson.dumps({"series": s, "timestamp": t, "value": v})
        for s, t, v in zip(frame["series"].tolist(), stamps, frame["value"].tolist())
    ]
    return keys, values


def encode_log_lines(path: Path, session_key: str) -> tuple[list[bytes | None], list[bytes]]:
    """Each non-empty line of a raw log as a plain-text message, keyed by the first session key it
    names (so with several partitions a session's lines stay in one, in order); no key otherwise."""
    pattern = re.compile(session_key)
    keys, values = [], []
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            match = pattern.search(line.decode("utf-8", errors="replace"))
            keys.append(match.group(0).encode() if match else None)
            values.append(line)
    return keys, values


def send(settings: Settings, topic: str, keys: list[bytes], values: list[bytes], rate: float | None = None,
         log=None) -> int:
    """Produce every message, paced at `rate` msgs/s if given; returns the count acknowledged.
    Raises if any message was not acknowledged by the broker."""
    ensure_topics(settings)
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    start = time.monotonic()
    for i, (key, value) in enumerate(zip(keys, values)):
        if rate:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        produce(producer, topic, value, key, on_delivery=tracker)
        if i % 10000 == 0:
            producer.poll(0)
    tracker.flush(producer)
    elapsed = time.monotonic() - start
    if log:
        log.info("produced", topic=topic, messages=tracker.delivered, seconds=round(elapsed, 3),
                 msgs_per_s=round(tracker.delivered / max(elapsed, 1e-9)))
    return tracker.delivered


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
        keys, values = encode(replay_frame(paths))
    else:
        topic = args.topic or settings.topic_transactions
        keys, values = encode(transactions(args.count, args.outlier_prob, seed=args.seed))
    try:
        send(settings, topic, keys, values, args.rate, log)
    except Exception as exc:  # delivery failures: report and exit non-zero, never silently
        log.error("produce failed", topic=topic, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
