"""IsolationForest over the scaled (value, hour, day_of_week) rows (the seed model).

Fitted by scikit-learn, scored by a compiled path: scikit-learn's `score_samples` pays several
milliseconds per call whatever the batch (input validation, a joblib dispatch per tree), so the
fitted trees are flattened, at fit() and at load(), into a few contiguous arrays and the rows are
scored by one numba kernel. It reproduces scikit-learn 1.9's arithmetic step by step (rows cast to
float32, compared as sklearn compares them with the float64 thresholds, NaN sent where the split
says, the per-tree terms added in tree order, the last power taken by numpy), so the scores are
scikit-learn's to the last bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from models.base import ArtifactError, Detector, read_json, write_json
from models.metrics.features import FeatureBatch

if TYPE_CHECKING:  # scikit-learn (about 90 MB) is imported only by a process that fits or loads one
    from sklearn.ensemble import IsolationForest


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary search tree of n
    points, the correction a leaf of n training points adds to its depth (sklearn's
    `_average_path_length`, with its arithmetic order)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros(n.shape)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def float32_at_most(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 threshold: for a float32 x, x <= threshold exactly when
    x <= float32_at_most(threshold), so the kernel compares float32 with float32."""
    t = threshold.astype(np.float32)
    over = t.astype(np.float64) > threshold
    t[over] = np.nextafter(t[over], np.float32(-np.inf))
    return t


