"""Log template mining: each raw log line -> (event id, template), with drain3.

Variable parts are masked before Drain sees a line (block ids, IPs with an optional port, hex ids,
numbers), so that lines differing only in those fall into one cluster. A cluster's id never
changes once given, so the event id "E<cluster_id>" is stable; with a state file the Drain tree is
saved (drain3 FilePersistence) and reloaded on restart, so a restarted miner gives known lines the
same ids and creates no new cluster for them. `max_clusters` caps the clusters kept (drain3
evicts the least recently used one; a new cluster always gets a fresh id).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from drain3 import TemplateMiner
from drain3.file_persistence import FilePersistence
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

# (regex, mask name), applied in this order: the block id before the numbers inside it.
DEFAULT_MASKS: tuple[tuple[str, str], ...] = (
    (r"blk_-?\d+(?:\s+blk_-?\d+)*", "BLK"),  # a list of blocks is one variable ("ask ... to delete blk_1 blk_2")
    (r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?(?![\w.])", "IP"),
    # 0x-prefixed, or 8+ hex digits holding both a letter and a digit (a plain number is NUM)
    (r"(?<!\w)(?:0x[0-9a-fA-F]+|(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,})(?!\w)", "HEX"),
    (r"(?<![\w.\-])[-+]?\d+(?:\.\d+)?(?![\w.])", "NUM"),
)

# HDFS_v1 raw line: "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for ..."
HDFS_LINE = re.compile(r"^(?P<date>\d{6}) (?P<time>\d{6}) (?P<pid>\d+) (?P<level>[A-Z]+) (?P<component>[^:\s]+): "
                       r"(?P<content>.*)$")


@dataclass(frozen=True)
class LogLine:
    date: str
    time: str
    pid: str
    level: str
    component: str
    content: str

    @property
    def timestamp(self) -> str:
        """ISO 8601 (HDFS_v1 dates are yyMMdd HHmmss of 2008)."""
        d, t = self.date, self.time
        return f"20{d[:2]}-{d[2:4]}-{d[4:6]}T{t[:2]}:{t[2:4]}:{t[4:6]}"


def parse_hdfs_line(line: str) -> LogLine | None:
    """A raw HDFS_v1 line split into its header fields and content; None when it has another shape."""
    match = HDFS_LINE.match(line.rstrip("\r\n"))
    return LogLine(**match.groupdict()) if match else None


def event_id(cluster_id: int) -> str:
    return f"E{cluster_id}"


class LogTemplateMiner:
    """drain3 with our masks, a stable event id per cluster, an optional state file and cluster cap."""

    def __init__(self, state_path: Path | None = None, masks: Sequence[tuple[str, str]] = DEFAULT_MASKS,
                 max_clusters: int | None = None, sim_th: float = 0.4, depth: int = 4):
        config = TemplateMinerConfig()
        config.masking_instructions = [MaskingInstruction(pattern, name) for pattern, name in masks]
        config.drain_max_clusters = max_clusters
        config.drain_sim_th = sim_th
        config.drain_depth = depth
        config.snapshot_interval_minutes = 10 ** 6  # snapshots on changes and on save(), not by the clock
        self.state_path = Path(state_path) if state_path else None
        persistence = None
        if self.state_path:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            persistence = FilePersistence(str(self.state_path))
        self._miner = TemplateMiner(persistence, config)  # loads the state file if there is one

    @property
    def cluster_count(self) -> int:
        return len(self._miner.drain.clusters)

    def add(self, content: str) -> tuple[str, str]:
        """(event id, current template) of one line's content, learning from it; with a state file
        every new or changed cluster is saved at once (streaming use)."""
        result = self._miner.add_log_message(content)
        return event_id(result["cluster_id"]), result["template_mined"]

    def add_many(self, contents: Iterable[str]) -> list[tuple[str, str]]:
        """Bulk version of add(): the state file is written once at the end, not per new cluster.
        Templates are the final ones (a cluster's template may still widen after a line joined it)."""
        persistence, self._miner.persistence_handler = self._miner.persistence_handler, None
        try:
            ids = [self._miner.add_log_message(c)["cluster_id"] for c in contents]
        finally:
            self._miner.persistence_handler = persistence
        self.save()
        return [(event_id(i), self.template(i)) for i in ids]

    def match(self, content: str) -> str | None:
        """Event id of a known cluster for this content, learning nothing; None when unknown."""
        cluster = self._miner.match(content, full_search_strategy="fallback")
        return event_id(cluster.cluster_id) if cluster else None

    def template(self, cluster_id: int) -> str:
        cluster = self._miner.drain.id_to_cluster.get(cluster_id)
        return cluster.get_template() if cluster else ""

    def templates(self) -> dict[str, str]:
        return {event_id(c.cluster_id): c.get_template() for c in self._miner.drain.clusters}

    def save(self) -> None:
        if self._miner.persistence_handler is not None:
            self._miner.save_state("save")


STRUCTURED_COLUMNS = ["line", "timestamp", "level", "component", "content", "event_id", "template"]


def parse_hdfs_file(path: Path, miner: LogTemplateMiner) -> Iterator[dict]:
    """One structured row per line of a raw HDFS_v1 log (a line of another shape keeps its whole
    text as content and empty header fields)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line.rstrip("\r\n") for line in fh]
    parsed = [parse_hdfs_line(line) for line in lines]
    contents = [p.content if p else line for p, line in zip(parsed, lines)]
    for number, (p, content, (eid, template)) in enumerate(zip(parsed, contents, miner.add_many(contents)), 1):
        yield {"line": number, "timestamp": p.timestamp if p else "", "level": p.level if p else "",
               "component": p.component if p else "", "content": content, "event_id": eid, "template": template}


def grouping_agreement(predicted: Sequence[str], truth: Sequence[str]) -> dict:
    """Compare our event ids with ground-truth ones line by line (loghub's grouping accuracy): a
    ground-truth event is matched one-to-one when exactly its lines form one of our clusters; a
    line is correctly grouped when its event is matched."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} parsed lines against {len(truth)} ground-truth lines")
    pairs = Counter(zip(predicted, truth))
    pred_sizes, true_sizes = Counter(predicted), Counter(truth)
    matched = sorted(t for (p, t), n in pairs.items() if n == pred_sizes[p] == true_sizes[t])
    return {
        "lines": len(truth), "true_events": len(true_sizes), "our_events": len(pred_sizes),
        "matched_events": len(matched), "matched": matched,
        "unmatched": sorted(set(true_sizes) - set(matched)),
        "grouping_accuracy": sum(true_sizes[t] for t in matched) / len(truth) if truth else 1.0,
    }


class TemplateAlignment:
    """Our drain3 templates -> the event ids of a reference template list (e.g. the `T01`..`T19` of
    the HDFS 100k sessions, parsed by another Drain run), so a model trained on those sessions can
    score the lines we mine. A reference template's `<*>` matches any text; a line's event is the
    reference whose pattern matches its mined template, else (the cluster has generalised past the
    reference, say two references merged into one cluster) the one matching the masked line itself,
    else none (an event the model never saw: anomalous). Among several matches the most literal wins.
    """

    def __init__(self, reference: dict[str, str]):
        self.reference = dict(reference)
        # Most literal first: the pattern with the most fixed characters decides a tie.
        ordered = sorted(self.reference.items(), key=lambda kv: -len(kv[1].replace("<*>", "")))
        self._patterns = [(eid, self._compile(template)) for eid, template in ordered]
        self._by_template: dict[str, str | None] = {}

    @staticmethod
    def _compile(template: str) -> re.Pattern:
        parts = [re.escape(p) for p in " ".join(template.split()).split("<*>")]
        return re.compile(".*?".join(parts), re.DOTALL)

    def _lookup(self, text: str) -> str | None:
        text = " ".join(text.split())
        return next((eid for eid, pattern in self._patterns if pattern.fullmatch(text)), None)

    def event_for(self, template: str, content: str | None = None) -> str | None:
        if template not in self._by_template:
            if len(self._by_template) > 10_000:  # templates are few; a bound against a runaway miner
                self._by_template.clear()
            self._by_template[template] = self._lookup(template)
        found = self._by_template[template]
        return found if found is not None or content is None else self._lookup(content)
