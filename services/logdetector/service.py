"""logdetector: raw log lines of `logs` -> templates -> sessions -> next-event model -> `anomalies`.

Per batch: consume -> decode (plain text, or JSON with `message`; bad ones to dead_letter with the
reason) -> models.logs.scorer (drain3, per-session windows, one network call) -> one
LogSessionRecord per newly anomalous session to `anomalies` (the alerter posts it). Every
`log_checkpoint_interval_s`, on a rebalance and at stop: wait until the broker acknowledged all
outputs -> checkpoint the open sessions with the offsets they absorbed -> commit those offsets.
When the input goes quiet, event time moves on with the wall clock, so sessions still end.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import Counter
from datetime import datetime, timezone

from confluent_kafka import KafkaException, TopicPartition

from models.base import ArtifactError
from models.logs.scorer import LogFinding, LogLine, LogStreamScorer
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
from shared.schemas import LogSessionRecord, decode_log_line
from shared.signals import stop_on_signals


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def session_record(f: LogFinding, scorer: LogStreamScorer, topic: str) -> LogSessionRecord:
    return LogSessionRecord(
        series=f.key, timestamp=_utc(f.timestamp), event=f.event, template=f.template, reason=f.reason,
        rank=f.rank, probability=f.probability, k=scorer.k, min_prob=scorer.detector.params["min_prob"],
        window=f.window, session_events=f.session_events, line=f.line, model_version=scorer.version,
        source_topic=topic, source_partition=f.partition, source_offset=f.offset,
        detected_at=datetime.now(timezone.utc))


def load_scorer(settings: Settings) -> LogStreamScorer:
    return LogStreamScorer(settings.model_dir, settings.model_logs, settings.log_state_dir, settings.log_session_key,
                           settings.log_session_timeout_s, settings.log_max_sessions, settings.log_terminal_events)


class LogDetectorService:
    def __init__(self, settings: Settings, scorer: LogStreamScorer):
        self.settings = settings
        self.scorer = scorer
        self.log = setup_logging(settings, "logdetector")
        self.consumer = make_consumer(settings, settings.logdetector_group)
        self.producer = make_producer(settings)
        self.tracker = DeliveryTracker()
        self.consumed: dict[tuple[str, int], int] = {}  # last offset handled, not yet committed
        self.last_checkpoint = time.monotonic()
        self.last_input = time.monotonic()
        self.stats = Counter()
        self.dirty = False  # sessions changed since the last checkpoint
        self.stopping = False

    def process(self, msgs) -> None:
        s, lines = self.settings, []
        for m in msgs:
            if not usable(m, self.log):
                continue
            self.consumed[(m.topic(), m.partition())] = m.offset()
            if self.scorer.is_applied(m.partition(), m.offset()):
                self.stats["already_in_checkpoint"] += 1  # re-read after a crash: its session already has it
                continue
            try:
                record = decode_log_line(m.value(), s.log_max_line_bytes)
            except ValueError as exc:
                dead_letter(self.producer, s, m, str(exc), "logdetector", self.tracker)
                self.log.warning("dead-lettered", topic=m.topic(), partition=m.partition(), offset=m.offset(),
                                 reason=str(exc))
                self.stats["dead_lettered"] += 1
                continue
            ts = record.timestamp
            lines.append(LogLine(record.message, None if ts is None else (
                ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp(),
                m.timestamp()[1] / 1000.0, m.partition(), m.offset()))
        self.publish(self.scorer.score(lines))
        self.stats["lines"] += len(lines)
        self.dirty = True

    def publish(self, findings: list[LogFinding]) -> None:
        for f in findings:
            produce(self.producer, self.settings.topic_anomalies,
                    session_record(f, self.scorer, self.settings.topic_logs).model_dump_json().encode(),
                    f.key.encode(), on_delivery=self.tracker)
            self.log.info("anomalous session", session=f.key, event_id=f.event, reason=f.reason)
        self.stats["anomalous_sessions"] += len(findings)

    def checkpoint(self) -> None:
        """Outputs durable -> sessions + absorbed offsets on disk -> offsets committed."""
        self.tracker.flush(self.producer)  # raises if an output was not acknowledged: nothing is committed
        self.scorer.checkpoint()
        self.last_checkpoint, self.dirty = time.monotonic(), False
        if not self.consumed:
            return
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in self.consumed.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self.consumed.clear()
            self.stats["checkpoints"] += 1
        except KafkaException as exc:
            if exc.args[0].code() not in REBALANCE_COMMIT_ERRORS:
                raise
            self.log.warning("commit refused by a rebalance; the checkpoint skips what it holds",
                             error=str(exc.args[0]))

    def on_assign(self, _consumer, partitions) -> None:
        self.log.info("sessions restored", source=self.scorer.restore(), partitions=[p.partition for p in partitions])

    def on_revoke(self, _consumer, _partitions) -> None:
        self.checkpoint()

    def run(self) -> None:
        s = self.settings
        ensure_topics(s)
        self.consumer.subscribe([s.topic_logs], on_assign=self.on_assign, on_revoke=self.on_revoke)
        self.log.info("log detector ready", topic=s.topic_logs, model=self.scorer.version, k=self.scorer.k,
                      session_timeout_s=s.log_session_timeout_s)
        last_report = time.monotonic()
        try:
            while not self.stopping:
                msgs = self.consumer.consume(s.batch_size, s.poll_timeout_s)
                now = time.monotonic()
                if msgs:
                    self.process(msgs)
                    self.last_input = now
                elif now - self.last_input >= 1.0 and len(self.scorer.tracker):
                    # Quiet: event time follows the wall clock, so sessions still end.
                    self.publish(self.scorer.idle(now - self.last_input))
                    self.last_input, self.dirty = now, True
                if self.dirty and now - self.last_checkpoint >= s.log_checkpoint_interval_s:
                    self.checkpoint()
                if now - last_report > 10:
                    self.log.info("progress", **self.stats, open_sessions=len(self.scorer.tracker),
                                  **{f"scorer_{k}": v for k, v in self.scorer.stats.items()})
                    last_report = now
            self.checkpoint()
        finally:
            self.consumer.close()
            self.log.info("log detector stopped", **self.stats, open_sessions=len(self.scorer.tracker))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="anomstream logdetect", description=__doc__).parse_args(argv)
    settings = load_settings()
    log = setup_logging(settings, "logdetector")
    from models.metrics.lstm_autoencoder import configure_tensorflow

    configure_tensorflow(1)
    try:
        scorer = load_scorer(settings)
    except (ArtifactError, ValueError, KeyError) as exc:
        log.error("cannot load the log model", error=str(exc))
        return 2
    gc.collect()
    gc.freeze()  # the model's objects stay for good; keep them out of every full collection
    service = LogDetectorService(settings, scorer)
    stop_on_signals(service)
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
