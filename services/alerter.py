"""alerter: posts every record of `anomalies` to Slack, committing each only after Slack accepted it.

Slack's 429 (Retry-After), 5xx and connection errors are retried by slack-sdk's retry handlers; when
they give up, the alert is retried with backoff until Slack takes it or the service stops (then it is
re-read on the next start). A per-series cooldown, in event time, suppresses repeats and counts them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter
from datetime import timezone

from confluent_kafka import TopicPartition
from pydantic import ValidationError
from slack_sdk import WebClient
from slack_sdk.http_retry import RetryHandler
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.webhook import WebhookClient

from shared.config import Settings, load_settings
from shared.kafka import DeliveryTracker, dead_letter, ensure_topics, make_consumer, make_producer
from shared.log import setup_logging
from shared.schemas import ScoreRecord


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

    def post(self, text: str, blocks: list[dict]) -> None:
        """Returns once Slack accepted the message; raises otherwise."""
        if self.web is not None:
            self.web.chat_postMessage(channel=self.channel, text=text, blocks=blocks)  # raises SlackApiError
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
        self.last_alert: dict[str, float] = {}  # series -> event time of the last alert posted
        self.stats = Counter()
        self.suppressed = Counter()
        self.stopping = False

    def deliver(self, text: str, blocks: list[dict]) -> bool:
        """Post until accepted; False if the service is stopping first (the alert is not committed)."""
        delay = 1.0
        while not self.stopping:
            try:
                self.slack.post(text, blocks)
                return True
            except Exception as exc:  # slack-sdk's own retries are spent; keep the alert, wait, retry
                self.log.warning("slack post failed; will retry", error=str(exc), retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 60)
        return False

    def handle(self, msg) -> bool:
        """True when the message is done with (posted, suppressed, logged or dead-lettered)."""
        try:
            rec = ScoreRecord.model_validate_json(msg.value() or b"")
        except ValidationError as exc:
            dead_letter(self.producer, self.settings, msg, f"invalid anomaly record: {exc.errors()[0]['msg']}"
                        f" at {exc.errors()[0]['loc']}", "alerter", self.tracker)
            self.tracker.flush(self.producer)
            self.stats["dead_lettered"] += 1
            return True
        event_time = rec.timestamp.timestamp()
        last = self.last_alert.get(rec.series)
        if last is not None and abs(event_time - last) < self.settings.alert_cooldown_s:
            self.suppressed[rec.series] += 1
            self.stats["suppressed"] += 1
            return True
        text, blocks = format_alert(rec)
        if not self.slack.configured:
            self.log.info("alert", text=text)
            self.stats["logged"] += 1
        elif self.deliver(text, blocks):
            self.log.info("alert posted", series=rec.series, timestamp=str(rec.timestamp))
            self.stats["posted"] += 1
        else:
            return False
        self.last_alert[rec.series] = event_time
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

    def on_signal(_sig, _frame):
        alerter.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    alerter.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
