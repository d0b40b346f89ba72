"""A model set: the scaler plus the trained detectors for one kind of stream, with a manifest.

Layout: <model_dir>/<name>/manifest.json, scaler in the manifest, one sub-folder per detector.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.base import ArtifactError, Detector, read_json, write_json
from models.metrics.adaptive_resonance import AdaptiveResonanceDetector
from models.metrics.contextual import ContextualDetector
from models.metrics.ensemble import Ensemble
from models.metrics.features import (
    FEATURES,
    SEQ_LEN,
    Scaler,
    SeriesWindows,
    build_batch,
    raw_features,
)
from models.metrics.isolation_forest import IsolationForestDetector
from models.metrics.knn_conformal import KnnConformalDetector
from models.metrics.lstm_autoencoder import LSTMAutoencoderDetector
from models.metrics.robust_zscore import RobustZScoreDetector
from models.metrics.seasonal import SeasonalResidualDetector

DETECTORS: dict[str, type[Detector]] = {
    IsolationForestDetector.name: IsolationForestDetector,
    LSTMAutoencoderDetector.name: LSTMAutoencoderDetector,
    RobustZScoreDetector.name: RobustZScoreDetector,
    # Streaming detectors from the NAB leaders' methods (issue 15); nothing fitted, state per series.
    ContextualDetector.name: ContextualDetector,
    KnnConformalDetector.name: KnnConformalDetector,
    AdaptiveResonanceDetector.name: AdaptiveResonanceDetector,
    SeasonalResidualDetector.name: SeasonalResidualDetector,
}
# The streaming candidates `evaluate` runs (with their likelihoods) beside the seed's detectors.
CANDIDATE_DETECTORS = [ContextualDetector.name, KnnConformalDetector.name, AdaptiveResonanceDetector.name,
                       SeasonalResidualDetector.name]
# Raw scores that also go through the anomaly-likelihood stage ("value" = the metric itself);
# each gives an output named "<source>_likelihood". Deployed sets run the two the default
# ensemble combines (see README, "Detection quality"); `evaluate` runs them all.
LIKELIHOOD_SOURCES = ["value", "seasonal"]
ALL_LIKELIHOOD_SOURCES = ["value", "robust_zscore", "isolation_forest", "lstm_autoencoder"]
# The default decision (README, "Detection quality"): chosen by leave-one-category-out on nab_dev
# among the candidates declared before their scores were seen whose state fits 2 KB per series
# (adding the robust z-score likelihood, 417 B, would not): an alarm when the value or the
# seasonal likelihood reaches 0.5, then 100 quiet points for that series.
DEFAULT_ENSEMBLE = "or[v+s]@0.5q100"
DEFAULT_ENSEMBLES: dict[str, Ensemble] = {DEFAULT_ENSEMBLE: Ensemble(
    DEFAULT_ENSEMBLE, {"value_likelihood": 0.5, "seasonal_likelihood": 0.5}, "or", 0.5, quiet=100)}
# The outputs whose flags make the decision (combined with the configured rule).
DEFAULT_DECISION = [DEFAULT_ENSEMBLE]
# A model set without the default ensemble's members decides by the value likelihood alone.
FALLBACK_DECISION = ["value_likelihood"]
SEED_DECISION = ["isolation_forest", "lstm_autoencoder"]
MANIFEST_FORMAT = 2


@dataclass
class ModelSet:
    name: str
    version: str
    scaler: Scaler
    detectors: dict[str, Detector]
    likelihood_sources: list[str]
    decision: list[str]
    # Ensembles the Scorer computes after the likelihood stages, in this order (a member may be
    # any output before it, an earlier ensemble included); each is an output like the others.
    ensembles: dict[str, Ensemble] = field(default_factory=dict)

    def __post_init__(self):
        check_ensembles([*self.detectors, *(f"{src}_likelihood" for src in self.likelihood_sources)],
                        self.ensembles, self.name)

    def outputs(self) -> list[str]:
        """Every score the set produces: each detector, then each likelihood stage, then each
        ensemble."""
        return [*self.detectors, *(f"{src}_likelihood" for src in self.likelihood_sources), *self.ensembles]

    @staticmethod
    def folder(model_dir: Path, name: str) -> Path:
        return Path(model_dir) / name

    @classmethod
    def read_manifest(cls, model_dir: Path, name: str) -> dict:
        """Checks the manifest (no TensorFlow import): fail fast before starting workers."""
        path = cls.folder(model_dir, name) / "manifest.json"
        manifest = read_json(path)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(f"{path}: manifest format {manifest.get('format')} != {MANIFEST_FORMAT}")
        if tuple(manifest.get("features", ())) != FEATURES or manifest.get("seq_len") != SEQ_LEN:
            raise ArtifactError(
                f"{path}: trained on features {manifest.get('features')} / seq_len {manifest.get('seq_len')},"
                f" this code uses {list(FEATURES)} / {SEQ_LEN}; retrain with `anomstream train`")
        unknown = set(manifest.get("detectors", {})) - set(DETECTORS)
        unknown |= set(manifest.get("likelihood_sources", [])) - set(DETECTORS) - {"value"}
        if unknown:
            raise ArtifactError(f"{path}: unknown detector(s) {sorted(unknown)}")
        return manifest

    @classmethod
    def load(cls, model_dir: Path, name: str, detectors: list[str] | None = None) -> "ModelSet":
        """The model set; with `detectors`, only those are loaded (and likelihoods and ensembles
        that need another are left out)."""
        manifest = cls.read_manifest(model_dir, name)
        folder = cls.folder(model_dir, name)
        names = [d for d in manifest["detectors"] if detectors is None or d in detectors]
        detectors = {d: DETECTORS[d].load(folder / d) for d in names}
        sources = [s for s in manifest["likelihood_sources"] if s == "value" or s in detectors]
        known = {*detectors, *(f"{src}_likelihood" for src in sources)}
        ensembles = {}
        for e, p in manifest.get("ensembles", {}).items():  # in order: one may combine an earlier one
            if set(p["members"]) <= known:
                ensembles[e] = Ensemble.from_dict(e, p)
                known.add(e)
        # The decision stays the manifest's: a Scorer given another (setting `decision`) uses that.
        return cls(name, manifest["version"], Scaler.from_dict(manifest["scaler"]), detectors, sources,
                   manifest["decision"], ensembles)

    def save(self, model_dir: Path, data_hash: str, rows: int) -> Path:
        folder = self.folder(model_dir, self.name)
        for det_name, det in self.detectors.items():
            det.save(folder / det_name)
        write_json(folder / "manifest.json", {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "features": list(FEATURES),
            "seq_len": SEQ_LEN,
            "scaler": self.scaler.to_dict(),
            "detectors": {d: {"threshold": det.threshold} for d, det in self.detectors.items()},
            "likelihood_sources": self.likelihood_sources,
            "decision": self.decision,
            "ensembles": {e: ens.to_dict() for e, ens in self.ensembles.items()},
            "training_data": {"sha256": data_hash, "rows": rows},
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return folder


def check_ensembles(outputs: list[str], ensembles: dict[str, Ensemble], set_name: str = "") -> None:
    """Each ensemble's members must be outputs before it (ArtifactError otherwise)."""
    known = list(outputs)
    for name, ens in ensembles.items():
        if name in known:
            raise ArtifactError(f"model set {set_name}: ensemble {name!r} has the name of another output")
        missing = set(ens.members) - set(known)
        if missing:
            raise ArtifactError(f"model set {set_name}: ensemble {name!r} combines unknown output(s) "
                                f"{sorted(missing)}; the set has {known}")
        known.append(name)


