"""Streaming log detection without a broker: template alignment, rendered HDFS lines, the session
tracker's checkpoint, `logs` message decoding, rank_windows, LogStreamScorer (batch-size
independence, streaming == offline, checkpoint/restore, reasons, bounds), the producer's log
encoding and the Slack text of a log anomaly."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from models.inference import limit_threads
from models.logs.base import Vocabulary
from models.logs.next_event import UNKNOWN_RANK, NextEventDetector
from models.logs.render import HDFS_LINE_FORMATS, START, render_line, render_sessions
from models.logs.scorer import LogLine, LogStreamScorer
from models.logs.sessions import (
    BLOCK_KEY,
    END,
    PAD,
    SessionTracker,
    Window,
    encode_log_lines,
    group_sessions,
    read_sessions_csv,
)
from models.logs.templates import (
    HDFS_LINE,
    LogTemplateMiner,
    TemplateAlignment,
    parse_hdfs_file,
    parse_hdfs_line,
)
from services.alerter.formatting import format_log_alert
from services.jobs.logs_train import train_log_model
from shared.config import load_settings
from shared.records.anomalies import anomaly_record_adapter
from shared.records.logs import LogLineRecord, LogSessionRecord, decode_log_line

limit_threads(1)
HDFS = load_settings().data_dir / "hdfs"
SESSIONS_CSV = HDFS / "hdfs_100k_sessions.csv"
TEMPLATES_CSV = HDFS / "hdfs_100k_templates.csv"
MODEL = "logs"
UTC = timezone.utc


# -- shared data --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    frame = pd.read_csv(TEMPLATES_CSV)
    return dict(zip(frame["TemplateId"], frame["EventTemplate"]))


@pytest.fixture(scope="module")
def sessions() -> pd.DataFrame:
    return read_sessions_csv(SESSIONS_CSV)


@pytest.fixture(scope="module")
def stream_sessions(sessions) -> pd.DataFrame:
    """300 test-split sessions: every anomalous one (57) and the first normal ones, shuffled."""
    test = sessions[sessions["Split"] == "test"]
    picked = pd.concat([test[test["y"] == 1], test[test["y"] == 0].head(300 - int(test["y"].sum()))])
    return picked.sample(frac=1, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def stream_lines(stream_sessions) -> list[str]:
    return list(render_sessions(list(stream_sessions["BlockId"]), list(stream_sessions["events"]), seed=7))


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    """The one model of this file: the service's model, trained small (3 epochs, ~10 s) on the real
    HDFS sessions, with the reference templates."""
    root = tmp_path_factory.mktemp("log_model")
    train_log_model(SESSIONS_CSV, TEMPLATES_CSV, root / MODEL, epochs=3)
    return root


def make_scorer(model_root, state_dir, **kwargs) -> LogStreamScorer:
    return LogStreamScorer(model_root, MODEL, state_dir, BLOCK_KEY, **kwargs)


def as_lines(raw: list[str], first_offset: int = 0, partition: int = 0) -> list[LogLine]:
    return [LogLine(text, None, 0.0, partition, first_offset + i) for i, text in enumerate(raw)]


def run(scorer: LogStreamScorer, lines: list[LogLine], batch: int, end: bool = True) -> list:
    """Every line through the scorer in batches of `batch`; with `end`, then a long quiet spell
    closes every open session."""
    findings = []
    for i in range(0, len(lines), batch):
        findings += scorer.score(lines[i:i + batch])
    return findings + (scorer.idle(1e9) if end else [])


def summary(findings) -> list[tuple[str, str, float]]:
    return sorted((f.key, f.event, f.rank) for f in findings)


@pytest.fixture(scope="module")
def uninterrupted(model_root, stream_lines, tmp_path_factory):
    """(scorer, findings) of the rendered stream in one batch, then every session closed."""
    scorer = make_scorer(model_root, tmp_path_factory.mktemp("state_all"))
    return scorer, run(scorer, as_lines(stream_lines), len(stream_lines))


# -- 1. template alignment ----------------------------------------------------------------------
def test_drain3_templates_of_hdfs_2k_align_to_the_reference_ids(reference):
    miner = LogTemplateMiner(None)
    rows = list(parse_hdfs_file(HDFS / "HDFS_2k.log", miner))
    alignment = TemplateAlignment(reference)
    aligned = {template: alignment.event_for(template) for template in miner.templates().values()}
    assert aligned == {
        "Receiving block <BLK> src: /<IP> dest: /<IP>": "T01",
        "BLOCK* NameSystem.addStoredBlock: blockMap updated: <IP> is added to <BLK> size <NUM>": "T02",
        "PacketResponder <NUM> for block <BLK> terminating": "T03",
        "Received block <BLK> of size <NUM> from /<IP>": "T04",
        "BLOCK* NameSystem.allocateBlock: <*> <BLK>": "T05",
        "Verification succeeded for <BLK>": "T06",
        "<IP> Served block <BLK> to /<IP>": "T07",
        "Received block <BLK> src: /<IP> dest: /<IP> of size <NUM>": "T09",
        "<IP> Starting thread to transfer block <BLK> to <IP>": "T10",
        "BLOCK* ask <IP> to replicate <BLK> to datanode(s) <IP>": "T12",
        "Deleting block <BLK> file <*>": "T14",
        # Events the 100k sessions never hold: the model has not seen them.
        "<IP>:Got exception while serving <BLK> to /<IP>:": None,
        "BLOCK* NameSystem.delete: <BLK> is added to invalidSet of <IP>": None,
        "BLOCK* ask <IP> to delete <BLK>": None,
    }
    # Line by line (with the content fallback) the same answer: each line's event is its template's.
    per_line = Counter(alignment.event_for(r["template"], r["content"]) for r in rows)
    assert per_line["T01"] == sum(r["template"].startswith("Receiving block") for r in rows) > 0
    assert sum(per_line.values()) == len(rows) == 2000


def test_a_merged_cluster_is_aligned_by_the_line_itself(reference):
    alignment = TemplateAlignment(reference)
    merged = "PacketResponder <NUM> for block <BLK> <*>"
    assert alignment.event_for(merged) is None  # the template alone fits no reference
    # The template's answer (None) is cached, the content fallback is not: each line decides.
    assert alignment.event_for(merged, content="PacketResponder 1 for block blk_1 Interrupted.") == "T19"
    assert alignment.event_for(merged, content="PacketResponder 0 for block blk_-7 terminating") == "T03"
    assert alignment.event_for(merged, content="PacketResponder 0 for block blk_-7 vanished") is None

    # And drain3 really merges the two: the streaming path still tells them apart.
    miner = LogTemplateMiner(None)
    miner.add("PacketResponder 1 for block blk_1 terminating")
    content = "PacketResponder 2 for block blk_2 Interrupted."
    _, template = miner.add(content)
    assert template == merged
    assert alignment.event_for(template, content) == "T19"


def test_the_most_literal_reference_wins_a_tie():
    specific, generic = "Receiving block <*> src: <*>", "<*> block <*>"
    for reference in ({"GEN": generic, "SPEC": specific}, {"SPEC": specific, "GEN": generic}):
        alignment = TemplateAlignment(reference)
        assert alignment.event_for("Receiving block <BLK> src: /<IP>") == "SPEC"  # both match
        assert alignment.event_for("Deleting block <BLK>") == "GEN"
        assert alignment.event_for("Receiving   block <BLK>  src: x") == "SPEC"  # whitespace runs are one space
        assert alignment.event_for("nothing here") is None


# -- 2. rendered sessions -----------------------------------------------------------------------
def aligned_sessions(lines: list[str], reference: dict[str, str]) -> dict[str, list[str]]:
    """The streaming path offline: each line parsed, mined (learning as it goes), aligned, grouped."""
    miner, alignment, pairs = LogTemplateMiner(None), TemplateAlignment(reference), []
    for line in lines:
        parsed = parse_hdfs_line(line)
        assert parsed is not None, line
        _, template = miner.add(parsed.content)
        pairs.append((parsed.content, alignment.event_for(template, parsed.content)))
    return group_sessions(pairs)


def test_rendered_lines_parse_back_to_the_original_sessions(sessions, reference):
    test = sessions[sessions["Split"] == "test"].head(200)
    blocks, events = list(test["BlockId"]), list(test["events"])
    lines = list(render_sessions(blocks, events, seed=1))
    assert len(lines) == sum(map(len, events))
    assert all(HDFS_LINE.match(line) for line in lines)
    stamps = [parse_hdfs_line(line).timestamp for line in lines]
    assert stamps == sorted(stamps) and stamps[0] >= "2008-11-12"
    assert aligned_sessions(lines, reference) == dict(zip(blocks, events))

    # Interleaved as in a real log: some session's lines are not contiguous.
    positions: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        positions.setdefault(re.search(BLOCK_KEY, line).group(0), []).append(i)
    assert any(p[-1] - p[0] + 1 > len(p) for p in positions.values())
    # Deterministic per seed.
    assert list(render_sessions(blocks, events, seed=1)) == lines
    assert list(render_sessions(blocks, events, seed=2)) != lines


def test_every_reference_event_renders_and_aligns_back(reference):
    every = sorted(HDFS_LINE_FORMATS)
    assert every == sorted(reference)  # T01..T19
    blocks, events = ["blk_1", "blk_-2", "blk_3"], [every, every[::-1], every * 2]
    for seed in range(3):
        assert aligned_sessions(list(render_sessions(blocks, events, seed=seed)), reference) == dict(zip(blocks,
                                                                                                         events))


def test_render_sessions_refuses_mismatched_lengths_and_skips_empty_sessions():
    with pytest.raises(ValueError, match="2 blocks for 1 sessions"):
        list(render_sessions(["blk_1", "blk_2"], [["T01"]]))
    assert [parse_hdfs_line(line).content.split()[2] for line in
            render_sessions(["blk_1", "blk_2"], [[], ["T01"]])] == ["blk_2"]
    with pytest.raises(KeyError):
        render_line("T99", "blk_1", START, random.Random(0))


# -- 3. session tracker checkpoint --------------------------------------------------------------
def test_tracker_restored_from_its_dict_continues_identically():
    def build() -> SessionTracker:
        return SessionTracker(h=3, timeout_s=10, max_sessions=3, terminal_events=frozenset({"DEL"}))

    tracker = build()
    tracker.add("a", "A", 0)
    tracker.add("b", "A", 1)
    tracker.add("b", "B", 2)
    tracker.add("x", "A", 3)
    tracker.add("x", "DEL", 4)  # terminal: closed
    tracker.add("c", "A", 5)
    tracker.add("d", "A", 6)  # evicts a, the least recently active
    tracker.add("b", "C", 7)  # b becomes the most recently active: c is now the oldest
    tracker.flag("b")
    assert (tracker.closed, tracker.evicted, len(tracker)) == (1, 1, 3)

    restored = build()
    restored.restore(json.loads(json.dumps(tracker.to_dict())))
    assert (restored.closed, restored.evicted, len(restored)) == (1, 1, 3)
    assert restored.to_dict() == tracker.to_dict()
    for t in (tracker, restored):
        assert t.add("b", "D", 8) == [Window("b", ("A", "B", "C"), "D", flagged=True, events=3, ts=8)]
        assert t.add("d", "B", 9) == [Window("d", (PAD, PAD, "A"), "B", events=1, ts=9)]
        t.add("e", "A", 10)  # full: the same victim in both
        assert [key for key in "abcde" if key in t] == ["b", "d", "e"] and t.evicted == 2
        # b idle 10.5 s, d 9.5 s; the END window has b's event count and its last event time.
        assert t.close_idle(now=18.5) == [Window("b", ("B", "C", "D"), END, flagged=True, events=4, ts=8)]
        assert t.closed == 2
    assert restored.to_dict() == tracker.to_dict()


# -- 4. decoding `logs` messages ----------------------------------------------------------------
LINE = "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38 terminating"


def test_decode_log_line_plain_and_json():
    assert decode_log_line(LINE.encode() + b"\r\n", 1024) == LogLineRecord(message=LINE)
    assert decode_log_line(json.dumps({"message": LINE}).encode(), 1024) == LogLineRecord(message=LINE)
    record = decode_log_line(json.dumps({"message": LINE + "\n", "timestamp": "2008-11-09T20:36:15Z"}).encode(), 1024)
    assert record.message == LINE and record.timestamp == datetime(2008, 11, 9, 20, 36, 15, tzinfo=UTC)
    assert decode_log_line(b"  indented line", 1024).message == "  indented line"


@pytest.mark.parametrize("payload, words", [
    (b"\xff\xfe not utf-8", ["UTF-8"]),
    (b"", ["empty log line"]),
    (None, ["empty message"]),
    (b" \t \n", ["empty log line"]),
    (b"first line\nsecond line", ["one log line, not several"]),
    (b"first line\rsecond line\n", ["one log line, not several"]),
    (json.dumps({"message": "a\nb"}).encode(), ["one log line, not several"]),
    (json.dumps({"message": "   "}).encode(), ["empty log line"]),
    (json.dumps({"message": LINE, "level": "INFO"}).encode(), ["level", "extra"]),
    (json.dumps({"message": 42}).encode(), ["message", "string"]),
    (json.dumps({"message": ""}).encode(), ["message", "at least 1"]),
    (json.dumps({"timestamp": "2008-11-09T20:36:15Z"}).encode(), ["message", "required"]),
    (json.dumps({"message": LINE, "timestamp": "yesterday"}).encode(), ["timestamp"]),
    (b'{"message": "unterminated', ["payload:", "invalid json"]),
    (b"x" * 4097, ["4097 bytes", "4096-byte limit"]),
])
def test_decode_log_line_refuses_with_a_reason(payload, words):
    with pytest.raises(ValueError) as info:
        decode_log_line(payload, 4096)
    reason = str(info.value).lower()
    assert all(w.lower() in reason for w in words), reason


def test_invalid_json_is_blamed_on_the_payload_not_on_its_message_field():
    # Invalid JSON has no location: the whole payload is at fault, not a `message` field it may not even have.
    for payload in (b'{"message": "unterminated', b'{"message": "x"} trailing', b'{"timestamp": 1'):
        with pytest.raises(ValueError) as info:
            decode_log_line(payload, 4096)
        reason = str(info.value)
        assert reason.startswith("payload: Invalid JSON"), reason
        assert "message:" not in reason
    # A field's own error still names the field.
    with pytest.raises(ValueError, match=r"^message: Input should be a valid string"):
        decode_log_line(json.dumps({"message": 42}).encode(), 4096)


# -- 5. rank_windows on known outputs -----------------------------------------------------------
def stub_detector(monkeypatch, min_prob: float = 0.0) -> tuple[NextEventDetector, list]:
    """h=2, vocabulary PAD UNK END A B C; after a window ending in A the output is
    (0, 0, .1, .1, .5, .3), after any other (0, 0, .05, .6, .2, .15)."""
    det = NextEventDetector(h=2, k=2, min_prob=min_prob)
    det.vocab = Vocabulary(["A", "B", "C"])
    det.model = object()
    calls = []
    after_a = np.array([0.0, 0.0, 0.1, 0.1, 0.5, 0.3])
    other = np.array([0.0, 0.0, 0.05, 0.6, 0.2, 0.15])

    def predict(inputs):
        calls.append(np.array(inputs))
        return np.stack([after_a if row[-1] == det.vocab.index["A"] else other for row in inputs])

    monkeypatch.setattr(det, "_predict", predict)
    return det, calls


def test_rank_windows_ranks_ties_unknowns_and_probabilities(monkeypatch):
    det, calls = stub_detector(monkeypatch)
    contexts = [(PAD, "A"), (PAD, PAD), ("B", "A"), ("A", "A"), (PAD, "A"), (PAD, PAD), ("Q", "B")]
    targets = ["B", "A", END, "A", "Zed", "C", "A"]
    ranks, probs = det.rank_windows(contexts, targets)
    # END and A tie at .1 after A: both rank 3 (ties in the target's favour).
    assert ranks.tolist() == [1, 1, 3, 3, UNKNOWN_RANK, 3, 1]
    assert probs.tolist() == pytest.approx([0.5, 0.6, 0.1, 0.1, 0.0, 0.15, 0.6])
    # Each distinct window through the network once ((Q, B) encodes as (UNK, B)).
    assert len(calls) == 1 and len(calls[0]) == 5

    det, _ = stub_detector(monkeypatch, min_prob=0.12)
    ranks, probs = det.rank_windows(contexts, targets)
    assert ranks.tolist() == [1, 1, UNKNOWN_RANK, UNKNOWN_RANK, UNKNOWN_RANK, 3, 1]
    assert probs[2] == pytest.approx(0.1)  # the probability is reported even when below min_prob


def test_rank_windows_of_nothing_and_unfitted(monkeypatch):
    det, calls = stub_detector(monkeypatch)
    ranks, probs = det.rank_windows([], [])
    assert ranks.shape == probs.shape == (0,) and not calls
    with pytest.raises(RuntimeError, match="not fitted"):
        NextEventDetector(h=2).rank_windows([(PAD, PAD)], ["A"])


# -- 6. LogStreamScorer -------------------------------------------------------------------------
def test_findings_do_not_depend_on_the_batch_size(model_root, stream_lines, uninterrupted, tmp_path):
    _, whole = uninterrupted
    assert whole  # the stream holds anomalous sessions the model finds
    for batch in (1, 37):
        scorer = make_scorer(model_root, tmp_path / f"state_{batch}")
        assert summary(run(scorer, as_lines(stream_lines), batch)) == summary(whole)
        assert scorer.stats["lines"] == len(stream_lines) and scorer.stats["lines_without_session"] == 0


def test_streaming_flags_the_sessions_the_offline_model_flags(uninterrupted, stream_sessions, stream_lines):
    scorer, findings = uninterrupted
    events = list(stream_sessions["events"])
    offline = set(stream_sessions["BlockId"][scorer.detector.predict(events)])
    assert 0 < len(offline) < len(events)
    assert {f.key for f in findings} == offline
    assert len(scorer.tracker) == 0 and scorer.tracker.closed == len(events)
    # One window per event plus one END per session, as offline.
    assert scorer.stats["windows"] == len(stream_lines) + len(events)
    # Most of what it flags is labelled anomalous (a weak 3-epoch model, but far better than chance).
    labels = dict(zip(stream_sessions["BlockId"], stream_sessions["y"]))
    assert sum(labels[k] for k in offline) > len(offline) / 2


def test_one_finding_per_session(uninterrupted):
    scorer, findings = uninterrupted
    assert max(Counter(f.key for f in findings).values()) == 1
    for f in findings:
        assert f.rank > scorer.k  # beyond the model's top k
        if f.event == END:
            assert f.line == "" and f.offset is None
        else:
            assert f.key in f.line and f.offset is not None


class Changelog:
    """What the log detector keeps on its changelog topic, in memory: per input partition the
    latest state of each session key (None deletes it, as a tombstone) and the meta, written in
    that order, JSON in between."""

    def __init__(self):
        self.sessions: dict[int, dict[str, dict]] = {}
        self.meta: dict[int, dict] = {}

    def write(self, scorer: LogStreamScorer) -> None:
        for p, (meta, sessions) in scorer.take_changes().items():
            held = self.sessions.setdefault(p, {})
            for key, state in json.loads(json.dumps(sessions)).items():
                held.pop(key, None)  # a rewritten key is the newest record
                if state is not None:
                    held[key] = state
            self.meta[p] = json.loads(json.dumps(meta))

    def restore(self, scorer: LogStreamScorer, partition: int = 0) -> str:
        return scorer.restore_partition(partition, self.meta.get(partition), dict(self.sessions.get(partition, {})))


def test_checkpoint_and_restore_mid_stream(model_root, stream_lines, uninterrupted, tmp_path):
    _, whole = uninterrupted
    lines = as_lines(stream_lines)
    half = len(lines) // 2
    changelog = Changelog()
    first = make_scorer(model_root, tmp_path)
    assert changelog.restore(first) == "empty"
    before = run(first, lines[:half], 50, end=False)
    changelog.write(first)
    open_sessions, watermark = first.tracker.to_dict()["sessions"], first.watermark
    assert open_sessions and set(changelog.sessions[0]) == {s[0] for s in open_sessions}
    assert changelog.write(first) is None and first.take_changes() == {}  # nothing changed since

    second = make_scorer(model_root, tmp_path)  # a restart: the same drain3 state file
    assert changelog.restore(second) == "checkpoint"
    assert sorted(second.tracker.to_dict()["sessions"]) == sorted(open_sessions) and second.watermark == watermark
    assert (second.latest, second.idle_s) == (first.latest, first.idle_s) == (first.latest, 0.0)
    assert second.is_applied(0, 0) and second.is_applied(0, half - 1)
    assert not second.is_applied(0, half) and not second.is_applied(1, 0)
    # Re-read from the start, as after a crash before any commit: what the state holds is skipped.
    rest = [line for line in lines if not second.is_applied(line.partition, line.offset)]
    assert len(rest) == len(lines) - half
    after = run(second, rest, 50)
    assert summary(before + after) == summary(whole)
    # Every session ended (`run` closes them): each one written gets its tombstone.
    changelog.write(second)
    assert changelog.sessions[0] == {} and changelog.meta[0]["offset"] == len(lines) - 1

    # Revoked: the partition's sessions and offsets are forgotten.
    second.drop_partition(0)
    assert len(second.tracker) == 0 and not second.is_applied(0, 0) and second.watermark == float("-inf")

    changelog.meta[0]["version"] = "logs-another-version"
    third = make_scorer(model_root, tmp_path)
    assert changelog.restore(third) == "empty (state of another model version ignored)"
    assert len(third.tracker) == 0 and not third.is_applied(0, 0) and third.watermark == float("-inf")


def test_sessions_belong_to_the_partition_of_their_latest_line(model_root, tmp_path):
    scorer = make_scorer(model_root, tmp_path, timeout_s=300)
    lines = timed_lines([("T05", "blk_1", 0), ("T05", "blk_2", 1)])
    lines[1].partition = 1
    scorer.score(lines)
    changes = scorer.take_changes()
    assert {p: set(sessions) for p, (_meta, sessions) in changes.items()} == {0: {"blk_1"}, 1: {"blk_2"}}
    assert (changes[0][0]["offset"], changes[1][0]["offset"]) == (0, 1)
    moved = timed_lines([("T05", "blk_1", 2)], first_offset=2)
    moved[0].partition = 1
    scorer.score(moved)  # blk_1's next line comes through partition 1: it moves there
    changes = scorer.take_changes()
    assert changes[0][1] == {"blk_1": None} and set(changes[1][1]) == {"blk_1"}
    scorer.drop_partition(1)
    assert len(scorer.tracker) == 0 and not scorer.is_applied(1, 0) and scorer.is_applied(0, 0)


def test_lines_without_a_session_key_are_counted_not_windowed(model_root, tmp_path):
    scorer = make_scorer(model_root, tmp_path)
    assert scorer.score(as_lines(["081112 000001 19 INFO dfs.DataNode: Starting DataNode with no block"])) == []
    assert scorer.stats["lines"] == 1 and scorer.stats["lines_without_session"] == 1
    assert scorer.stats["windows"] == 0 and len(scorer.tracker) == 0 and scorer.is_applied(0, 0)
    # A line naming two blocks feeds both sessions.
    scorer.score(as_lines(["081112 000002 19 INFO dfs.FSNamesystem: BLOCK* ask 10.251.1.1:50010 to delete "
                           "blk_1 blk_-2"], first_offset=1))
    assert scorer.stats["windows"] == 2 and "blk_1" in scorer.tracker and "blk_-2" in scorer.tracker


def test_event_time_from_the_message_the_header_or_kafka(model_root, tmp_path):
    scorer = make_scorer(model_root, tmp_path)
    header = parse_hdfs_line(LINE)
    assert scorer.event_time(LogLine(LINE, 5.0, 9.0, 0, 0), header) == 5.0
    assert scorer.event_time(LogLine(LINE, None, 9.0, 0, 0), header) == datetime(2008, 11, 9, 20, 36, 15,
                                                                                  tzinfo=UTC).timestamp()
    assert scorer.event_time(LogLine("free text blk_1", None, 9.0, 0, 0), parse_hdfs_line("free text blk_1")) == 9.0


def line_at(event: str, block: str, second: int) -> str:
    return render_line(event, block, START + timedelta(seconds=second), random.Random(second))


START_S = START.replace(tzinfo=UTC).timestamp()  # event time of line_at(..., 0)


def timed_lines(events: list[tuple[str, str, int]], first_offset: int = 0) -> list[LogLine]:
    """Raw lines of (event, block, second after START): each line's event time is its header's."""
    return as_lines([line_at(event, block, second) for event, block, second in events], first_offset)


def test_injected_events_are_found_with_their_reason(model_root, reference, tmp_path):
    scorer = make_scorer(model_root, tmp_path)
    det, k, h = scorer.detector, scorer.k, scorer.detector.params["h"]

    # T08 (writeBlock ... exception) is in anomalous sessions only: never in the normal training ones.
    assert "T08" not in det.vocab.index
    raw = line_at("T08", "blk_808", 0)
    [f] = scorer.score(as_lines([raw], first_offset=10, partition=2))
    assert (f.key, f.event, f.rank) == ("blk_808", "T08", UNKNOWN_RANK)
    assert f.reason == "an event never seen in the training sessions"
    assert f.template == reference["T08"] and f.line == raw and (f.partition, f.offset) == (2, 10)
    assert f.window == [] and f.session_events == 1
    assert scorer.score(as_lines([line_at("T08", "blk_808", 1)], first_offset=11)) == []  # reported once

    # An event absent from the reference: its drain3 id and template.
    [f] = scorer.score(as_lines(["081112 000002 19 INFO dfs.FSNamesystem: BLOCK* NameSystem.delete: blk_909 is "
                                 "added to invalidSet of 10.251.1.1:50010"], first_offset=12))
    assert f.event.startswith("E") and "NameSystem.delete" in f.template
    assert f.reason == "an event never seen in the training sessions"

    # A known event where a session never starts (e.g. a PacketResponder line before allocateBlock):
    # the least likely first event the model knows, if its rank is beyond k.
    tokens = [t for t in det.vocab.tokens if t.startswith("T")]
    ranks, _ = det.rank_windows([(PAD,) * h] * len(tokens), tokens)
    candidates = [(r, t) for r, t in zip(ranks, tokens) if k < r < UNKNOWN_RANK]
    assert candidates, f"every known event ranks within k={k} at a session start"
    rank, event = max(candidates)
    [f] = scorer.score(as_lines([line_at(event, "blk_1001", 3)], first_offset=13))
    assert (f.event, f.rank) == (event, rank)
    assert f.reason == f"not among the top {k} predicted next events (rank {rank:g})"

    # A session that stops early: fewer events than the shortest normal training session.
    assert det.min_events > 1
    assert scorer.score(as_lines([line_at("T05", "blk_1002", 4)], first_offset=14)) == []
    ended = scorer.idle(scorer.tracker.timeout_s + 1)
    assert [(f.key, f.event, f.rank) for f in ended] == [("blk_1002", END, UNKNOWN_RANK)]
    f = ended[0]
    assert f.reason == f"the session ended after 1 event, fewer than any normal training session ({det.min_events})"
    assert f.window == ["T05"] and f.session_events == 1
    assert f.line == "" and f.partition is None and f.offset is None

    # A model saved before min_events was learned ranks a session's end like an event.
    det.min_events = None
    (start_rank, end_rank), _ = det.rank_windows([(PAD,) * h, (PAD,) * (h - 1) + ("T05",)], ["T05", END], [0, 1])
    assert start_rank < end_rank < UNKNOWN_RANK, "the model expects a session to go on after allocateBlock"
    det.k = int(end_rank) - 1  # this scorer's own copy of the model
    assert scorer.score(as_lines([line_at("T05", "blk_1003", 400)], first_offset=15)) == []
    ended = scorer.idle(scorer.tracker.timeout_s + 1)
    assert [(f.key, f.event, f.rank) for f in ended] == [("blk_1003", END, end_rank)]
    f = ended[0]
    assert f.reason.startswith("the session ended where the model did not expect an end")
    assert f"k={det.k}" in f.reason and f.window == ["T05"] and f.session_events == 1
    assert f.line == "" and f.partition is None and f.offset is None


def test_a_probability_below_min_prob_is_its_own_reason(model_root, tmp_path):
    scorer = make_scorer(model_root, tmp_path)
    det, h = scorer.detector, scorer.detector.params["h"]
    tokens = [t for t in det.vocab.tokens if t.startswith("T")]
    ranks, probs = det.rank_windows([(PAD,) * h] * len(tokens), tokens)
    best = int(np.argmin(ranks))  # the most likely first event: within k
    assert ranks[best] == 1
    # When seen transitions are accepted, a session starting as a normal training session started
    # is accepted whatever the probability of its first event.
    first = next(event for previous, event in det.transitions if previous == PAD)
    det.params["seen_transitions"], det.params["min_prob"] = "accept", 1.0
    assert scorer.score(as_lines([line_at(first, "blk_4", 0)])) == []
    det.params["seen_transitions"], det.params["min_prob"] = "rank", float(probs[best]) * 1.5
    [f] = scorer.score(as_lines([line_at(tokens[best], "blk_5", 0)], first_offset=1))
    assert f.event == tokens[best] and f.rank == UNKNOWN_RANK and f.probability == pytest.approx(probs[best])
    assert f.reason.startswith("probability ") and "below min_prob" in f.reason


def test_open_sessions_are_bounded(model_root, stream_lines, tmp_path):
    scorer = make_scorer(model_root, tmp_path, max_sessions=5)
    for line in as_lines(stream_lines[:600]):
        scorer.score([line])
        assert len(scorer.tracker) <= 5
    assert scorer.tracker.evicted > 0


# -- 6b. regressions: idle time, session_events, the time of a session end, the checkpoint ------
@pytest.fixture(scope="module")
def accepted_normal(model_root, sessions) -> list[tuple[str, list[str]]]:
    """Normal test-split sessions of more than h + 2 events that the offline model accepts whole:
    every event within the top k, and the END too."""
    det = NextEventDetector.load(model_root / MODEL)
    normal = sessions[(sessions["Split"] == "test") & (sessions["y"] == 0)].head(300)
    blocks, events = list(normal["BlockId"]), list(normal["events"])
    picked = [(b, e) for b, e, flagged in zip(blocks, events, det.predict(events))
              if not flagged and len(e) > det.params["h"] + 2]
    assert len(picked) >= 2, "the model accepts too few normal sessions"
    return picked


def test_a_quiet_spell_does_not_split_the_next_session_line_by_line(model_root, accepted_normal, tmp_path):
    """The reported reproduction: a normal session, a quiet spell of 1000 s, then a second normal
    session one line per batch, its lines older than (the last line + 1000 s) by more than the
    timeout. The quiet spell used to move event time on for good, so each of those lines closed its
    session again in the same batch and the next one reopened it: a finding for (nearly) every line."""
    (first, first_events), (second, second_events) = accepted_normal[:2]
    scorer = make_scorer(model_root, tmp_path)
    timeout, n = scorer.tracker.timeout_s, len(first_events)
    findings = scorer.score(timed_lines([(e, first, i) for i, e in enumerate(first_events)]))
    latest = START_S + n - 1
    findings += scorer.idle(1000)
    assert first not in scorer.tracker and scorer.tracker.closed == 1 and scorer.watermark == latest + 1000

    open_after_each, watermarks = [], []
    for i, event in enumerate(second_events):
        second_at = n + 10 + i
        assert START_S + second_at < latest + 1000 - timeout
        findings += scorer.score(timed_lines([(event, second, second_at)], first_offset=n + i))
        open_after_each.append(second in scorer.tracker)
        watermarks.append(scorer.watermark - START_S)
    findings += scorer.idle(timeout + 1)

    # Both sessions are normal ones the model accepts offline: no finding at all (old: one per line).
    assert summary(findings) == []
    assert all(open_after_each) and watermarks == [n + 10 + i for i in range(len(second_events))]
    # One session each: every event a window, plus one END each.
    assert scorer.tracker.closed == 2 and len(scorer.tracker) == 0
    assert scorer.stats["windows"] == len(first_events) + len(second_events) + 2


def test_idle_closes_sessions_past_the_timeout_and_a_line_starts_the_quiet_time_over(model_root, tmp_path):
    scorer = make_scorer(model_root, tmp_path, timeout_s=300)
    assert scorer.idle(10) == [] and scorer.watermark == float("-inf")  # no line yet: no event time to move on
    scorer.score(timed_lines([("T05", "blk_101", 0)]))
    assert scorer.watermark == START_S
    scorer.idle(120)
    scorer.idle(80)  # quiet time adds up
    assert scorer.watermark == START_S + 200 and "blk_101" in scorer.tracker

    # A line older than the moved-on watermark: event time is back at that line's, the quiet time starts over.
    scorer.score(timed_lines([("T05", "blk_102", 100)], first_offset=1))
    assert scorer.watermark == START_S + 100
    assert "blk_101" in scorer.tracker and "blk_102" in scorer.tracker

    scorer.idle(250)  # blk_101 quiet for 350 s of event time: ended; blk_102 for 250 s
    assert "blk_101" not in scorer.tracker and "blk_102" in scorer.tracker
    scorer.idle(50)  # blk_102 quiet for exactly the timeout: not past it yet
    assert "blk_102" in scorer.tracker
    scorer.idle(1)
    assert len(scorer.tracker) == 0 and scorer.tracker.closed == 2
    assert scorer.idle(0) == [] and scorer.idle(-5) == [] and scorer.watermark == START_S + 401
    assert (scorer.latest, scorer.idle_s) == (START_S + 100, 301)  # the watermark is latest + idle_s
    # The latest line time itself never moves back: an older line does not lower it.
    scorer.score(timed_lines([("T05", "blk_103", 40)], first_offset=2))
    assert scorer.latest == START_S + 100 and scorer.watermark == START_S + 100 and "blk_103" in scorer.tracker


def test_session_events_counts_the_whole_session_past_h(model_root, accepted_normal, tmp_path):
    block, events = accepted_normal[0]
    scorer = make_scorer(model_root, tmp_path)
    h = scorer.detector.params["h"]
    prefix = events[:12]  # 12 > h events the model accepts, then one it never saw
    assert len(prefix) == 12 > h
    assert scorer.score(timed_lines([(e, block, i) for i, e in enumerate(prefix)])) == []
    changelog = Changelog()
    changelog.write(scorer)
    restored = make_scorer(model_root, tmp_path)
    assert changelog.restore(restored) == "checkpoint"
    for s in (scorer, restored):
        [f] = s.score(timed_lines([("T08", block, 12)], first_offset=12))
        assert (f.key, f.event, f.rank) == (block, "T08", UNKNOWN_RANK)
        assert f.session_events == 13  # not h + 1 = len(window) + 1
        assert f.window == prefix[-h:] and f.timestamp == START_S + 12


def expect_every_event_never_an_end(scorer, monkeypatch) -> None:
    """The scorer's model made to rank every event first and every END just beyond k."""
    k = scorer.k

    def rank_windows(contexts, targets, lengths=None):
        return np.array([k + 1.0 if t == END else 1.0 for t in targets]), np.full(len(targets), 0.01)

    monkeypatch.setattr(scorer.detector, "rank_windows", rank_windows)


