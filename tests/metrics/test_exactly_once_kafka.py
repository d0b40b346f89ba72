"""Exactly-once scoring with per-series state that survives faults, on the real broker (issue 14).

Under read_committed, `scores` must hold exactly one record per input -- 0 lost, 0 duplicated --
and every score must equal the score of an uninterrupted run over the same input (the per-series
state continues exactly: no series learns again), after:
- the whole detector (supervisor and workers) SIGKILLed twice mid-stream and restarted (on a
  broker of its own);
- the broker SIGKILLed mid-stream and restarted (the detector and the feeder keep running);
- a scale-out mid-stream from 1 worker to 3 (a second detector joins the group) and back.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import orjson
import pytest
from helpers import as_settings, running, series_frame, wait_until, worker_pids

from models.metrics.model_set import ModelSet
from models.metrics.scorer import Scorer
from shared.kafka import committed_offsets, end_offsets, ensure_topics, read_topic, send
from shared.local_broker import LocalBroker, free_port
from shared.records.metrics import encode_metric_frame

N_SERIES = 6
POINTS = 1500  # per series: past the likelihood stage's 300-point learning period
# The streaming outputs must match bit for bit; the network's output may differ in the last bits
# with the batch it was computed in (oneDNN).
EXACT = ("value_likelihood", "seasonal", "seasonal_likelihood", "or[v+s]@0.5q100", "isolation_forest")


def input_frame():
    base = series_frame().head(POINTS)
    frames = []
    for i in range(N_SERIES):
        f = base.copy()
        f["series"] = f"host-{i}"
        f["value"] = f["value"] * (1 + 0.2 * i) + i
        frames.append(f)
    import pandas as pd

    return pd.concat(frames).sort_values(["epoch_s", "series"], kind="stable", ignore_index=True)


def reference(model_dir, frame) -> dict[tuple[str, str], dict[str, float]]:
    """(series, ISO timestamp) -> the scores of one uninterrupted Scorer over the whole input."""
    scored = Scorer(ModelSet.load(model_dir, "ec2_cpu")).score(
        frame["series"].to_numpy(), frame["epoch_s"].to_numpy(), frame["value"].to_numpy())
    keys, values = encode_metric_frame(frame)
    out = {}
    for j, v in enumerate(values):
        rec = orjson.loads(v)
        out[(rec["series"], rec["timestamp"])] = {n: float(s[j]) for n, s in scored.scores.items()}
    return out


def check_scores(settings, expected: dict, exactly_once: bool = True) -> None:
    """One record per input (at-least-once: at least one, repeats identical), each equal to the
    uninterrupted run's scores."""
    records = [orjson.loads(m.value()) for m in read_topic(settings, settings.topic_scores, idle=5, timeout=180)]
    keys = [(r["series"], r["timestamp"]) for r in records]
    duplicated = len(keys) - len(set(keys))
    lost = set(expected) - set(keys)
    assert not lost and set(keys) == set(expected) and (duplicated == 0 or not exactly_once), \
        f"{len(keys)} score records for {len(expected)} inputs: {duplicated} duplicated, {len(lost)} lost"
    for rec, key in zip(records, keys):
        want = expected[key]
        for name in EXACT:
            assert rec["scores"][name] == want[name], (key, name, rec["scores"][name], want[name])
        assert rec["scores"]["lstm_autoencoder"] == pytest.approx(want["lstm_autoencoder"], rel=1e-4, abs=1e-6)
    flagged = sum(r["is_anomaly"] for r in records)
    print(f"{len(records)} score records for {len(expected)} inputs ({duplicated} repeated), all equal to the "
          f"uninterrupted run; {flagged} anomalies")


def produce_paced(settings, frame, rate: float) -> threading.Thread:
    keys, values = encode_metric_frame(frame)
    thread = threading.Thread(target=send, args=(settings, settings.topic_input, keys, values, rate), daemon=True)
    thread.start()
    return thread


def scored(settings) -> int:
    try:
        return sum(end_offsets(settings, settings.topic_scores, timeout=5).values())
    except Exception:  # the broker is down for a moment
        return 0


def all_inputs_committed(settings) -> bool:
    """The detector group committed every input (under exactly-once, with its transaction)."""
    try:
        end = end_offsets(settings, settings.topic_input, timeout=5)
        return committed_offsets(settings, settings.consumer_group, settings.topic_input, end) == end
    except Exception:  # the broker is down for a moment
        return False


