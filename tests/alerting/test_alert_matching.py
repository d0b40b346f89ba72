"""Matchers (Alertmanager's =, !=, =~, !~), routes (first match wins, default channel), silences
(file re-read when it changes, expiry, the `anomstream silence` command) and the labels of each
kind of anomaly record, without Slack or a broker."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from services.alerter.matchers import Matcher, alert_labels, match_all, parse_all
from services.alerter.routing import Router
from services.alerter.silences import (
    Silence,
    Silencer,
    parse_duration,
    read_silences,
    write_silences,
)
from services.cli import main as cli_main
from shared.app_logging import setup_logging
from shared.config import Settings
from shared.records.anomalies import anomaly_record_adapter

LABELS = {"series": "host-12", "kind": "metric", "definition": "ec2_cpu"}


@pytest.mark.parametrize("text, expected", [
    ("series=host-12", True), ("series=host-1", False),
    ('series=~"host-.*"', True), ("series=~host", False),  # anchored: the whole value
    ("series!~host-1.", False), ("series!~db-.*", True),
    ("kind!=metric", False), ("kind != rule", True),
    ("severity=", True), ("severity!=", False),  # a missing label is the empty string
    ('severity=~"critical|page"', False),
])
def test_matcher_operators(text, expected):
    assert Matcher.parse(text).matches(LABELS) is expected


def test_matcher_quoted_value_and_errors():
    m = Matcher.parse('comment="a \\"quoted\\" b"')
    assert (m.name, m.op, m.value) == ("comment", "=", 'a "quoted" b')
    for bad in ["series", "=x", "series=~(", "9x=y"]:
        with pytest.raises(ValueError):
            Matcher.parse(bad)
    assert match_all(parse_all(["kind=metric", 'series=~"host-.*"']), LABELS)
    assert not match_all(parse_all(["kind=metric", "definition=other"]), LABELS)


def test_routes_first_match_wins_and_a_rules_own_channels_win():
    router = Router([{"match": {"kind": "rule"}, "channel": "#rules"},
                     {"matchers": ['series=~"db-.*"'], "channel": "#db"},
                     {"match": {"kind": "metric"}, "matchers": ["series=~db-.*|host-.*"], "channel": "#hosts"}],
                    default="#alerts")
    assert router.channel({"kind": "rule", "series": "db-1"}) == "#rules"  # first of two that match
    assert router.channel({"kind": "metric", "series": "db-1"}) == "#db"
    assert router.channel({"kind": "metric", "series": "host-3"}) == "#hosts"
    assert router.channel({"kind": "log", "series": "blk_1"}) == "#alerts"
    assert router.channels({"kind": "rule", "series": "x"}, ["#own", "#own"]) == ["#own"]
    assert router.channels({"kind": "rule", "series": "x"}, []) == ["#rules"]
    with pytest.raises(ValueError):
        Router([{"match": {"kind": "rule"}}], "#alerts")  # no channel
    with pytest.raises(ValueError):
        Router([{"when": {"kind": "rule"}, "channel": "#x"}], "#alerts")  # a typo is not ignored


def test_labels_of_each_kind():
    score = {"series": "cpu-1", "timestamp": "2024-05-06T07:08:09Z", "value": 1.0, "is_anomaly": True,
             "if_anomaly": True, "lstm_anomaly": False, "reconstruction_error": 0.1, "if_score": 0.6,
             "model_version": "ec2_cpu-20240101T000000-abcdef12", "source_topic": "input_data",
             "source_partition": 0, "source_offset": 0, "source_timestamp_ms": 0,
             "detected_at": "2024-05-06T07:08:10Z"}
    assert alert_labels(anomaly_record_adapter.validate_python(score)) == {
        "series": "cpu-1", "kind": "metric", "definition": "ec2_cpu"}
    # A labelled series (issue 17): its labels route and silence like Alertmanager's.
    labelled = alert_labels(anomaly_record_adapter.validate_python(score | {"series": 'cpu{host="a",region="eu"}'}))
    assert labelled == {"series": 'cpu{host="a",region="eu"}', "kind": "metric", "definition": "ec2_cpu",
                        "metric": "cpu", "host": "a", "region": "eu"}
    assert Router([{"match": {"region": "eu"}, "channel": "#eu"}], "#alerts").channel(labelled) == "#eu"


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_silence_is_active_between_its_start_and_its_expiry():
    s = Silence("s1", ['series=~"host-.*"', "kind=metric"], starts_at=100, ends_at=200)
    assert not s.silences(LABELS, 99) and s.silences(LABELS, 100) and s.silences(LABELS, 199.9)
    assert not s.silences(LABELS, 200)  # expired
    assert not s.silences(LABELS | {"kind": "rule"}, 150)  # every matcher must hold
    with pytest.raises(ValueError):
        Silence("s2", [], 0, 1)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_the_silences_file_is_read_again_when_it_changes(tmp_path, suffix):
    path = tmp_path / f"silences{suffix}"
    clock = Clock(150)
    silencer = Silencer(path, setup_logging(Settings(), "alerter"), clock)
    silencer.refresh()
    assert silencer.silenced_by(LABELS) is None  # no file yet
    write_silences(path, [Silence("s1", ["series=host-12"], 100, 200, "me", "maintenance")])
    if suffix == ".json":
        assert json.loads(path.read_text())["silences"][0]["ends_at"] == "1970-01-01T00:03:20Z"
    else:
        assert yaml.safe_load(path.read_text())["silences"][0]["comment"] == "maintenance"
    silencer.refresh()
    assert silencer.silenced_by(LABELS).id == "s1"
    assert silencer.silenced_by(LABELS | {"series": "host-13"}) is None
    clock.t = 200
    assert silencer.silenced_by(LABELS) is None  # expired, without a new read
    clock.t = 150
    path.write_text("silences: [ {broken")  # half-written: the silences read before stay
    os.utime(path, ns=(1, 1))
    silencer.refresh()
    assert silencer.silenced_by(LABELS).id == "s1"
    path.unlink()
    silencer.refresh()
    assert silencer.silenced_by(LABELS) is None


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400
    for bad in ["2", "h", "2x", "0s"]:
        with pytest.raises(Exception):
            parse_duration(bad)


def test_the_silence_command_adds_lists_and_expires(tmp_path, monkeypatch, capsys):
    path = tmp_path / "silences.yaml"
    monkeypatch.setenv("ANOMSTREAM_ALERT_SILENCES_FILE", str(path))
    assert cli_main(["silence", "add", "--match", 'series=~"host-.*"', "--match", "kind=metric", "--for", "2h",
                     "--comment", "maintenance"]) == 0
    silence_id = capsys.readouterr().out.split()[0]
    (s,) = read_silences(path)
    assert s.id == silence_id and s.matchers == ['series=~"host-.*"', "kind=metric"] and s.comment == "maintenance"
    assert 7199 <= s.ends_at - s.starts_at <= 7201
    assert s.silences(LABELS, s.starts_at + 60)
    assert cli_main(["silence", "list"]) == 0
    listed = capsys.readouterr().out
    assert silence_id in listed and "active" in listed and "maintenance" in listed
    assert cli_main(["silence", "expire", silence_id]) == 0
    capsys.readouterr()
    (s,) = read_silences(path)
    assert not s.active(s.ends_at) and cli_main(["silence", "list"]) == 0
    assert silence_id not in capsys.readouterr().out  # expired ones only with --all
    assert cli_main(["silence", "expire", "nosuchid"]) == 1
    assert cli_main(["silence", "add", "--match", "series=~(", "--for", "1h"]) == 2  # a bad regex is refused
    assert len(read_silences(path)) == 1