def test_a_session_end_finding_has_the_sessions_last_line_time(model_root, tmp_path, monkeypatch):
    from services.logdetector.service import session_record

    scorer = make_scorer(model_root, tmp_path, timeout_s=300)
    expect_every_event_never_an_end(scorer, monkeypatch)
    long_session = ["T05", "T01", "T01", "T01"] + ["T02", "T03", "T04"] * 4  # 16 events > h
    lines = ([("T05", "blk_-201", 0), ("T01", "blk_-201", 4), ("T01", "blk_-201", 3)]  # out of order: the last is 4
             + [(e, "blk_202", 10 + i) for i, e in enumerate(long_session)] + [("T05", "blk_203", 30)])
    assert scorer.score(timed_lines(lines)) == []

    # Ended by the quiet time: the closing happens at START + 430, each finding keeps its session's time.
    ended = {f.key: f for f in scorer.idle(400)}
    assert len(scorer.tracker) == 0 and set(ended) == {"blk_-201", "blk_202", "blk_203"}
    assert {key: f.timestamp - START_S for key, f in ended.items()} == {"blk_-201": 4, "blk_202": 25, "blk_203": 30}
    assert {key: f.session_events for key, f in ended.items()} == {"blk_-201": 3, "blk_202": 16, "blk_203": 1}
    assert all(f.event == END and f.rank == scorer.k + 1 and f.line == "" for f in ended.values())
    assert ended["blk_202"].window == long_session[-scorer.detector.params["h"]:]
    record = session_record(ended["blk_-201"], scorer, "logs")
    assert record.timestamp == START.replace(tzinfo=UTC) + timedelta(seconds=4)

    # Ended by a later line of another session, in the same batch: still the ended session's last line time.
    ended = scorer.score(timed_lines([("T05", "blk_301", 1000), ("T05", "blk_302", 1400)], first_offset=len(lines)))
    assert [(f.key, f.event, f.timestamp - START_S) for f in ended] == [("blk_301", END, 1000)]


