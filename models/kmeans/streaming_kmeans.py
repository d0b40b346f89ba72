"""Real-Time K-Means: a batch K-Means fitted on history hands its centers to a streaming K-Means
that keeps learning with a forgetting factor.

Rows (a broker's per-second rates, one per scrape) -> log1p (rates span orders of magnitude) ->
drop constant and near-duplicate (correlated) columns -> standard scaling fitted on the training
rows -> batch K-Means with k at the elbow of the inertia curve -> adapter: the streaming model
starts from the batch centers, each weighted by the number of training rows in its cluster ->
mini-batch updates  c' = (c·n·a + x̄·m) / (n·a + m),  n' = n·a + m.
A row is anomalous when its distance to the nearest center (of a cluster holding at least
`small_cluster_fraction` of the weight) exceeds a threshold learned from the training distances
(never below `min_threshold`); a row in a small far cluster is therefore anomalous too.

init="random" is the cold-start baseline with Spark MLlib StreamingKMeans semantics: Gaussian
random centers of equal weight, updated with every row (anomalies included), and the split of a
dying cluster; it learns from the training rows as a stream (trainOn) before it scores.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from models.base import ArtifactError, Detector, read_json, write_json
from models.metrics.features import VectorBatch

STATE_FORMAT = 1


def decay_factor(decay: float = 1.0, half_life: float | None = None) -> float:
    """The per-step weight a: 1 keeps all history, 0 keeps only the newest step; a half-life of h
    steps gives a = 0.5 ** (1/h), so a point's weight halves after h steps (Spark's setHalfLife)."""
    if half_life is not None:
        if half_life <= 0:
            raise ValueError("half_life must be > 0")
        return math.exp(math.log(0.5) / half_life)
    if not 0.0 <= decay <= 1.0:
        raise ValueError("decay must be in [0, 1]")
    return float(decay)


class StreamingKMeansState:
    """Centers and their weights (counts), updated one mini-batch at a time."""

    def __init__(self, centers, counts, decay: float = 1.0, time_unit: str = "batches"):
        if time_unit not in ("batches", "points"):
            raise ValueError("time_unit is 'batches' or 'points'")
        self.centers = np.array(centers, dtype=np.float64, ndmin=2)
        self.counts = np.array(counts, dtype=np.float64)
        if len(self.counts) != len(self.centers):
            raise ValueError("one count per center")
        self.decay = float(decay)
        self.time_unit = time_unit

    def distances(self, X: np.ndarray) -> np.ndarray:
        """(n, k) Euclidean distances of each row to each center."""
        diff = X[:, None, :] - self.centers[None, :, :]
        return np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))

    def update(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        if len(X) == 0:  # an empty batch still ages the model when time runs in batches (as Spark)
            if self.time_unit == "batches":
                self.counts = self.counts * self.decay
            return
        k = len(self.centers)
        labels = self.distances(X).argmin(axis=1)
        m = np.bincount(labels, minlength=k).astype(np.float64)
        sums = np.zeros_like(self.centers)
        np.add.at(sums, labels, X)
        # "points": every point ages the model by one step, as in Spark's timeUnit POINTS.
        a = self.decay if self.time_unit == "batches" else self.decay ** len(X)
        kept = self.counts * a
        new_counts = kept + m
        moved = m > 0
        # c' = (c·n·a + x̄·m) / (n·a + m), with x̄·m the sum of the cluster's new points.
        self.centers[moved] = ((self.centers[moved] * kept[moved, None] + sums[moved])
                               / new_counts[moved, None])
        self.counts = new_counts
        self._split_dying_cluster()

    def _split_dying_cluster(self) -> None:
        # Spark: a cluster whose weight fell below 1e-8 of the largest is moved next to the largest
        # one, and the two share its weight, so k clusters stay in use.
        big, small = int(self.counts.argmax()), int(self.counts.argmin())
        if big == small or self.counts[small] >= 1e-8 * self.counts[big]:
            return
        weight = (self.counts[big] + self.counts[small]) / 2.0
        self.counts[big] = self.counts[small] = weight
        x = self.centers[big].copy()
        p = 1e-14 * np.maximum(np.abs(x), 1.0)
        self.centers[big], self.centers[small] = x + p, x - p

    def to_dict(self) -> dict:
        return {"centers": self.centers.tolist(), "counts": self.counts.tolist(), "decay": self.decay,
                "time_unit": self.time_unit}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamingKMeansState":
        return cls(d["centers"], d["counts"], d["decay"], d["time_unit"])


class RatePreprocessor:
    """log1p, then drop constant and near-duplicate columns, then standard scaling; fitted on the
    training rows only. A duplicate adds weight to one direction of the distance, not information.

    A column's scale is at least log(1 + min_change): a rate that hardly moved in training (a
    broker's fetch rate varies ~1%) would otherwise make any ordinary shift of a few percent, such
    as one more consumer group, look like many standard deviations."""

    def __init__(self, correlation_limit: float = 0.995, topic_metrics: bool = False, min_change: float = 0.25):
        self.correlation_limit = correlation_limit
        self.min_change = min_change
        # Per-topic rates ("messages_in:orders") tie a model to topic names; broker-wide ones carry
        # over to any traffic mix, so they are the default.
        self.topic_metrics = topic_metrics
        self.columns: list[str] = []  # kept, in input order
        self.dropped: dict[str, str] = {}  # column -> why
        self.mean = np.empty(0)
        self.scale = np.empty(0)

    def fit(self, batch: VectorBatch) -> "RatePreprocessor":
        Z = np.log1p(np.clip(batch.values, 0.0, None))
        std = Z.std(axis=0)
        kept: list[int] = []
        for j, name in enumerate(batch.columns):
            if ":" in name and not self.topic_metrics:
                self.dropped[name] = "per-topic (topic_metrics=False)"
                continue
            if std[j] <= 1e-9 * (1.0 + abs(Z[:, j].mean())):
                self.dropped[name] = "constant"
                continue
            twin = next((i for i in kept if abs(np.corrcoef(Z[:, i], Z[:, j])[0, 1]) >= self.correlation_limit),
                        None)
            if twin is not None:
                self.dropped[name] = f"correlated with {batch.columns[twin]}"
                continue
            kept.append(j)
        if not kept:
            raise ValueError("every metric column is constant in the training rows; nothing to cluster")
        self.columns = [batch.columns[j] for j in kept]
        self.mean, self.scale = Z[:, kept].mean(axis=0), np.maximum(std[kept], math.log1p(self.min_change))
        return self

    def transform(self, batch: VectorBatch) -> np.ndarray:
        Z = np.log1p(np.clip(batch.matrix(self.columns), 0.0, None))
        return (Z - self.mean) / self.scale

    def to_dict(self) -> dict:
        return {"correlation_limit": self.correlation_limit, "topic_metrics": self.topic_metrics,
                "min_change": self.min_change, "columns": self.columns, "dropped": self.dropped,
                "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "RatePreprocessor":
        pre = cls(d["correlation_limit"], d["topic_metrics"], d["min_change"])
        pre.columns, pre.dropped = list(d["columns"]), dict(d["dropped"])
        pre.mean, pre.scale = np.array(d["mean"], dtype=np.float64), np.array(d["scale"], dtype=np.float64)
        return pre


def elbow_k(ks: list[int], inertia: list[float]) -> int:
    """k at the knee of the (convex, decreasing) inertia curve; 2 when the curve has no knee."""
    from kneed import KneeLocator

    if len(ks) < 3:
        return ks[-1]
    knee = KneeLocator(ks, inertia, curve="convex", direction="decreasing").knee
    return int(knee) if knee is not None else min(2, ks[-1])


class RealTimeKMeans(Detector):
    name = "realtime_kmeans"
    state_class = StreamingKMeansState  # where the update rule runs (models/kmeans/spark_baseline.py: in Spark)

    def __init__(self, k: int | None = None, k_max: int = 10, init: str = "batch", decay: float = 1.0,
                 half_life: float | None = None, time_unit: str = "batches", mini_batch: int = 10,
                 update_with: str = "normal", threshold_quantile: float = 1.0, threshold_factor: float = 1.5,
                 small_cluster_fraction: float = 0.0, correlation_limit: float = 0.995,
                 topic_metrics: bool = False, min_change: float = 0.25, min_threshold: float = 1.0, seed: int = 0,
                 n_init: int = 10, random_weight: float = 1.0):
        if init not in ("batch", "random"):
            raise ValueError("init is 'batch' (warm start) or 'random' (cold start)")
        if update_with not in ("normal", "all"):
            raise ValueError("update_with is 'normal' or 'all'")
        if mini_batch < 1:
            raise ValueError("mini_batch must be >= 1")
        self.params = {"k": k, "k_max": k_max, "init": init, "decay": decay, "half_life": half_life,
                       "time_unit": time_unit, "mini_batch": mini_batch, "update_with": update_with,
                       "threshold_quantile": threshold_quantile, "threshold_factor": threshold_factor,
                       "small_cluster_fraction": small_cluster_fraction,
                       "correlation_limit": correlation_limit, "topic_metrics": topic_metrics,
                       "min_change": min_change, "min_threshold": min_threshold, "seed": seed, "n_init": n_init,
                       "random_weight": random_weight}
        decay_factor(decay, half_life)  # reject bad values now
        self.preprocessor = RatePreprocessor(correlation_limit, topic_metrics, min_change)
        self.state: StreamingKMeansState | None = None
        self.elbow: dict[str, list] = {}
        self.batch_centers = np.empty(0)  # the warm start, kept to show how far the stream moved
        self.pending = np.empty((0, 0))  # scored rows waiting for their mini-batch update
        self.rows_seen = 0
        self.version = ""  # set by training; a checkpoint of another version is not resumed

    # --- training -------------------------------------------------------------------------------
    def fit(self, history: VectorBatch) -> "RealTimeKMeans":
        # Training only: a detector worker does not import scikit-learn.
        from sklearn.cluster import KMeans

        p = self.params
        Z = self.preprocessor.fit(history).transform(history)
        ks = list(range(1, min(p["k_max"], len(Z)) + 1))
        inertia = [float(KMeans(k, n_init=p["n_init"], random_state=p["seed"]).fit(Z).inertia_) for k in ks]
        k = p["k"] or elbow_k(ks, inertia)
        self.elbow = {"k": ks, "inertia": inertia, "chosen": k}
        a = decay_factor(p["decay"], p["half_life"])
        if p["init"] == "batch":
            km = KMeans(k, n_init=p["n_init"], random_state=p["seed"]).fit(Z)
            counts = np.bincount(km.labels_, minlength=k)
            # The adapter: batch centers, each weighted by its number of training rows. Sorted, so
            # seeds that find the same clusters give the same state.
            order = np.lexsort(km.cluster_centers_.T[::-1])
            self.state = self.state_class(km.cluster_centers_[order], counts[order], a, p["time_unit"])
        else:
            rng = np.random.default_rng(p["seed"])
            self.state = self.state_class(rng.standard_normal((k, Z.shape[1])),
                                              np.full(k, p["random_weight"]), a, p["time_unit"])
            for start in range(0, len(Z), p["mini_batch"]):  # trainOn: the history as a stream
                self.state.update(Z[start:start + p["mini_batch"]])
        self.batch_centers = self.state.centers.copy()
        train_distance = self._distances(Z)
        # At least min_threshold scaled units: a row whose every rate is within min_change of its
        # center is ordinary, however still the training traffic was.
        self.threshold = float(max(np.quantile(train_distance, p["threshold_quantile"]) * p["threshold_factor"],
                                   p["min_threshold"]))
        self.pending = np.empty((0, Z.shape[1]))
        self.rows_seen = 0
        return self

    # --- scoring --------------------------------------------------------------------------------
    def _distances(self, Z: np.ndarray) -> np.ndarray:
        d = self.state.distances(Z)
        share = self.state.counts / max(self.state.counts.sum(), 1e-300)
        large = share >= self.params["small_cluster_fraction"]
        return d[:, large if large.any() else slice(None)].min(axis=1)

    def score(self, batch: VectorBatch) -> np.ndarray:
        """Distance of each row to its nearest center, in row order; rows are scored with the model
        as it stood before their own mini-batch, and each full mini-batch then updates it."""
        Z = self.preprocessor.transform(batch)
        out = np.empty(len(Z))
        i, size = 0, self.params["mini_batch"]
        while i < len(Z):
            take = min(size - self.rows_seen % size, len(Z) - i)  # up to the end of this mini-batch
            out[i:i + take] = self._distances(Z[i:i + take])
            rows = Z[i:i + take]
            if self.params["update_with"] == "normal":  # an anomaly must not drag a center towards it
                rows = rows[out[i:i + take] <= self.threshold]
            self.pending = np.vstack([self.pending, rows]) if len(rows) else self.pending
            i += take
            self.rows_seen += take
            if self.rows_seen % size == 0:
                self.state.update(self.pending)
                self.pending = self.pending[:0]
        return out

    def for_stream(self) -> "RealTimeKMeans":
        return copy.deepcopy(self)

    # --- artifacts / checkpoints ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": STATE_FORMAT, "version": self.version, "params": self.params, "threshold": self.threshold,
            "preprocessor": self.preprocessor.to_dict(), "state": self.state.to_dict(),
            "elbow": self.elbow, "batch_centers": self.batch_centers.tolist(),
            "pending": self.pending.tolist(), "rows_seen": self.rows_seen,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "RealTimeKMeans":
        if d.get("format") != STATE_FORMAT:
            raise ArtifactError(f"{where}: format {d.get('format')} != {STATE_FORMAT}; retrain")
        det = cls(**d["params"])
        det.threshold = d["threshold"]
        det.version = d.get("version", "")
        det.preprocessor = RatePreprocessor.from_dict(d["preprocessor"])
        det.state = StreamingKMeansState.from_dict(d["state"])
        det.elbow = d["elbow"]
        det.batch_centers = np.array(d["batch_centers"], dtype=np.float64)
        width = len(det.preprocessor.columns)
        det.pending = np.array(d["pending"], dtype=np.float64).reshape(-1, width)
        det.rows_seen = d["rows_seen"]
        return det

    def save(self, folder: Path) -> None:
        """The whole model, streaming state included: a checkpoint and a trained artifact hold the
        same thing, so a restart resumes where the stream stood instead of re-learning."""
        write_json(Path(folder) / "realtime_kmeans.json", self.to_dict())

    @classmethod
    def load(cls, folder: Path) -> "RealTimeKMeans":
        path = Path(folder) / "realtime_kmeans.json"
        return cls.from_dict(read_json(path), str(path))

    def explain(self, batch: VectorBatch, top: int = 3) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Per row, its nearest cluster and the `top` metrics furthest from that cluster's center
        (signed, scaled units), with the current state."""
        Z = self.preprocessor.transform(batch)
        nearest = self.state.distances(Z).argmin(axis=1)
        diff = Z - self.state.centers[nearest]
        cols = self.preprocessor.columns
        order = np.argsort(-np.abs(diff), axis=1)[:, :top]
        return nearest, [{cols[j]: round(float(diff[i, j]), 3) for j in order[i]} for i in range(len(Z))]
