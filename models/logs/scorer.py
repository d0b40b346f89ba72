"""The scoring path of `logs`: raw lines -> drain3 templates -> event ids -> per-session windows ->
next-event model (one network call per batch) -> the anomalous sessions.

A session is reported once, at its first event outside the model's top-k (or below min_prob, or
never seen in training), or when it ends (inactivity timeout in event time, or a terminal event)
where the model did not expect an end (under the "length" rule: shorter than any normal training
session). Only the last h events of each open session are kept, at most `max_sessions` sessions;
the idle ones are closed as the batch's event time passes them.

The open sessions live in memory, each belonging to the input partition of its latest line (a
session's lines are expected in one partition: producers key them by session). Their state is
handed out per partition (`take_changes`: each changed session's state, None for one that ended,
and the partition's meta: model version, the last offset absorbed, event time) for the log detector
to make durable (a changelog topic) before it commits those offsets, and taken back per partition
(`restore_partition`) when the partition is assigned, wherever it ran before; `drop_partition`
forgets a revoked one. A message at or below the restored offset is already in its sessions and is
skipped (`is_applied`), so no event enters a session twice. This module knows nothing of Kafka.
The drain3 state is its own file under `state_dir`, saved on every new template, so event ids stay
the same across restarts.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path

from models.base import ArtifactError, read_json
from models.logs.next_event import UNKNOWN_RANK, NextEventDetector
from models.logs.sessions import END, PAD, SessionTracker
from models.logs.templates import LogLine as HdfsLine
from models.logs.templates import LogTemplateMiner, TemplateAlignment, parse_hdfs_line

MANIFEST = "manifest.json"
REFERENCE_TEMPLATES = "reference_templates.json"


@dataclass
class LogLine:
    """A decoded line and where it came from."""

    content: str  # the whole raw line
    timestamp: float | None  # event time (epoch s) when the message gave one
    kafka_timestamp_s: float
    partition: int
    offset: int


@dataclass
class LogFinding:
    """An anomalous session, at its offending event (the fields of schemas.LogSessionRecord)."""

    key: str
    timestamp: float
    event: str
    template: str
    reason: str
    rank: float
    probability: float
    window: list[str]
    session_events: int
    line: str
    partition: int | None
    offset: int | None


class LogStreamScorer:
    def __init__(self, model_dir: Path, name: str, state_dir: Path, session_key: str, timeout_s: float = 300.0,
                 max_sessions: int = 100_000, terminal_events: list[str] | tuple = ()):
        folder = Path(model_dir) / name
        if not (folder / MANIFEST).exists():
            raise ArtifactError(f"no trained log model at {folder} (run `anomstream logs train`)")
        self.manifest = read_json(folder / MANIFEST)
        self.version: str = self.manifest["version"]
        self.detector = NextEventDetector.load(folder)
        reference = folder / REFERENCE_TEMPLATES
        # A model trained on another parser's event ids scores our templates through the alignment.
        self.templates = read_json(reference) if reference.exists() else {}
        self.alignment = TemplateAlignment(self.templates) if self.templates else None
        self.state_dir = Path(state_dir) / name
        self.miner = LogTemplateMiner(self.state_dir / "drain3_state.bin")
        self.key_regex = re.compile(session_key)
        self.tracker_args = dict(h=self.detector.params["h"], timeout_s=timeout_s,
                                 terminal_events=frozenset(terminal_events), max_sessions=max_sessions)
        self.tracker = SessionTracker(**self.tracker_args)
        self.applied: dict[int, int] = {}  # partition -> last offset the sessions have absorbed
        self.latest = float("-inf")  # the latest event time of a line
        self.idle_s = 0.0  # wall time the input has been quiet since that line
        self.partition_of: dict[str, int] = {}  # open session -> the input partition of its latest line
        self.touched: set[str] = set()  # sessions that took an event since the last take_changes
        self.changed_parts: set[int] = set()  # partitions whose meta moved since then
        self.stored: dict[int, set[str]] = {}  # partition -> sessions whose state was handed out (or restored)
        self.stats = {"lines": 0, "lines_without_session": 0, "windows": 0, "anomalous_sessions": 0}

    @property
    def k(self) -> int:
        return self.detector.k

    # -- one line -> event id ------------------------------------------------------------------
    def event_of(self, content: str) -> tuple[str, str]:
        """(event id in the model's vocabulary, template text) of a line's message part."""
        eid, template = self.miner.add(content)
        if self.alignment is not None:
            reference = self.alignment.event_for(template, content)
            if reference is not None:
                return reference, self.templates[reference]
        return eid, template

    @staticmethod
    def event_time(line: LogLine, parsed: HdfsLine | None) -> float:
        """The message's own time, else the line's HDFS header, else the Kafka timestamp."""
        if line.timestamp is not None:
            return line.timestamp
        if parsed is not None:
            return calendar.timegm(time.strptime(parsed.date + parsed.time, "%y%m%d%H%M%S"))  # naive = UTC
        return line.kafka_timestamp_s

    # -- a batch -------------------------------------------------------------------------------
    def is_applied(self, partition: int, offset: int) -> bool:
        return offset <= self.applied.get(partition, -1)

    def score(self, lines: list[LogLine]) -> list[LogFinding]:
        """Every line into its sessions, the windows scored together, the new anomalous sessions out."""
        pending = []  # (window, line or None, event time, template)
        for line in lines:
            parsed = parse_hdfs_line(line.content)
            content = parsed.content if parsed is not None else line.content
            event, template = self.event_of(content)
            ts = self.event_time(line, parsed)
            self.latest, self.idle_s = max(self.latest, ts), 0.0
            self.stats["lines"] += 1
            keys = list(dict.fromkeys(self.key_regex.findall(content)))
            if not keys:
                self.stats["lines_without_session"] += 1  # parsed (its template is learned), not scored
            for key in keys:
                pending.extend((w, line, template) for w in self.tracker.add(key, event, ts))
                self.partition_of[key] = line.partition
            self.touched.update(keys)
            self.applied[line.partition] = max(self.applied.get(line.partition, -1), line.offset)
            self.changed_parts.add(line.partition)
        return self._decide(pending)

    @property
    def watermark(self) -> float:
        """Event time now: the latest line's, moved on by the wall time the input has been quiet
        since (so sessions still end when the stream stops; the next line resets it)."""
        return self.latest + self.idle_s

    def idle(self, seconds: float) -> list[LogFinding]:
        """The input has been quiet for `seconds` more of wall time: close the sessions that became idle."""
        if self.latest == float("-inf") or seconds <= 0:
            return []
        self.idle_s += seconds
        self.changed_parts.update(self.applied)  # the event time each partition's meta holds moved
        return self._decide([])

    def _decide(self, pending: list) -> list[LogFinding]:
        pending.extend((w, None, "") for w in self.tracker.close_idle(self.watermark))
        if not pending:
            return []
        self.stats["windows"] += len(pending)
        ranks, probs = self.detector.rank_windows([w.context for w, *_ in pending], [w.target for w, *_ in pending],
                                                  [w.events for w, *_ in pending])
        findings, reported = [], set()
        for (window, line, template), rank, prob in zip(pending, ranks.tolist(), probs.tolist()):
            if rank <= self.k or window.flagged or window.key in reported:
                continue
            reported.add(window.key)
            self.tracker.flag(window.key)
            findings.append(self._finding(window, line, template, rank, prob))
        self.stats["anomalous_sessions"] += len(findings)
        return findings

    def _finding(self, window, line, template, rank, prob) -> LogFinding:
        ends_by_length = self.detector.params.get("session_end") == "length" and self.detector.min_events is not None
        if window.target == END and ends_by_length and rank >= UNKNOWN_RANK:
            reason = (f"the session ended after {window.events} event{'s' * (window.events != 1)}, fewer than any "
                      f"normal training session ({self.detector.min_events})")
        elif window.target == END:
            reason = f"the session ended where the model did not expect an end (rank {rank:g} > k={self.k})"
        elif rank >= UNKNOWN_RANK and window.target not in self.detector.vocab.index:
            reason = "an event never seen in the training sessions"
        elif rank >= UNKNOWN_RANK:
            reason = f"probability {prob:.2g} below min_prob {self.detector.params['min_prob']:g}"
        else:
            reason = f"not among the top {self.k} predicted next events (rank {rank:g})"
        context = [e for e in window.context if e != PAD]
        return LogFinding(key=window.key, timestamp=window.ts, event=window.target, template=template, reason=reason,
                          rank=rank, probability=prob, window=context,
                          session_events=window.events + (window.target != END),
                          line=line.content[:1000] if line else "", partition=line.partition if line else None,
                          offset=line.offset if line else None)

    # -- state, per input partition ---------------------------------------------------------
    def meta(self, partition: int) -> dict:
        """What a partition's state holds besides its sessions."""
        return {"version": self.version, "offset": self.applied.get(partition, -1), "latest": self.latest,
                "idle_s": self.idle_s}

    def take_changes(self) -> dict[int, tuple[dict, dict[str, dict | None]]]:
        """Per input partition whose state changed since the last call: (its meta, {session key:
        the session's state, or None for a session that ended, was evicted or moved to another
        partition}). Make it durable (meta after the sessions) before committing the offsets."""
        open_keys = set(self.tracker.keys())
        self.partition_of = {k: p for k, p in self.partition_of.items() if k in open_keys}
        sessions: dict[int, dict[str, dict | None]] = {}
        for key in self.touched:
            p = self.partition_of.get(key)
            if p is not None:
                sessions.setdefault(p, {})[key] = self.tracker.session_dict(key)
                self.stored.setdefault(p, set()).add(key)
        for p, keys in self.stored.items():
            gone = [k for k in keys if self.partition_of.get(k) != p]
            for key in gone:
                sessions.setdefault(p, {})[key] = None
            keys.difference_update(gone)
        changes = {p: (self.meta(p), sessions.get(p, {})) for p in sorted(self.changed_parts | set(sessions))}
        self.touched, self.changed_parts = set(), set()
        return changes

    def restore_partition(self, partition: int, meta: dict | None, sessions: dict[str, dict]) -> str:
        """Continue `partition` from its state (meta and open sessions, least recently active first)
        when it was written by this model version, else start it empty; says which."""
        self.drop_partition(partition)
        if meta is None:
            return "empty"
        if meta.get("version") != self.version:
            return "empty (state of another model version ignored)"
        for key, state in sessions.items():
            self.tracker.load_session(key, state)
            self.partition_of[key] = partition
        self.stored[partition] = set(sessions)
        if int(meta["offset"]) >= 0:
            self.applied[partition] = int(meta["offset"])
        if float(meta["latest"]) > self.latest:  # event time: the latest any owned partition saw
            self.latest, self.idle_s = float(meta["latest"]), float(meta["idle_s"])
        return "checkpoint"

    def drop_partition(self, partition: int) -> None:
        """Forget a partition's sessions and offsets (revoked: its state lives in what was handed out)."""
        keys = [k for k, p in self.partition_of.items() if p == partition]
        for key in keys:
            self.tracker.forget(key)
            del self.partition_of[key]
        self.touched.difference_update(keys)
        self.stored.pop(partition, None)
        self.applied.pop(partition, None)
        self.changed_parts.discard(partition)
        if not self.partition_of and not self.applied:  # nothing owned: no event time either
            self.latest, self.idle_s = float("-inf"), 0.0
