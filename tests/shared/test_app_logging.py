"""Structured logs: JSON lines with event/level/timestamp, and secrets never printed."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from shared.app_logging import REDACTED, setup_logging
from shared.config import Settings

TOKEN = "xoxb-9876-log-test-token"
PASSWORD = "hunter2-sasl-pw"
WEBHOOK = "https://hooks.slack.com/services/T1/B2/log-test-webhook"


def settings(**kw) -> Settings:
    return Settings(slack_bot_token=TOKEN, sasl_password=PASSWORD, slack_webhook_url=WEBHOOK, **kw)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_no_secret(text: str) -> None:
    for secret in (TOKEN, PASSWORD, WEBHOOK):
        assert secret not in text


def test_json_lines_have_event_level_timestamp(capsys):
    log = setup_logging(settings(log_format="json"), "unit")
    log.info("hello", n=3, ratio=0.5)
    log.warning("careful")
    records = json_lines(capsys.readouterr().err)
    assert [r["event"] for r in records] == ["hello", "careful"]
    assert [r["level"] for r in records] == ["info", "warning"]
    assert records[0]["n"] == 3 and records[0]["ratio"] == 0.5 and records[0]["service"] == "unit"
    for r in records:
        stamp = datetime.fromisoformat(r["timestamp"])
        assert stamp.utcoffset() == timedelta(0)
        assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=5)


def test_secrets_in_strings_are_redacted(capsys):
    log = setup_logging(settings(), "unit")
    log.error(f"connect failed with token {TOKEN}",
              error=f"SASL authentication failed for user svc with password {PASSWORD}",
              url=WEBHOOK, nested={"attempts": [f"pw={PASSWORD}", 2]}, pair=("x", TOKEN))
    err = capsys.readouterr().err
    assert_no_secret(err)
    (record,) = json_lines(err)
    assert record["event"] == f"connect failed with token {REDACTED}"
    assert record["error"] == f"SASL authentication failed for user svc with password {REDACTED}"
    assert record["url"] == REDACTED
    assert record["nested"] == {"attempts": [f"pw={REDACTED}", 2]}
    assert record["pair"] == ["x", REDACTED]


def test_secret_inside_an_exception_object_is_redacted(capsys):
    log = setup_logging(settings(), "unit")
    log.error("slack failed", error=RuntimeError(f"invalid_auth for {TOKEN}"))
    err = capsys.readouterr().err
    assert_no_secret(err)
    (record,) = json_lines(err)
    assert REDACTED in record["error"] and "invalid_auth" in record["error"]


def test_secret_in_a_traceback_is_redacted(capsys):
    log = setup_logging(settings(), "unit")
    try:
        raise ConnectionError(f"broker rejected password {PASSWORD}")
    except ConnectionError:
        log.exception("kafka failed")
    err = capsys.readouterr().err
    assert_no_secret(err)
    (record,) = json_lines(err)
    assert "ConnectionError" in record["exception"] and REDACTED in record["exception"]


def test_console_format_is_redacted_too(capsys):
    log = setup_logging(settings(log_format="console"), "unit")
    log.warning("retrying", error=f"token {TOKEN} rejected")
    err = capsys.readouterr().err
    assert_no_secret(err)
    assert REDACTED in err and "retrying" in err


def test_log_level_filters(capsys):
    log = setup_logging(settings(log_level="WARNING"), "unit")
    log.info("not shown")
    log.debug("not shown either")
    log.warning("shown")
    assert [r["event"] for r in json_lines(capsys.readouterr().err)] == ["shown"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_values_without_secrets_are_unchanged(capsys, fmt):
    log = setup_logging(settings(log_format=fmt), "unit")
    log.info("plain", error=ValueError("nothing to hide"), count=5)
    err = capsys.readouterr().err
    assert "nothing to hide" in err and REDACTED not in err


def test_processes_sharing_stderr_never_glue_two_records_onto_one_line(tmp_path):
    """A detector's workers inherit its stderr: each record must reach it in one write."""
    import subprocess
    import sys

    from helpers import REPO_ROOT

    script = ("from shared.app_logging import setup_logging; from shared.config import Settings\n"
              "log = setup_logging(Settings(), 'w')\n"
              "for i in range(3000): log.info('tick', i=i)\n")
    path = tmp_path / "shared.log"
    with open(path, "wb") as out:  # one open file, as the test harness and a container's stderr give
        procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stderr=out) for _ in range(3)]
        assert all(p.wait(60) == 0 for p in procs)
    records = json_lines(path.read_text())
    assert len(records) == 9000 and all(r["event"] == "tick" for r in records)