def data_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the training rows, independent of the order they were given in."""
    frame = frame.sort_values(["series", "epoch_s"], kind="stable")
    h = hashlib.sha256()
    h.update("\n".join(map(str, frame["series"])).encode())
    h.update(np.ascontiguousarray(frame["epoch_s"].to_numpy(np.float64)).tobytes())
    h.update(np.ascontiguousarray(frame["value"].to_numpy(np.float64)).tobytes())
    return h.hexdigest()


# The detectors a model set fits by default (the others in DETECTORS are evaluate candidates).
FITTED_BY_DEFAULT = ["isolation_forest", "lstm_autoencoder", "robust_zscore", "seasonal"]


def fit_model_set(name: str, frame: pd.DataFrame, epochs: int = 50, progress: bool = True,
                  decision: list[str] | None = None, likelihood_sources: list[str] | None = None,
                  detectors: list[str] | None = None, ensembles: dict[str, Ensemble] | None = None) -> ModelSet:
    """Fit the detectors named in `detectors` (default FITTED_BY_DEFAULT) on `frame` (columns
    series, epoch_s, value; each series in time order)."""
    frame = frame.sort_values(["series", "epoch_s"], kind="stable")
    scaler = Scaler().fit(raw_features(frame["epoch_s"].to_numpy(), frame["value"].to_numpy()))
    history = build_batch(scaler, SeriesWindows(), frame["series"].to_numpy(), frame["epoch_s"].to_numpy(),
                          frame["value"].to_numpy())
    names = FITTED_BY_DEFAULT if detectors is None else detectors
    unknown = set(names) - set(DETECTORS)
    if unknown:
        raise ValueError(f"unknown detector(s) {sorted(unknown)}; known: {sorted(DETECTORS)}")
    fitted: dict[str, Detector] = {}
    for det_name in names:
        if det_name == LSTMAutoencoderDetector.name:
            fitted[det_name] = LSTMAutoencoderDetector(epochs=epochs, progress=progress).fit(history)
        else:
            fitted[det_name] = DETECTORS[det_name]().fit(history)
    version = f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{data_hash(frame)[:8]}"
    sources = list(likelihood_sources or LIKELIHOOD_SOURCES)
    if ensembles is None:  # the default ensembles whose members the set has
        outputs = {*fitted, *(f"{src}_likelihood" for src in sources)}
        ensembles = {e: ens for e, ens in DEFAULT_ENSEMBLES.items() if set(ens.members) <= outputs}
    if decision is None:
        decision = DEFAULT_DECISION if set(DEFAULT_DECISION) <= set(ensembles) else FALLBACK_DECISION
    return ModelSet(name, version, scaler, fitted, sources, list(decision), dict(ensembles))


def train_model_set(name: str, frame: pd.DataFrame, model_dir: Path, epochs: int = 50,
                    progress: bool = True, decision: list[str] | None = None) -> ModelSet:
    model_set = fit_model_set(name, frame, epochs, progress, decision)
    model_set.save(model_dir, data_hash(frame), len(frame))
    return model_set
