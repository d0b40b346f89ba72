"""The scoring path of `logs`: raw lines -> drain3 templates -> event ids -> per-session windows ->
next-event model (one network call per batch) -> the anomalous sessions.

A session is reported once, at its first event outside the model's top-k (or below min_prob, or
never seen in training), or when it ends (inactivity timeout in event time, or a terminal event)
where the model did not expect an end. Only the last h events of each open session are kept, at
most `max_sessions` sessions; the idle ones are closed as the batch's event time passes them.

The open sessions live in memory, so the log detector writes them with the offsets they have
absorbed to a checkpoint (atomically), and commits offsets only up to a checkpoint. After a crash
it restores the checkpoint and re-reads from there: a message the checkpoint already holds is
skipped, so no event enters a session twice. The drain3 state is its own file, saved on every new
template, so event ids stay the same across restarts.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path

from models.base import ArtifactError, read_checkpoint, read_json, write_checkpoint
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
        self.stats = {"lines": 0, "lines_without_session": 0, "windows": 0, "anomalous_sessions": 0}

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / "checkpoint.json"

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
            self.applied[line.partition] = max(self.applied.get(line.partition, -1), line.offset)
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
        return self._decide([])

    def _decide(self, pending: list) -> list[LogFinding]:
        pending.extend((w, None, "") for w in self.tracker.close_idle(self.watermark))
        if not pending:
            return []
        self.stats["windows"] += len(pending)
        ranks, probs = self.detector.rank_windows([w.context for w, *_ in pending], [w.target for w, *_ in pending])
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
        if window.target == END:
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

    # -- checkpoint ----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Sessions, event time and absorbed offsets, written atomically (old file or new, never half)."""
        write_checkpoint(self.checkpoint_path, {"version": self.version, "offsets": self.applied, "latest": self.latest,
                                                "idle_s": self.idle_s, "sessions": self.tracker.to_dict()})

    def restore(self) -> str:
        """Continue from the checkpoint of this model version, else start empty; says which."""
        self.tracker, self.applied = SessionTracker(**self.tracker_args), {}
        self.latest, self.idle_s = float("-inf"), 0.0
        saved = read_checkpoint(self.checkpoint_path)
        if saved is None:
            return "empty"
        if saved.get("version") != self.version:
            return "empty (checkpoint of another model version ignored)"
        if "latest" not in saved:
            return "empty (checkpoint in an older format ignored)"
        self.tracker.restore(saved["sessions"])
        self.applied = {int(p): int(o) for p, o in saved["offsets"].items()}
        self.latest, self.idle_s = float(saved["latest"]), float(saved["idle_s"])
        return "checkpoint"

