"""alerter: posts every record of `anomalies` to Slack, committing each only after Slack accepted it.

A record is an ML score (kind "score", or no kind: older records), a rule firing (kind "rule",
written by the rules service; it goes to each channel its definition names) or a scored scrape of
the broker's own metrics (kind "cluster", Real-Time K-Means) or an anomalous log session (kind
"log", written by the log detector).

Slack's 429 (Retry-After), 5xx and connection errors are retried by slack-sdk's retry handlers; when
they give up, the alert is retried with backoff until Slack takes it or the service stops (then it is
re-read on the next start). A per-series cooldown, in event time, suppresses repeats and counts them;
a rule firing has its own cooldown per definition and group, so it never hides an ML alert.

Each alert is posted at most once and none is lost: right after Slack accepted a post, and before
the record is committed, the alerter writes which record of the partition it posted (and to which
channels) to its changelog topic (services.alerter.state) and waits for the broker's
acknowledgement. On partition assignment it restores that marker and the cooldowns: a record read
again after a crash is skipped (`already_posted`) instead of posted again. The one gap left is a
crash after Slack answered and before the marker was acknowledged (milliseconds): that alert is
posted again.

Alertmanager-like (README "Alerting like Alertmanager"): every record gets
labels (services.alerter.matchers); one an active silence matches (services.alerter.silences) is
counted and logged, not posted; routes pick its channel (services.alerter.routing). With
`alert_grouping`, records are grouped per channel and `alert_group_by` labels
(services.alerter.grouping: group_wait, group_interval, resolve_timeout) and posted as one message
per group notification. A grouped record is held back from the commit until its group's
notification was accepted (`committable`) and a `sent:<offset>` marker says so on the changelog: a
crash before the notification re-reads it and groups it again (none lost), a record read again
after its notification is not posted again. The series notified as firing are on the changelog
too (`firing:`), so a series that goes quiet across a restart still gets its resolved notice. Not
durable: the groups' timers (after a restart a new group waits group_wait again).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import click
from confluent_kafka import TopicPartition
from pydantic import ValidationError
from slack_sdk.errors import SlackApiError

from services.alerter.chart import Recent, render_png
from services.alerter.formatting import (
    as_utc,
    format_alert,
    format_cluster_alert,
    format_group,
    format_log_alert,
    format_rule_alert,
)
from services.alerter.grouping import Alert, Group, Grouper
from services.alerter.matchers import alert_labels
from services.alerter.routing import Router
from services.alerter.silences import Silencer, silences_file
from services.alerter.slack import PERMANENT_CHANNEL_ERRORS, SlackNotifier
from services.alerter.state import (
    POSTED,
    ChangelogStore,
    MemoryStore,
    Posted,
    cooldown_entry,
    firing_entry,
    parse_firing,
    parse_partition,
    parse_sent,
    sent_entry,
)
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, run_command
from shared.config import Settings, load_settings
from shared.kafka import group_instance_id
from shared.records.anomalies import anomaly_record_adapter
from shared.records.kmeans import ClusterScoreRecord
from shared.records.logs import LogSessionRecord
from shared.records.rules import RuleFiringRecord
from shared.stream import Processor, Result, StreamLoop
from shared.telemetry import SLACK_POSTS

KEEP_ALIVE_EVERY_S = 5.0  # well inside any max.poll.interval.ms
# Grouping: the groups are looked over for a due notification at most this often (not after every
# record: a backlog of anomalies over many groups would pay for every group each time).
FLUSH_EVERY_S = 0.2


# deliver(): the partition was revoked during the retries (compared by identity).
REVOKED: list[str] = ["revoked"]


@dataclass
class Outcome:
    """What became of one anomaly record; false while it is not done with (the service stopped
    mid-retry: it is not committed and is read again on the next start)."""

    done: bool
    dead_letter: str | None = None  # why it goes to dead_letter (invalid, or refused by Slack for good)

    def __bool__(self) -> bool:
        return self.done


class Alerter(Processor):
    name = "alerter"
    batch_size = 1  # one alert, one commit: a crash re-posts at most the alert in flight

    def __init__(self, settings: Settings, log, store: ChangelogStore | MemoryStore | None = None, clock=time.time):
        self.settings = settings
        self.log = log
        self.clock = clock  # wall time, for silences and grouping (Alertmanager's); the cooldown is in event time
        self.slack = SlackNotifier(settings)
        self.router = Router(settings.alert_routes, settings.slack_channel)
        self.silencer = Silencer(silences_file(settings), log, clock)
        self.grouping = settings.alert_grouping
        self.ticks_when_idle = self.grouping  # group timers fire with no input
        self.grouper = Grouper(settings.alert_group_by, settings.alert_group_wait_s, settings.alert_group_interval_s,
                               settings.alert_resolve_timeout_s, clock)
        self.sent: dict[int, dict[int, list]] = {}  # grouping: partition -> offset -> targets notified
        self.held: dict[tuple[int, int], set[tuple]] = {}  # grouping: (partition, offset) -> groups yet to notify
        self.flushed_at = float("-inf")  # time.monotonic() of the last look for due group notifications
        self.recent = Recent(settings.alert_chart_points if self.slack.web is not None else 0)
        self.responses: dict = {}  # target -> Slack's answer to the last post there (channel id, ts)
        self.silenced = Counter()  # silence id -> anomalies it kept from Slack
        self.webhook_warned: set[str] = set()  # rule definitions whose channels a webhook ignores, said once
        self.loop: StreamLoop | None = None
        self.store = store if store is not None else ChangelogStore(settings, log)
        # cooldown key (series, or "rule:<definition>:<group>") -> event time of the last alert posted
        self.last_alert: dict[str, float] = {}
        self.cooldown_partition: dict[str, int] = {}  # cooldown key -> the partition whose record set it
        self.posted: dict[int, Posted] = {}  # per partition restored (assigned): its last record posted
        self.stats = Counter()
        self.suppressed = Counter()
        self.stopping = False

    def deliver(self, text: str, blocks: list[dict], channels: list[str] | None = None, done=(),
                on_posted=None, still_ours=None) -> list[str] | None:
        """Post to every target (but those in `done`) until each accepted; `on_posted(target)` right
        after each acceptance. Returns the targets Slack refused for good (a channel that does not
        exist or the bot is not in: retrying cannot help, and would block every alert behind this
        one), None if the service is stopping first (the alert is not committed), or REVOKED if
        `still_ours()` turned false during the retries (the partition went to another member, which
        posts it). A target that accepted is not posted again when a later one is retried."""
        refused = []
        self.responses = {}  # only this alert's answers: a chart never goes under an older message
        for channel in self.slack.targets(channels or []):
            if channel in done:
                continue
            delay = 1.0
            while True:
                if self.stopping:
                    return None
                if still_ours is not None and not still_ours():
                    return REVOKED
                try:
                    self.responses[channel] = self.slack.post(text, blocks, channel)
                    SLACK_POSTS.labels("posted").inc()
                    if on_posted is not None:
                        on_posted(channel)
                    break
                except SlackApiError as exc:
                    error = exc.response.get("error") if exc.response is not None else None
                    if error in PERMANENT_CHANNEL_ERRORS:
                        SLACK_POSTS.labels("refused").inc()
                        refused.append(f"{channel}: {error}")
                        break
                    SLACK_POSTS.labels("failed").inc()
                    # A 429's Retry-After is a floor for the next try.
                    retry_after = float((exc.response.headers or {}).get("Retry-After", 0) or 0) \
                        if exc.response is not None else 0.0
                    self.log.warning("slack post failed; will retry", error=str(exc), channel=channel,
                                     retry_in_s=max(delay, retry_after))
                    self.wait(max(delay, retry_after))
                    delay = min(delay * 2, 60)
                except Exception as exc:  # slack-sdk's own retries are spent; keep the alert, wait, retry
                    SLACK_POSTS.labels("failed").inc()
                    self.log.warning("slack post failed; will retry", error=str(exc), channel=channel,
                                     retry_in_s=delay)
                    self.wait(delay)
                    delay = min(delay * 2, 60)
        return refused

    def attach(self, loop: StreamLoop) -> None:
        self.loop = loop

    def wait(self, seconds: float) -> None:
        """Back off before retrying Slack; the group keeps this member meanwhile (no
        max.poll.interval.ms expiry, rebalances served), however long Slack stays down."""
        while seconds > 0 and not self.stopping:
            if self.loop is not None:
                self.loop.keep_alive()
            time.sleep(min(seconds, KEEP_ALIVE_EVERY_S))
            seconds -= KEEP_ALIVE_EVERY_S

    def topics(self) -> list[str]:
        return [self.settings.topic_anomalies]

    # -- durable state (services.alerter.state) ------------------------------------------------
    def on_assign(self, partitions: list[TopicPartition]) -> None:
        new = [tp.partition for tp in partitions
               if tp.topic == self.settings.topic_anomalies and tp.partition not in self.posted]
        if new:
            self.restore(new)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions if tp.topic == self.settings.topic_anomalies}
        for p in gone:
            self.posted.pop(p, None)
            self.sent.pop(p, None)
        for ref in [ref for ref in self.held if ref[0] in gone]:
            del self.held[ref]
        self.grouper.drop(gone)
        for key in [k for k, p in self.cooldown_partition.items() if p in gone]:
            del self.cooldown_partition[key]
            self.last_alert.pop(key, None)

    def restore(self, partitions: list[int]) -> None:
        started = time.monotonic()
        loaded = self.store.load(sorted(partitions))
        cooldowns = 0
        for p, entries in loaded.items():
            self.posted[p], restored = parse_partition(entries)
            self.sent[p] = parse_sent(entries)
            for channel, fingerprint, seen, labels in parse_firing(entries):
                self.grouper.restore(channel, Alert(fingerprint, labels, labels.get("series", fingerprint),
                                                    ref=(p, -1)), seen)
            cooldowns += len(restored)
            for key, event_time in restored.items():
                # A key set from two partitions (rare: records of one key usually share a partition): the later time.
                if key not in self.last_alert or event_time > self.last_alert[key]:
                    self.last_alert[key], self.cooldown_partition[key] = event_time, p
        self.log.info("alerter state restored", partitions=sorted(partitions), cooldowns=cooldowns,
                      last_posted={p: self.posted[p].offset for p in sorted(partitions)},
                      seconds=round(time.monotonic() - started, 3))

    def set_cooldown(self, key: str, event_time: float, partition: int) -> None:
        """In memory, and durable (written and acknowledged) when a cooldown is on."""
        if partition not in self.posted:  # revoked while its alert was being posted (keep_alive): not ours now
            return
        changed = self.last_alert.get(key) != event_time or self.cooldown_partition.get(key) != partition
        self.last_alert[key], self.cooldown_partition[key] = event_time, partition
        if changed and self.settings.alert_cooldown_s > 0:
            self.store.save(partition, [cooldown_entry(key, event_time)])

    def mark_posted(self, msg, target: str | None) -> None:
        """Slack accepted `msg` at `target`: durable before anything else happens to it."""
        p, offset = msg.partition(), msg.offset()
        posted = self.posted.get(p)
        if posted is None:
            # Revoked during the Slack retries (keep_alive serves rebalances) and not given back: the
            # new owner restored the marker before this post, and may post the alert again.
            self.log.warning("partition revoked while its alert was being posted; not marked", partition=p,
                             offset=offset)
            return
        if posted.offset != offset:
            posted = self.posted[p] = Posted(offset, [])
        posted.done.append(target)
        self.store.save(p, [(POSTED, posted.encode())])

    def fault_pause(self, **where) -> None:
        """For tests only (fault_pause_after_post_s): wait between a post's durable marker and its commit."""
        pause = self.settings.fault_pause_after_post_s
        if pause <= 0:
            return
        self.log.warning("fault injection: paused after a post, before its commit", **where, pause_s=pause)
        until = time.monotonic() + pause
        while time.monotonic() < until and not self.stopping:
            time.sleep(0.05)

    def process(self, messages: list, now: float) -> Result:
        result = Result()
        for i, msg in enumerate(messages):
            outcome = self.handle(msg)
            if not outcome:
                result.handled = i  # stopping mid-retry: leave it uncommitted
                break
            if outcome.dead_letter:
                result.dead_letters.append((msg, outcome.dead_letter))
        if self.grouping and result.handled is None and time.monotonic() - self.flushed_at >= FLUSH_EVERY_S:
            self.flushed_at = time.monotonic()
            result.state_changed |= self.flush(result)
        return result

    def refresh(self) -> None:
        self.silencer.refresh()

    # -- grouping (services.alerter.grouping) ---------------------------------------------------
    def group(self, msg, rec, labels: dict[str, str], channels: list[str], text: str, blocks: list) -> Outcome:
        """Into the group of each target it goes to; held back from the commit until notified."""
        p, offset = msg.partition(), msg.offset()
        sent = self.sent.setdefault(p, {}).get(offset, [])
        summary = text.removeprefix(":rotating_light: ")
        waiting = set()
        for target in self.slack.targets(channels):
            alert = Alert(f"{labels['kind']}:{rec.series}", labels, summary, text, blocks, (p, offset), msg)
            group = self.grouper.add(target, alert, pending=target not in sent)
            if target not in sent:
                waiting.add(group.key)
        if not waiting:
            return self.already_posted(msg)
        self.held[(p, offset)] = waiting
        self.stats["grouped"] += 1
        self.log.info("alert grouped", series=rec.series, kind=labels["kind"], partition=p, offset=offset,
                      groups=len(waiting))
        return Outcome(True)

    def committable(self, read_to: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Not past a record whose group notification is still to come."""
        if not self.held:
            return read_to
        first: dict[int, int] = {}
        for p, offset in self.held:
            first[p] = min(first.get(p, offset), offset)
        return {(t, p): min(o, first[p]) if p in first else o for (t, p), o in read_to.items()}

    def flush(self, result: Result) -> bool:
        """Post every group notification that is due; True if any was."""
        changed = False
        for group in self.grouper.due():
            firing, resolved = list(group.pending), list(group.resolved)
            text, blocks = format_group(group.describe(), firing, resolved, self.settings.alert_group_max_listed,
                                        self.settings.alert_resolve_timeout_s)
            refused: list[str] | None = []
            if not self.slack.configured:
                self.log.info("alert", text=text, **({"channels": [group.channel]} if group.channel else {}))
                self.stats["logged"] += 1
            else:
                refused = self.deliver(text, blocks, [group.channel] if group.channel else [])
                if refused is None:  # stopping: the held records are read again on the next start
                    return changed
                if refused:
                    reason = f"slack refused the alert for good: {'; '.join(refused)}"
                    self.log.error("alert not deliverable", reason=reason, group=group.describe())
                    result.dead_letters += [(a.msg, reason) for a in firing if a.msg is not None]
                else:
                    self.stats["posted"] += 1
                    self.log.info("group notification posted", group=group.describe(), channel=group.channel,
                                  firing=len(firing), resolved=len(resolved))
                    charted = {a.labels["series"]: self.recent.of(a.labels["series"]) for a in firing
                               if a.labels["kind"] == "metric"}
                    if charted:
                        self.attach_chart(group.channel if self.slack.web is not None else None, charted)
            if resolved:
                self.stats["resolved"] += len(resolved)
                for a in resolved:
                    self.forward_resolved(a)
            self.mark_sent(group, firing, resolved)
            if firing:
                self.fault_pause(group=group.describe(), records=len(firing))
            self.grouper.notified(group, firing, resolved)
            changed = True
        return changed

    def mark_sent(self, group: Group, firing: list[Alert], resolved: list[Alert]) -> None:
        """The group's notification has these records: durable, then they may be committed. Its
        series are firing (or resolved) on the changelog, for a resolved notice after a restart."""
        writes: dict[int, list] = defaultdict(list)
        for alert in resolved:
            if alert.ref is not None and alert.ref[0] in self.posted:
                writes[alert.ref[0]].append(firing_entry(group.channel, alert.fingerprint))
        for alert in {a.fingerprint: a for a in firing}.values():  # the last record of each series
            if alert.ref[0] in self.posted and alert.fingerprint in group.firing and self.grouper.resolve_timeout > 0:
                writes[alert.ref[0]].append(firing_entry(group.channel, alert.fingerprint,
                                                         group.firing[alert.fingerprint], alert.labels))
        for alert in firing:
            p, offset = alert.ref
            if p not in self.posted:  # revoked meanwhile: its new owner reads it again
                continue
            targets = self.sent.setdefault(p, {}).setdefault(offset, [])
            if group.channel not in targets:
                targets.append(group.channel)
            writes[p].append(sent_entry(offset, targets))
            waiting = self.held.get((p, offset))
            if waiting is not None:
                waiting.discard(group.key)
                if not waiting:
                    del self.held[(p, offset)]
        committed = self.loop.committed if self.loop is not None else {}
        for p, entries in writes.items():
            done_below = committed.get((self.settings.topic_anomalies, p), -1)
            for offset in [o for o in self.sent[p] if o < done_below]:  # committed past: not read again
                del self.sent[p][offset]
                entries.append(sent_entry(offset, None))
            self.store.save(p, entries)

    # -- extras: the chart, Alertmanager ---------------------------------------------------------
    def attach_chart(self, target: str | None, series_points: dict[str, list]) -> None:
        """A PNG of the recent points, in the thread of the message just posted at `target` (bot
        token only); a failure is logged, the alert is delivered already."""
        response = self.responses.get(target)
        if self.slack.web is None or self.recent.points <= 0 or response is None:
            return
        try:
            png = render_png(series_points)
            self.slack.upload_png(png, response["channel"], response["ts"], ", ".join(series_points)[:80])
            self.stats["charts"] += 1
        except Exception as exc:
            self.stats["charts_failed"] += 1
            self.log.warning("chart not uploaded; the alert was posted without it", error=str(exc))

    def forward(self, rec, labels: dict[str, str], text: str) -> None:
        """To an existing Alertmanager as well (alertmanager_url): one alert, firing."""
        if not self.settings.alertmanager_url:
            return
        starts = as_utc(getattr(rec, "timestamp")).isoformat()
        self.post_alertmanager([{"labels": {"alertname": f"anomstream_{labels['kind']}"} | labels,
                                 "annotations": {"summary": text.removeprefix(":rotating_light: ")[:1000]},
                                 "startsAt": starts}])

    def forward_resolved(self, alert: Alert) -> None:
        if not self.settings.alertmanager_url:
            return
        now = as_utc(datetime.fromtimestamp(self.clock(), timezone.utc)).isoformat()
        self.post_alertmanager([{"labels": {"alertname": f"anomstream_{alert.labels['kind']}"} | alert.labels,
                                 "endsAt": now}])

    def post_alertmanager(self, alerts: list[dict]) -> None:
        url = self.settings.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        request = urllib.request.Request(url, data=json.dumps(alerts).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.slack_timeout_s) as resp:
                resp.read()
            self.stats["alertmanager_sent"] += len(alerts)
        except Exception as exc:  # Slack is the delivery this service guarantees; this one is best effort
            self.stats["alertmanager_failed"] += len(alerts)
            self.log.warning("alertmanager did not take the alert", url=url, error=str(exc))

    def handle(self, msg) -> Outcome:
        """Post (or suppress, or log) one anomaly record, unless it was posted before a restart."""
        p, offset = msg.partition(), msg.offset()
        if p not in self.posted:  # not restored by an assignment (a processor run without a consumer group)
            self.restore([p])
        posted = self.posted[p]
        if offset < posted.offset and not self.grouping:  # handled before the restart: a later one was posted
            return self.already_posted(msg)
        try:
            rec = anomaly_record_adapter.validate_json(msg.value() or b"")
        except ValidationError as exc:
            return Outcome(True, f"invalid anomaly record: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}")
        if isinstance(rec, RuleFiringRecord):
            key, channels, (text, blocks) = f"rule:{rec.definition}:{rec.series}", rec.channels, format_rule_alert(rec)
            event_time = as_utc(rec.window_end).timestamp()
        elif isinstance(rec, LogSessionRecord):
            key, channels, (text, blocks) = f"log:{rec.series}", [], format_log_alert(rec)
            event_time = as_utc(rec.timestamp).timestamp()
        elif isinstance(rec, ClusterScoreRecord):
            key, channels, (text, blocks) = f"cluster:{rec.series}", [], format_cluster_alert(rec)
            event_time = as_utc(rec.timestamp).timestamp()
        else:
            key, channels, (text, blocks) = rec.series, [], format_alert(rec)
            event_time = rec.timestamp.timestamp()
            self.recent.add(rec.series, event_time, rec.value)
        labels = alert_labels(rec)
        silence = self.silencer.silenced_by(labels)
        if silence is not None:
            self.silenced[silence.id] += 1
            self.stats["silenced"] += 1
            self.log.info("alert silenced", series=rec.series, kind=labels["kind"], silence=silence.id)
            if self.grouping:  # muted, yet still anomalous: a series already firing is not resolved meanwhile
                for target in self.slack.targets(self.router.channels(labels, channels)):
                    self.grouper.touch(target, labels, f"{labels['kind']}:{rec.series}")
            return Outcome(True)
        if channels and self.slack.webhook is not None and rec.definition not in self.webhook_warned:
            self.webhook_warned.add(rec.definition)  # once per definition, not per firing
            self.log.warning("a rule definition names slack channels, but slack_webhook_url posts to the "
                             "webhook's own channel: they are ignored (set ANOMSTREAM_SLACK_BOT_TOKEN to honour them)",
                             definition=rec.definition, channels=channels)
        channels = self.router.channels(labels, channels)
        self.forward(rec, labels, text)
        if self.grouping:
            return self.group(msg, rec, labels, channels, text, blocks)
        done = posted.done if offset == posted.offset else []
        if done and all(t in done for t in self.slack.targets(channels or [])):
            # Posted before a crash or a stop cut in before its commit; its cooldown may not have been written.
            self.set_cooldown(key, event_time, p)
            return self.already_posted(msg)
        last = self.last_alert.get(key)
        if not done and last is not None and abs(event_time - last) < self.settings.alert_cooldown_s:
            self.suppressed[key] += 1
            self.stats["suppressed"] += 1
            return Outcome(True)
        dead_letter = None
        if not self.slack.configured:
            self.log.info("alert", text=text, **({"channels": channels} if channels else {}))
            self.stats["logged"] += 1
        else:
            refused = self.deliver(text, blocks, channels, done=list(done),
                                   on_posted=lambda target: self.mark_posted(msg, target),
                                   still_ours=lambda: p in self.posted)
            if refused is None:
                return Outcome(False)
            if refused is REVOKED:
                # A rebalance served while Slack was retried gave the partition to another member:
                # it posts this alert (the stream core does not commit it here), so this one stops.
                self.log.warning("partition revoked while its alert was being retried; left to its new owner",
                                 partition=p, offset=offset)
                self.stats["left_to_new_owner"] += 1
                return Outcome(True)
            if p in self.posted and self.posted[p].offset == offset:
                self.fault_pause(partition=msg.partition(), offset=msg.offset())
            if refused:  # kept, with the reason, where an operator looks for what was not delivered
                dead_letter = f"slack refused the alert for good: {'; '.join(refused)}"
                self.log.error("alert not deliverable", reason=dead_letter, series=rec.series)
            if len(refused) < len(self.slack.targets(channels or [])):
                if rec.kind == "score":
                    for target in self.slack.targets(channels or []):
                        self.attach_chart(target, {rec.series: self.recent.of(rec.series)})
                self.log.info("alert posted", kind=rec.kind, series=rec.series, event_time=str(rec.timestamp),
                              **({"definition": rec.definition} if rec.kind == "rule" else {}))
                self.stats["posted"] += 1
        self.set_cooldown(key, event_time, p)
        return Outcome(True, dead_letter)

    def warn_webhook_channels(self) -> None:
        """A webhook posts to the one channel it was made for: routes' channels (and rules' own) are
        not honoured. Said once at start-up rather than refused: every alert still arrives."""
        if self.slack.webhook is not None and self.router.routes:
            self.log.warning("slack_webhook_url posts every alert to the webhook's own channel; the channels of "
                             "alert_routes are ignored (and so are rule definitions' channels): set "
                             "ANOMSTREAM_SLACK_BOT_TOKEN to route", routes=[r.channel for r in self.router.routes])

    def already_posted(self, msg) -> Outcome:
        self.log.info("already posted before a restart; skipped", partition=msg.partition(), offset=msg.offset())
        self.stats["already_posted"] += 1
        return Outcome(True)

    def progress(self) -> dict:
        extra = {"silenced_by": dict(self.silenced)} if self.silenced else {}
        if self.grouping:
            extra |= {"groups": len(self.grouper.groups), "held": len(self.held)}
        return dict(self.stats) | {"suppressed_by_series": dict(self.suppressed)} | extra

    def close(self) -> None:
        self.store.close()


@click.command("alert", help=__doc__, context_settings=CONTEXT)
def command() -> int:
    settings = load_settings()
    log = setup_logging(settings, "alerter")
    alerter = Alerter(settings, log)
    if not alerter.slack.configured:
        log.warning("slack is not configured (ANOMSTREAM_SLACK_BOT_TOKEN or "
                    "ANOMSTREAM_SLACK_WEBHOOK_URL); alerts are only logged")
    alerter.warn_webhook_channels()
    loop = StreamLoop(settings, alerter, settings.alerter_group, log,
                      instance_id=group_instance_id(settings, settings.alerter_group, "alerter"))
    loop.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream alert")


if __name__ == "__main__":
    sys.exit(main())
