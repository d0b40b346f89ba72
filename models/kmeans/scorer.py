"""The scoring path of `kafka_metrics`: BrokerMetricsRecords -> VectorBatch -> Real-Time K-Means ->
decision, with the streaming state checkpointed so that a restart resumes instead of re-learning.

Order per batch (the detector service): score -> outputs acknowledged -> checkpoint (state + the
offsets it has absorbed) -> offset commit. After a crash, a re-read message at or below the
checkpoint's offset already moved the state and already has its outputs: it is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.base import read_checkpoint, write_checkpoint
from models.kmeans.streaming_kmeans import RealTimeKMeans
from models.metrics.features import VectorBatch


@dataclass
class ClusterResult:
    scores: np.ndarray
    flags: np.ndarray
    nearest: np.ndarray
    deviations: list[dict[str, float]]
    threshold: float


class ClusterScorer:
    def __init__(self, model_dir: Path, name: str, state_dir: Path):
        self.name = name
        self.trained_folder = Path(model_dir) / name
        self.checkpoint_path = Path(state_dir) / name / "checkpoint.json"
        self.detector: RealTimeKMeans
        self.applied: dict[int, int] = {}  # partition -> last offset the state has absorbed
        self.restore()

    @property
    def version(self) -> str:
        return self.detector.version

    def restore(self) -> str:
        """Load the checkpoint when it continues the trained model, else start from the trained
        model. Returns where the state came from."""
        trained = RealTimeKMeans.load(self.trained_folder)
        self.detector, self.applied = trained.for_stream(), {}
        saved = read_checkpoint(self.checkpoint_path)
        if saved is None:
            return "trained"
        if saved.get("model", {}).get("version") != trained.version:
            return "trained (checkpoint of another model version ignored)"
        self.detector = RealTimeKMeans.from_dict(saved["model"], str(self.checkpoint_path))
        self.applied = {int(p): int(o) for p, o in saved["offsets"].items()}
        return "checkpoint"

    def is_applied(self, partition: int, offset: int) -> bool:
        return offset <= self.applied.get(partition, -1)

    def score(self, records) -> ClusterResult:
        batch = VectorBatch.from_records(records)
        nearest, deviations = self.detector.explain(batch)  # with the state that scores the batch's first rows
        scores = self.detector.score(batch)
        return ClusterResult(scores, self.detector.decide(scores), nearest, deviations, self.detector.threshold)

    def checkpoint(self, offsets: dict[int, int]) -> None:
        """Write state and absorbed offsets atomically (a crash leaves the old file or the new)."""
        self.applied.update(offsets)
        write_checkpoint(self.checkpoint_path, {"model": self.detector.to_dict(), "offsets": self.applied})
