"""The per-series state store: slots, export/import per series, continuity of scores across an
export and a load (what a restart or a rebalance does), refusal of foreign states."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics.likelihood import AnomalyLikelihood
from models.metrics.model_set import ModelSet
from models.metrics.scorer import Scorer
from models.state import FEW_KEYS, PENDING_KEYS, SeriesState


def store(capacity: int = 2) -> SeriesState:
    return SeriesState({"x": (np.float64, (3,)), "n": (np.int64, ())}, "test", capacity=capacity)


def test_slots_are_stable_reused_and_grow():
    s = store()
    first = s.slots(["a", "b", "a", "c"])
    assert first[0] == first[2] and len(set(first.tolist())) == 3 and len(s) == 3
    np.testing.assert_array_equal(s.slots(["c", "a"]), [first[3], first[0]])
    s.arrays["x"][first[1]] = 7.0
    s.drop([first[1]])
    assert s.find(["b"])[0] == -1 and len(s) == 2
    again = s.slots(["b"])[0]
    assert (s.arrays["x"][again] == 0).all(), "a re-added series starts from fresh state"


def test_lookup_across_index_rebuilds():
    s = store()
    keys = np.array([f"k{i}" for i in range(PENDING_KEYS * 2 + 10)], dtype=object)
    slots = np.concatenate([s.slots(keys[i:i + 1000]) for i in range(0, len(keys), 1000)])
    assert len(set(slots.tolist())) == len(keys)
    np.testing.assert_array_equal(s.find(keys), slots)
    np.testing.assert_array_equal(s.find(["nope", "k3"]), [-1, slots[3]])


def test_a_few_keys_are_found_one_by_one_as_the_vectorised_lookup_finds_them():
    s = store()
    indexed = s.slots([f"k{i}" for i in range(PENDING_KEYS + 1)])  # past PENDING_KEYS: in the hashed index
    pending = s.slots(["p0", "p1"])  # added since: in the pending dict
    few = ["k3", "p1", "nope", f"k{PENDING_KEYS}", "p0"]
    assert len(few) <= FEW_KEYS
    expected = [indexed[3], pending[1], -1, indexed[-1], pending[0]]
    np.testing.assert_array_equal(s.find(few), expected)
    np.testing.assert_array_equal(s.find(few + ["x"] * FEW_KEYS)[:len(few)], expected)  # the vectorised path


def test_dropping_keys_added_since_the_last_rebuild_and_indexed_ones():
    s = store()
    indexed = s.slots([f"k{i}" for i in range(PENDING_KEYS + 1)])
    new = s.slots(["p0"])[0]
    s.drop([new])  # pending only: no rebuild needed, and none done
    assert s.find(["p0"])[0] == -1 and "p0" not in s._pending and len(s) == PENDING_KEYS + 1
    assert s.slots(["p0"])[0] == new, "the freed slot is reused"
    s.drop([indexed[5], new])  # an indexed key among them: the index is rebuilt
    assert s.find(["k5"])[0] == -1 and s.find(["p0"])[0] == -1 and s.find(["k6"])[0] == indexed[6]
    np.testing.assert_array_equal(s.find([f"k{i}" for i in range(10)]) >= 0, [i != 5 for i in range(10)])


def test_export_load_round_trip_and_refusal():
    s = store()
    slots = s.slots(["a", "b"], partition=1, event_time=[10.0, 20.0])
    s.arrays["x"][slots] = [[1, 2, 3], [4, 5, 6]]
    s.arrays["n"][slots] = [5, 6]
    blobs = s.export(slots)
    assert all(len(b) == len(blobs[0]) for b in blobs)
    t = store()
    assert t.load(["a", "b"], blobs, partition=1) == 2
    got = t.find(["a", "b"])
    np.testing.assert_array_equal(t.arrays["x"][got], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(t.last_seen[got], [10.0, 20.0])
    assert not t.dirty[got].any(), "a loaded state is in the changelog already"
    other = SeriesState({"x": (np.float64, (3,)), "n": (np.int64, ())}, "other hyper-parameters")
    assert other.load(["a"], blobs[:1]) == 0 and other.stats["states_refused"] == 1
    assert other.check(blobs[0]) and t.check(blobs[0]) is None
    assert t.load(["z"], [b"garbage"]) == 0


def test_dirty_partition_and_idle():
    s = store()
    a = s.slots(["a", "b"], partition=[0, 1], event_time=[100.0, 200.0])
    assert sorted(s.take_dirty().tolist()) == sorted(a.tolist()) and len(s.take_dirty()) == 0
    np.testing.assert_array_equal(s.in_partitions([1]), [a[1]])
    assert len(s.idle(before=150.0)) == 0, "idle but with no stored copy yet: kept"
    s.stored_at[a] = [7, 8]  # their changelog records were acknowledged
    np.testing.assert_array_equal(s.idle(before=150.0), [a[0]])
    s.slots(["a"], partition=0, event_time=[300.0])
    assert len(s.idle(before=150.0)) == 0, "changed (not yet written) or recent: not idle"
    s.drop([a[0]])
    assert s.stored_at[a[0]] == -1, "a dropped slot forgets where its copy was"


@pytest.fixture(scope="module")
def ec2_cpu(model_dir) -> ModelSet:
    return ModelSet.load(model_dir, "ec2_cpu")


def stream(n: int = 3000, n_series: int = 5, seed: int = 3):
    rng = np.random.default_rng(seed)
    series = np.array([f"s{i % n_series}" for i in range(n)], dtype=object)
    t = 1.7e9 + (np.arange(n) // n_series) * 300.0
    values = rng.normal(50, 5, n)
    values[2500:2550] += 60  # an anomaly in every series, after the learning period
    return series, t, values


def test_scores_continue_exactly_after_export_and_load(ec2_cpu):
    """A restart or a rebalance: the state exported mid-stream and loaded into a new Scorer gives
    exactly the scores an uninterrupted Scorer gives."""
    series, t, values = stream()
    whole = Scorer(ec2_cpu).score(series, t, values)
    first, cut = Scorer(ec2_cpu), 1800
    first.score(series[:cut], t[:cut], values[:cut])
    keys = first.store.keys[first.store.find(np.unique(series))].tolist()
    blobs = first.store.export(first.store.find(keys))
    second = Scorer(ec2_cpu)
    assert second.store.load(keys, blobs) == len(keys)
    rest = second.score(series[cut:], t[cut:], values[cut:])
    for name, scores in whole.scores.items():
        np.testing.assert_array_equal(rest.scores[name], scores[cut:], err_msg=name)
    assert whole.is_anomaly[cut:].any(), "the stream has alarms to compare"
    # Without the state, the second half relearns: the likelihood is blind (0.5 floor) again.
    cold = Scorer(ec2_cpu).score(series[cut:], t[cut:], values[cut:])
    assert not cold.is_anomaly.any()


def test_state_is_bounded_per_series(ec2_cpu):
    scorer = Scorer(ec2_cpu)
    # The default set: windows, robust z-score, seasonal, two likelihood stages and the default
    # ensemble's quiet counter: 1,962 bytes (README, "Detection quality").
    assert scorer.store.bytes_per_series <= 2048
    series, t, values = stream(n=20_000, n_series=2)
    scorer.score(series, t, values)
    assert scorer.store.bytes_per_series <= 2048 and len(scorer.store) == 2


def test_likelihood_history_past_its_length_stays_close_to_the_exact_window():
    """Past `history` points the blocks drop whole: the alarms stay those of the exact window."""
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 1, 3000)
    raw[2500:2505] += 8
    series = np.array(["s"] * len(raw), dtype=object)
    blocky = AnomalyLikelihood(history=500, blocks=10, learning_period=100).update(series, raw)
    exact = AnomalyLikelihood(history=500, blocks=500, learning_period=100).update(series, raw)
    np.testing.assert_allclose(blocky[:500], exact[:500], rtol=1e-12)
    np.testing.assert_array_equal(blocky >= 0.5, exact >= 0.5)
    assert (exact[2500:2510] >= 0.5).any()
