"""Posting to Slack: a bot token (chat.postMessage, per-channel) or an incoming webhook, with
slack-sdk's retry handlers for 429 (Retry-After), 5xx and connection errors."""

from __future__ import annotations

from slack_sdk import WebClient
from slack_sdk.http_retry import RetryHandler
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import (
    BackoffRetryIntervalCalculator,
)
from slack_sdk.webhook import WebhookClient

from shared.config import Settings
from shared.telemetry import SLACK_RETRIES


class AnyServerErrorRetryHandler(RetryHandler):
    """slack-sdk's ServerErrorRetryHandler covers 500 and 503 only; a 502/504 from a proxy is as
    transient."""

    def _can_retry(self, *, state, request, response=None, error=None) -> bool:
        return response is not None and 500 <= response.status_code < 600


def counted(handler: RetryHandler) -> RetryHandler:
    """The handler, with each retry it allows counted (anomstream_slack_retries_total)."""
    can_retry = handler._can_retry

    def _can_retry(**kwargs) -> bool:
        allowed = can_retry(**kwargs)
        if allowed:
            SLACK_RETRIES.inc()
        return allowed

    handler._can_retry = _can_retry
    return handler


def retry_handlers() -> list[RetryHandler]:
    """A few quick retries inside one post (a blip); a longer outage is waited out by the alerter,
    which keeps its consumer-group membership alive meanwhile (slack-sdk's sleeps cannot)."""
    backoff = BackoffRetryIntervalCalculator(backoff_factor=0.5)
    return [counted(h) for h in (
        RateLimitErrorRetryHandler(max_retry_count=1),
        AnyServerErrorRetryHandler(max_retry_count=2, interval_calculator=backoff),
        ConnectionErrorRetryHandler(max_retry_count=2, interval_calculator=backoff),
    )]


# Slack answers that no retry can fix for that channel.
PERMANENT_CHANNEL_ERRORS = {"channel_not_found", "not_in_channel", "is_archived", "restricted_action"}


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

    def post(self, text: str, blocks: list[dict], channel: str | None = None):
        """Returns once Slack accepted the message (a bot token: Slack's answer, with the channel's id
        and the message's ts); raises otherwise."""
        if self.web is not None:
            # raises SlackApiError
            return self.web.chat_postMessage(channel=channel or self.channel, text=text, blocks=blocks)
        else:
            resp = self.webhook.send(text=text, blocks=blocks)
            if resp.status_code != 200:
                raise RuntimeError(f"webhook answered {resp.status_code}: {resp.body[:200]}")

    def upload_png(self, png: bytes, channel_id: str, thread_ts: str, title: str) -> None:
        """A PNG in the thread of a message (files_upload_v2: files.getUploadURLExternal, the upload,
        files.completeUploadExternal). Bot token only."""
        self.web.files_upload_v2(channel=channel_id, thread_ts=thread_ts, file=png, filename="recent.png",
                                 title=title or "recent points")
