"""Real-Time K-Means: the update rule by hand, the adapter, the elbow, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from models.kmeans.streaming_kmeans import (
    RatePreprocessor,
    RealTimeKMeans,
    StreamingKMeansState,
    decay_factor,
)
from models.metrics.features import VectorBatch


def one_center(center: float, count: float, decay: float, time_unit: str = "batches") -> StreamingKMeansState:
    return StreamingKMeansState([[center]], [count], decay, time_unit)


@pytest.mark.parametrize("decay, center, count", [
    (1.0, 2.5, 4.0),       # a = 1 keeps all history: (0·2 + 4 + 6) / (2 + 2)
    (0.0, 5.0, 2.0),       # a = 0 keeps only the last batch: its mean
    (0.5, 10 / 3, 3.0),    # (0·2·0.5 + 10) / (2·0.5 + 2)
])
def test_update_rule_by_hand(decay, center, count):
    state = one_center(0.0, 2.0, decay)
    state.update(np.array([[4.0], [6.0]]))
    assert state.centers[0, 0] == pytest.approx(center)
    assert state.counts[0] == pytest.approx(count)


def test_update_moves_only_the_nearest_center():
    state = StreamingKMeansState([[0.0, 0.0], [10.0, 10.0]], [1.0, 3.0], decay=1.0)
    state.update(np.array([[9.0, 11.0], [11.0, 13.0]]))  # both nearest the second center; mean (10, 12)
    np.testing.assert_allclose(state.centers, [[0.0, 0.0], [10.0, 3 * 10 / 5 + 2 * 12 / 5]])
    np.testing.assert_allclose(state.counts, [1.0, 5.0])


@pytest.mark.parametrize("half_life", [1, 4, 10])
def test_half_life_halves_a_points_weight_after_that_many_steps(half_life):
    a = decay_factor(half_life=half_life)
    # Cluster 0 holds one old point; every later batch lands in cluster 1 only.
    state = StreamingKMeansState([[0.0], [100.0]], [1.0, 1.0], a, "batches")
    for _ in range(half_life):
        state.update(np.array([[100.0]]))
    assert state.counts[0] == pytest.approx(0.5)
    assert state.centers[0, 0] == 0.0  # weight fades, the center stays


def test_time_unit_points_ages_by_batch_size():
    a = decay_factor(half_life=4)
    state = StreamingKMeansState([[0.0], [100.0]], [1.0, 1.0], a, "points")
    state.update(np.full((4, 1), 100.0))  # one batch of 4 points = 4 steps
    assert state.counts[0] == pytest.approx(0.5)


def test_bad_decay_values_are_refused():
    for kwargs in ({"decay": 1.5}, {"decay": -0.1}, {"half_life": 0}):
        with pytest.raises(ValueError):
            decay_factor(**kwargs)


def test_a_dying_cluster_is_split_from_the_largest_as_spark_does():
    state = StreamingKMeansState([[0.0], [50.0]], [1.0, 1e-9], decay=1.0)
    state.update(np.array([[1.0]]))
    assert state.counts[0] == pytest.approx(state.counts[1])
    assert abs(state.centers[1, 0] - state.centers[0, 0]) < 1e-12 * max(1.0, abs(state.centers[0, 0]))


def blobs(sizes=(50, 30, 20), seed=0) -> tuple[VectorBatch, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.array([[100.0, 5000.0], [1000.0, 90000.0], [10000.0, 500.0]])
    rows, labels = [], []
    for i, n in enumerate(sizes):
        rows.append(means[i] * np.exp(rng.normal(0, 0.05, (n, 2))))
        labels += [i] * n
    X = np.vstack(rows)
    return VectorBatch(np.arange(len(X), dtype=float), ["messages_in", "bytes_in"], X), np.array(labels)


def test_adapter_hands_batch_centers_and_training_counts_to_the_stream():
    batch, labels = blobs()
    det = RealTimeKMeans(k=3).fit(batch)
    assert sorted(det.state.counts.tolist()) == [20.0, 30.0, 50.0]
    Z = det.preprocessor.transform(batch)
    for i in range(3):  # each center is its blob's mean, carrying its blob's size
        mean = Z[labels == i].mean(axis=0)
        j = int(np.linalg.norm(det.state.centers - mean, axis=1).argmin())
        np.testing.assert_allclose(det.state.centers[j], mean, atol=1e-9)
        assert det.state.counts[j] == (labels == i).sum()


def test_elbow_finds_three_blobs():
    batch, _ = blobs(sizes=(60, 60, 60))
    det = RealTimeKMeans(k=None, k_max=8).fit(batch)
    assert det.elbow["chosen"] == 3
    assert det.elbow["k"] == list(range(1, 9))
    assert all(a >= b for a, b in zip(det.elbow["inertia"], det.elbow["inertia"][1:]))


def test_preprocessing_drops_constant_and_duplicate_columns():
    rng = np.random.default_rng(1)
    a = rng.uniform(10, 1000, 200)
    X = np.column_stack([a, a * 70, np.full(200, 7.0), rng.uniform(1, 5, 200)])
    pre = RatePreprocessor().fit(VectorBatch(np.arange(200.0), ["m", "m_bytes", "flat", "other"], X))
    assert pre.columns == ["m", "other"]
    assert pre.dropped == {"m_bytes": "correlated with m", "flat": "constant"}
    Z = pre.transform(VectorBatch(np.arange(200.0), ["other", "m"], X[:, [3, 0]]))  # order by name
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-9)


def stream(seed=3) -> tuple[VectorBatch, VectorBatch, np.ndarray]:
    """History of normal rows, then a stream with two bursts and one large message."""
    rng = np.random.default_rng(seed)
    n = 400
    msgs = 250 * np.exp(rng.normal(0, 0.05, n))
    msgs[::40] += 100  # a normal periodic batch
    X = np.column_stack([msgs, msgs * 90 * np.exp(rng.normal(0, 0.05, n)), rng.uniform(8, 12, n)])
    truth = np.zeros(n, bool)
    for i in (250, 330):
        X[i, :2] *= 200
        truth[i] = True
    X[300, 1] += 960_000
    truth[300] = True
    cols = ["messages_in", "bytes_in", "fetch_requests"]
    t = np.arange(n, dtype=float)
    return VectorBatch(t[:200], cols, X[:200]), VectorBatch(t[200:], cols, X[200:]), truth[200:]


def test_warm_model_flags_the_injected_rows_and_nothing_else():
    history, live, truth = stream()
    det = RealTimeKMeans().fit(history)
    flags = det.decide(det.for_stream().score(live))
    np.testing.assert_array_equal(flags, truth)


def test_scores_do_not_depend_on_how_the_stream_is_cut_into_batches():
    history, live, _ = stream()
    det = RealTimeKMeans(mini_batch=7, decay=0.9).fit(history)
    whole = det.for_stream().score(live)
    pieces = det.for_stream()
    cuts = [0, 1, 5, 17, 18, 90, len(live)]
    parts = [pieces.score(VectorBatch(live.timestamps[a:b], live.columns, live.values[a:b]))
             for a, b in zip(cuts, cuts[1:])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_checkpoint_restore_gives_identical_scores(tmp_path):
    history, live, _ = stream()
    det = RealTimeKMeans(mini_batch=7, half_life=50).fit(history)
    straight = det.for_stream()
    uninterrupted = straight.score(live)
    first = det.for_stream()
    head = first.score(VectorBatch(live.timestamps[:45], live.columns, live.values[:45]))  # mid mini-batch
    first.save(tmp_path / "ckpt")
    resumed = RealTimeKMeans.load(tmp_path / "ckpt")
    assert resumed.rows_seen == 45 and len(resumed.pending) > 0
    tail = resumed.score(VectorBatch(live.timestamps[45:], live.columns, live.values[45:]))
    np.testing.assert_array_equal(np.concatenate([head, tail]), uninterrupted)
    np.testing.assert_array_equal(resumed.state.centers, straight.state.centers)
    np.testing.assert_array_equal(resumed.state.counts, straight.state.counts)
    assert not np.array_equal(resumed.state.centers, det.state.centers)  # the stream did move it


def test_warm_scores_are_the_same_for_every_seed_and_cold_ones_are_not():
    # Traffic with clusters (as a broker's has: idle, steady, periodic batches); on a structureless
    # blob any partition is as good as another and no start can be seed-free.
    history, _ = blobs(seed=0)
    live, _ = blobs(seed=1)
    warm = [RealTimeKMeans(seed=s).fit(history).score(live) for s in range(3)]
    cold = [RealTimeKMeans(init="random", update_with="all", seed=s).fit(history).score(live) for s in range(3)]
    for w in warm[1:]:
        np.testing.assert_allclose(w, warm[0], rtol=0, atol=1e-9)
    assert max(np.abs(c - cold[0]).max() for c in cold[1:]) > 1e-3


@pytest.mark.parametrize("time_unit", ["batches", "points"])
def test_our_update_rule_matches_spark_mllib(time_unit):
    """The same batches through our StreamingKMeansState and through Spark's StreamingKMeansModel."""
    from models.kmeans.spark_baseline import SparkStreamingKMeansState

    rng = np.random.default_rng(7)
    centers, counts = rng.normal(0, 3, (3, 2)), [5.0, 1.0, 2.0]
    ours = StreamingKMeansState(centers, counts, 0.7, time_unit)
    spark = SparkStreamingKMeansState(centers, counts, 0.7, time_unit)
    for size in (4, 1, 9, 3):
        batch = rng.normal(0, 3, (size, 2))
        ours.update(batch)
        spark.update(batch)
        np.testing.assert_allclose(ours.centers, spark.centers, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours.counts, spark.counts, rtol=1e-12)


