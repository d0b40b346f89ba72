"""Structured logging (structlog) with secret redaction.

Secrets are SecretStr in Settings, so they print as '**********' already; the redaction
processor is the second line of defence for a secret that reaches a log line some other way
(e.g. inside an exception text from a client library).
"""

from __future__ import annotations

import logging
import sys

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
