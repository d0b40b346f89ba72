"""Rule detector: event-time check windows per definition and group key, closed by a watermark.

For each definition, messages of its topic that pass its filter are grouped by the group-by key
and put in the tumbling window [k·T, (k+1)·T) of their event time (T = trigger_every). A window
is checked when the topic's watermark passes its end plus the allowed lateness; the watermark is
the lowest "newest event time" over the topic's partitions that delivered something recently
(an idle partition does not hold the others back). Every window between a group's first message
and the watermark yields one check, with data or "no data", in order. A message for a window
already checked is late: `add` returns why, and the service dead-letters it.

The engine is pure (no Kafka, no database): the rules service and the tests drive it the same way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

import numpy as np

from models.rules.conditions import ConditionOutcome, condition_state, no_data_outcome
from models.rules.definitions import Definition, RatioCondition, compile_predicate
from shared.records.metrics import TimestampUnit, parse_timestamp

NO_GROUP = "*"  # the group key of a definition without group_by
MAX_FUTURE_S = 86400  # an event time further ahead of this clock is refused as a producer error


@dataclass
class Check:
    """One check of one definition for one group key: what the run history stores."""

    definition: str
    version: str
    group: str
    topic: str
    window_start: float  # epoch seconds, UTC
    window_end: float
    status: str  # "fired", "ok" or "no_data"
    messages: int
    values: dict[str, float | None]  # aggregated values, e.g. {"average(value)": 81.2, "count": 3}
    conditions: list[ConditionOutcome]
    state: dict  # the group's state after this check (restored on restart)
    notify: bool = False  # fired, and not a repeat within the definition's repeat_every
    actions: list[dict] = field(default_factory=list)  # filled by the service: type, target, outcome

    @property
    def fired(self) -> bool:
        return self.status == "fired"


class _Window:
    """Running aggregates of one window; field values are kept only when a p95 needs them."""

    __slots__ = ("count", "fields", "numerators", "first_offsets")

    def __init__(self, fields: dict[str, bool], n_ratios: int):
        self.count = 0
        # field -> [n, sum, min, max, values or None]
        self.fields = {f: [0, 0.0, math.inf, -math.inf, [] if keep else None] for f, keep in fields.items()}
        self.numerators = [0] * n_ratios
        self.first_offsets: dict[tuple[str, int], int] = {}


class _Group:
    __slots__ = ("next_start", "conditions", "last_values", "no_data_streak", "firing_since", "notified_at")

    def __init__(self, next_start: float, conditions: list):
        self.next_start = next_start
        self.conditions = conditions
        self.last_values: dict | None = None
        self.no_data_streak = 0
        self.firing_since: float | None = None  # window end of the first check of the current firing run
        self.notified_at: float | None = None  # window end of the last notified firing


class DefinitionRunner:
    """The state of one definition: its open windows and, per group key, its conditions."""

    def __init__(self, definition: Definition, default_lateness_s: float):
        self.definition = definition
        self.version = definition.version
        self.period = definition.trigger_every
        self.lateness = definition.allowed_lateness if definition.allowed_lateness is not None else default_lateness_s
        self.matches = compile_predicate(definition.filter)
        self.ratio_queries = [(i, compile_predicate(c.query)) for i, c in enumerate(definition.conditions)
                              if isinstance(c, RatioCondition)]
        fields: dict[str, bool] = {}
        for c in definition.conditions:
            if not isinstance(c, RatioCondition) and c.aggregation != "count":
                fields[c.field] = fields.get(c.field, False) or c.aggregation == "p95"
        self.fields = fields
        self.groups: dict[str, _Group] = {}
        self.windows: dict[tuple[str, float], _Window] = {}

    def group_key(self, record: dict) -> str:
        by = self.definition.query.group_by
        if not by:
            return NO_GROUP
        return "/".join(str(record.get(f, "-")) for f in by)

    def new_group(self, start: float) -> _Group:
        return _Group(start, [condition_state(i, c) for i, c in enumerate(self.definition.conditions)])

    def aggregate(self, w: _Window | None) -> dict[str, float | None]:
        values: dict[str, float | None] = {"count": float(w.count) if w else 0.0}
        for name, (n, total, lo, hi, kept) in (w.fields.items() if w else []):
            values[f"average({name})"] = total / n if n else None
            values[f"sum({name})"] = total if n else None
            values[f"min({name})"] = lo if n else None
            values[f"max({name})"] = hi if n else None
            if kept is not None:
                values[f"p95({name})"] = float(np.percentile(kept, 95)) if n else None
        for j, (i, _query) in enumerate(self.ratio_queries):
            num = w.numerators[j] if w else 0
            values[f"ratio[{i}].numerator"] = float(num)
            values[f"ratio[{i}]"] = 100.0 * num / w.count if w and w.count else None
        return values

    def zero_values(self) -> dict[str, float | None]:
        """The `zero` no-data policy: every aggregate of an empty window is 0."""
        values: dict[str, float | None] = {"count": 0.0}
        for name, keep in self.fields.items():
            for agg in ("average", "sum", "min", "max") + (("p95",) if keep else ()):
                values[f"{agg}({name})"] = 0.0
        for i, _query in self.ratio_queries:
            values[f"ratio[{i}]"] = None  # 0 of 0 is no ratio: never a pass, whatever the policy
            values[f"ratio[{i}].numerator"] = 0.0
        return values

    def check(self, key: str, group: _Group, start: float, window: _Window | None) -> Check:
        d = self.definition
        policy = d.no_data
        if window is not None and window.count:
            values = self.aggregate(window)
            group.last_values, group.no_data_streak = values, 0
            evaluate = True
        else:
            group.no_data_streak += 1
            values = self.aggregate(None)
            evaluate = policy != "ignore"
            if policy == "zero":
                values = self.zero_values()
            elif policy == "previous":
                evaluate = group.last_values is not None
                values = dict(group.last_values) if evaluate else values
        if evaluate:
            outcomes = [state.evaluate(values) for state in group.conditions]
            fired = all(o.holds for o in outcomes)
        else:
            outcomes = [no_data_outcome(i, c) for i, c in enumerate(d.conditions)]
            fired = False
        has_data = window is not None and window.count > 0
        status = "fired" if fired else "ok" if has_data else "no_data"
        end = start + self.period
        notify = False
        if fired:
            if group.firing_since is None:  # a new firing run: always notified
                group.firing_since, notify = end, True
            else:
                notify = d.repeat_every == 0 or end - group.notified_at >= d.repeat_every
            if notify:
                group.notified_at = end
        elif evaluate:  # a check that saw data (or a no-data policy value) and did not fire ends the run
            group.firing_since = None
        group.next_start = end
        return Check(d.name, self.version, key, d.query.topic, start, end, status,
                     window.count if window else 0, values, outcomes, self.group_state(group), notify)

    @staticmethod
    def group_state(group: _Group) -> dict:
        return {"next_start": group.next_start, "no_data_streak": group.no_data_streak,
                "last_values": group.last_values, "firing_since": group.firing_since,
                "notified_at": group.notified_at, "conditions": [s.state() for s in group.conditions]}

    def restore(self, key: str, state: dict) -> None:
        group = self.new_group(float(state["next_start"]))
        group.no_data_streak = int(state.get("no_data_streak", 0))
        group.last_values = state.get("last_values")
        group.firing_since, group.notified_at = state.get("firing_since"), state.get("notified_at")
        for cond_state, saved in zip(group.conditions, state.get("conditions", [])):
            cond_state.restore(saved)
        self.groups[key] = group


class RuleEngine:
    def __init__(self, definitions: Iterable[Definition] = (), default_lateness_s: float = 60.0,
                 idle_partition_s: float = 10.0, timestamp_unit: TimestampUnit = "seconds"):
        self.default_lateness_s = default_lateness_s
        self.timestamp_unit = timestamp_unit  # of a number in a timestamp field (setting timestamp_unit)
        self.idle_partition_s = idle_partition_s
        self.runners: dict[str, DefinitionRunner] = {}
        # topic -> partition -> [newest event time, processing time it last delivered]
        self.partitions: dict[str, dict[int, list[float]]] = {}
        # (topic, partition) -> offset below which messages were already seen before a restart
        self.replayed_below: dict[tuple[str, int], int] = {}
        self.set_definitions(definitions)

    def set_definitions(self, definitions: Iterable[Definition]) -> set[str]:
        """Swap in a new set of definitions; one whose version is unchanged keeps its state.
        Returns the names that start afresh."""
        fresh = set()
        runners = {}
        for d in definitions:
            old = self.runners.get(d.name)
            if old is not None and old.version == d.version:
                old.definition = d  # description / actions / environment may have changed
                runners[d.name] = old
            else:
                runners[d.name] = DefinitionRunner(d, self.default_lateness_s)
                fresh.add(d.name)
        self.runners = runners
        return fresh

    def topics(self) -> set[str]:
        return {r.definition.query.topic for r in self.runners.values()}

    def add(self, topic: str, partition: int, offset: int, record: dict, now: float) -> list[str]:
        """Count one message in every definition it matches. Returns problems (bad field values,
        late arrival), each naming the definition; an empty list means it was taken in full."""
        problems: list[str] = []
        newest = None
        times: dict[str, float | None] = {}
        watermark = self.watermark(topic, now)  # this message moves it only after the loop
        for runner in self.runners.values():
            d = runner.definition
            if d.query.topic != topic:
                continue
            ts_field = d.query.timestamp_field
            if ts_field not in times:
                times[ts_field] = parse_timestamp(record.get(ts_field), self.timestamp_unit)
            ts = times[ts_field]
            if ts is None:
                given = record.get(ts_field)
                hint = (" (epoch milliseconds? set ANOMSTREAM_TIMESTAMP_UNIT=milliseconds)"
                        if self.timestamp_unit == "seconds" and isinstance(given, (int, float))
                        and parse_timestamp(given, "milliseconds") is not None else "")
                problems.append(f"{d.name}: {ts_field!r} is missing or not a timestamp (ISO 8601, or epoch "
                                f"{self.timestamp_unit} in 1970..2200){hint}")
                continue
            if not 0 <= ts <= time.time() + MAX_FUTURE_S:
                # e.g. epoch milliseconds: it would carry the watermark centuries ahead and make
                # every later message late.
                problems.append(f"{d.name}: {ts_field!r} {record.get(ts_field)!r} is before 1970 or more than "
                                f"{MAX_FUTURE_S // 3600}h in the future (epoch milliseconds?)")
                continue
            newest = ts if newest is None else max(newest, ts)
            if not runner.matches(record):
                continue
            bad = [f for f in runner.fields if f in record and not _is_number(record[f])]
            if bad:
                problems.append(f"{d.name}: field(s) {bad} must be finite numbers")
                continue
            key = runner.group_key(record)
            start = math.floor(ts / runner.period) * runner.period
            group = runner.groups.get(key)
            closed = (group is not None and start < group.next_start) or (
                group is None and watermark is not None and start + runner.period + runner.lateness <= watermark)
            if closed:
                if offset < self.replayed_below.get((topic, partition), -1):
                    continue  # counted before the restart, in a check that is already recorded
                problems.append(f"{d.name}: late: event time {_iso(ts)} falls in the check window "
                                f"{_iso(start)}–{_iso(start + runner.period)}, already checked "
                                f"(allowed lateness {runner.lateness:g}s)")
                continue
            if group is None:
                runner.groups[key] = group = runner.new_group(start)
            w = runner.windows.get((key, start))
            if w is None:
                w = runner.windows[(key, start)] = _Window(runner.fields, len(runner.ratio_queries))
            w.count += 1
            w.first_offsets.setdefault((topic, partition), offset)
            for name, acc in w.fields.items():
                v = record.get(name)
                if v is None:
                    continue  # a message without the field takes no part in its aggregates
                v = float(v)
                acc[0] += 1
                acc[1] += v
                acc[2] = min(acc[2], v)
                acc[3] = max(acc[3], v)
                if acc[4] is not None:
                    acc[4].append(v)
            for j, (_i, query) in enumerate(runner.ratio_queries):
                if query(record):
                    w.numerators[j] += 1
        if newest is not None:
            parts = self.partitions.setdefault(topic, {})
            entry = parts.setdefault(partition, [newest, now])
            entry[0] = max(entry[0], newest)
            entry[1] = now
        return problems

    def assign(self, topic: str, partition: int, now: float) -> None:
        """A partition this consumer now reads: it holds the watermark back (as if at the start of
        time) until it delivers or has been idle for idle_partition_s. Without this, a partition
        fetched first would carry the watermark past the others' messages, making them late."""
        self.partitions.setdefault(topic, {}).setdefault(partition, [-math.inf, now])

    def revoke(self, topic: str, partition: int) -> None:
        self.partitions.get(topic, {}).pop(partition, None)

    def watermark(self, topic: str, now: float) -> float | None:
        parts = self.partitions.get(topic)
        if not parts:
            return None
        active = [t for t, seen in parts.values() if now - seen <= self.idle_partition_s]
        wm = min(active) if active else max(t for t, _ in parts.values())
        return None if wm == -math.inf else wm

    def advance(self, now: float) -> list[Check]:
        """Every check whose window the watermark has passed (window end + allowed lateness)."""
        checks = []
        for runner in self.runners.values():
            wm = self.watermark(runner.definition.query.topic, now)
            if wm is None:
                continue
            for key in list(runner.groups):
                group = runner.groups[key]
                while group.next_start + runner.period + runner.lateness <= wm:
                    start = group.next_start
                    checks.append(runner.check(key, group, start, runner.windows.pop((key, start), None)))
                    if group.no_data_streak >= runner.definition.expire_after and \
                            not any(k == key for k, _ in runner.windows):
                        del runner.groups[key]  # gone quiet: forget it until it sends again
                        break
        return checks

    def held_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the lowest offset still held in an open window: offsets from
        there on must not be committed, or a crash would lose those windows' messages."""
        held: dict[tuple[str, int], int] = {}
        for runner in self.runners.values():
            for w in runner.windows.values():
                for tp, off in w.first_offsets.items():
                    held[tp] = min(held.get(tp, off), off)
        return held

    def restore(self, definition: str, version: str, states: dict[str, dict]) -> int:
        """Resume the groups of a definition from the run history, if its version is unchanged."""
        runner = self.runners.get(definition)
        if runner is None or runner.version != version:
            return 0
        live = {k: st for k, st in states.items()
                if int(st.get("no_data_streak", 0)) < runner.definition.expire_after}  # not expired groups
        for key, state in live.items():
            runner.restore(key, state)
        return len(live)


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
