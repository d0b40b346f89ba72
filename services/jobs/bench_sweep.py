"""The bench's cardinality sweep: the cost of scoring a message, and the memory a series holds, as
the number of live series grows (issue 14). In-process, one thread, no broker: the shipped Scorer
(the detector workers' scoring path, with what setting `scoring` asks computed) on batches of
`batch` messages spread evenly over N series, for each N asked (8, 1000, 100000 by default).

Every series starts from a steady state, not a blank one: the NAB EC2 series are scored for
WARM_POINTS points each (past the likelihood stages' learning period), their states exported, and
series i of N gets the state of NAB series i mod 8 (`SeriesState.load`) and continues that series'
data. Then one pass over all N series (at least two batches) warms the store and the caches up,
unmeasured; then the measured batches (each series seen at least twice more, at least
MIN_MEASURED batches), the N interleaved batch by batch so that a change of load on the machine
falls on all of them alike.

Reported per N: microseconds per message over the measured batches, as process CPU time (the
cost, which other work on a shared machine inflates less than the wall clock) and as wall clock; and for the largest N, the growth of the process's resident memory (VmRSS) from before
its series were created to after their warm-up pass, per series: the store's arrays, the keys and
their index, beside `store.bytes_per_series` (the state record alone).
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import numpy as np

from models.inference import limit_threads
from models.metrics.features import replay_frame
from models.metrics.model_set import ModelSet
from models.metrics.scorer import Scorer

WARM_POINTS = 1000  # per NAB series before its state is copied: past the 300-point learning period
MIN_MEASURED = 10  # measured batches per series count, at least
LOAD_CHUNK = 5000  # states loaded per call (keeps the transient blobs small for the RSS figure)
TARGET_COST_RATIO = 1.5  # us/msg at the largest N over us/msg at the smallest N, at most
TARGET_STATE_BYTES = 2048  # streaming state per series, at most


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc/self/status VmRSS); 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Fleet:
    """N series replicating the NAB EC2 series (series i continues NAB series i mod k from point
    `start`); a replica past the end of its NAB series starts it again, shifted forward in time."""

    def __init__(self, bases: list[tuple[np.ndarray, np.ndarray]], n_series: int, start: int, tag: str):
        self.k = len(bases)
        self.n = n_series
        self.start = start
        self.lengths = np.array([len(t) for t, _ in bases])
        width = self.lengths.max()
        self.times = np.zeros((self.k, width))
        self.values = np.zeros((self.k, width))
        for b, (t, v) in enumerate(bases):
            self.times[b, :len(t)], self.values[b, :len(v)] = t, v
        steps = [float(np.median(np.diff(t))) if len(t) > 1 else 300.0 for t, _ in bases]
        self.periods = np.array([t[-1] - t[0] + step for (t, _), step in zip(bases, steps)])
        self.names = np.array([f"sweep{tag}-{i}" for i in range(n_series)], dtype=object)

    def rows(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows first .. first+count-1 of the interleaved stream: row r is point r // N of series r % N."""
        r = np.arange(first, first + count)
        s, p = r % self.n, r // self.n + self.start
        b = s % self.k
        q, wraps = p % self.lengths[b], p // self.lengths[b]
        return self.names[s], self.times[b, q] + wraps * self.periods[b], self.values[b, q]


def warm_states(model_set: ModelSet, bases: list[tuple[np.ndarray, np.ndarray]], batch: int,
                scoring: str = "lean") -> list[bytes]:
    """Each NAB series scored for its first WARM_POINTS points (interleaved, in batches); returns
    their exported states, in base order. Also compiles the kernels and traces the network."""
    scorer = Scorer(model_set, scoring=scoring)
    fleet = Fleet(bases, len(bases), 0, "warm")
    total = WARM_POINTS * len(bases)
    for first in range(0, total, batch):
        scorer.score(*fleet.rows(first, min(batch, total - first)))
    return scorer.store.export(scorer.store.find(fleet.names))


