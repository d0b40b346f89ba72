"""Raw HDFS_v1 log lines rendered from labelled sessions of reference event ids.

The HDFS 100k sessions come as event-id sequences (`T01`..`T19`), without their raw lines; the raw
sample (HDFS_2k) has raw lines but no labels and ~1 line per block. To stream labelled sessions
through the real path (raw text -> drain3 -> alignment -> sessions -> model), each event is written
back as a line in the HDFS_v1 format: the header (`yyMMdd HHmmss pid LEVEL component:`) and the
message in the shape of real HDFS lines of that event (see HDFS_2k.log), with the session's block
id and random hosts, ports, sizes. Sessions are interleaved as in a real log: a bounded number are
open at once and each next line comes from a random open session, in that session's order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

# reference event id -> (level, component, message format); {blk} is the session's block id.
HDFS_LINE_FORMATS: dict[str, tuple[str, str, str]] = {
    "T01": ("INFO", "dfs.DataNode$DataXceiver", "Receiving block {blk} src: /{ip}:{port} dest: /{ip2}:50010"),
    "T02": ("INFO", "dfs.FSNamesystem",
            "BLOCK* NameSystem.addStoredBlock: blockMap updated: {ip}:50010 is added to {blk} size {size}"),
    "T03": ("INFO", "dfs.DataNode$PacketResponder", "PacketResponder {n} for block {blk} terminating"),
    "T04": ("INFO", "dfs.DataNode$PacketResponder", "Received block {blk} of size {size} from /{ip}"),
    "T05": ("INFO", "dfs.FSNamesystem",
            "BLOCK* NameSystem.allocateBlock: /user/root/rand/_temporary/_task_200811092030_0001_m_{task:06d}_0/"
            "part-{task:05d}. {blk}"),
    "T06": ("INFO", "dfs.DataBlockScanner", "Verification succeeded for {blk}"),
    "T07": ("INFO", "dfs.DataNode", "{ip}:50010 Served block {blk} to /{ip2}"),
    "T08": ("INFO", "dfs.DataNode$DataXceiver",
            "writeBlock {blk} received exception java.io.IOException: Could not read from stream"),
    "T09": ("INFO", "dfs.DataNode$DataXceiver", "Received block {blk} src: /{ip}:{port} dest: /{ip2}:50010 of size {size}"),
    "T10": ("INFO", "dfs.DataNode", "{ip}:50010 Starting thread to transfer block {blk} to {ip2}:50010"),
    "T11": ("INFO", "dfs.DataNode$DataTransfer", "{ip}:50010:Transmitted block {blk} to /{ip2}:50010"),
    "T12": ("INFO", "dfs.FSNamesystem", "BLOCK* ask {ip}:50010 to replicate {blk} to datanode(s) {ip2}:50010"),
    "T13": ("INFO", "dfs.DataNode$DataXceiver", "Receiving empty packet for block {blk}"),
    "T14": ("INFO", "dfs.FSDataset", "Deleting block {blk} file /mnt/hadoop/dfs/data/current/subdir{n}/{blk}"),
    "T15": ("INFO", "dfs.DataNode$DataXceiver",
            "Exception in receiveBlock for block {blk} java.io.IOException: Connection reset by peer"),
    "T16": ("INFO", "dfs.DataNode$PacketResponder", "PacketResponder {blk} {n} Exception java.io.EOFException"),
    "T17": ("INFO", "dfs.DataNode$BlockReceiver",
            "Changing block file offset of block {blk} from {size} to {size2} meta file offset to {n}"),
    "T18": ("WARN", "dfs.FSNamesystem",
            "BLOCK* NameSystem.addStoredBlock: Redundant addStoredBlock request received for {blk} on {ip}:50010 "
            "size {size}"),
    "T19": ("INFO", "dfs.DataNode$PacketResponder", "PacketResponder {n} for block {blk} Interrupted."),
}

START = datetime(2008, 11, 12)  # after the raw sample (2008-11-09..11), so the two never share a session


def _ip(rng: random.Random) -> str:
    return f"10.251.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def render_line(event: str, block: str, when: datetime, rng: random.Random) -> str:
    """One raw HDFS_v1 line of a reference event for a block; KeyError for an unknown event id."""
    level, component, fmt = HDFS_LINE_FORMATS[event]
    message = fmt.format(blk=block, ip=_ip(rng), ip2=_ip(rng), port=rng.randint(30000, 60000),
                         size=rng.choice([67108864, rng.randint(1000, 67108864)]), size2=rng.randint(1000, 67108864),
                         n=rng.randint(0, 63), task=rng.randint(0, 999))
    return f"{when:%y%m%d %H%M%S} {rng.randint(10, 9999)} {level} {component}: {message}"


def render_sessions(blocks: Sequence[str], sessions: Sequence[Sequence[str]], seed: int = 0, open_sessions: int = 20,
                    start: datetime = START, step_s: float = 0.1) -> Iterator[str]:
    """Raw lines of every session, interleaved (at most `open_sessions` open at once), each session's
    events in its order; the clock advances `step_s` per line."""
    if len(blocks) != len(sessions):
        raise ValueError(f"{len(blocks)} blocks for {len(sessions)} sessions")
    rng = random.Random(seed)
    waiting = [(b, list(s)) for b, s in zip(blocks, sessions) if len(s)]
    waiting.reverse()  # pop() from the end takes them in the given order
    active: list[tuple[str, list[str], int]] = []
    clock = 0.0
    while waiting or active:
        while waiting and len(active) < open_sessions:
            block, events = waiting.pop()
            active.append((block, events, 0))
        i = rng.randrange(len(active))
        block, events, pos = active[i]
        yield render_line(events[pos], block, start + timedelta(seconds=clock), rng)
        clock += step_s
        if pos + 1 == len(events):
            active.pop(i)
        else:
            active[i] = (block, events, pos + 1)
