"""Sessions of log events and the sliding windows the log models learn from.

A session is the ordered event ids of one key (HDFS: one block, `blk_<id>`); a line naming several
keys belongs to each of them, once. A window is the h events before a target event.

Padding (the choice for short sessions): with `pad` given, a session is left-padded with h PAD ids,
so EVERY event, the first included, is a target and a session of any length (HDFS has sessions of
2 events) yields one window per event; the first events are predicted from what a session normally
starts with. With `end` given, one more window has the end of the session as its target, so a
session that stops early (say after its first two events) can be told from one that completed.
Without padding a session yields len - h windows, none when it is shorter than h + 1.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

BLOCK_KEY = r"blk_-?\d+"
PAD = "<PAD>"  # left padding of a window
END = "<END>"  # target of the window that closes a session
UNKNOWN = "<UNK>"  # an event id the model never saw in training


def windows(seq: Sequence[str], h: int = 10, pad: str | None = None,
            end: str | None = None) -> list[tuple[tuple[str, ...], str]]:
    """(window of the h previous events, target) pairs of one session, in order.

    windows("ABCDEF", 3) -> (A,B,C)->D, (B,C,D)->E, (C,D,E)->F; with pad=PAD also
    (PAD,PAD,PAD)->A, (PAD,PAD,A)->B, (PAD,A,B)->C first, and with end=END a last (D,E,F)->END.
    """
    if h < 1:
        raise ValueError("h must be at least 1")
    events = list(seq) + ([end] if end is not None else [])
    history = [pad] * h if pad is not None else []
    padded = history + events
    return [(tuple(padded[i - h:i]), padded[i]) for i in range(h, len(padded))]


def session_keys(content: str, key_regex: re.Pattern | str = BLOCK_KEY) -> list[str]:
    """The distinct session keys named in a line, in order of first mention."""
    pattern = re.compile(key_regex) if isinstance(key_regex, str) else key_regex
    return list(dict.fromkeys(pattern.findall(content)))


def group_sessions(lines: Iterable[tuple[str, str]], key_regex: str = BLOCK_KEY) -> dict[str, list[str]]:
    """{key: event ids in log order} from (content, event_id) pairs in log order."""
    pattern = re.compile(key_regex)
    sessions: dict[str, list[str]] = {}
    for content, event in lines:
        for key in session_keys(content, pattern):
            sessions.setdefault(key, []).append(event)
    return sessions


SESSION_COLUMNS = ["BlockId", "Label", "NumEvents", "EventSequence", "Split"]


def read_sessions_csv(path: Path, unlabelled_ok: bool = False) -> pd.DataFrame:
    """A sessions CSV (BlockId, Label Normal/Anomaly, NumEvents, EventSequence space-separated,
    optional Split train/test) with two more columns: `events` (list) and `y` (1 = Anomaly).
    With `unlabelled_ok`, every Label may be empty (sessions parsed from a team's own raw logs,
    `logs parse --sessions`): y is then 0 throughout and frame.attrs["labelled"] is False."""
    frame = pd.read_csv(path, dtype={"BlockId": str, "Label": str, "EventSequence": str})
    missing = {"BlockId", "Label", "EventSequence"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    frame["Label"] = frame["Label"].fillna("")
    labels = set(frame["Label"].unique())
    frame.attrs["labelled"] = labels != {""}
    if not frame.attrs["labelled"] and not unlabelled_ok:
        raise ValueError(f"{path}: no session is labelled (Label is empty); this needs Normal/Anomaly labels")
    if frame.attrs["labelled"] and not labels <= {"Normal", "Anomaly"}:
        raise ValueError(f"{path}: Label must be Normal or Anomaly, found {sorted(labels - {'Normal', 'Anomaly'})}")
    frame["events"] = frame["EventSequence"].fillna("").str.split()
    frame["y"] = (frame["Label"] == "Anomaly").astype(int)
    return frame


def write_sessions_csv(path: Path, sessions: dict[str, list[str]], labels: dict[str, str] | None = None) -> None:
    """Sessions in the CSV format above (Label from `labels`, empty when unknown; no Split)."""
    labels = labels or {}
    pd.DataFrame({
        "BlockId": list(sessions), "Label": [labels.get(k, "") for k in sessions],
        "NumEvents": [len(s) for s in sessions.values()], "EventSequence": [" ".join(s) for s in sessions.values()],
    }).to_csv(path, index=False)


@dataclass(frozen=True)
class Window:
    key: str
    context: tuple[str, ...]
    target: str
    flagged: bool = False  # the session was already found anomalous (see SessionTracker.flag)
    events: int = 0  # events of the session before the target
    ts: float = 0.0  # event time of the target (of the session's last event, for an END target)


@dataclass
class _Session:
    recent: deque
    last_ts: float
    events: int = 0
    flagged: bool = False


@dataclass
class SessionTracker:
    """Streaming sessions: one bounded deque of the last h events per key.

    add(key, event, ts) returns the window whose target is this event (sessions are left-padded, so
    every event is a target), plus the closing window (target END) when the event is terminal.
    close_idle(now) closes the sessions silent for more than timeout_s and returns their END windows;
    an event for a session silent for more than timeout_s before it also closes that session first
    and starts a new one, so where a stream is cut into batches does not matter.
    At most max_sessions are kept: a new key beyond that drops the least recently active session
    without an END window (it did not end, it was forgotten; counted in `evicted`).
    """

    h: int = 10
    timeout_s: float = 300.0
    terminal_events: frozenset[str] = frozenset()
    max_sessions: int = 100_000
    pad: str = PAD
    end: str | None = END
    evicted: int = 0
    closed: int = 0
    _sessions: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, key: str) -> bool:
        return key in self._sessions

    def add(self, key: str, event: str, ts: float) -> list[Window]:
        session = self._sessions.get(key)
        out: list[Window] = []
        if session is not None and ts - session.last_ts > self.timeout_s:
            # Idle past the timeout before this event: that session ended, this one is new (checked
            # here, not only by close_idle at a batch's end, so batch boundaries change nothing).
            out, session = self.close(key), None
        if session is None:
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
                self.evicted += 1
            session = self._sessions[key] = _Session(deque([self.pad] * self.h, maxlen=self.h), ts)
        else:
            self._sessions.move_to_end(key)
        out.append(Window(key, tuple(session.recent), event, session.flagged, session.events, ts))
        session.recent.append(event)
        session.events += 1
        session.last_ts = max(session.last_ts, ts)
        if event in self.terminal_events:
            out.extend(self.close(key))
        return out

    def add_line(self, content: str, event: str, ts: float, key_regex: str = BLOCK_KEY) -> list[Window]:
        """add() for every session key a raw line names."""
        return [w for key in session_keys(content, key_regex) for w in self.add(key, event, ts)]

    def close(self, key: str) -> list[Window]:
        """End one session now: its END window (if `end` is set); unknown keys give nothing."""
        session = self._sessions.pop(key, None)
        if session is None:
            return []
        self.closed += 1
        return ([Window(key, tuple(session.recent), self.end, session.flagged, session.events, session.last_ts)]
                if self.end is not None else [])

    def close_idle(self, now: float) -> list[Window]:
        """Close every session whose last event is more than timeout_s before `now`."""
        # A full scan: keys are ordered by arrival, which need not be the order of event time.
        idle = [key for key, s in self._sessions.items() if now - s.last_ts > self.timeout_s]
        return [w for key in idle for w in self.close(key)]

    def flag(self, key: str) -> None:
        """Remember that a session was found anomalous (one alert per session, not one per event)."""
        if key in self._sessions:
            self._sessions[key].flagged = True

    def keys(self) -> list[str]:
        """The open sessions' keys, least recently active first."""
        return list(self._sessions)

    def session_dict(self, key: str) -> dict:
        """One open session's state (for a per-session checkpoint record)."""
        s = self._sessions[key]
        return {"recent": list(s.recent), "last_ts": s.last_ts, "events": s.events, "flagged": s.flagged}

    def load_session(self, key: str, state: dict) -> None:
        """An open session back from `session_dict`, as the most recently active one."""
        self._sessions.pop(key, None)
        self._sessions[key] = _Session(deque(state["recent"], maxlen=self.h), float(state["last_ts"]),
                                       int(state["events"]), bool(state["flagged"]))

    def forget(self, key: str) -> None:
        """Drop an open session without closing it (its state lives elsewhere now)."""
        self._sessions.pop(key, None)

    def to_dict(self) -> dict:
        """The open sessions, least recently active first, for a checkpoint."""
        return {"evicted": self.evicted, "closed": self.closed,
                "sessions": [[k, list(s.recent), s.last_ts, s.events, s.flagged] for k, s in self._sessions.items()]}

    def restore(self, state: dict) -> None:
        self.evicted, self.closed = int(state["evicted"]), int(state["closed"])
        self._sessions = OrderedDict(
            (k, _Session(deque(recent, maxlen=self.h), float(ts), int(n), bool(f)))
            for k, recent, ts, n, f in state["sessions"])


def encode_log_lines(path: Path, session_key: str) -> tuple[list[bytes | None], list[bytes]]:
    """Each non-empty line of a raw log as a plain-text message, keyed by the first session key it
    names (so with several partitions a session's lines stay in one, in order); no key otherwise."""
    pattern = re.compile(session_key)
    keys, values = [], []
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            match = pattern.search(line.decode("utf-8", errors="replace"))
            keys.append(match.group(0).encode() if match else None)
            values.append(line)
    return keys, values