def test_checkpoint_keeps_the_latest_line_time_and_the_quiet_time(model_root, tmp_path):
    changelog = Changelog()
    first = make_scorer(model_root, tmp_path, timeout_s=300)
    first.score(timed_lines([("T05", "blk_101", 0), ("T05", "blk_102", 50)]))
    first.idle(120)
    changelog.write(first)
    saved = changelog.meta[0]
    assert (saved["latest"], saved["idle_s"]) == (START_S + 50, 120) and "watermark" not in saved

    second = make_scorer(model_root, tmp_path, timeout_s=300)
    assert changelog.restore(second) == "checkpoint"
    assert (second.latest, second.idle_s, second.watermark) == (START_S + 50, 120, START_S + 170)
    # Both go on identically: blk_101 ends once event time passes START + 300, blk_102 once it passes START + 350.
    for s in (first, second):
        s.idle(130)
        assert "blk_101" in s.tracker
        s.idle(1)
        assert "blk_101" not in s.tracker and "blk_102" in s.tracker
        s.idle(50)
        assert len(s.tracker) == 0 and s.watermark == START_S + 351
    assert first.tracker.to_dict() == second.tracker.to_dict()


# -- 7. the producer's log messages -------------------------------------------------------------
def test_encode_log_lines_keys_by_first_block(tmp_path):
    path = tmp_path / "raw.log"
    path.write_bytes(b"081109 203615 148 INFO dfs.FSNamesystem: BLOCK* ask 10.0.0.1:50010 to delete blk_-1 blk_2\r\n"
                     b"\n"
                     b"   \n"
                     b"081109 203616 149 INFO dfs.DataNode: no block here\n"
                     b"Verification succeeded for blk_77")
    keys, values = encode_log_lines(path, BLOCK_KEY)
    assert keys == [b"blk_-1", None, b"blk_77"]
    assert values == [b"081109 203615 148 INFO dfs.FSNamesystem: BLOCK* ask 10.0.0.1:50010 to delete blk_-1 blk_2",
                      b"081109 203616 149 INFO dfs.DataNode: no block here", b"Verification succeeded for blk_77"]
    assert all(decode_log_line(v, 1024).message == v.decode() for v in values)


