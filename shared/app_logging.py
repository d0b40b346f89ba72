"""Structured logging (structlog) with secret redaction.

Secrets are SecretStr in Settings, so they print as '**********' already; the redaction
processor is the second line of defence for a secret that reaches a log line some other way
(e.g. inside an exception text from a client library).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import time

import structlog

from shared.config import Settings

_secrets: set[str] = set()
REDACTED = "[REDACTED]"


def _redact(value):
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
    elif isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    elif not isinstance(value, (int, float, bool, type(None))):
        # An object (an exception, say) is rendered by repr/str later: redact that text now.
        text = repr(value)
        if any(secret in text for secret in _secrets):
            return _redact(text)
    return value


def redact_secrets(_logger, _method, event_dict):
    if not _secrets:
        return event_dict
    return {k: _redact(v) for k, v in event_dict.items()}


def setup_logging(settings: Settings, service: str) -> structlog.stdlib.BoundLogger:
    for secret in (settings.slack_bot_token, settings.slack_webhook_url, settings.sasl_password):
        if secret is not None and secret.get_secret_value():
            _secrets.add(secret.get_secret_value())
    renderer = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, settings.log_level)),
        # One write per record, newline included: processes that share stderr (a detector and its
        # workers) cannot glue two records onto one line, as print()'s two writes let them.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger(service=service)


def get_logger(**context) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(**context)


class LibrdkafkaLogger(logging.Logger):
    """librdkafka's own log lines (confluent-kafka's `logger` property) as structured records instead
    of raw `%3|...` lines on stderr. With the broker away librdkafka repeats the same line many
    times a second: a line whose text (digits aside) was logged in the last REPEAT_EVERY_S is
    counted, and the count goes out with the next one logged."""

    REPEAT_EVERY_S = 30.0

    def __init__(self):
        super().__init__("librdkafka")
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, level, msg, *args, **kwargs):  # confluent-kafka calls log(level, "%s [%s] %s", fac, name, text)
        facility, client, text = args[:3] if len(args) >= 3 else ("", "", msg % args)
        key = (str(facility), re.sub(r"\d+", "#", str(text))[:200])
        now = time.monotonic()
        with self._lock:
            last, repeated = self._last.get(key, (-1e18, 0))
            if now - last < self.REPEAT_EVERY_S:
                self._last[key] = (last, repeated + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 1000:  # bounded: forget the oldest lines
                for k in sorted(self._last, key=lambda k: self._last[k][0])[:500]:
                    del self._last[k]
        method = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}.get(level, "error")
        fields = {"facility": facility, "client": client}
        if repeated:
            fields["repeated"] = repeated
        try:
            getattr(structlog.get_logger(source="librdkafka"), method)(str(text), **fields)
        except Exception:  # noqa: BLE001 - a log line must never fail the Kafka call that served it
            pass


@functools.cache
def librdkafka_logger() -> LibrdkafkaLogger:
    """The one logger every Kafka client of this process logs through (shared.kafka.client_config)."""
    return LibrdkafkaLogger()
