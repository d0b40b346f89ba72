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

import argparse
import sys
import time
from collections import Counter
from datetime import datetime, timezone

from confluent_kafka import TopicPartition
from pydantic import ValidationError
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import RetryHandler
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import (
    BackoffRetryIntervalCalculator,
)
from slack_sdk.webhook import WebhookClient

from shared.app_logging import setup_logging
from shared.config import Settings, load_settings
from shared.kafka import (
    DeliveryTracker,
    dead_letter,
    ensure_topics,
    make_consumer,
    make_producer,
)
from shared.schemas import (
    ClusterScoreRecord,
    LogSessionRecord,
    RuleFiringRecord,
    ScoreRecord,
    anomaly_record_adapter,
)
from shared.signals import stop_on_signals


class AnyServerErrorRetryHandler(RetryHandler):
    """slack-sdk's ServerErrorRetryHandler covers 500 and 503 only; a 502/504 from a proxy is as
    transient."""

    def _can_retry(self, *, state, request, response=None, error=None) -> bool:
        return response is not None and 500 <= response.status_code < 600


def retry_handlers() -> list[RetryHandler]:
    backoff = BackoffRetryIntervalCalculator(backoff_factor=0.5)
    return [
        RateLimitErrorRetryHandler(max_retry_count=5),
        AnyServerErrorRetryHandler(max_retry_count=4, interval_calculator=backoff),
        ConnectionErrorRetryHandler(max_retry_count=4, interval_calculator=backoff),
    ]


# Slack answers that no retry can fix for that channel.
PERMANENT_CHANNEL_ERRORS = {"channel_not_found", "not_in_channel", "is_archived", "restricted_action"}

DETECTOR_LABELS = {"if_anomaly": "IsolationForest", "lstm_anomaly": "LSTM autoencoder"}


def format_alert(rec: ScoreRecord) -> tuple[str, list[dict]]:
    fired = [name for name in rec.decision if rec.flags.get(name)] or [
        label for field, label in DETECTOR_LABELS.items() if getattr(rec, field)] or ["combined rule"]
    ts = rec.timestamp.astimezone(timezone.utc) if rec.timestamp.tzinfo else rec.timestamp  # naive = UTC
    when = ts.strftime("%Y-%m-%d %H:%M:%S UTC")
    text = (f":rotating_light: Anomaly in {rec.series} at {when}: value {rec.value:g} "
            f"({', '.join(fired)} fired)")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Anomaly in {rec.series}"[:150]}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Time*\n{when}"},
            {"type": "mrkdwn", "text": f"*Value*\n{rec.value:g}"},
            {"type": "mrkdwn", "text": f"*Fired*\n{', '.join(fired)}"},
            {"type": "mrkdwn", "text": f"*Scores*\nIF {rec.if_score:.3f} · LSTM error {rec.reconstruction_error:.3f}"},
        ]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text":
            f"model {rec.model_version} · {rec.source_topic}[{rec.source_partition}]@{rec.source_offset}"}]},
    ]
    return text, blocks


def _utc(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc) if ts.tzinfo else ts.replace(tzinfo=timezone.utc)  # naive = UTC


def format_window(start: datetime, end: datetime) -> str:
    """'2014-02-14 14:00–14:15 UTC'; seconds only when a bound has them, the end's date only when it differs."""
    start, end = _utc(start), _utc(end)
    clock = "%H:%M:%S" if start.second or end.second else "%H:%M"
    end_fmt = clock if end.date() == start.date() else f"%Y-%m-%d {clock}"
    return f"{start.strftime(f'%Y-%m-%d {clock}')}–{end.strftime(end_fmt)} UTC"


def _condition_clause(text: str, metric: str, value: float | None) -> str:
    """'average(value) above 80 for 3 times' with 85.2 -> 'average(value) 85.2 above 80 for 3 times'."""
    if value is None:
        return f"{text} (no value)"
    if text.startswith(metric + " "):
        return f"{metric} {value:g}{text[len(metric):]}"
    return f"{text} ({value:g})"  # e.g. a ratio, whose text does not start with its metric name