# -- 8. the Slack text of a log anomaly ---------------------------------------------------------
def log_record(**overrides) -> dict:
    record = {
        "kind": "log", "series": "blk_808", "timestamp": "2008-11-12T00:00:01Z", "event": "T08",
        "template": "writeBlock <*> received exception <*>", "reason": "an event never seen in the training sessions",
        "rank": UNKNOWN_RANK, "probability": 0.0, "k": 5, "min_prob": 0.0, "window": ["T05", "T01"],
        "session_events": 3, "line": "081112 000001 19 INFO dfs.DataNode$DataXceiver: writeBlock blk_808 received "
                                     "exception java.io.IOException: Could not read from stream",
        "model_version": "logs-test", "source_topic": "logs", "source_partition": 0, "source_offset": 41,
        "detected_at": "2024-01-01T00:00:00Z"}
    return {**record, **overrides}


def test_log_session_record_is_an_anomaly_record():
    rec = anomaly_record_adapter.validate_python(log_record())
    assert isinstance(rec, LogSessionRecord) and rec.series == "blk_808"
    assert isinstance(anomaly_record_adapter.validate_json(rec.model_dump_json()), LogSessionRecord)
    with pytest.raises(ValidationError) as info:
        anomaly_record_adapter.validate_python(log_record(kind="logs"))
    assert "'log'" in str(info.value)
    with pytest.raises(ValidationError):
        anomaly_record_adapter.validate_python(log_record(unexpected=1))


