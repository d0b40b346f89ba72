"""Sessions and windows (models/logs/sessions.py): windows/targets, keys, the streaming tracker."""

from __future__ import annotations

import pytest

from models.logs.sessions import (
    END,
    PAD,
    SessionTracker,
    Window,
    group_sessions,
    read_sessions_csv,
    windows,
)


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
    assert tracker.add("b1", "A", ts=0) == [Window("b1", (PAD, PAD, PAD), "A", events=0, ts=0)]
    tracker.add("b1", "B", ts=1)
    tracker.add("b2", "A", ts=5)
    assert tracker.add("b1", "C", ts=2) == [Window("b1", (PAD, "A", "B"), "C", events=2, ts=2)]
    # Only the last h events kept; `events` still counts the whole session.
    assert tracker.add("b1", "D", ts=3) == [Window("b1", ("A", "B", "C"), "D", events=3, ts=3)]
    # b1 silent 11 s, b2 9 s; an END window carries the session's last event time, not `now`.
    assert tracker.close_idle(now=14) == [Window("b1", ("B", "C", "D"), END, events=4, ts=3)]
    assert "b1" not in tracker and "b2" in tracker and tracker.closed == 1
    assert tracker.close_idle(now=16) == [Window("b2", (PAD, PAD, "A"), END, events=1, ts=5)]
    assert len(tracker) == 0
    # A key seen again after closing starts a fresh session.
    assert tracker.add("b1", "E", ts=20)[0].context == (PAD, PAD, PAD)


def test_tracker_terminal_event_ends_the_session():
    tracker = SessionTracker(h=2, terminal_events=frozenset({"DEL"}))
    tracker.add("b", "A", 0)
    assert tracker.add("b", "DEL", 1) == [Window("b", (PAD, "A"), "DEL", events=1, ts=1),
                                          Window("b", ("A", "DEL"), END, events=2, ts=1)]
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
    assert tracker.close_idle(now=1e9) == [Window("a", ("A", "B"), END, events=2, ts=2),
                                           Window("c", (PAD, "A"), END, events=1, ts=3)]


def test_tracker_windows_count_every_event_and_keep_event_times():
    """`events` counts the session's events before the target however many the window drops (h=2
    here); `ts` is the target's event time, and for END the session's latest event time (the
    maximum, also when lines arrive out of order), never the time the session is closed at."""
    tracker = SessionTracker(h=2, timeout_s=10)
    out = [w for i, ts in enumerate([100, 101, 103, 102, 104, 105]) for w in tracker.add("s", f"E{i}", ts)]
    assert [w.events for w in out] == [0, 1, 2, 3, 4, 5]
    assert [w.ts for w in out] == [100, 101, 103, 102, 104, 105]
    assert out[-1].context == ("E3", "E4")
    [end] = tracker.close_idle(now=1000)
    assert (end.target, end.events, end.ts, end.context) == (END, 6, 105, ("E4", "E5"))
    # The same after a checkpoint round trip.
    tracker.add("t", "A", 7)
    tracker.add("t", "B", 9)
    restored = SessionTracker(h=2, timeout_s=10)
    restored.restore(tracker.to_dict())
    assert restored.add("t", "C", 8) == [Window("t", ("A", "B"), "C", events=2, ts=8)]
    assert restored.close("t") == [Window("t", ("B", "C"), END, events=3, ts=9)]


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


def test_an_event_after_the_timeout_ends_the_old_session_whatever_the_batches():
    """A at 0 s, B at 400 s, A again at 401 s (timeout 300 s): A's first session ended, whether or
    not close_idle ran between the events (it runs once per consumed batch)."""
    def run(close_between: bool):
        tracker = SessionTracker(h=2, timeout_s=300)
        out = []
        for key, event, ts in (("A", "x", 0.0), ("B", "y", 400.0), ("A", "z", 401.0)):
            out += tracker.add(key, event, ts)
            if close_between:
                out += tracker.close_idle(ts)
        return [(w.key, w.context, w.target) for w in out], tracker.closed

    windows, closed = run(False)
    assert (windows, closed) == run(True)
    assert closed == 1
    assert windows == [("A", (PAD, PAD), "x"), ("B", (PAD, PAD), "y"), ("A", (PAD, "x"), END), ("A", (PAD, PAD), "z")]