def format_rule_alert(rec: RuleFiringRecord) -> tuple[str, list[dict]]:
    window = format_window(rec.window_start, rec.window_end)
    clauses = [_condition_clause(c.text, c.metric, c.value) for c in rec.conditions]
    text = f":rotating_light: Rule {rec.definition} fired for {rec.series} (window {window}): {'; '.join(clauses)}"
    fields = [{"type": "mrkdwn", "text": f"*Group*\n{rec.series}"},
              {"type": "mrkdwn", "text": f"*Window*\n{window}"}]
    for c in rec.conditions:
        value = "no value" if c.value is None else f"{c.value:g}"
        fields.append({"type": "mrkdwn", "text": f"*{c.text}*\n{value} {'✓' if c.holds else '✗'}"[:2000]})
    context = f"definition version {rec.version} · {rec.source_topic} · {rec.environment}"
    if rec.description:
        context += f" · {rec.description}"
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Rule {rec.definition} fired"[:150]}}]
    # Slack takes at most 10 fields per section.
    blocks += [{"type": "section", "fields": fields[i:i + 10]} for i in range(0, len(fields), 10)]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context[:2000]}]})
    return text, blocks


def format_cluster_alert(rec: ClusterScoreRecord) -> tuple[str, list[dict]]:
    when = _utc(rec.timestamp).strftime("%Y-%m-%d %H:%M:%S UTC")
    moved = ", ".join(f"{name} {'+' if d >= 0 else ''}{d:g}σ ({rec.metrics.get(name, 0.0):g}/s)"
                      for name, d in rec.deviations.items())
    text = (f":rotating_light: Broker metrics anomaly at {when} ({rec.series}): distance {rec.score:.3g} "
            f"> {rec.threshold:.3g} from the nearest cluster; furthest: {moved}")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "Kafka broker metrics anomaly"}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Time*\n{when}"},
            {"type": "mrkdwn", "text": f"*Source*\n{rec.series}"[:2000]},
            {"type": "mrkdwn", "text": f"*Distance*\n{rec.score:.3g} (threshold {rec.threshold:.3g})"},
            {"type": "mrkdwn", "text": f"*Furthest metrics*\n{moved}"[:2000]},
        ]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text":
            f"Real-Time K-Means {rec.model_version} · cluster {rec.nearest_cluster} · "
            f"{rec.source_topic}[{rec.source_partition}]@{rec.source_offset}"}]},
    ]
    return text, blocks


def format_log_alert(rec: LogSessionRecord) -> tuple[str, list[dict]]:
    when = _utc(rec.timestamp).strftime("%Y-%m-%d %H:%M:%S UTC")
    what = "session ended" if rec.event == "<END>" else f"event {rec.event} `{rec.template}`"
    text = f":rotating_light: Log anomaly in session {rec.series} at {when}: {what}: {rec.reason}"
    before = " → ".join(rec.window) or "(session start)"
    fields = [
        {"type": "mrkdwn", "text": f"*Session*\n{rec.series}"[:2000]},
        {"type": "mrkdwn", "text": f"*Time*\n{when}"},
        {"type": "mrkdwn", "text": f"*Unexpected*\n{what}"[:2000]},
        {"type": "mrkdwn", "text": f"*Why*\n{rec.reason}"[:2000]},
        {"type": "mrkdwn", "text": f"*Events before it*\n{before}"[:2000]},
    ]
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Log anomaly in {rec.series}"[:150]}},
              {"type": "section", "fields": fields}]
    if rec.line:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"```{rec.line[:2900]}```"}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text":
        f"next-event model {rec.model_version} · k={rec.k} · {rec.session_events} events so far · "
        f"{rec.source_topic}[{rec.source_partition}]@{rec.source_offset}"}]})
    return text, blocks


class SlackNotifier:
    def __init__(self, settings: Settings):
        self.channel = settings.slack_channel
        self.web: WebClient | None = None
        self.webhook: WebhookClient | None = None
        timeout = int(max(1, settings.slack_timeout_s))
        if settings.slack_bot_token:
            kwargs = {"base_url": settings.slack_base_url} if settings.slack_base_url else {}
            self.web = WebClient(token=settings.slack_bot_token.get_secret_value(), timeout=timeout,
                                 retry_handlers=retry_handlers(), **kwargs)
        elif settings.slack_webhook_url:
            self.webhook = WebhookClient(settings.slack_webhook_url.get_secret_value(), timeout=timeout,
                                         retry_handlers=retry_handlers())

    @property
    def configured(self) -> bool:
        return self.web is not None or self.webhook is not None

    def targets(self, channels: list[str]) -> list[str | None]:
        """Where one alert goes: the named channels (or the default); a webhook has no channels: once."""
        if self.web is None:
            return [None]
        return list(dict.fromkeys(channels)) or [self.channel]

    def post(self, text: str, blocks: list[dict], channel: str | None = None) -> None:
        """Returns once Slack accepted the message; raises otherwise."""
        if self.web is not None:
            self.web.chat_postMessage(channel=channel or self.channel, text=text, blocks=blocks)  # raises SlackApiError
        else:
            resp = self.webhook.send(text=text, blocks=blocks)
            if resp.status_code != 200:
                raise RuntimeError(f"webhook answered {resp.status_code}: {resp.body[:200]}")


