"""The scoring path of `kafka_metrics`: BrokerMetricsRecords -> VectorBatch -> Real-Time K-Means ->
decision, with one streaming state per input partition, so that a partition's state can be kept
elsewhere (the detector writes it to a changelog topic) and move with the partition.

Order per batch (the detector service): score -> outputs acknowledged -> state of each partition
(model + the last offset it absorbed, `to_dict`) made durable -> offset commit. After a crash or a
move, `restore(partition, saved)` continues from that state, and a re-read message at or below its
offset already moved the state and already has its outputs: it is skipped (`is_applied`).
This module knows nothing of Kafka: the state is a dict, serialised by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    def __init__(self, model_dir: Path, name: str):
        self.name = name
        self.trained_folder = Path(model_dir) / name
        self.trained = RealTimeKMeans.load(self.trained_folder)
        self.detectors: dict[int, RealTimeKMeans] = {}  # partition -> its streaming state
        self.applied: dict[int, int] = {}  # partition -> last offset its state has absorbed

    @property
    def version(self) -> str:
        return self.trained.version

    def detector(self, partition: int) -> RealTimeKMeans:
        """The streaming state of `partition`; the trained model's when it has none yet."""
        det = self.detectors.get(partition)
        if det is None:
            det = self.detectors[partition] = self.trained.for_stream()
        return det

    # -- state ---------------------------------------------------------------------------------
    def to_dict(self, partition: int) -> dict:
        """The state of `partition`: the model and the last offset it absorbed."""
        return {"model": self.detector(partition).to_dict(), "offset": self.applied.get(partition, -1)}

    def restore(self, partition: int, saved: dict | None, where: str = "checkpoint") -> str:
        """Continue `partition` from `saved` (a `to_dict`) when it continues the trained model, else
        from the trained model. Returns where the state came from."""
        self.drop(partition)
        if saved is None:
            return "trained"
        if saved.get("model", {}).get("version") != self.version:
            return "trained (state of another model version ignored)"
        self.detectors[partition] = RealTimeKMeans.from_dict(saved["model"], where)
        if int(saved.get("offset", -1)) >= 0:
            self.applied[partition] = int(saved["offset"])
        return "checkpoint"

    def drop(self, partition: int) -> None:
        self.detectors.pop(partition, None)
        self.applied.pop(partition, None)

    # -- scoring -------------------------------------------------------------------------------
    def is_applied(self, partition: int, offset: int) -> bool:
        return offset <= self.applied.get(partition, -1)

    def score(self, records, partition: int = 0, offsets: list[int] | None = None) -> ClusterResult:
        """Score records of one partition, in order, with (and into) its state; `offsets`: theirs,
        so that the state remembers the last one it absorbed."""
        det = self.detector(partition)
        batch = VectorBatch.from_records(records)
        nearest, deviations = det.explain(batch)  # with the state that scores the batch's first rows
        scores = det.score(batch)
        if offsets:
            self.applied[partition] = max(self.applied.get(partition, -1), max(offsets))
        return ClusterResult(scores, det.decide(scores), nearest, deviations, det.threshold)
