"""detector-cost: CPU per message of each streaming component on its own, and of an ensemble
candidate, in 5,000-message batches spread evenly over N series (default 100,000), one thread, no
broker: what a candidate for the default decision costs in the detector workers.

As in the bench's cardinality sweep, series start from a steady state: the NAB EC2 series are
scored for WARM points each, their states exported and loaded into the N series (series i gets
NAB series i mod 8's state and continues its data); then one unmeasured pass over all N series,
then the measured batches (each series seen twice more, at least ten batches). Reported per
component: us/message of process CPU (the state store's slot lookup included, as the Scorer pays
it once per batch) and the state bytes per series.
"""

from __future__ import annotations

import math
import sys
import time

import click
import numpy as np

from models.metrics.ensemble import Ensemble
from models.metrics.features import FeatureBatch, replay_frame
from models.metrics.likelihood import AnomalyLikelihood
from models.metrics.model_set import CANDIDATE_DETECTORS, DETECTORS
from models.state import SeriesState
from shared.cli import CONTEXT, run_command
from shared.config import load_settings

WARM = 1000
BATCH = 5000


class Fleet:
    def __init__(self, bases: list[np.ndarray], n: int, tag: str):
        self.bases, self.n = bases, n
        self.names = np.array([f"{tag}{i}" for i in range(n)], dtype=object)

    def rows(self, first: int, count: int):
        """Row r: point WARM + r // n of series r % n (NAB series (r % n) mod 8, wrapped)."""
        r = np.arange(first, first + count)
        s, p = r % self.n, r // self.n + WARM
        k = len(self.bases)
        values = np.array([self.bases[b][q % len(self.bases[b])] for b, q in zip(s % k, p)])
        return self.names[s], 1.4e9 + p * 300.0, values


def batch_of(series, times, values, store, slots) -> FeatureBatch:
    n = len(values)
    return FeatureBatch(series, times, values, np.zeros((n, 3), np.float32), np.zeros((n, 1, 3), np.float32),
                        store, slots)


def warm_states(bases, fields, schema, step) -> list[bytes]:
    store = SeriesState(fields, schema)
    k = len(bases)
    names = np.array([f"warm{i}" for i in range(k)], dtype=object)
    for p0 in range(0, WARM, 50):
        points = np.repeat(np.arange(p0, p0 + 50), k)
        which = np.tile(np.arange(k), 50)
        series, times = names[which], 1.4e9 + points * 300.0
        values = np.array([bases[b][q % len(bases[b])] for b, q in zip(which, points)])
        step(series, times, values, store, store.slots(series, None, times))
    return store.export(store.find(names))


def measure(bases, n: int, fields: dict, schema: str, step) -> tuple[float, int]:
    """(us/message CPU, state bytes per series) of `step(series, times, values, store, slots)`."""
    blobs = warm_states(bases, fields, schema, step)
    store = SeriesState(fields, schema, capacity=1024)
    fleet = Fleet(bases, n, "s")
    for i in range(0, n, BATCH):
        keys = fleet.names[i:i + BATCH].tolist()
        store.load(keys, [blobs[j % len(blobs)] for j in range(i, i + len(keys))])
    warm = max(2, math.ceil(n / BATCH))
    for j in range(warm):
        series, times, values = fleet.rows(j * BATCH, BATCH)
        step(series, times, values, store, store.slots(series, None, times))
    measured = max(10, math.ceil(2 * n / BATCH))
    cpu = 0.0
    for j in range(measured):
        series, times, values = fleet.rows((warm + j) * BATCH, BATCH)
        c0 = time.process_time()
        step(series, times, values, store, store.slots(series, None, times))
        cpu += time.process_time() - c0
    return cpu / (measured * BATCH) * 1e6, store.bytes_per_series - 8  # without last_time


def components(ensemble: str) -> dict:
    """name -> (fields, schema, step) for each detector, one likelihood stage, and the candidate
    `ensemble` (letters of evaluate's GRID_SOURCES: v value, s seasonal, r robust_zscore, ...)
    with its detectors, likelihood stages and gate (OR at 0.5, quiet 100)."""
    from services.jobs.evaluate import GRID_SOURCES

    out = {}
    for name in ["robust_zscore", *CANDIDATE_DETECTORS]:
        det = DETECTORS[name]()
        out[name] = (det.state_fields(), det.schema(),
                     lambda se, t, v, st, sl, det=det: det.score(batch_of(se, t, v, st, sl)))
    stage = AnomalyLikelihood.for_source("value")
    out["likelihood stage"] = (stage.state_fields(), stage.schema(),
                               lambda se, t, v, st, sl: stage.update(se, v, t, st, sl))
    sources = [GRID_SOURCES[x] for x in ensemble]
    dets = {s: DETECTORS[s]() for s in sources if s != "value"}
    stages = {s: AnomalyLikelihood.for_source(s) for s in sources}
    gate = Ensemble(ensemble, {f"{s}_likelihood": 0.5 for s in sources}, quiet=100)
    parts = [*dets.values(), *stages.values(), gate]

    def candidate(se, t, v, st, sl):
        batch = batch_of(se, t, v, st, sl)
        raw = {"value": v, **{s: d.score(batch) for s, d in dets.items()}}
        return gate.decide(se, {f"{s}_likelihood": stages[s].update(se, raw[s], t, st, sl) for s in sources}, st, sl)

    out[f"or[{'+'.join(ensemble)}]@0.5q100"] = ({k: v for p in parts for k, v in p.state_fields().items()},
                                                "|".join(p.schema() for p in parts), candidate)
    return out


@click.command("detector-cost", help=__doc__, context_settings=CONTEXT)
@click.option("--series", "n", type=int, default=100_000, show_default=True)
@click.option("--ensemble", default="vsr", show_default=True, help="candidate: GRID_SOURCES letters")
@click.option("--only", default=None, help="comma-separated component names")
def command(n: int, ensemble: str, only: str | None) -> int:
    settings = load_settings()
    frame = replay_frame(settings.nab_csvs())
    bases = [g["value"].to_numpy(np.float64) for _, g in frame.groupby("series", sort=True)]
    wanted = None if only is None else set(only.split(","))
    print(f"{BATCH}-message batches over {n} series, one thread, process CPU:")
    for name, (fields, schema, step) in components(ensemble).items():
        if wanted is None or name in wanted:
            us, size = measure(bases, n, fields, schema, step)
            print(f"  {name:<24} {us:6.2f} us/msg   {size:5d} B/series", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream detector-cost")


if __name__ == "__main__":
    sys.exit(main())
