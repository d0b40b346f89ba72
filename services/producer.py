"""producer: replays NAB-style CSVs into `input_data`, or generates synthetic `transactions`."""

from __future__ import annotations

import argparse
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
    parser.add_argument("--source", choices=["csv", "synthetic"], default="csv")
    parser.add_argument("paths", nargs="*", type=Path, help="CSV files (default: the 8 NAB EC2 CPU series)")
    parser.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    parser.add_argument("--topic", default=None, help="override the target topic")
    parser.add_argument("--count", type=int, default=10_000, help="synthetic: number of transactions")
    parser.add_argument("--outlier-prob", type=float, default=0.01, help="synthetic: outlier probability")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = load_settings()
    log = setup_logging(settings, "producer")
    if args.source == "csv":
        paths = args.paths or settings.nab_csvs()
        if not paths:
            parser.error(f"no CSV files given and none found under {settings.data_dir}")
        frame, topic = replay_frame(paths), args.topic or settings.topic_input
    else:
        frame = transactions(args.count, args.outlier_prob, seed=args.seed)
        topic = args.topic or settings.topic_transactions
    keys, values = encode(frame)
    try:
        send(settings, topic, keys, values, args.rate, log)
    except Exception as exc:  # delivery failures: report and exit non-zero, never silently
        log.error("produce failed", topic=topic, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
