"""Definition files: validation errors name the field and line; the folder reloads without a restart."""

from __future__ import annotations

import time

import pytest
from helpers import REPO_ROOT

from models.rules.definitions import (
    DefinitionError,
    DefinitionFolder,
    compile_predicate,
    load_definition_file,
    parse_definition,
    parse_duration,
)

GOOD = """\
name: api-latency
description: average latency above 800 ms for 3 checks
environment: prod
trigger_every: 1m
query:
  topic: gateway
  group_by: service
filter:
  and:
    - field: path
      regex: "^/api/"
    - not: {field: method, in: [OPTIONS, HEAD]}
conditions:
  - type: metric
    aggregation: average
    field: latency_ms
    operator: above
    value: 800
    times: 3
actions:
  - type: slack
    channel: "#api"
"""


def test_a_valid_definition_parses_with_defaults():
    d = parse_definition(GOOD)
    assert d.trigger_every == 60 and d.environment == ["prod"] and d.query.group_by == ["service"]
    assert d.no_data == "ignore" and d.allowed_lateness is None and d.repeat_every == 4 * 3600
    assert d.conditions[0].describe() == "average(latency_ms) above 800 for 3 times"
    assert d.runs_in("prod") and not d.runs_in("test")


@pytest.mark.parametrize("text, expected", [
    ("30s", 30), ("1m", 60), ("5m", 300), ("1h", 3600), ("1d", 86400), ("250ms", 0.25), (45, 45),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


def errors(text: str) -> list[str]:
    with pytest.raises(DefinitionError) as info:
        parse_definition(text, "rule.yaml")
    return str(info.value).splitlines()


def test_errors_name_the_field_and_its_line():
    bad = (GOOD.replace("1m", "1 minute").replace("value: 800", "value: high")
           .replace('regex: "^/api/"', 'regex: "(^/api/"').replace("type: slack", "type: pager"))
    lines = errors(bad)
    assert "rule.yaml:4: trigger_every: Value error, '1 minute' is not a duration" in lines[0]
    assert lines[1].startswith("rule.yaml:11: filter.and.0.regex: Value error, invalid regular expression")
    assert lines[2].startswith("rule.yaml:18: conditions.0.value: Input should be a valid number")
    assert lines[3].startswith("rule.yaml:21: actions.0: Input tag 'pager'")
    assert len(lines) == 4


def test_missing_and_unknown_fields_and_bad_yaml():
    assert errors(GOOD.replace("trigger_every: 1m\n", "")) == [
        "rule.yaml:1: trigger_every: Field required"]
    assert errors(GOOD.replace("    times: 3\n", "    times: 3\n    window: 5\n")) == [
        "rule.yaml:20: conditions.0.window: Extra inputs are not permitted"]
    assert errors(GOOD.replace("    field: latency_ms\n", "")) == [
        "rule.yaml:14: conditions.0: Value error, field is required for aggregation 'average'"]
    (line,) = errors(GOOD.replace("  group_by: service", "  group_by: [service"))
    assert line.startswith("rule.yaml:") and "not valid YAML" in line
    assert errors("- just\n- a list\n") == [
        "rule.yaml:1: a definition is a YAML mapping (name, trigger_every, query, conditions, ...)"]


def test_predicates():
    f = compile_predicate(parse_definition(GOOD).filter)
    assert f({"path": "/api/pay", "method": "POST"})
    assert not f({"path": "/api/pay", "method": "HEAD"})
    assert not f({"path": "/health", "method": "GET"})
    assert not f({"method": "GET"})  # a missing field fails the test on it
    d = parse_definition(GOOD.replace("""  and:
    - field: path
      regex: "^/api/"
    - not: {field: method, in: [OPTIONS, HEAD]}""", """  or:
    - {field: status, gte: 500, lt: 600}
    - {field: error, exists: true}
    - {field: region, equals: eu-west-1}"""))
    g = compile_predicate(d.filter)
    assert g({"status": 503}) and not g({"status": 404}) and not g({"status": "503"})
    assert g({"error": None}) and g({"region": "eu-west-1"}) and not g({"region": "us-east-1"})


def test_every_shipped_example_is_valid_and_covers_every_condition_type():
    files = sorted((REPO_ROOT / "rules").glob("*.yaml"))
    definitions = [load_definition_file(p) for p in files]
    assert {c.type for d in definitions for c in d.conditions} == {"metric", "rate", "bollinger", "ratio"}
    assert all(d.runs_in("prod") for d in definitions)


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_folder_reloads_changes_without_restart_and_keeps_running_on_an_invalid_file(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("api-latency", "api-latency-b"))
    (tmp_path / "notes.txt").write_text("not a definition")
    folder = DefinitionFolder(tmp_path)
    folder.watch()
    try:
        changed, errs = folder.refresh()
        assert changed == {"api-latency", "api-latency-b"} and errs == []
        assert folder.refresh() == (set(), [])  # nothing changed: nothing re-read

        # b turns invalid: the error names file and line; b's last valid version keeps running
        (tmp_path / "b.yaml").write_text(GOOD.replace("api-latency", "api-latency-b").replace("value: 800", "value: x"))
        changed, errs = [], []
        assert wait_for(lambda: bool(folder.refresh()[1] and errs.append(1) is None) or bool(errs))
        assert str(tmp_path / "b.yaml") + ":18: conditions.0.value" in folder.errors[tmp_path / "b.yaml"]
        assert set(folder.definitions()) == {"api-latency", "api-latency-b"}

        # a changes: the new version is picked up
        (tmp_path / "a.yaml").write_text(GOOD.replace("value: 800", "value: 900"))
        assert wait_for(lambda: "api-latency" in folder.refresh()[0])
        assert folder.definitions()["api-latency"].conditions[0].value == 900

        # a new file with a name already taken is refused; a deleted file's definition stops
        (tmp_path / "c.yaml").write_text(GOOD)
        assert wait_for(lambda: any("already defined" in e for e in folder.refresh()[1]))
        (tmp_path / "b.yaml").unlink()
        assert wait_for(lambda: "api-latency-b" in folder.refresh()[0])
        assert set(folder.definitions()) == {"api-latency"}
    finally:
        folder.stop()