def kill_detector(detector) -> None:
    workers = worker_pids(detector.proc.pid)
    os.kill(detector.proc.pid, signal.SIGKILL)
    for pid in workers:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    detector.proc.wait()
    wait_until(lambda: not any(running(pid) for pid in workers), 20, "the killed workers gone")


@pytest.fixture
def own_broker(model_dir, tmp_path):
    """A broker of the test's own (it is killed), the detector's settings on it, and the expected
    scores of the input a paced feeder starts producing when the test calls `feed()`."""
    broker = LocalBroker(tmp_path / "broker", port=free_port(), controller_port=free_port())
    broker.start()
    try:
        overrides = {"bootstrap_servers": broker.bootstrap, "model_dir": str(model_dir), "workers": 3,
                     "batch_size": 500, "poll_timeout_s": "0.1", "delivery": "exactly_once",
                     "home": str(tmp_path / "home")}
        settings = as_settings(overrides)
        ensure_topics(settings)
        frame = input_frame()
        yield (broker, overrides, settings, reference(model_dir, frame),
               lambda part=slice(None): produce_paced(settings, frame.iloc[part], 700))
    finally:
        broker.stop()


def finish(settings, detector, feeder, expected) -> None:
    """The feeder done, every input committed, one score per input equal to the uninterrupted run's."""
    feeder.join(300)
    assert not feeder.is_alive()
    wait_until(lambda: all_inputs_committed(settings), 300, "every input committed", [detector])
    check_scores(settings, expected)


@pytest.mark.kafka
def test_two_kills_of_the_whole_detector_lose_and_duplicate_nothing(own_broker, services):
    broker, overrides, settings, expected, feed = own_broker
    # Each generation of the detector gets its own third of the input, fed once it starts: every
    # generation scores (the last one only from restored state), whatever the start-up takes.
    third = len(expected) // 3
    detector = services("detector", overrides)
    for generation in range(3):
        last = generation == 2
        feeder = feed(slice(generation * third, None if last else (generation + 1) * third))
        if last:
            break
        kill_at = generation * third + third // 2  # mid-stream, a transaction open
        wait_until(lambda: scored(settings) >= kill_at, 240, f"{kill_at} scores", [detector])
        kill_detector(detector)
        feeder.join(300)
        detector = services("detector", overrides)
    finish(settings, detector, feeder, expected)
    assert "series state restored" in detector.log
    assert detector.stop() == 0


@pytest.mark.kafka
def test_a_sigkill_of_the_broker_mid_stream_loses_and_duplicates_nothing(own_broker, services):
    broker, overrides, settings, expected, feed = own_broker
    feeder = feed()
    detector = services("detector", overrides)
    wait_until(lambda: scored(settings) >= 2500, 240, "2500 scores", [detector])
    broker.kill()
    time.sleep(8)  # the detector and the feeder go on against a dead broker
    assert detector.alive()
    broker.start()
    finish(settings, detector, feeder, expected)
    assert "worker died" not in detector.log
    assert detector.stop() == 0


@pytest.mark.kafka
def test_scaling_out_and_back_mid_stream_loses_and_duplicates_nothing(pipeline_settings, model_dir, services):
    overrides = pipeline_settings | {"workers": 1, "batch_size": 500, "delivery": "exactly_once",
                                     "instance_id": "first"}
    settings = as_settings(overrides)
    ensure_topics(settings)
    frame = input_frame()
    expected = reference(model_dir, frame)
    first = services("detector", overrides)
    wait_until(lambda: "worker ready" in first.log, 120, "the first detector ready", [first])
    feeder = produce_paced(settings, frame, rate=600)
    wait_until(lambda: scored(settings) >= 2000, 240, "2000 scores", [first])
    second = services("detector", overrides | {"workers": 2, "instance_id": "second"})  # 1 -> 3 workers
    wait_until(lambda: second.log.count("series state restored") >= 1 and scored(settings) >= 5000, 240,
               "the second detector scoring", [first, second])
    assert second.stop() == 0  # 3 -> 1: its partitions go back to the first
    feeder.join(300)
    wait_until(lambda: all_inputs_committed(settings), 300, "every input committed", [first])
    check_scores(settings, expected)
    assert first.log.count("series state restored") >= 2, "the first detector took partitions back with state"
    assert first.stop() == 0