def cardinality_sweep(model_dir: Path, model_name: str, nab_paths: list[Path], counts: list[int],
                      batch: int = 5000, say=lambda text: None, scoring: str = "lean") -> dict:
    """Runs the sweep; returns {"batch", "us_per_msg" (CPU), "wall_us_per_msg" (series count -> us),
    "measured_msgs" (series count -> messages timed), "state_bytes_per_series",
    "rss_bytes_per_series", "rss_series" (the series count it was measured at), "cost_ratio"
    (largest over smallest N), "seconds"}."""
    started = time.monotonic()
    counts = sorted(set(counts))
    limit_threads(1)
    model_set = ModelSet.load(model_dir, model_name)
    frame = replay_frame(nab_paths)
    bases = [(g["epoch_s"].to_numpy(np.float64), g["value"].to_numpy(np.float64))
             for _, g in frame.groupby("series", sort=True)]
    say(f"sweep: model set {model_name} loaded ({time.monotonic() - started:.0f}s)")
    blobs = warm_states(model_set, bases, batch, scoring)
    say(f"sweep: {len(bases)} NAB series warmed up for {WARM_POINTS} points each ({time.monotonic() - started:.0f}s)")
    gc.collect()
    gc.freeze()  # as a detector worker does once its models are loaded

    runs = []
    rss_per_series = None
    for n in counts:
        rss0 = rss_bytes()
        fleet = Fleet(bases, n, WARM_POINTS, str(n))
        scorer = Scorer(model_set, scoring=scoring)
        for i in range(0, n, LOAD_CHUNK):
            keys = fleet.names[i:i + LOAD_CHUNK].tolist()
            scorer.store.load(keys, [blobs[j % fleet.k] for j in range(i, i + len(keys))])
        warmup = max(2, math.ceil(n / batch))
        for j in range(warmup):
            scorer.score(*fleet.rows(j * batch, batch))
        if n == counts[-1]:
            rss_per_series = (rss_bytes() - rss0) / n
        measured = max(MIN_MEASURED, math.ceil(2 * n / batch))
        runs.append({"n": n, "fleet": fleet, "scorer": scorer, "next": warmup * batch, "left": measured,
                     "wall": 0.0, "cpu": 0.0, "msgs": 0})
        say(f"sweep: {n} series loaded and warmed up ({warmup} batch(es), "
            f"{time.monotonic() - started:.0f}s)")

    while any(run["left"] for run in runs):
        for run in runs:
            if not run["left"]:
                continue
            rows = run["fleet"].rows(run["next"], batch)
            w0, c0 = time.perf_counter(), time.process_time()
            run["scorer"].score(*rows)
            run["wall"] += time.perf_counter() - w0
            run["cpu"] += time.process_time() - c0
            run["next"] += batch
            run["msgs"] += batch
            run["left"] -= 1

    gc.unfreeze()
    us = {run["n"]: round(run["cpu"] / run["msgs"] * 1e6, 2) for run in runs}
    wall_us = {run["n"]: round(run["wall"] / run["msgs"] * 1e6, 2) for run in runs}
    held = {run["n"]: len(run["scorer"].store) for run in runs}
    if any(held[n] != n for n in counts):
        raise RuntimeError(f"sweep: the stores hold {held} series, not the series counts asked")
    return {
        "batch": batch,
        "us_per_msg": us,
        "wall_us_per_msg": wall_us,
        "measured_msgs": {run["n"]: run["msgs"] for run in runs},
        "state_bytes_per_series": runs[0]["scorer"].store.bytes_per_series,
        "rss_bytes_per_series": None if rss_per_series is None else round(rss_per_series, 1),
        "rss_series": counts[-1],
        "cost_ratio": round(us[counts[-1]] / us[counts[0]], 2),
        "seconds": round(time.monotonic() - started, 1),
    }


def summary(sweep: dict) -> str:
    """One line per figure, each beside its target."""
    lo, hi = min(sweep["us_per_msg"]), max(sweep["us_per_msg"])
    costs = ", ".join(f"{n} series {us} us/msg CPU ({sweep['wall_us_per_msg'][n]} wall)"
                      for n, us in sweep["us_per_msg"].items())
    rss = sweep["rss_bytes_per_series"]
    return (f"sweep ({sweep['batch']}-message batches, one thread): {costs}; "
            f"cost at {hi} series / at {lo}: {sweep['cost_ratio']}x (target <= {TARGET_COST_RATIO}x); "
            f"state per series {sweep['state_bytes_per_series']} B (target <= {TARGET_STATE_BYTES} B), "
            f"process RSS growth per series at {sweep['rss_series']} series "
            f"{'n/a' if rss is None else f'{rss:.0f} B'} (target <= {TARGET_STATE_BYTES} B)")
