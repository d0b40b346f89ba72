"""rules: evaluates the detector definitions (rules/*.yaml) on the metric topics.

Per batch: consume -> decode (a JSON object; bad ones to dead_letter with the reason) -> count each
message in the check windows of the definitions it matches (late ones to dead_letter) -> close the
windows the watermark has passed -> for each firing: a RuleFiringRecord to `anomalies` (the alerter
posts it) and the definition's other actions -> wait until the broker acknowledged all of it ->
record every check in the run history (one transaction, with how far each partition was read)
-> commit offsets, but never past a message still held in an open window.

After a crash the service re-reads from the last commit: open windows are rebuilt, the checks
already recorded are not made twice (the run history holds each group's state and where reading
had got to), so a firing is never lost; an action can repeat (at-least-once).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone

import orjson
from confluent_kafka import KafkaException, TopicPartition

from models.rules.definitions import (
    Definition,
    DefinitionFolder,
    KafkaAction,
    SlackAction,
)
from models.rules.engine import Check, RuleEngine
from models.rules.run_history import RunHistory
from services.rules.actions import run_actions
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
from shared.schemas import RuleFiringRecord, decode_object
from shared.signals import stop_on_signals


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def firing_record(check: Check, definition: Definition, environment: str) -> RuleFiringRecord:
    return RuleFiringRecord(
        definition=check.definition, description=definition.description, version=check.version,
        series=check.group, timestamp=_utc(check.window_end), window_start=_utc(check.window_start),
        window_end=_utc(check.window_end), values=check.values,
        conditions=[asdict(c) for c in check.conditions], source_topic=check.topic, environment=environment,
        channels=[a.channel for a in definition.actions if isinstance(a, SlackAction)],
        detected_at=datetime.now(timezone.utc),
    )


class RulesService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.log = setup_logging(settings, "rules")
        self.folder = DefinitionFolder(settings.rules_dir)
        self.history = RunHistory(settings.rules_db_url)
        self.active: list[Definition] = []
        self.engine = self.resumed_engine()
        self.rebuild = False  # set on a revoke: the open windows must be re-read from the commit
        self.consumer = make_consumer(settings, settings.rules_group)
        self.producer = make_producer(settings)
        self.tracker = DeliveryTracker()
        self.read_to: dict[tuple[str, int], int] = {}  # next offset to read, per partition read so far
        self.committed: dict[tuple[str, int], int] = {}
        self.subscribed: set[str] = set()
        self.stats = Counter()
        self.stopping = False

    # -- definitions ---------------------------------------------------------------------------
    def reload(self, force: bool = False) -> None:
        changed, errors = self.folder.refresh(force)
        for error in errors:
            self.log.error("invalid definition file; the other definitions keep running", error=error)
        if not changed and not force:
            return
        self.active = active = [d for d in self.folder.definitions().values() if d.runs_in(self.settings.environment)]
        fresh = self.engine.set_definitions(active)
        for name in sorted(fresh):
            runner = self.engine.runners[name]
            resumed = self.engine.restore(name, runner.version, self.history.latest_states(name, runner.version))
            self.log.info("definition loaded", definition=name, version=runner.version,
                          topic=runner.definition.query.topic, every_s=runner.period, groups_resumed=resumed)
        self.log.info("definitions active", names=sorted(self.engine.runners),
                      skipped_other_environment=sorted(set(self.folder.definitions()) - set(self.engine.runners)))
        topics = self.engine.topics()
        action_topics = {a.topic for d in active for a in d.actions if isinstance(a, KafkaAction)}
        ensure_topics(self.settings, {t: self.settings.partitions_input for t in topics | action_topics}
                      | self.settings.topic_partitions())
        if topics != self.subscribed:
            if topics:
                self.consumer.subscribe(sorted(topics), on_assign=self.on_assign, on_revoke=self.on_revoke)
            else:
                self.consumer.unsubscribe()
            self.subscribed = topics

    def resumed_engine(self) -> RuleEngine:
        """An engine as after a restart: each group's state and the read positions from the run
        history; open windows are rebuilt by reading again from the committed offsets."""
        engine = RuleEngine(default_lateness_s=self.settings.rules_allowed_lateness_s,
                            idle_partition_s=self.settings.rules_idle_partition_s)
        engine.set_definitions(self.active)
        for name, runner in engine.runners.items():
            engine.restore(name, runner.version, self.history.latest_states(name, runner.version))
        engine.replayed_below = self.history.progress(self.settings.rules_group)
        return engine

    def on_assign(self, _consumer, partitions) -> None:
        if self.rebuild:
            # Eager rebalance (a re-subscribe, another member): every partition restarts at its
            # commit, i.e. at the oldest open window's first message. Keeping the open windows
            # would count those messages twice; every check so far is recorded, so resume from it.
            self.engine, self.read_to, self.committed, self.rebuild = self.resumed_engine(), {}, {}, False
        for tp in partitions:
            self.engine.assign(tp.topic, tp.partition, time.monotonic())

    def on_revoke(self, _consumer, partitions) -> None:
        self.rebuild = True
        for tp in partitions:
            self.engine.revoke(tp.topic, tp.partition)

    # -- one batch -----------------------------------------------------------------------------
    def process(self, msgs, now: float) -> None:
        s = self.settings
        for m in msgs:
            if not usable(m, self.log):
                continue
            tp = (m.topic(), m.partition())
            try:
                problems = self.engine.add(m.topic(), m.partition(), m.offset(),
                                           decode_object(m.value(), s.max_message_bytes), now)
            except ValueError as exc:
                problems = [str(exc)]
            if problems:
                reason = "; ".join(problems)
                dead_letter(self.producer, s, m, reason, "rules", self.tracker)
                self.log.warning("dead-lettered", topic=m.topic(), partition=m.partition(), offset=m.offset(),
                                 reason=reason)
                self.stats["dead_lettered"] += 1
            self.read_to[tp] = max(self.read_to.get(tp, 0), m.offset() + 1)
            self.stats["consumed"] += 1
        checks = self.engine.advance(now)
        for check in checks:
            self.stats["checks"] += 1
            if check.notify:
                self.fire(check)
            elif check.fired:
                check.actions = [{"type": "notification", "target": "",
                                  "outcome": f"not repeated: still firing since {_utc(check.state['firing_since']).isoformat()}"}]
        if not msgs and not checks:
            return
        # Durable first (outputs acknowledged, then the checks and read positions in one
        # transaction), then commit: a crash before the commit only means reading again.
        self.tracker.flush(self.producer)
        self.history.record(checks, self.read_to, s.rules_group)
        self.commit()

    def fire(self, check: Check) -> None:
        definition = self.engine.runners[check.definition].definition
        record = firing_record(check, definition, self.settings.environment)
        value = orjson.dumps(record.model_dump(mode="json"))
        produce(self.producer, self.settings.topic_anomalies, value, check.group.encode(), on_delivery=self.tracker)
        check.actions = [{"type": "anomalies", "target": self.settings.topic_anomalies, "outcome": "produced"}]
        check.actions += run_actions(definition.actions, record, producer=self.producer, tracker=self.tracker,
                                     log=self.log)
        self.stats["fired"] += 1
        self.log.info("rule fired", definition=check.definition, group=check.group,
                      window_end=_utc(check.window_end).isoformat(),
                      conditions=[f"{c.text}: {c.value}" for c in check.conditions])

    def commit(self) -> None:
        held = self.engine.held_offsets()
        offsets = []
        for tp, next_offset in self.read_to.items():
            safe = min(next_offset, held.get(tp, next_offset))
            if safe > self.committed.get(tp, -1):
                offsets.append(TopicPartition(tp[0], tp[1], safe))
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() not in REBALANCE_COMMIT_ERRORS:
                raise
            self.log.warning("commit refused by a rebalance", error=str(exc.args[0]))
            return
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset

    def run(self) -> None:
        s = self.settings
        ensure_topics(s)
        self.folder.watch()
        self.reload(force=True)
        self.log.info("rules service ready", rules_dir=str(s.rules_dir), environment=s.environment,
                      history=s.rules_db_url.split("@")[-1])
        last_report = time.monotonic()
        try:
            while not self.stopping:
                self.reload()
                msgs = self.consumer.consume(s.batch_size, s.poll_timeout_s) if self.subscribed else []
                if not self.subscribed:
                    time.sleep(s.poll_timeout_s)
                self.process(msgs, time.monotonic())
                if time.monotonic() - last_report > 10:
                    self.log.info("progress", **self.stats)
                    last_report = time.monotonic()
        finally:
            self.folder.stop()
            self.consumer.close()
            self.history.close()
            self.log.info("rules service stopped", **self.stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomstream rules", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules-dir", default=None, help="folder of definition files (default: rules/)")
    parser.add_argument("--environment", default=None, help="run the definitions of this environment")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"rules_dir": args.rules_dir, "environment": args.environment}.items() if v}
    service = RulesService(load_settings(**overrides))
    stop_on_signals(service)
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
