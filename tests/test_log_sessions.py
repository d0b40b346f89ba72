"""Sessions and windows (shared/log_sessions.py): windows/targets, keys, the streaming tracker."""

from __future__ import annotations

import pytest

from shared.log_sessions import END, PAD, SessionTracker, Window, group_sessions, read_sessions_csv, windows


def test_windows_and_targets_of_abcdef():
    assert windows("ABCDEF", 3) == [(("A", "B", "C"), "D"), (("B", "C", "D"), "E"), (("C", "D", "E"), "F")]
    padded = windows("ABCDEF", 3, pad=PAD, end=END)
    assert padded[:3] == [((PAD, PAD, PAD), "A"), ((PAD, PAD, "A"), "B"), ((PAD, "A", "B"), "C")]
    assert padded[3:6] == windows("ABCDEF", 3)
    assert padded[6] == (("D", "E", "F"), END) and len(padded) == 7


def test_short_sessions_yield_nothing_unpadded_and_one_window_per_event_padded():
    assert windows("AB", 3) == []
    assert windows("AB", 3, pad=PAD) == [((PAD, PAD, PAD), "A"), ((PAD, PAD, "A"), "B")]
    assert windows("AB", 3, pad=PAD, end=END)[-1] == ((PAD, "A", "B"), END)
    assert windows("", 3, pad=PAD, end=END) == [((PAD, PAD, PAD), END)]
    with pytest.raises(ValueError):
        windows("AB", 0)


def test_a_line_naming_several_blocks_belongs_to_each():
    lines = [("Receiving block blk_1 src", "E1"),
             ("ask 10.0.0.1:50010 to delete blk_1 blk_-2 blk_1", "E2"),  # blk_1 twice: counted once
             ("PacketResponder 0 for block blk_-2 terminating", "E3"),
             ("no block here", "E4")]
    assert group_sessions(lines) == {"blk_1": ["E1", "E2"], "blk_-2": ["E2", "E3"]}
    assert group_sessions([("job_7 and job_8 started", "E9")], key_regex=r"job_\d+") == {"job_7": ["E9"],
                                                                                          "job_8": ["E9"]}


def test_tracker_gives_the_window_of_every_event_and_closes_idle_sessions():
    tracker = SessionTracker(h=3, timeout_s=10)
    assert tracker.add("b1", "A", ts=0) == [Window("b1", (PAD, PAD, PAD), "A")]
    tracker.add("b1", "B", ts=1)
    tracker.add("b2", "A", ts=5)
    assert tracker.add("b1", "C", ts=2) == [Window("b1", (PAD, "A", "B"), "C")]
    assert tracker.add("b1", "D", ts=3) == [Window("b1", ("A", "B", "C"), "D")]  # only the last h kept
    assert tracker.close_idle(now=14) == [Window("b1", ("B", "C", "D"), END)]  # b1 silent 11 s, b2 9 s
    assert "b1" not in tracker and "b2" in tracker and tracker.closed == 1
    assert tracker.close_idle(now=16) == [Window("b2", (PAD, PAD, "A"), END)]
    assert len(tracker) == 0
    # A key seen again after closing starts a fresh session.
    assert tracker.add("b1", "E", ts=20)[0].context == (PAD, PAD, PAD)


def test_tracker_terminal_event_ends_the_session():
    tracker = SessionTracker(h=2, terminal_events=frozenset({"DEL"}))
    tracker.add("b", "A", 0)
    assert tracker.add("b", "DEL", 1) == [Window("b", (PAD, "A"), "DEL"), Window("b", ("A", "DEL"), END)]
    assert "b" not in tracker
    assert SessionTracker(h=2, end=None, terminal_events=frozenset({"X"})).add("c", "X", 0) == [
        Window("c", (PAD, PAD), "X")]


def test_tracker_memory_is_bounded():
    tracker = SessionTracker(h=2, max_sessions=2)
    tracker.add("a", "A", 0)
    tracker.add("b", "A", 1)
    tracker.add("a", "B", 2)  # a is now the most recently active
    tracker.add("c", "A", 3)  # evicts b, without an END window
    assert "b" not in tracker and "a" in tracker and "c" in tracker
    assert len(tracker) == 2 and tracker.evicted == 1
    assert tracker.close_idle(now=1e9) == [Window("a", ("A", "B"), END), Window("c", (PAD, "A"), END)]


def test_tracker_add_line_feeds_every_block_of_the_line():
    tracker = SessionTracker(h=2)
    out = tracker.add_line("ask 10.0.0.1:50010 to delete blk_1 blk_2", "E4", ts=0)
    assert [w.key for w in out] == ["blk_1", "blk_2"] and len(tracker) == 2


def test_read_sessions_csv(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("BlockId,Label,NumEvents,EventSequence,Split\nblk_1,Normal,2,T05 T01,train\n"
                    "blk_2,Anomaly,1,T08,test\n")
    frame = read_sessions_csv(path)
    assert frame["events"].tolist() == [["T05", "T01"], ["T08"]] and frame["y"].tolist() == [0, 1]
    path.write_text("BlockId,Label,EventSequence\nblk_1,Weird,T01\n")
    with pytest.raises(ValueError, match="Label"):
        read_sessions_csv(path)
