"""The detector's `kafka_metrics` path: each scrape of a broker's metrics scored by the Real-Time
K-Means (models.kmeans), a ClusterScoreRecord per scrape, and the model's streaming state
checkpointed with the offsets it absorbed, after the outputs are acknowledged and before the commit.
After a restart, a re-read scrape the checkpoint already holds is skipped, not learned twice."""

from __future__ import annotations

from collections import Counter

from shared.config import Settings
from shared.records.kmeans import decode_broker_metrics, encode_cluster_score_record
from shared.stream import Output, Result


class BrokerMetricsScoring:
    def __init__(self, settings: Settings, scorer, log):
        self.settings = settings
        self.scorer = scorer  # models.kmeans.scorer.ClusterScorer
        self.log = log
        self.reload = False
        self.absorbed: dict[int, int] = {}  # partition -> last offset absorbed since the last checkpoint
        self.stats = Counter()

    @classmethod
    def load(cls, settings: Settings, log) -> "BrokerMetricsScoring | None":
        """None (topic left unread, nothing lost) when no K-Means model is trained; raises when a
        trained one cannot be loaded."""
        from models.kmeans.scorer import ClusterScorer

        if not (settings.model_dir / settings.model_kafka_metrics / "realtime_kmeans.json").exists():
            log.warning("no Real-Time K-Means model; kafka_metrics is not scored (run `anomstream train`)",
                        model=settings.model_kafka_metrics)
            return None
        return cls(settings, ClusterScorer(settings.model_dir, settings.model_kafka_metrics,
                                           settings.kmeans_state_dir), log)

    def score(self, msgs: list, result: Result) -> None:
        """Score kafka_metrics scrapes with the Real-Time K-Means; the state that absorbed them is
        checkpointed (with their offsets) once the outputs are durable."""
        s, scorer = self.settings, self.scorer
        if self.reload:  # (re)assigned: continue from the newest checkpoint, whoever wrote it
            self.log.info("K-Means state restored", source=scorer.restore(), model=scorer.name)
            self.reload, self.absorbed = False, {}
        good, records = [], []
        for m in msgs:
            if scorer.is_applied(m.partition(), m.offset()):
                self.stats["already_in_checkpoint"] += 1  # scored before a crash; outputs already durable
                continue
            try:
                records.append(decode_broker_metrics(m.value(), s.max_message_bytes))
                good.append(m)
            except ValueError as exc:
                result.dead_letters.append((m, str(exc)))
        if not records:
            return
        scored = scorer.score(records)
        for j, (m, rec) in enumerate(zip(good, records)):
            anomalous = bool(scored.flags[j])
            value = encode_cluster_score_record(
                rec.source, rec.timestamp, rec.metrics, scored.scores[j], scored.threshold, anomalous,
                scored.nearest[j], scored.deviations[j], scorer.version, m.topic(), m.partition(), m.offset())
            result.outputs.append(Output(s.topic_scores, value, rec.source.encode()))
            if anomalous:
                result.outputs.append(Output(s.topic_anomalies, value, rec.source.encode()))
                self.stats["cluster_anomalies"] += 1
            self.absorbed[m.partition()] = max(self.absorbed.get(m.partition(), -1), m.offset())
        self.stats["cluster_scored"] += len(records)

    def checkpoint(self) -> None:
        if self.absorbed:  # the state that includes these scrapes, before their offsets are committed
            self.scorer.checkpoint(self.absorbed)
            self.absorbed = {}

    def on_assign(self, partitions) -> None:
        if any(p.topic == self.settings.topic_kafka_metrics for p in partitions):
            self.reload = True  # continue from the newest checkpoint, whoever wrote it
