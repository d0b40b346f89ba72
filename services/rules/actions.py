"""The actions of a fired rule definition, run by the rules service for one RuleFiringRecord.

slack: nothing to do here; the record the rules service writes to `anomalies` names the channel and
the alerter posts it (it owns Slack delivery, retries and cooldown). webhook: an HTTP POST of the
record as JSON, retried on 429/5xx and connection errors. kafka: the record produced to a topic;
it is durable once the caller's DeliveryTracker.flush() returns, which it calls before committing.
log: one structured log line.

An action that fails never stops the others nor raises: its outcome says "failed: <reason>".
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from models.rules.definitions import (
    Action,
    KafkaAction,
    LogAction,
    SlackAction,
    WebhookAction,
)
from shared.kafka import produce
from shared.records.rules import RuleFiringRecord

RETRY_AFTER_MAX_S = 10.0  # the rules service waits for its actions: a Retry-After of an hour must not stall it


class _CappedRetry(Retry):
    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), RETRY_AFTER_MAX_S)


def make_http_session() -> requests.Session:
    """A session whose POSTs are retried 3 times on 429, 5xx and connection errors (backoff 0.5 s,
    Retry-After respected up to RETRY_AFTER_MAX_S)."""
    retry = _CappedRetry(total=3, backoff_factor=0.5, status_forcelist=[429, *range(500, 600)],
                         allowed_methods=Retry.DEFAULT_ALLOWED_METHODS | {"POST"},
                         respect_retry_after_header=True,
                         raise_on_status=False)  # give back the last response: its status is the outcome
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def safe_url(url: str) -> str:
    """Scheme and host only, for logs and outcomes: user info, query and even the path may carry
    credentials (…?token=…, hooks.slack.com/services/T…/B…/secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, "/…" if parts.path not in ("", "/") else parts.path, "", ""))


def _scrub(text: str, url: str) -> str:
    """An exception text without the URL's path, query or user info (urllib3 puts the request path in it)."""
    parts = urlsplit(url)
    for secret in (parts.query, parts.password, parts.username, parts.path if parts.path != "/" else ""):
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text


def _post_webhook(action: WebhookAction, body: bytes, http: requests.Session) -> str:
    headers = {"Content-Type": "application/json"} | action.headers
    # Redirects are not followed: they would carry the action's headers (tokens) to another URL.
    resp = http.post(action.url, data=body, headers=headers, timeout=action.timeout_s, allow_redirects=False)
    if 200 <= resp.status_code < 300:
        return f"HTTP {resp.status_code}"
    return f"failed: HTTP {resp.status_code}"


def _log_firing(action: LogAction, record: RuleFiringRecord, log) -> str:
    getattr(log, action.level)(
        "rule fired", definition=record.definition, version=record.version, group=record.series,
        window_start=record.window_start.isoformat(), window_end=record.window_end.isoformat(),
        conditions={c.text: c.value for c in record.conditions}, values=record.values)
    return "logged"


_shared_session: requests.Session | None = None


def default_http_session() -> requests.Session:
    """One session for the process (keeps connections to a webhook open between firings)."""
    global _shared_session
    if _shared_session is None:
        _shared_session = make_http_session()
    return _shared_session


def run_actions(actions: list[Action], record: RuleFiringRecord, *, producer, tracker, log,
                http: requests.Session | None = None) -> list[dict]:
    """Run each action once; one {"type", "target", "outcome"} per action, in order.
    `http` defaults to default_http_session()."""
    http = http or default_http_session()
    body = orjson.dumps(record.model_dump(mode="json"))
    outcomes = []
    for action in actions:
        target = ""
        try:
            if isinstance(action, SlackAction):
                target, outcome = action.channel, "queued for the alerter"
            elif isinstance(action, WebhookAction):
                target = safe_url(action.url)
                outcome = _post_webhook(action, body, http)
            elif isinstance(action, KafkaAction):
                target = action.topic
                produce(producer, action.topic, body, record.series.encode(), on_delivery=tracker)
                outcome = "produced"
            elif isinstance(action, LogAction):
                target = action.level
                outcome = _log_firing(action, record, log)
            else:
                outcome = f"failed: unknown action {type(action).__name__}"
        except Exception as exc:  # one action's failure must not stop the others or the service
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(action, WebhookAction):
                reason = _scrub(reason, action.url)
            outcome = f"failed: {reason[:500]}"
        if outcome.startswith("failed"):
            # Header names only: their values may be tokens.
            extra = {"headers": sorted(action.headers)} if isinstance(action, WebhookAction) else {}
            log.warning("rule action failed", type=action.type, target=target, definition=record.definition,
                        group=record.series, outcome=outcome, **extra)
        outcomes.append({"type": action.type, "target": target, "outcome": outcome})
    return outcomes
