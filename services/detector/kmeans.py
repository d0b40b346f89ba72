"""The detector's `kafka_metrics` path: each scrape of a broker's metrics scored by the Real-Time
K-Means (models.kmeans), a ClusterScoreRecord per scrape. The model's streaming state is kept per
input partition in a compacted changelog topic (shared.changelog): input partition p's state (model
+ the last offset it absorbed, JSON under the key b"kmeans") in changelog partition p, written at
the checkpoint (after the outputs are acknowledged and before the commit; under exactly-once in the
batch's transaction), read back when p is assigned, dropped when it is revoked. After a restart or
a move, a re-read scrape the state already holds is skipped, not learned twice."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

from shared.changelog import changelog_topic, ensure_changelog, restore, write
from shared.config import Settings
from shared.records.kmeans import decode_broker_metrics, encode_cluster_score_record
from shared.stream import Output, Result

STATE_KEY = b"kmeans"


class BrokerMetricsScoring:
    def __init__(self, settings: Settings, scorer, log):
        self.settings = settings
        self.scorer = scorer  # models.kmeans.scorer.ClusterScorer
        self.log = log
        self.changelog = changelog_topic(settings, "detector", settings.topic_kafka_metrics)
        self.changed: set[int] = set()  # partitions whose state moved since the last checkpoint
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
        return cls(settings, ClusterScorer(settings.model_dir, settings.model_kafka_metrics), log)

    def ensure(self) -> None:
        """The changelog exists, with the input topic's partition count."""
        ensure_changelog(self.settings, self.changelog, self.settings.partitions_kafka_metrics)

    def score(self, msgs: list, result: Result) -> None:
        """Score kafka_metrics scrapes with their partition's Real-Time K-Means state; that state
        (with their offsets) goes to the changelog once the outputs are durable."""
        s, scorer = self.settings, self.scorer
        by_partition = defaultdict(list)
        for m in msgs:
            if scorer.is_applied(m.partition(), m.offset()):
                self.stats["already_in_checkpoint"] += 1  # scored before a crash or a move; outputs durable
                continue
            try:
                by_partition[m.partition()].append((m, decode_broker_metrics(m.value(), s.max_message_bytes)))
            except ValueError as exc:
                result.dead_letters.append((m, str(exc)))
        for partition, pairs in by_partition.items():
            good, records = [m for m, _ in pairs], [r for _, r in pairs]
            scored = scorer.score(records, partition, [m.offset() for m in good])
            for j, (m, rec) in enumerate(zip(good, records)):
                anomalous = bool(scored.flags[j])
                value = encode_cluster_score_record(
                    rec.source, rec.timestamp, rec.metrics, scored.scores[j], scored.threshold, anomalous,
                    scored.nearest[j], scored.deviations[j], scorer.version, m.topic(), m.partition(), m.offset())
                result.outputs.append(Output(s.topic_scores, value, rec.source.encode()))
                if anomalous:
                    result.outputs.append(Output(s.topic_anomalies, value, rec.source.encode()))
                    self.stats["cluster_anomalies"] += 1
            self.changed.add(partition)
            self.stats["cluster_scored"] += len(records)

    def checkpoint(self, producer, on_delivery) -> None:
        """The state of every partition that absorbed scrapes since the last call, to its changelog
        partition (the caller flushes, or commits the transaction, before the offsets move)."""
        for partition in sorted(self.changed):
            write(producer, self.changelog, partition, STATE_KEY,
                  json.dumps(self.scorer.to_dict(partition)).encode(), on_delivery=on_delivery)
            self.stats["kmeans_states_written"] += 1
        self.changed = set()

    def on_assign(self, partitions) -> None:
        """Each assigned partition continues from its changelog state, before its first scrape."""
        parts = [p.partition for p in partitions if p.topic == self.settings.topic_kafka_metrics]
        if not parts:
            return
        start = time.monotonic()
        saved = restore(self.settings, self.changelog, parts, timeout=self.settings.state_restore_timeout_s)
        for partition in parts:
            value = saved.get(partition, {}).get(STATE_KEY)
            source = self.scorer.restore(partition, json.loads(value) if value else None,
                                         f"changelog {self.changelog}[{partition}]")
            self.changed.discard(partition)
            self.log.info("K-Means state restored", source=source, partition=partition, changelog=self.changelog,
                          offset=self.scorer.applied.get(partition, -1), model=self.scorer.name,
                          seconds=round(time.monotonic() - start, 3))

    def on_revoke(self, partitions) -> None:
        for p in partitions:
            if p.topic == self.settings.topic_kafka_metrics:
                self.scorer.drop(p.partition)
                self.changed.discard(p.partition)
