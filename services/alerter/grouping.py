"""Alertmanager's grouping, on a clock of its own (wall time; a fake one in tests).

Alerts are grouped per channel and per the values of `group_by` labels. A new group waits
`group_wait` before its first notification (to collect the alerts that come with the first);
after a notification, the next one of that group comes at most every `group_interval`, and only
when something changed (new alerts, or series resolved). A series of a group resolves when no
anomaly of it came for `resolve_timeout` (Alertmanager's resolve_timeout: an alert that stops
firing); its resolved notice goes out with the group's next notification. A group with nothing
firing and nothing left to say is forgotten (without resolve_timeout: once its group_interval is
over, as nothing would ever resolve).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# A group holding this many new alerts is notified at once, whatever its timers: each one is held
# in memory (and its record uncommitted) until then, and a backlog read at full speed must not pile
# up without bound.
MAX_PENDING = 1000


@dataclass
class Alert:
    fingerprint: str  # the series' identity: kind + series
    labels: dict[str, str]
    summary: str  # one line for a group's message
    text: str = ""  # the alert's own message (posted as such when it is a group's only news)
    blocks: list = field(default_factory=list)
    ref: tuple[int, int] | None = None  # (partition, offset) of its record
    msg: object = None  # the Kafka message (dead-lettering)


@dataclass
class Group:
    key: tuple
    channel: str | None
    labels: dict[str, str]  # the group_by labels
    created: float
    pending: list[Alert] = field(default_factory=list)  # new alerts not notified yet
    firing: dict[str, float] = field(default_factory=dict)  # fingerprint -> when its last anomaly came
    last: dict[str, Alert] = field(default_factory=dict)  # fingerprint -> its last alert
    resolved: list[Alert] = field(default_factory=list)  # resolved, not notified yet
    last_notified: float | None = None

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items()) or "all"


class Grouper:
    def __init__(self, group_by: list[str], group_wait: float, group_interval: float, resolve_timeout: float,
                 clock=time.time):
        self.group_by, self.clock = list(group_by), clock
        self.group_wait, self.group_interval, self.resolve_timeout = group_wait, group_interval, resolve_timeout
        self.groups: dict[tuple, Group] = {}

    def key(self, channel: str | None, labels: dict[str, str]) -> tuple:
        return (channel, *(labels.get(name, "") for name in self.group_by))

    def add(self, channel: str | None, alert: Alert, pending: bool = True) -> Group:
        """An anomaly for `channel`; `pending=False`: notified before (read again after a restart),
        it only keeps its series firing."""
        now = self.clock()
        key = self.key(channel, alert.labels)
        group = self.groups.get(key)
        if group is None:
            labels = {name: alert.labels.get(name, "") for name in self.group_by}
            group = self.groups[key] = Group(key, channel, labels, now)
        if pending:
            group.pending.append(alert)
        if pending or alert.fingerprint not in group.firing:  # read again after a restart: not news
            group.firing[alert.fingerprint] = now
        group.last[alert.fingerprint] = alert
        group.resolved = [a for a in group.resolved if a.fingerprint != alert.fingerprint]  # firing again
        return group

    def restore(self, channel: str | None, alert: Alert, seen: float) -> None:
        """A series notified as firing before a restart, its last anomaly at `seen`: it resolves
        resolve_timeout after that, unless it fires again."""
        group = self.add(channel, alert, pending=False)
        group.firing[alert.fingerprint] = min(group.firing[alert.fingerprint], seen)

    def touch(self, channel: str | None, labels: dict[str, str], fingerprint: str) -> None:
        """A silenced anomaly of a series: not news, but the series is not quiet either."""
        group = self.groups.get(self.key(channel, labels))
        if group is not None and fingerprint in group.firing:
            group.firing[fingerprint] = self.clock()

    def due(self) -> list[Group]:
        """The groups whose notification is due now (resolving the series that went quiet first)."""
        now = self.clock()
        ready = []
        for group in list(self.groups.values()):
            if self.resolve_timeout > 0:
                quiet = [fp for fp, seen in group.firing.items() if now - seen >= self.resolve_timeout]
                for fp in quiet:
                    del group.firing[fp]
                    group.resolved.append(group.last.pop(fp))
            if not (group.pending or group.resolved):
                # Nothing to say: forgotten when nothing fires, or (no resolved notices) once its
                # group_interval is over, so that groups do not pile up.
                idle = self.resolve_timeout <= 0 and (group.last_notified is None
                                                      or now - group.last_notified >= self.group_interval)
                if not group.firing or idle:
                    del self.groups[group.key]
                continue
            if len(group.pending) >= MAX_PENDING:
                ready.append(group)
            elif group.last_notified is None:
                if now - group.created >= self.group_wait:
                    ready.append(group)
            elif now - group.last_notified >= self.group_interval:
                ready.append(group)
        return ready

    def notified(self, group: Group, firing: list[Alert], resolved: list[Alert]) -> None:
        """`group`'s notification of `firing` and `resolved` was delivered."""
        group.pending = [a for a in group.pending if all(a is not f for f in firing)]
        group.resolved = [a for a in group.resolved if all(a is not r for r in resolved)]
        group.last_notified = self.clock()
        if not (group.firing or group.pending or group.resolved):
            self.groups.pop(group.key, None)

    def drop(self, partitions: set[int]) -> None:
        """Partitions revoked: their alerts not notified yet are the new owner's, and so are their
        series (no resolved notice from here)."""
        for group in list(self.groups.values()):
            group.pending = [a for a in group.pending if a.ref is None or a.ref[0] not in partitions]
            for fp, alert in list(group.last.items()):
                if alert.ref is not None and alert.ref[0] in partitions:
                    group.firing.pop(fp, None)
                    group.last.pop(fp, None)
            if not (group.firing or group.pending or group.resolved):
                del self.groups[group.key]

    def pending_count(self) -> int:
        return sum(len(g.pending) for g in self.groups.values())
