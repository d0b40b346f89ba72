"""detector: worker processes in one consumer group score every message of the input topics.

Per batch: consume -> validate (bad ones to dead_letter with the reason) -> score with the model set
of the message's topic -> one record per input to `scores`, anomalies also to `anomalies` -> wait
until the broker acknowledged all of it -> commit the batch's offsets. A crash anywhere before the
commit means the batch is consumed again (at-least-once, never a gap).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import signal
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone

import orjson
from confluent_kafka import KafkaException, TopicPartition

from models.base import ArtifactError
from shared.app_logging import setup_logging
from shared.config import Settings, load_settings
from shared.kafka import (
    REBALANCE_COMMIT_ERRORS,
    DeliveryTracker,
    dead_letter,
    ensure_topics,
    make_consumer,
    make_producer,
    produce,
    usable,
)
from shared.schemas import decode_broker_metrics, decode_metrics, iso_utc

EXIT_CONFIG_ERROR = 2  # a worker that cannot load its models is not restarted


def score_records(msgs, decoded, result, model_version: str, decision: list[str]) -> list[tuple[bytes, bytes, bool]]:
    """(key, JSON value, is_anomaly) for each good message, in the shape of schemas.ScoreRecord."""
    stamps = iso_utc(decoded.timestamps)
    detected_at = datetime.now(timezone.utc).isoformat()
    values = decoded.values.tolist()
    is_anomaly = result.is_anomaly.tolist()
    if_flag = result.flags["isolation_forest"].tolist()
    lstm_flag = result.flags["lstm_autoencoder"].tolist()
    if_score = result.scores["isolation_forest"].tolist()
    recon = result.scores["lstm_autoencoder"].tolist()
    names = list(result.scores)
    all_scores = [result.scores[n].tolist() for n in names]
    all_flags = [result.flags[n].tolist() for n in names]
    out = []
    for j, i in enumerate(decoded.index):
        m = msgs[i]
        series = decoded.series[j]
        out.append((series.encode(), orjson.dumps({
            "series": series, "timestamp": stamps[j], "value": values[j],
            "is_anomaly": is_anomaly[j], "if_anomaly": if_flag[j], "lstm_anomaly": lstm_flag[j],
            "reconstruction_error": recon[j], "if_score": if_score[j], "model_version": model_version,
            "source_topic": m.topic(), "source_partition": m.partition(), "source_offset": m.offset(),
            "source_timestamp_ms": m.timestamp()[1], "detected_at": detected_at,
            "scores": {n: col[j] for n, col in zip(names, all_scores)},
            "flags": {n: col[j] for n, col in zip(names, all_flags)},
            "decision": decision, "kind": "score",
        }), is_anomaly[j]))
    return out


def cluster_records(msgs, records, result, model_version: str) -> list[tuple[bytes, bytes, bool]]:
    """(key, JSON value, is_anomaly) per scored scrape, in the shape of schemas.ClusterScoreRecord."""
    detected_at = datetime.now(timezone.utc).isoformat()
    out = []
    for j, (m, rec) in enumerate(zip(msgs, records)):
        anomalous = bool(result.flags[j])
        out.append((rec.source.encode(), orjson.dumps({
            "kind": "cluster", "series": rec.source, "timestamp": rec.timestamp.isoformat(),
            "score": float(result.scores[j]), "threshold": float(result.threshold), "is_anomaly": anomalous,
            "nearest_cluster": int(result.nearest[j]), "deviations": result.deviations[j],
            "metrics": rec.metrics, "model_version": model_version, "source_topic": m.topic(),
            "source_partition": m.partition(), "source_offset": m.offset(), "detected_at": detected_at,
        }), anomalous))
    return out


class Worker:
    def __init__(self, settings: Settings, worker_id: int, scorers: dict, cluster_scorer=None):
        self.settings = settings
        self.scorers = scorers  # topic -> Scorer
        self.cluster = cluster_scorer  # scores settings.topic_kafka_metrics when a K-Means model is trained
        self.reload_cluster = False
        self.log = setup_logging(settings, "detector").bind(worker=worker_id)
        self.consumer = make_consumer(settings, settings.consumer_group)
        self.producer = make_producer(settings)
        self.tracker = DeliveryTracker()
        self.stats = defaultdict(int)
        self.stopping = False

    def process(self, msgs) -> None:
        s, tracker = self.settings, self.tracker
        by_topic = defaultdict(list)
        for m in msgs:
            if not usable(m, self.log):
                continue
            by_topic[m.topic()].append(m)
        absorbed: dict[int, int] = {}
        for topic, tmsgs in by_topic.items():
            if self.cluster is not None and topic == s.topic_kafka_metrics:
                absorbed = self.process_cluster(tmsgs)
                continue
            scorer = self.scorers.get(topic)
            if scorer is None:
                for m in tmsgs:
                    dead_letter(self.producer, s, m, f"no model set is configured for topic {topic}", "detector", tracker)
                self.stats["dead_lettered"] += len(tmsgs)
                continue
            decoded = decode_metrics([m.value() for m in tmsgs], s.max_message_bytes)
            for i, reason in decoded.errors:
                dead_letter(self.producer, s, tmsgs[i], reason, "detector", tracker)
                self.log.warning("dead-lettered", topic=topic, partition=tmsgs[i].partition(),
                                 offset=tmsgs[i].offset(), reason=reason)
            self.stats["dead_lettered"] += len(decoded.errors)
            if not decoded.index:
                continue
            result = scorer.score(decoded.series, decoded.timestamps, decoded.values)
            for key, value, anomalous in score_records(tmsgs, decoded, result, scorer.model_set.version, scorer.decision):
                produce(self.producer, s.topic_scores, value, key, on_delivery=tracker)
                if anomalous:
                    produce(self.producer, s.topic_anomalies, value, key, on_delivery=tracker)
                    self.stats["anomalies"] += 1
            self.stats["scored"] += len(decoded.index)
        # Durable first, then commit: flush raises if any output was not acknowledged.
        tracker.flush(self.producer)
        if absorbed:  # the K-Means state that includes these scrapes, before their offsets are committed
            self.cluster.checkpoint(absorbed)
        offsets = {}
        for m in msgs:
            if not m.error():
                offsets[(m.topic(), m.partition())] = max(offsets.get((m.topic(), m.partition()), -1), m.offset())
        if offsets:
            try:
                self.consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()],
                                     asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() not in REBALANCE_COMMIT_ERRORS:
                    raise
                self.log.warning("commit refused by a rebalance; the new owner re-reads the batch",
                                 error=str(exc.args[0]))
                self.stats["commits_lost_to_rebalance"] += 1
        self.stats["consumed"] += len(msgs)

    def process_cluster(self, msgs) -> dict[int, int]:
        """Score kafka_metrics scrapes with the Real-Time K-Means; returns partition -> last offset
        its state absorbed (checkpointed by the caller once the outputs are durable)."""
        s, scorer = self.settings, self.cluster
        if self.reload_cluster:  # (re)assigned: continue from the newest checkpoint, whoever wrote it
            self.log.info("K-Means state restored", source=scorer.restore(), model=scorer.name)
            self.reload_cluster = False
        good, records = [], []
        for m in msgs:
            if scorer.is_applied(m.partition(), m.offset()):
                self.stats["already_in_checkpoint"] += 1  # scored before a crash; outputs already durable
                continue
            try:
                records.append(decode_broker_metrics(m.value(), s.max_message_bytes))
                good.append(m)
            except ValueError as exc:
                dead_letter(self.producer, s, m, str(exc), "detector", self.tracker)
                self.log.warning("dead-lettered", topic=m.topic(), partition=m.partition(), offset=m.offset(),
                                 reason=str(exc))
                self.stats["dead_lettered"] += 1
        if not records:
            return {}
        result = scorer.score(records)
        for key, value, anomalous in cluster_records(good, records, result, scorer.version):
            produce(self.producer, s.topic_scores, value, key, on_delivery=self.tracker)
            if anomalous:
                produce(self.producer, s.topic_anomalies, value, key, on_delivery=self.tracker)
                self.stats["cluster_anomalies"] += 1
        self.stats["cluster_scored"] += len(records)
        absorbed: dict[int, int] = {}
        for m in good:
            absorbed[m.partition()] = max(absorbed.get(m.partition(), -1), m.offset())
        return absorbed

    def on_assign(self, _consumer, partitions) -> None:
        if any(p.topic == self.settings.topic_kafka_metrics for p in partitions):
            self.reload_cluster = True

    def run(self) -> None:
        s = self.settings
        topics = list(self.scorers) + ([s.topic_kafka_metrics] if self.cluster is not None else [])
        self.consumer.subscribe(topics, on_assign=self.on_assign)
        self.log.info("worker ready", topics=topics, batch_size=s.batch_size)
        last_report = time.monotonic()
        try:
            while not self.stopping:
                msgs = self.consumer.consume(s.batch_size, s.poll_timeout_s)
                if msgs:
                    self.process(msgs)
                if time.monotonic() - last_report > 10:
                    self.log.info("progress", **self.stats)
                    last_report = time.monotonic()
        finally:
            self.consumer.close()
            self.log.info("worker stopped", **self.stats)


def load_cluster_scorer(settings: Settings, log):
    """The kafka_metrics scorer, or None (topic left unread, nothing lost) when no K-Means model is
    trained; a model that is there but broken stops the worker like a broken model set."""
    from models.kmeans.scorer import ClusterScorer

    if not (settings.model_dir / settings.model_kafka_metrics / "realtime_kmeans.json").exists():
        log.warning("no Real-Time K-Means model; kafka_metrics is not scored (run `anomstream train`)",
                    model=settings.model_kafka_metrics)
        return None
    try:
        return ClusterScorer(settings.model_dir, settings.model_kafka_metrics, settings.kmeans_state_dir)
    except (ArtifactError, ValueError, KeyError) as exc:
        log.error("cannot load the Real-Time K-Means model", error=str(exc))
        sys.exit(EXIT_CONFIG_ERROR)


def worker_main(settings: Settings, worker_id: int) -> None:
    # Ctrl-C reaches every process in the group; both signals mean "finish the batch, commit, exit".
    stop = {"flag": False}
    worker: Worker | None = None

    def on_signal(_sig, _frame):
        stop["flag"] = True
        if worker is not None:
            worker.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from models.metrics.lstm_autoencoder import configure_tensorflow
    from models.metrics.model_set import ModelSet
    from models.metrics.scorer import Scorer

    configure_tensorflow(1)
    log = setup_logging(settings, "detector").bind(worker=worker_id)
    try:
        scorers = {topic: Scorer(ModelSet.load(settings.model_dir, name), settings.combine, settings.decision)
                   for topic, name in settings.topic_models().items()}
    except (ArtifactError, ValueError) as exc:
        log.error("cannot load models", error=str(exc))
        sys.exit(EXIT_CONFIG_ERROR)
    cluster_scorer = load_cluster_scorer(settings, log)
    # The models are loaded for good: move them out of the garbage collector's sight, or every
    # full collection walks ~500k TensorFlow objects (about 30% of a worker's time).
    gc.collect()
    gc.freeze()
    worker = Worker(settings, worker_id, scorers, cluster_scorer)
    worker.stopping = stop["flag"]
    worker.run()


def supervise(settings: Settings) -> int:
    """Run settings.workers worker processes; restart one that dies; stop all on SIGTERM/SIGINT."""
    from models.metrics.model_set import ModelSet

    log = setup_logging(settings, "detector")
    for name in set(settings.topic_models().values()):
        ModelSet.read_manifest(settings.model_dir, name)  # fail here, clearly, not in N workers
    ensure_topics(settings)
    ctx = mp.get_context("spawn")  # TensorFlow is not fork-safe
    procs: dict[int, mp.Process] = {}
    stopping = False

    def start(i: int) -> None:
        procs[i] = ctx.Process(target=worker_main, args=(settings, i), name=f"detector-{i}")
        procs[i].start()

    def on_signal(_sig, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(settings.workers):
        start(i)
    log.info("detector started", workers=settings.workers, topics=settings.topic_models())
    exit_code = 0
    while not stopping:
        time.sleep(0.5)
        for i, p in list(procs.items()):
            if p.is_alive() or stopping:
                continue
            if p.exitcode == EXIT_CONFIG_ERROR:
                log.error("worker cannot start; stopping", worker=i)
                stopping, exit_code = True, 1
                break
            log.warning("worker died; restarting", worker=i, exitcode=p.exitcode)
            start(i)
    for p in procs.values():
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker finishes its batch and commits
    for p in procs.values():
        p.join(60)
        if p.is_alive():
            p.kill()
    log.info("detector stopped")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomstream detect", description=__doc__)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    settings = load_settings(**({"workers": args.workers} if args.workers else {}))
    try:
        return supervise(settings)
    except ArtifactError as exc:
        setup_logging(settings, "detector").error("cannot start", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