class CompiledForest:
    """A fitted IsolationForest as a few flat arrays, each tree laid out as a complete binary tree
    of its depth D (heap order: the children of slot k are 2k+1 and 2k+2), so a row descends by
    arithmetic alone, D steps in every tree. A leaf above depth D is pushed down its leftmost
    path: the slots on the way split at +inf (every row goes left, NaN too). Per tree t, its
    2**D - 1 split slots start at `node_start[t]` (`feature`: the column of the full row, the
    tree's feature subset applied; `threshold`: float32, rounded down, see float32_at_most;
    `nan_right`: where NaN goes, sklearn's missing_go_to_left negated) and its 2**D bottom slots at
    `leaf_start[t]` (`leaf_term`: what a row ending there adds to its path length, sklearn's
    depth (root 1) + c(n_node_samples) - 1.0). sklearn caps D at ceil(log2(max_samples)), so a
    tree takes fewer than 4 * max_samples slots: 255 + 256 at most with max_samples "auto"."""

    def __init__(self, model: IsolationForest):
        n_features = int(model.n_features_in_)
        # sklearn subsamples columns only when _max_features < n_features; otherwise it hands
        # every tree the full row, whatever estimators_features_ holds (a permutation, then).
        subsample = int(model._max_features) != n_features
        feature, threshold, nan_right, leaf_term, depth = [], [], [], [], []
        node_start, leaf_start = [0], [0]
        for est, cols in zip(model.estimators_, model.estimators_features_):
            tree = est.tree_
            left, right = tree.children_left, tree.children_right
            node_depth = tree.compute_node_depths()  # root 1, as sklearn's decision path lengths
            term = node_depth + average_path_length(tree.n_node_samples) - 1.0
            d = int(node_depth.max()) - 1
            # Heap slot of every node, level by level from the root.
            slot = np.zeros(tree.node_count, dtype=np.int64)
            for level in range(1, d + 1):
                parents = np.flatnonzero((node_depth == level) & (left != -1))
                slot[left[parents]] = 2 * slot[parents] + 1
                slot[right[parents]] = 2 * slot[parents] + 2
            split = left != -1
            n_split = 2 ** d - 1
            f = np.zeros(n_split, dtype=np.int64)
            cols = np.asarray(cols, dtype=np.int64)
            f[slot[split]] = cols[tree.feature[split]] if subsample else tree.feature[split]
            t = np.full(n_split, np.inf, dtype=np.float32)
            t[slot[split]] = float32_at_most(tree.threshold[split])
            r = np.zeros(n_split, dtype=np.uint8)
            missing_left = getattr(tree, "missing_go_to_left", None)
            if missing_left is not None:
                r[slot[split]] = 1 - np.asarray(missing_left, dtype=np.uint8)[split]
            bottom = np.zeros(2 ** d, dtype=np.float64)
            leaves = ~split
            down = d - (node_depth[leaves] - 1)  # levels from the leaf to the bottom
            bottom[(slot[leaves] + 1) * 2 ** down - 1 - n_split] = term[leaves]
            feature.append(f)
            threshold.append(t)
            nan_right.append(r)
            leaf_term.append(bottom)
            depth.append(d)
            node_start.append(node_start[-1] + n_split)
            leaf_start.append(leaf_start[-1] + 2 ** d)
        self.n_features = n_features
        self.feature = np.concatenate(feature)
        self.threshold = np.concatenate(threshold)
        self.nan_right = np.concatenate(nan_right)
        self.leaf_term = np.concatenate(leaf_term)
        self.depth = np.asarray(depth, dtype=np.int64)
        self.node_start = np.asarray(node_start[:-1], dtype=np.int64)
        self.leaf_start = np.asarray(leaf_start[:-1], dtype=np.int64)
        # The normaliser: n_trees * c(max_samples) (sklearn's _max_samples, the validated integer).
        max_samples = getattr(model, "_max_samples", model.max_samples_)
        self.denominator = len(model.estimators_) * average_path_length(np.array([max_samples]))[0]

    def anomaly_score(self, X: np.ndarray) -> np.ndarray:
        """-score_samples(X) (higher = more anomalous): 2 ** -(path length / c(max_samples))."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got shape {X.shape}")
        X32 = np.ascontiguousarray(X, dtype=np.float32)  # as sklearn's validate_data(dtype=float32)
        total = np.zeros(X32.shape[0], dtype=np.float64)
        if X32.shape[0]:
            _path_lengths(X32, self.feature, self.threshold, self.nan_right, self.leaf_term, self.depth,
                          self.node_start, self.leaf_start, total)
        # sklearn's own expression (numpy's power, not the kernel's: the same last bit). For a
        # single training sample the denominator is 0 and sklearn takes the ratio as 1.
        ratio = np.divide(total, self.denominator, out=np.ones_like(total), where=self.denominator != 0)
        return 2 ** (-ratio)


@njit(cache=True, nogil=True)
def _path_lengths(X, feature, threshold, nan_right, leaf_term, depth, node_start, leaf_start, out):
    """out[i] += each tree's path length of row i, tree after tree (sklearn's order of the sum).
    Eight rows descend a tree together (independent chains of loads); a row holding a NaN is then
    done again alone, on the careful path."""
    n = X.shape[0]
    for t in range(depth.shape[0]):
        s = node_start[t]
        d = depth[t]
        b = leaf_start[t] - ((1 << d) - 1)  # the bottom slot k is leaf_term[b + k]
        i = 0
        while i + 8 <= n:
            k0 = k1 = k2 = k3 = k4 = k5 = k6 = k7 = 0
            for _ in range(d):
                k0 = 2 * k0 + 1 + np.int64(X[i, feature[s + k0]] > threshold[s + k0])
                k1 = 2 * k1 + 1 + np.int64(X[i + 1, feature[s + k1]] > threshold[s + k1])
                k2 = 2 * k2 + 1 + np.int64(X[i + 2, feature[s + k2]] > threshold[s + k2])
                k3 = 2 * k3 + 1 + np.int64(X[i + 3, feature[s + k3]] > threshold[s + k3])
                k4 = 2 * k4 + 1 + np.int64(X[i + 4, feature[s + k4]] > threshold[s + k4])
                k5 = 2 * k5 + 1 + np.int64(X[i + 5, feature[s + k5]] > threshold[s + k5])
                k6 = 2 * k6 + 1 + np.int64(X[i + 6, feature[s + k6]] > threshold[s + k6])
                k7 = 2 * k7 + 1 + np.int64(X[i + 7, feature[s + k7]] > threshold[s + k7])
            out[i] += leaf_term[b + k0]
            out[i + 1] += leaf_term[b + k1]
            out[i + 2] += leaf_term[b + k2]
            out[i + 3] += leaf_term[b + k3]
            out[i + 4] += leaf_term[b + k4]
            out[i + 5] += leaf_term[b + k5]
            out[i + 6] += leaf_term[b + k6]
            out[i + 7] += leaf_term[b + k7]
            i += 8
        for j in range(i, n):
            k = 0
            for _ in range(d):
                k = 2 * k + 1 + np.int64(X[j, feature[s + k]] > threshold[s + k])
            out[j] += leaf_term[b + k]
    # NaN compares false, so above it went left everywhere; sklearn sends it where the split says.
    for i in range(n):
        has_nan = False
        for c in range(X.shape[1]):
            has_nan |= np.isnan(X[i, c])
        if not has_nan:
            continue
        total = 0.0
        for t in range(depth.shape[0]):
            s = node_start[t]
            d = depth[t]
            k = 0
            for _ in range(d):
                x = X[i, feature[s + k]]
                right = (x > threshold[s + k]) | (np.isnan(x) & (nan_right[s + k] != 0))
                k = 2 * k + 1 + np.int64(right)
            total += leaf_term[leaf_start[t] - ((1 << d) - 1) + k]
        out[i] = total


class IsolationForestDetector(Detector):
    name = "isolation_forest"
    uses_features = True

    def __init__(self, n_estimators: int = 100, contamination: float = 0.1, random_state: int = 42):
        self.params = {"n_estimators": n_estimators, "contamination": contamination,
                       "random_state": random_state}
        self.model: IsolationForest | None = None
        self.forest: CompiledForest | None = None

    def fit(self, history: FeatureBatch) -> "IsolationForestDetector":
        from sklearn.ensemble import IsolationForest

        self.model = IsolationForest(**self.params).fit(history.X)
        self.forest = CompiledForest(self.model)
        # sklearn flags a row when score_samples < offset_; with scores negated, that is > -offset_.
        self.threshold = float(-self.model.offset_)
        return self

    def score(self, batch: FeatureBatch) -> np.ndarray:
        # -model.score_samples(batch.X), computed by the compiled forest. batch.X is finite and
        # bounded (features.FEATURE_LIMIT); the kernel would also take NaN/inf as sklearn does.
        return self.forest.anomaly_score(batch.X)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        import joblib

        joblib.dump(self.model, folder / "isolation_forest.joblib")
        write_json(folder / "isolation_forest.json", {"params": self.params, "threshold": self.threshold})

    @classmethod
    def load(cls, folder: Path) -> "IsolationForestDetector":
        meta = read_json(folder / "isolation_forest.json")
        path = folder / "isolation_forest.joblib"
        if not path.exists():
            raise ArtifactError(f"model artifact not found: {path}")
        det = cls(**meta["params"])
        import joblib
        from sklearn.ensemble import IsolationForest

        det.model = joblib.load(path)
        if not isinstance(det.model, IsolationForest):
            raise ArtifactError(f"{path} does not hold an IsolationForest")
        det.forest = CompiledForest(det.model)  # rebuilt from the fitted trees, not stored
        det.threshold = meta["threshold"]
        return det
