"""logdetector: raw log lines of `logs` -> templates -> sessions -> next-event model -> `anomalies`.

Runs on the stream core (shared.stream). Per batch: decode (plain text, or JSON with `message`;
bad ones to dead_letter with the reason) -> models.logs.scorer (drain3, per-session windows, one
network call) -> one LogSessionRecord per newly anomalous session to `anomalies` (the alerter
posts it). Every `log_checkpoint_interval_s`, on a rebalance and at stop the core waits until the
broker acknowledged all outputs -> the open sessions go to a compacted changelog topic
(shared.changelog), those of input partition p to changelog partition p: one record per changed
session (keyed "session:<key>", a tombstone when it ended) and then the partition's meta (key
"meta": model version, the last offset absorbed, event time); under exactly-once in the batch's
transaction -> the offsets are committed. When partition p is assigned its sessions are read back
from the changelog, wherever they were written; when it is revoked they are dropped.
When the input goes quiet, event time moves on with the wall clock, so sessions still end.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections import Counter
from datetime import datetime, timezone

import click

from models.base import ArtifactError
from models.logs.scorer import LogFinding, LogLine, LogStreamScorer
from shared.app_logging import setup_logging
from shared.changelog import changelog_topic, ensure_changelog, restore, write
from shared.cli import CONTEXT, run_command
from shared.config import Settings, load_settings
from shared.kafka import group_instance_id
from shared.records.logs import LogSessionRecord, decode_log_line
from shared.stream import Output, Processor, Result, StreamLoop
from shared.telemetry import STATE_RESTORE_SECONDS


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def session_record(f: LogFinding, scorer: LogStreamScorer, topic: str) -> LogSessionRecord:
    return LogSessionRecord(
        series=f.key, timestamp=_utc(f.timestamp), event=f.event, template=f.template, reason=f.reason,
        rank=f.rank, probability=f.probability, k=scorer.k, min_prob=scorer.detector.params["min_prob"],
        window=f.window, session_events=f.session_events, line=f.line, model_version=scorer.version,
        source_topic=topic, source_partition=f.partition, source_offset=f.offset,
        detected_at=datetime.now(timezone.utc))


META_KEY = b"meta"
SESSION_PREFIX = b"session:"


def load_scorer(settings: Settings) -> LogStreamScorer:
    return LogStreamScorer(settings.model_dir, settings.model_logs, settings.log_state_dir, settings.log_session_key,
                           settings.log_session_timeout_s, settings.log_max_sessions, settings.log_terminal_events)


class LogDetectorProcessor(Processor):
    """Raw lines -> the log scorer; anomalous sessions to `anomalies`. Its open sessions and the
    offsets they absorbed go to the changelog every log_checkpoint_interval_s (drain3 keeps its own
    file)."""

    name = "logdetector"
    ticks_when_idle = True  # when the input goes quiet, event time follows the wall clock

    def __init__(self, settings: Settings, scorer: LogStreamScorer, log):
        self.settings = settings
        self.scorer = scorer
        self.log = log
        self.checkpoint_interval_s = settings.log_checkpoint_interval_s
        self.last_input = time.monotonic()
        self.stats = Counter()
        self.loop: StreamLoop | None = None
        self.changelog = changelog_topic(settings, "logdetector", settings.topic_logs)

    def attach(self, loop: StreamLoop) -> None:
        self.loop = loop
        ensure_changelog(self.settings, self.changelog, self.settings.partitions_logs)

    def topics(self) -> list[str]:
        return [self.settings.topic_logs]

    def process(self, messages: list, now: float) -> Result:
        result = Result()
        if not messages:
            if now - self.last_input >= 1.0 and len(self.scorer.tracker):
                # Quiet: event time follows the wall clock, so sessions still end.
                self.publish(self.scorer.idle(now - self.last_input), result)
                self.last_input, result.state_changed = now, True
            return result
        self.last_input = now
        lines = []
        for m in messages:
            if self.scorer.is_applied(m.partition(), m.offset()):
                self.stats["already_in_checkpoint"] += 1  # re-read after a crash: its session already has it
                continue
            try:
                record = decode_log_line(m.value(), self.settings.log_max_line_bytes)
            except ValueError as exc:
                result.dead_letters.append((m, str(exc)))
                continue
            ts = record.timestamp
            lines.append(LogLine(record.message, None if ts is None else (
                ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp(),
                m.timestamp()[1] / 1000.0, m.partition(), m.offset()))
        self.publish(self.scorer.score(lines), result)
        self.stats["lines"] += len(lines)
        return result

    def publish(self, findings: list[LogFinding], result: Result) -> None:
        for f in findings:
            result.outputs.append(Output(self.settings.topic_anomalies,
                                         session_record(f, self.scorer, self.settings.topic_logs).encode(),
                                         f.key.encode()))
            self.log.info("anomalous session", session=f.key, event_id=f.event, reason=f.reason)
        self.stats["anomalous_sessions"] += len(findings)

    def checkpoint(self) -> None:
        """Called after the outputs are acknowledged (at-least-once) or inside the batch's
        transaction (exactly-once): the changed sessions, then each partition's meta, to the
        changelog before the offsets move."""
        loop = self.loop
        for partition, (meta, sessions) in self.scorer.take_changes().items():
            for key, state in sessions.items():
                write(loop.producer, self.changelog, partition, SESSION_PREFIX + key.encode(),
                      None if state is None else json.dumps(state).encode(), on_delivery=loop.tracker)
                self.stats["session_states_written" if state is not None else "session_states_deleted"] += 1
            # Last: a meta that is durable means its partition's sessions are too (one partition, in order).
            write(loop.producer, self.changelog, partition, META_KEY, json.dumps(meta).encode(),
                  on_delivery=loop.tracker)
        if self.settings.delivery != "exactly_once":
            loop.tracker.flush(loop.producer, loop.log)  # durable before the commit
        self.stats["checkpoints"] += 1

    def on_assign(self, partitions) -> None:
        """Each assigned partition's open sessions back from the changelog, before its first line."""
        parts = [p.partition for p in partitions if p.topic == self.settings.topic_logs]
        if not parts:
            return
        start = time.monotonic()
        saved = restore(self.settings, self.changelog, parts, timeout=self.settings.state_restore_timeout_s,
                        with_offsets=True)
        STATE_RESTORE_SECONDS.labels("logdetector").observe(time.monotonic() - start)
        for partition in parts:
            records = saved.get(partition, {})
            meta = records.pop(META_KEY, None)
            # Least recently written first: the order the sessions were last active in, near enough.
            sessions = {key[len(SESSION_PREFIX):].decode(): json.loads(value)
                        for key, (value, _offset) in sorted(records.items(), key=lambda kv: kv[1][1])
                        if key.startswith(SESSION_PREFIX)}
            source = self.scorer.restore_partition(partition, None if meta is None else json.loads(meta[0]), sessions)
            self.log.info("sessions restored", source=source, partition=partition, changelog=self.changelog,
                          sessions=len(sessions) if source == "checkpoint" else 0,
                          offset=self.scorer.applied.get(partition, -1), seconds=round(time.monotonic() - start, 3))

    def on_revoke(self, partitions) -> None:
        for p in partitions:
            if p.topic == self.settings.topic_logs:
                self.scorer.drop_partition(p.partition)

    def progress(self) -> dict:
        return dict(self.stats) | {"open_sessions": len(self.scorer.tracker)} | {
            f"scorer_{k}": v for k, v in self.scorer.stats.items()}


@click.command("logdetect", help=__doc__, context_settings=CONTEXT)
def command() -> int:
    settings = load_settings()
    log = setup_logging(settings, "logdetector")
    from models.inference import limit_threads

    limit_threads(1)
    try:
        scorer = load_scorer(settings)
    except (ArtifactError, ValueError, KeyError) as exc:
        log.error("cannot load the log model", error=str(exc))
        return 2
    gc.collect()
    gc.freeze()  # the model's objects stay for good; keep them out of every full collection
    loop = StreamLoop(settings, LogDetectorProcessor(settings, scorer, log), settings.logdetector_group, log,
                      instance_id=group_instance_id(settings, settings.logdetector_group, "logdetector"))
    loop.serve(
        model=scorer.version, k=scorer.k, session_timeout_s=settings.log_session_timeout_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream logdetect")


if __name__ == "__main__":
    sys.exit(main())
