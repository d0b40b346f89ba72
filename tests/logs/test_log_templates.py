"""Template mining (models/logs/templates.py): masks, stable ids across restarts, cluster cap, HDFS parser."""

from __future__ import annotations

import pandas as pd

from models.logs.templates import (
    LogTemplateMiner,
    grouping_agreement,
    parse_hdfs_file,
    parse_hdfs_line,
)
from services.jobs.logs import main as logs_main
from shared.config import load_settings

HDFS = load_settings().data_dir / "hdfs"

LINES = [
    "Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "Receiving block blk_7503483334202473044 src: /10.251.215.16:55695 dest: /10.251.215.16:50010",
    "PacketResponder 1 for block blk_38865049064139660 terminating",
    "PacketResponder 2 for block blk_-6952295868487656571 terminating",
    "Verification succeeded for blk_-4980916519894289629",
    "Served block blk_-3544583377289625738 to /10.251.71.193 after 0x7f3a9c retries",
]


def test_hdfs_line_parser_splits_header_and_content():
    line = ("081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block "
            "blk_38865049064139660 terminating")
    parsed = parse_hdfs_line(line)
    assert (parsed.date, parsed.time, parsed.pid, parsed.level) == ("081109", "203615", "148", "INFO")
    assert parsed.component == "dfs.DataNode$PacketResponder"
    assert parsed.content == "PacketResponder 1 for block blk_38865049064139660 terminating"
    assert parsed.timestamp == "2008-11-09T20:36:15"
    assert parse_hdfs_line("not an HDFS line") is None


def test_block_ids_ips_hex_and_numbers_are_masked():
    miner = LogTemplateMiner()
    ids = [miner.add(line)[0] for line in LINES]
    templates = miner.templates()
    assert ids[0] == ids[1] and ids[2] == ids[3] and len(set(ids)) == 4
    assert templates[ids[0]] == "Receiving block <BLK> src: /<IP> dest: /<IP>"
    assert templates[ids[2]] == "PacketResponder <NUM> for block <BLK> terminating"
    assert templates[ids[5]] == "Served block <BLK> to /<IP> after <HEX> retries"
    # A list of blocks is one variable, whatever its length.
    one, _ = miner.add("BLOCK* ask 10.250.14.224:50010 to delete blk_1")
    three, _ = miner.add("BLOCK* ask 10.251.43.21:50010 to delete blk_2 blk_-3 blk_4")
    assert one == three and miner.templates()[one] == "BLOCK* ask <IP> to delete <BLK>"


def test_event_ids_survive_a_restart_from_the_snapshot(tmp_path):
    state = tmp_path / "drain3.bin"
    first = LogTemplateMiner(state)
    ids = [eid for eid, _ in first.add_many(LINES)]
    clusters = first.cluster_count
    assert state.exists()

    restarted = LogTemplateMiner(state)
    assert restarted.cluster_count == clusters
    assert [restarted.match(line) for line in LINES] == ids  # known lines, nothing learned
    assert [restarted.add(line)[0] for line in LINES] == ids  # learning again creates no cluster
    assert restarted.cluster_count == clusters
    # Streaming add() saves a new cluster at once: a third miner knows it without an explicit save.
    new_id, _ = restarted.add("Deleting block blk_1 file /mnt/hadoop/dfs/data/current/subdir1/blk_1")
    assert new_id not in ids
    third = LogTemplateMiner(state)
    assert third.cluster_count == clusters + 1
    assert third.match("Deleting block blk_9 file /mnt/hadoop/dfs/data/current/subdir1/blk_9") == new_id


def test_the_cluster_cap_evicts_and_never_reuses_an_id():
    miner = LogTemplateMiner(max_clusters=2)
    ids = [miner.add(line)[0] for line in ("alpha beta gamma", "one two three four", "x y", "p q r s t")]
    assert miner.cluster_count == 2
    assert len(set(ids)) == 4
    assert set(miner.templates()) == set(ids[-2:])


def test_grouping_agreement_counts_one_to_one_events():
    result = grouping_agreement(["E1", "E1", "E2", "E3", "E3"], ["a", "a", "b", "b", "c"])
    assert result["matched"] == ["a"] and result["unmatched"] == ["b", "c"]
    assert result["grouping_accuracy"] == 2 / 5


def test_hdfs_2k_templates_match_loghub_ground_truth():
    miner = LogTemplateMiner()
    rows = list(parse_hdfs_file(HDFS / "HDFS_2k.log", miner))
    truth = pd.read_csv(HDFS / "HDFS_2k.log_structured.csv")
    result = grouping_agreement([r["event_id"] for r in rows], list(truth["EventId"]))
    assert result["true_events"] == 14
    assert result["matched_events"] == 14 and result["grouping_accuracy"] == 1.0
    assert rows[0]["timestamp"] == "2008-11-09T20:36:15" and rows[0]["level"] == "INFO"


def test_logs_parse_writes_structured_csv_and_sessions(tmp_path, capsys):
    raw = tmp_path / "tiny.log"
    raw.write_text(
        "081109 203518 143 INFO dfs.DataNode$DataXceiver: Receiving block blk_1 src: /10.0.0.1:1 dest: /10.0.0.2:2\n"
        "081109 203519 145 INFO dfs.DataNode$PacketResponder: PacketResponder 0 for block blk_1 terminating\n"
        "081109 203520 19 INFO dfs.FSNamesystem: BLOCK* ask 10.0.0.3:50010 to delete blk_1 blk_2\n")
    out, sessions, state = tmp_path / "s.csv", tmp_path / "sessions.csv", tmp_path / "state.bin"
    assert logs_main(["parse", str(raw), "--out", str(out), "--state", str(state), "--sessions", str(sessions)]) == 0
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["line", "timestamp", "level", "component", "content", "event_id", "template"]
    assert rows["event_id"].nunique() == 3 and rows["line"].tolist() == [1, 2, 3]
    grouped = pd.read_csv(sessions).set_index("BlockId")
    ids = rows["event_id"].tolist()
    assert grouped.loc["blk_1", "EventSequence"] == " ".join(ids)
    assert grouped.loc["blk_2", "EventSequence"] == ids[2]
    assert "3 lines, 3 events" in capsys.readouterr().out
