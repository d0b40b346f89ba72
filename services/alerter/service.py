"""alerter: posts every record of `anomalies` to Slack, committing each only after Slack accepted it.

A record is an ML score (kind "score", or no kind: older records), a rule firing (kind "rule",
written by the rules service; it goes to each channel its definition names) or a scored scrape of
the broker's own metrics (kind "cluster", Real-Time K-Means) or an anomalous log session (kind
"log", written by the log detector).

Slack's 429 (Retry-After), 5xx and connection errors are retried by slack-sdk's retry handlers; when
they give up, the alert is retried with backoff until Slack takes it or the service stops (then it is
re-read on the next start). A per-series cooldown, in event time, suppresses repeats and counts them;
a rule firing has its own cooldown per definition and group, so it never hides an ML alert.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass

import click
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

    def __init__(self, settings: Settings, log):
        self.settings = settings
        self.log = log
        self.slack = SlackNotifier(settings)
        self.loop: StreamLoop | None = None
        # cooldown key (series, or "rule:<definition>:<group>") -> event time of the last alert posted
        self.last_alert: dict[str, float] = {}
        self.stats = Counter()
        self.suppressed = Counter()
        self.stopping = False

    def deliver(self, text: str, blocks: list[dict], channels: list[str] | None = None) -> list[str] | None:
        """Post to every target until each accepted. Returns the targets Slack refused for good (a
        channel that does not exist or the bot is not in: retrying cannot help, and would block
        every alert behind this one), or None if the service is stopping first (the alert is not
        committed). A target that accepted is not posted again when a later one is retried."""
        refused = []
        for channel in self.slack.targets(channels or []):
            delay = 1.0
            while True:
                if self.stopping:
                    return None
                try:
                    self.slack.post(text, blocks, channel)
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
        """Post (or suppress, or log) one anomaly record."""
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
        last = self.last_alert.get(key)
        if last is not None and abs(event_time - last) < self.settings.alert_cooldown_s:
            self.suppressed[key] += 1
            self.stats["suppressed"] += 1
            return Outcome(True)
        dead_letter = None
        if not self.slack.configured:
            self.log.info("alert", text=text, **({"channels": channels} if channels else {}))
            self.stats["logged"] += 1
        else:
            refused = self.deliver(text, blocks, channels)
            if refused is None:
                return Outcome(False)
            if refused:  # kept, with the reason, where an operator looks for what was not delivered
                dead_letter = f"slack refused the alert for good: {'; '.join(refused)}"
                self.log.error("alert not deliverable", reason=dead_letter, series=rec.series)
            if len(refused) < len(self.slack.targets(channels or [])):
                self.log.info("alert posted", kind=rec.kind, series=rec.series, event_time=str(rec.timestamp),
                              **({"definition": rec.definition} if rec.kind == "rule" else {}))
                self.stats["posted"] += 1
        self.last_alert[key] = event_time
        return Outcome(True, dead_letter)

    def progress(self) -> dict:
        return dict(self.stats) | {"suppressed_by_series": dict(self.suppressed)}


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