def test_format_log_alert_names_the_session_and_the_reason():
    rec = anomaly_record_adapter.validate_python(log_record())
    text, blocks = format_log_alert(rec)
    assert "blk_808" in text and rec.reason in text and "T08" in text and "2008-11-12 00:00:01 UTC" in text
    assert blocks[0]["type"] == "header" and "blk_808" in blocks[0]["text"]["text"]
    fields = " ".join(f["text"] for f in blocks[1]["fields"])
    assert "T05 → T01" in fields and rec.reason in fields
    assert {"type": "mrkdwn", "text": f"```{rec.line}```"} in [b.get("text") for b in blocks]
    assert "k=5" in json.dumps(blocks) and "logs[0]@41" in json.dumps(blocks)

    ended = anomaly_record_adapter.validate_python(log_record(event=END, line="", window=[], source_partition=None,
                                                              source_offset=None))
    text, blocks = format_log_alert(ended)
    assert "session ended" in text and "T08" not in text
    assert not any("```" in json.dumps(b) for b in blocks)  # no raw line to show
    assert "(session start)" in json.dumps(blocks)


def test_a_scorer_finding_becomes_a_valid_alert(model_root, tmp_path):
    from services.logdetector.service import session_record

    scorer = make_scorer(model_root, tmp_path)
    [finding] = scorer.score(as_lines([line_at("T08", "blk_4242", 0)], first_offset=7))
    payload = session_record(finding, scorer, "logs").model_dump_json()
    rec = anomaly_record_adapter.validate_json(payload)
    assert isinstance(rec, LogSessionRecord) and rec.kind == "log" and rec.model_version == scorer.version
    assert rec.timestamp == START.replace(tzinfo=UTC) and rec.source_offset == 7
    text, _ = format_log_alert(rec)
    assert "blk_4242" in text and "never seen" in text