def test_recorded_scenario_warm_model_flags_every_injected_anomaly_and_nothing_else():
    """models/kmeans/data/kafka_load.csv: one recorded `anomstream scenario kafka-load` run on the real broker."""
    import pandas as pd

    from services.jobs.compare import DEFAULT_DATA, confusion_rates, split

    frame = pd.read_csv(DEFAULT_DATA)
    history, live, truth, _ = split(frame, 0.4)
    assert truth.sum() == 6 and not frame["is_anomaly"][: len(history)].any()
    scores = []
    for seed in (0, 1, 2):
        det = RealTimeKMeans(seed=seed).fit(history)
        scores.append(det.score(live))
        rates = confusion_rates(truth, det.decide(scores[-1]))
        assert min(rates[m] for m in ("TPR", "TNR", "PPV", "NPV")) >= 0.99, rates
    np.testing.assert_array_equal(scores[1], scores[0])
    np.testing.assert_array_equal(scores[2], scores[0])


def test_confusion_rates_and_center_spread():
    from services.jobs.compare import center_spread, confusion_rates

    r = confusion_rates(np.array([1, 1, 0, 0, 0], bool), np.array([1, 0, 1, 0, 0], bool))
    assert (r["TPR"], r["TNR"], r["PPV"], r["NPV"]) == (0.5, 2 / 3, 0.5, 2 / 3)
    a = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert center_spread([a, a[::-1]]) == {"mean": 0.0, "max": 0.0}  # same centers, other order
    assert center_spread([a, a + [0.0, 3.0]])["mean"] == pytest.approx(3.0)


def test_compare_command_writes_its_report(tmp_path):
    import json

    from services.jobs.compare import main

    assert main(["kmeans", "--seeds", "2", "--spark", "no", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report["models"]) == {"warm_realtime_kmeans", "cold_streaming_kmeans"}
    warm = report["models"]["warm_realtime_kmeans"]
    assert warm["TPR"]["min"] >= 0.99 and warm["PPV"]["min"] >= 0.99
    assert warm["score_max_abs_diff_across_seeds"] == 0.0
    assert report["models"]["cold_streaming_kmeans"]["center_distance_across_seeds"]["mean"] > 0
    for name in ("results.csv", "elbow.png", "scores.png"):
        assert (tmp_path / name).stat().st_size > 1000
