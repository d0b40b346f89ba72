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

import sys
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import click

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
from shared.cli import CONTEXT, PATH, run_command, verbatim
from shared.config import Settings, load_settings
from shared.kafka import (
    ensure_topics,
    group_instance_id,
)
from shared.records.common import decode_object
from shared.records.metrics import MetricInput, decode_metric_fields
from shared.records.rules import RuleFiringRecord
from shared.stream import Output, Processor, Result, StreamLoop


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


class RulesProcessor(Processor):
    """Definitions evaluated in event-time check windows; firings to `anomalies` and the actions;
    every check recorded in the run history before the commit, which never passes an open window."""

    name = "rules"
    ticks_when_idle = True  # windows close on the watermark and on idle partitions, input or not

    def __init__(self, settings: Settings, log):
        self.settings = settings
        self.log = log
        self.metric_topics = set(settings.topic_models())
        self.metric_input = MetricInput.of(settings)
        self.folder = DefinitionFolder(settings.rules_dir)
        self.history = RunHistory(settings.rules_db_url)
        self.active: list[Definition] = []
        self.engine = self.resumed_engine()
        self.rebuild = False  # set on a revoke: the open windows must be re-read from the commit
        self.read_to: dict[tuple[str, int], int] = {}  # next offset to read, per partition read so far
        self.pending: list[Check] = []  # checks made since the last checkpoint
        self.subscribed: set[str] = set()
        self.loop: StreamLoop | None = None  # its producer sends the kafka actions' outputs too
        self.stats = Counter()
        self.folder.watch()
        self.reload(force=True)

    def attach(self, loop: StreamLoop) -> None:
        self.loop = loop

    # -- definitions ---------------------------------------------------------------------------
    def refresh(self) -> None:
        self.reload()

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
        self.subscribed = topics

    def topics(self) -> list[str]:
        return sorted(self.subscribed)

    def resumed_engine(self) -> RuleEngine:
        """An engine as after a restart: each group's state and the read positions from the run
        history; open windows are rebuilt by reading again from the committed offsets."""
        engine = RuleEngine(default_lateness_s=self.settings.rules_allowed_lateness_s,
                            idle_partition_s=self.settings.rules_idle_partition_s,
                            timestamp_unit=self.settings.timestamp_unit)
        engine.set_definitions(self.active)
        for name, runner in engine.runners.items():
            engine.restore(name, runner.version, self.history.latest_states(name, runner.version))
        engine.replayed_below = self.history.progress(self.settings.rules_group)
        return engine

    def on_assign(self, partitions) -> None:
        if self.rebuild:
            # Eager rebalance (a re-subscribe, another member): every partition restarts at its
            # commit, i.e. at the oldest open window's first message. Keeping the open windows
            # would count those messages twice; every check so far is recorded, so resume from it.
            self.engine, self.read_to, self.rebuild = self.resumed_engine(), {}, False
        for tp in partitions:
            self.engine.assign(tp.topic, tp.partition, time.monotonic())

    def on_revoke(self, partitions) -> None:
        self.rebuild = True
        for tp in partitions:
            self.engine.revoke(tp.topic, tp.partition)

    # -- one batch -----------------------------------------------------------------------------
    def process(self, messages: list, now: float) -> Result:
        result = Result()
        for m in messages:
            tp = (m.topic(), m.partition())
            try:
                problems = self.engine.add(m.topic(), m.partition(), m.offset(), self.decode(m), now)
            except ValueError as exc:
                problems = [str(exc)]
            if problems:
                result.dead_letters.append((m, "; ".join(problems)))
            self.read_to[tp] = max(self.read_to.get(tp, 0), m.offset() + 1)
        checks = self.engine.advance(now)
        for check in checks:
            self.stats["checks"] += 1
            if check.notify:
                result.outputs.append(self.fire(check))
            elif check.fired:
                check.actions = [{"type": "notification", "target": "",
                                  "outcome": f"not repeated: still firing since {_utc(check.state['firing_since']).isoformat()}"}]
        self.pending += checks
        result.state_changed = bool(checks)
        return result

    def decode(self, m) -> dict:
        """A message of a metric topic (one the detector scores) is read as the detector reads it,
        labels included, with the same refusals; any other topic's is any JSON object."""
        s = self.settings
        if m.topic() in self.metric_topics:
            return decode_metric_fields(m.value(), s.max_message_bytes, s.max_abs_value, self.metric_input)
        return decode_object(m.value(), s.max_message_bytes)

    def fire(self, check: Check) -> Output:
        definition = self.engine.runners[check.definition].definition
        record = firing_record(check, definition, self.settings.environment)
        check.actions = [{"type": "anomalies", "target": self.settings.topic_anomalies, "outcome": "produced"}]
        check.actions += run_actions(definition.actions, record, producer=self.loop.producer,
                                     tracker=self.loop.tracker, log=self.log)
        self.stats["fired"] += 1
        self.log.info("rule fired", definition=check.definition, group=check.group,
                      window_end=_utc(check.window_end).isoformat(),
                      conditions=[f"{c.text}: {c.value}" for c in check.conditions])
        return Output(self.settings.topic_anomalies, record.encode(), check.group.encode())

    def checkpoint(self) -> None:
        """Outputs are acknowledged: record the checks and how far each partition was read, in
        one transaction; a crash before the commit only means reading again."""
        self.history.record(self.pending, self.read_to, self.settings.rules_group)
        self.pending = []

    def committable(self, read_to: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        held = self.engine.held_offsets()  # never past a message still held in an open window
        return {tp: min(next_offset, held.get(tp, next_offset)) for tp, next_offset in read_to.items()}

    def progress(self) -> dict:
        return dict(self.stats)

    def close(self) -> None:
        self.folder.stop()
        self.history.close()


@click.command("rules", help=verbatim(__doc__), context_settings=CONTEXT)
@click.option("--rules-dir", type=PATH, default=None, help="folder of definition files (default: rules/)")
@click.option("--environment", default=None, help="run the definitions of this environment")
def command(rules_dir: Path | None, environment: str | None) -> int:
    overrides = {k: v for k, v in {"rules_dir": rules_dir, "environment": environment}.items() if v}
    settings = load_settings(**overrides)
    log = setup_logging(settings, "rules")
    loop = StreamLoop(settings, RulesProcessor(settings, log), settings.rules_group, log,
                      instance_id=group_instance_id(settings, settings.rules_group, "rules"))
    loop.serve(
        rules_dir=str(settings.rules_dir), environment=settings.environment,
        history=settings.rules_db_url.split("@")[-1])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream rules")


if __name__ == "__main__":
    sys.exit(main())