class Alerter:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.log = setup_logging(settings, "alerter")
        self.slack = SlackNotifier(settings)
        self.consumer = make_consumer(settings, settings.alerter_group)
        self.producer = make_producer(settings)
        self.tracker = DeliveryTracker()
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
                    self.log.warning("slack post failed; will retry", error=str(exc), channel=channel,
                                     retry_in_s=delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 60)
                except Exception as exc:  # slack-sdk's own retries are spent; keep the alert, wait, retry
                    self.log.warning("slack post failed; will retry", error=str(exc), channel=channel,
                                     retry_in_s=delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 60)
        return refused

    def handle(self, msg) -> bool:
        """True when the message is done with (posted, suppressed, logged or dead-lettered)."""
        try:
            rec = anomaly_record_adapter.validate_json(msg.value() or b"")
        except ValidationError as exc:
            dead_letter(self.producer, self.settings, msg, f"invalid anomaly record: {exc.errors()[0]['msg']}"
                        f" at {exc.errors()[0]['loc']}", "alerter", self.tracker)
            self.tracker.flush(self.producer)
            self.stats["dead_lettered"] += 1
            return True
        if isinstance(rec, RuleFiringRecord):
            key, channels, (text, blocks) = f"rule:{rec.definition}:{rec.series}", rec.channels, format_rule_alert(rec)
            event_time = _utc(rec.window_end).timestamp()
        elif isinstance(rec, LogSessionRecord):
            key, channels, (text, blocks) = f"log:{rec.series}", [], format_log_alert(rec)
            event_time = _utc(rec.timestamp).timestamp()
        elif isinstance(rec, ClusterScoreRecord):
            key, channels, (text, blocks) = f"cluster:{rec.series}", [], format_cluster_alert(rec)
            event_time = _utc(rec.timestamp).timestamp()
        else:
            key, channels, (text, blocks) = rec.series, [], format_alert(rec)
            event_time = rec.timestamp.timestamp()
        last = self.last_alert.get(key)
        if last is not None and abs(event_time - last) < self.settings.alert_cooldown_s:
            self.suppressed[key] += 1
            self.stats["suppressed"] += 1
            return True
        if not self.slack.configured:
            self.log.info("alert", text=text, **({"channels": channels} if channels else {}))
            self.stats["logged"] += 1
        else:
            refused = self.deliver(text, blocks, channels)
            if refused is None:
                return False
            if refused:  # kept, with the reason, where an operator looks for what was not delivered
                reason = f"slack refused the alert for good: {'; '.join(refused)}"
                dead_letter(self.producer, self.settings, msg, reason, "alerter", self.tracker)
                self.tracker.flush(self.producer)
                self.log.error("alert not deliverable", reason=reason, series=rec.series)
                self.stats["dead_lettered"] += 1
            if len(refused) < len(self.slack.targets(channels or [])):
                self.log.info("alert posted", kind=rec.kind, series=rec.series, timestamp=str(rec.timestamp),
                              **({"definition": rec.definition} if rec.kind == "rule" else {}))
                self.stats["posted"] += 1
        self.last_alert[key] = event_time
        return True

    def run(self) -> None:
        ensure_topics(self.settings)
        if not self.slack.configured:
            self.log.warning("slack is not configured (ANOMSTREAM_SLACK_BOT_TOKEN or "
                             "ANOMSTREAM_SLACK_WEBHOOK_URL); alerts are only logged")
        self.consumer.subscribe([self.settings.topic_anomalies])
        self.log.info("alerter ready", topic=self.settings.topic_anomalies)
        try:
            while not self.stopping:
                for msg in self.consumer.consume(100, self.settings.poll_timeout_s):
                    if msg.error():
                        self.log.warning("consumer error", error=str(msg.error()))
                        continue
                    if not self.handle(msg):
                        return  # stopping mid-retry: leave it uncommitted
                    self.consumer.commit(offsets=[TopicPartition(msg.topic(), msg.partition(), msg.offset() + 1)],
                                         asynchronous=False)
        finally:
            self.consumer.close()
            self.log.info("alerter stopped", **self.stats, suppressed_by_series=dict(self.suppressed))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="anomstream alert", description=__doc__).parse_args(argv)
    alerter = Alerter(load_settings())
    stop_on_signals(alerter)
    alerter.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
