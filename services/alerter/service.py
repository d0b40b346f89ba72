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
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import click
from confluent_kafka import TopicPartition
from pydantic import ValidationError
from slack_sdk.errors import SlackApiError

from services.alerter.formatting import (
    as_utc,
    format_alert,
    format_cluster_alert,
    format_log_alert,
    format_rule_alert,
)
from services.alerter.slack import PERMANENT_CHANNEL_ERRORS, SlackNotifier
from services.alerter.state import (
    POSTED,
    ChangelogStore,
    MemoryStore,
    Posted,
    cooldown_entry,
    parse_partition,
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

KEEP_ALIVE_EVERY_S = 5.0  # well inside any max.poll.interval.ms


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

    def __init__(self, settings: Settings, log, store: ChangelogStore | MemoryStore | None = None):
        self.settings = settings
        self.log = log
        self.slack = SlackNotifier(settings)
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
                    self.slack.post(text, blocks, channel)
                    if on_posted is not None:
                        on_posted(channel)
                    break
                except SlackApiError as exc:
                    error = exc.response.get("error") if exc.response is not None else None
                    if error in PERMANENT_CHANNEL_ERRORS:
                        refused.append(f"{channel}: {error}")
                        break
                    # A 429's Retry-After is a floor for the next try.
                    retry_after = float((exc.response.headers or {}).get("Retry-After", 0) or 0) \
                        if exc.response is not None else 0.0
                    self.log.warning("slack post failed; will retry", error=str(exc), channel=channel,
                                     retry_in_s=max(delay, retry_after))
                    self.wait(max(delay, retry_after))
                    delay = min(delay * 2, 60)
                except Exception as exc:  # slack-sdk's own retries are spent; keep the alert, wait, retry
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
        for key in [k for k, p in self.cooldown_partition.items() if p in gone]:
            del self.cooldown_partition[key]
            self.last_alert.pop(key, None)

    def restore(self, partitions: list[int]) -> None:
        started = time.monotonic()
        loaded = self.store.load(sorted(partitions))
        cooldowns = 0
        for p, entries in loaded.items():
            self.posted[p], restored = parse_partition(entries)
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

    def fault_pause(self, msg) -> None:
        """For tests only (fault_pause_after_post_s): wait between a post's durable marker and its commit."""
        pause = self.settings.fault_pause_after_post_s
        if pause <= 0:
            return
        self.log.warning("fault injection: paused after a post, before its commit", partition=msg.partition(),
                         offset=msg.offset(), pause_s=pause)
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
        return result

    def handle(self, msg) -> Outcome:
        """Post (or suppress, or log) one anomaly record, unless it was posted before a restart."""
        p, offset = msg.partition(), msg.offset()
        if p not in self.posted:  # not restored by an assignment (a processor run without a consumer group)
            self.restore([p])
        posted = self.posted[p]
        if offset < posted.offset:  # handled before the restart: a later record was posted after it
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
                self.fault_pause(msg)
            if refused:  # kept, with the reason, where an operator looks for what was not delivered
                dead_letter = f"slack refused the alert for good: {'; '.join(refused)}"
                self.log.error("alert not deliverable", reason=dead_letter, series=rec.series)
            if len(refused) < len(self.slack.targets(channels or [])):
                self.log.info("alert posted", kind=rec.kind, series=rec.series, event_time=str(rec.timestamp),
                              **({"definition": rec.definition} if rec.kind == "rule" else {}))
                self.stats["posted"] += 1
        self.set_cooldown(key, event_time, p)
        return Outcome(True, dead_letter)

    def already_posted(self, msg) -> Outcome:
        self.log.info("already posted before a restart; skipped", partition=msg.partition(), offset=msg.offset())
        self.stats["already_posted"] += 1
        return Outcome(True)

    def progress(self) -> dict:
        return dict(self.stats) | {"suppressed_by_series": dict(self.suppressed)}

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
    loop = StreamLoop(settings, alerter, settings.alerter_group, log,
                      instance_id=group_instance_id(settings, settings.alerter_group, "alerter"))
    loop.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream alert")


if __name__ == "__main__":
    sys.exit(main())
