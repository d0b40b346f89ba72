"""Idle series on the real broker (services.detector.series_state): a series silent for
ANOMSTREAM_STATE_IDLE_S (event time) leaves memory, is counted, and when it comes back its state is
read from the changelog record of its last checkpoint, so its scores continue exactly as if it had
never left; a series whose state was never acknowledged is not evicted."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from helpers import SERIES_24AE8D, as_settings

from models.metrics.features import read_series_csv
from models.metrics.model_set import ModelSet
from models.metrics.scorer import Scorer
from services.detector.series_state import SeriesChangelog
from shared.app_logging import setup_logging
from shared.kafka import DeliveryTracker, make_producer

pytestmark = pytest.mark.kafka

STREAMING = ("value_likelihood", "seasonal", "seasonal_likelihood", "or[v+s]@0.5q100", "isolation_forest")


def test_an_idle_series_is_evicted_counted_and_brought_back_from_the_changelog_unchanged(
        kafka_bootstrap, model_dir, tmp_path):
    run = uuid.uuid4().hex[:8]
    settings = as_settings({"bootstrap_servers": kafka_bootstrap, "home": str(tmp_path / "home"),
                            "state_idle_s": 3600, "state_topic_prefix": f"evict-{run}"})
    model_set = ModelSet.load(model_dir, "ec2_cpu")
    scorer = Scorer(model_set)
    changelog = SeriesChangelog(settings, f"input_{run}", scorer.store, setup_logging(settings, "test"))
    changelog.ensure(1)
    producer, tracker = make_producer(settings), DeliveryTracker()

    def step(series: str, times, values):
        """One batch as the detector runs it: bring back, score, checkpoint (acknowledged)."""
        keys = np.full(len(times), series, dtype=object)
        changelog.bring_back(keys)
        result = scorer.score(keys, times, values, partition=0)
        changelog.write_changed(producer, tracker)
        tracker.flush(producer, timeout=30)
        return result.scores

    points = read_series_csv(SERIES_24AE8D)
    t, v = points["epoch_s"].to_numpy(float), points["value"].to_numpy(float)
    a_first, a_back = slice(0, 600), slice(700, 1200)
    step("a", t[a_first], v[a_first])
    step("b", t[:700], v[:700])  # b goes on 100 points (8 h) past a's last point
    changelog.evict(changelog._idle_before())
    assert changelog.stats["series_evicted"] == 1
    assert scorer.store.find(["a", "b"]).tolist()[0] == -1 and scorer.store.find(["b"])[0] >= 0
    got = step("a", t[a_back], v[a_back])  # a comes back after 8 h of silence
    assert changelog.stats["series_brought_back"] == 1
    # The same points of a, scored by one Scorer that never let it go.
    keep = np.r_[0:600, 700:1200]
    want = Scorer(model_set).score(np.full(len(keep), "a", dtype=object), t[keep], v[keep]).scores
    for name in STREAMING:
        np.testing.assert_array_equal(got[name], want[name][600:], err_msg=name)
    cold = Scorer(model_set).score(np.full(500, "a", dtype=object), t[a_back], v[a_back]).scores
    assert not np.array_equal(cold["value_likelihood"], want["value_likelihood"][600:]), \
        "the test cannot tell a restored state from a fresh one"
    # A series whose state was never written is idle but kept: its changelog holds nothing to bring back.
    scorer.score(np.array(["c"], dtype=object), t[:1], v[:1], partition=0)
    scorer.store.take_dirty()
    changelog.evict(t[1199])
    assert scorer.store.find(["c"])[0] >= 0
    changelog.close()


def test_thousands_of_series_coming_back_together_are_read_back_in_one_pass(kafka_bootstrap, model_dir, tmp_path):
    """After a gap in the data every series returns at once: all are read back (one sequential read
    per changelog partition, not one fetch each), each with exactly the state it left with."""
    run = uuid.uuid4().hex[:8]
    settings = as_settings({"bootstrap_servers": kafka_bootstrap, "home": str(tmp_path / "home"),
                            "state_idle_s": 3600, "state_topic_prefix": f"evict-many-{run}"})
    scorer = Scorer(ModelSet.load(model_dir, "ec2_cpu"), scoring="lean")
    changelog = SeriesChangelog(settings, f"input_{run}", scorer.store, setup_logging(settings, "test"))
    changelog.ensure(2)
    producer, tracker = make_producer(settings), DeliveryTracker()
    n = 3000
    names = np.array([f"host-{i}" for i in range(n)], dtype=object)
    for step in range(5):  # five points per series, two checkpoints: older copies precede the last ones
        scorer.score(names, np.full(n, 1.6e9 + 300.0 * step), np.arange(n, dtype=float) + step,
                     partition=np.arange(n) % 2)
        if step in (2, 4):
            changelog.write_changed(producer, tracker)
            tracker.flush(producer, timeout=60)
    before = dict(zip(names.tolist(), scorer.store.export(scorer.store.find(names))))
    changelog.evict(1.6e9 + 300.0 * 4 + 7200)  # two hours later: every series is idle
    assert changelog.stats["series_evicted"] == n and (scorer.store.find(names) < 0).all()
    changelog.bring_back(names)
    assert changelog.stats["series_brought_back"] == n
    slots = scorer.store.find(names)
    assert (slots >= 0).all()
    assert dict(zip(names.tolist(), scorer.store.export(slots))) == before
    assert sorted(set(scorer.store.partition[slots].tolist())) == [0, 1]
    changelog.close()
