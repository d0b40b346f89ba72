"""The log detector service on the real broker: raw HDFS lines in `logs`, one session with an
event out of its order, and that session (only) reaches the Slack test server; bad messages are
dead-lettered with the reason; a restart in the middle of the replay resumes the open sessions
from the changelog topic (no false alert for a session cut in two, nothing scored twice), also
when it restarts with another data directory in another consumer group (the state moved with the
partition, not with the host)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaException
from helpers import HDFS_DIR, as_settings, wait_until
from slack_server import VALID_TOKEN, SlackTestServer

from models.logs.next_event import NextEventDetector
from models.logs.render import render_sessions
from models.logs.sessions import read_sessions_csv
from services.jobs.run import (
    delete_topic,
    log_changelog,
    log_detector_done,
    log_detector_env,
)
from shared.changelog import changelog_topic, restore
from shared.kafka import (
    commit_group_offsets,
    committed_offsets,
    end_offsets,
    ensure_topics,
    make_admin,
    make_producer,
    read_topic,
)
from shared.records.anomalies import anomaly_record_adapter
from shared.records.logs import LogSessionRecord

BAD = [
    (b"\xff\xfe not text", "UTF-8"),
    (b"", "empty log line"),
    (b"081112 000000 1 INFO a: one blk_1\n081112 000000 1 INFO a: two blk_1", "one log line"),
    (orjson.dumps({"message": "Receiving block blk_5 src: /1.2.3.4:1 dest: /1.2.3.5:2", "host": "dn1"}),
     "Extra inputs"),
    (orjson.dumps({"message": 42}), "valid string"),
    (b"x" * 20_000, "exceeds"),
]


def out_of_order(model: NextEventDetector, session: list[str]) -> list[str]:
    """The session with one event moved elsewhere such that the model flags it at that event (not
    only at the session's end), allocateBlock (T05) moved first if that works."""
    k = model.k
    moves = [(i, j) for i in range(len(session)) for j in range(len(session)) if i != j]
    moves.sort(key=lambda m: session[m[0]] != "T05")
    for i, j in moves:
        moved = session[:i] + session[i + 1:]
        moved.insert(j, session[i])
        if moved != session and model.window_scores([moved])[0][:-1].max() > k:
            return moved
    raise AssertionError(f"no single moved event of {session} is outside the top {k}")


def committed(settings) -> int:
    """The log detector group's committed offset of partition 0; -1 while the (fresh) broker's group
    coordinator is not ready yet."""
    try:
        return committed_offsets(settings, settings.logdetector_group, settings.topic_logs, [0])[0]
    except KafkaException:
        return -1


def saved_sessions(settings) -> tuple[dict, set[str]]:
    """The log detector's changelog of input partition 0: its meta and the open sessions' keys."""
    records = restore(settings, changelog_topic(settings, "logdetector", settings.topic_logs), [0])[0]
    meta = json.loads(records.pop(b"meta"))
    return meta, {k.decode().removeprefix("session:") for k in records}


def commit_at(settings, group: str, offsets: dict[int, int]) -> bool:
    """Commit `offsets` of `logs` for `group` (as `anomstream run` does); False while the (fresh)
    broker's group coordinator is not ready yet."""
    try:
        commit_group_offsets(settings, group, settings.topic_logs, offsets)
    except KafkaException:
        return False
    return True


def model_templates(model_dir) -> dict:
    return json.loads((Path(model_dir) / "hdfs_logs" / "reference_templates.json").read_text())


def send(settings, payloads: list[bytes]) -> None:
    producer = make_producer(settings)
    for p in payloads:
        producer.produce(settings.topic_logs, p)
    assert producer.flush(30) == 0


@pytest.mark.kafka
@pytest.mark.parametrize("elsewhere", [None, "wiped", "regroup"])
def test_logdetector_alerts_the_out_of_order_session_and_resumes_from_checkpoint(pipeline_settings, services,
                                                                                 model_dir, elsewhere, tmp_path):
    model = NextEventDetector.load(Path(model_dir) / "hdfs_logs")
    frame = read_sessions_csv(HDFS_DIR / "hdfs_100k_sessions.csv")
    normal = frame[(frame["Split"] == "test") & (frame["y"] == 0)].head(150)
    accepted = normal[~model.predict(list(normal["events"]))].head(60)
    assert len(accepted) == 60, "the trained model accepts too few normal test sessions"
    blocks, sessions = list(accepted["BlockId"]), [list(s) for s in accepted["events"]]
    injected = 30
    original = sessions[injected]
    sessions[injected] = out_of_order(model, original)
    # Interleaved, as in a real log; lines 10 ms apart so no session pauses near the timeout.
    lines = list(render_sessions(blocks, sessions, seed=3, open_sessions=15, step_s=0.01))
    payloads = [line.encode() if i % 5 else orjson.dumps({"message": line}) for i, line in enumerate(lines)]
    half = len(payloads) // 2

    with SlackTestServer() as slack:
        overrides = pipeline_settings | {
            "slack_bot_token": VALID_TOKEN, "slack_base_url": slack.base_url, "alert_cooldown_s": 0,
            "alert_grouping": False,  # one message per anomalous session
            "log_session_timeout_s": 3600, "log_checkpoint_interval_s": 0.5, "log_max_line_bytes": 16384}
        settings = as_settings(overrides)
        ensure_topics(settings)
        detector = services("logdetector", overrides)
        alerter = services("alerter", overrides)
        send(settings, payloads[:half] + [p for p, _ in BAD])
        first_end = half + len(BAD)
        wait_until(lambda: committed(settings) >= first_end, 120, "the first half committed", [detector])
        assert detector.stop() == 0
        meta, open_sessions = saved_sessions(settings)
        assert meta["offset"] == first_end - len(BAD) - 1  # the last good line absorbed
        # Every session the first half started is held (none ended: the timeout is an hour away).
        started = {b for b in blocks if any(b + " " in line or line.endswith(b) for line in lines[:half])}
        assert open_sessions == started
        assert 0 < len(started) < 60

        if elsewhere:
            # Another host, or the data directory wiped (no drain3 state either): the open sessions
            # come from the changelog, so no session cut by the restart starts again half-way (and is
            # alerted for it). "regroup": in another consumer group too, which reads `logs` from its
            # start again, as after a crash between the state write and the commit: the lines the
            # sessions hold are skipped, not added to them a second time.
            overrides = overrides | {"home": str(tmp_path / "host-b"), "log_state_dir": str(tmp_path / "host-b-logs")}
            if elsewhere == "regroup":
                overrides["logdetector_group"] += "-moved"
            settings = as_settings(overrides)
        detector = services("logdetector", overrides)
        send(settings, payloads[half:])
        total = len(payloads) + len(BAD)
        wait_until(lambda: committed(settings) >= total, 120, "every line committed", [detector])
        wait_until(lambda: len(slack.messages) >= 1, 60, "the Slack alert", [alerter])
        wait_until(lambda: "sessions restored" in detector.log and "checkpoint" in detector.log, 10,
                   "the restore log line")
        assert f'"sessions": {len(started)}' in detector.log

        n_anomalies = sum(end_offsets(settings, settings.topic_anomalies).values())
        anomalies = [anomaly_record_adapter.validate_json(m.value())
                     for m in read_topic(settings, settings.topic_anomalies, count=n_anomalies)]
        assert [a.series for a in anomalies] == [blocks[injected]]  # no session cut by the restart alerted
        rec = anomalies[0]
        assert isinstance(rec, LogSessionRecord) and rec.kind == "log"
        # Flagged at the first event outside the top k, with the events before it as the window.
        moved = sessions[injected]
        first = int((model.window_scores([moved])[0][:-1] > model.k).argmax())
        assert (rec.event, rec.window, rec.rank > rec.k) == (moved[first], moved[max(0, first - 10):first], True)
        assert blocks[injected] in rec.line and rec.source_topic == settings.topic_logs
        assert rec.template in model_templates(model_dir).values()

        wait_until(lambda: len(slack.messages) >= 1, 30, "the alert")
        assert len(slack.messages) == 1
        posted = slack.messages[0]
        assert blocks[injected] in posted["text"] and "Log anomaly" in posted["text"]

        # Regroup: the bad messages after the last line the sessions absorbed are read and
        # dead-lettered again by the new group (at-least-once); the restart's group had committed them.
        copies = 2 if elsewhere == "regroup" else 1
        dead = list(read_topic(settings, settings.topic_dead_letter, {0: 0}, copies * len(BAD), idle=2))
        assert len(dead) == copies * len(BAD)
        for msg, (payload, reason) in zip(dead, BAD * copies):
            headers = dict(msg.headers())
            assert msg.value() == payload
            assert reason in headers["dlq.error"].decode(), headers["dlq.error"]
            assert headers["dlq.service"] == b"logdetector"
        assert detector.stop() == 0
        if elsewhere == "regroup":  # the first half re-read: every line of it already in the sessions
            assert f'"already_in_checkpoint": {half}' in detector.log
        else:
            assert "already_in_checkpoint" not in detector.log


@pytest.mark.kafka
def test_each_anomstream_run_gives_its_log_detector_state_of_its_own(pipeline_settings, services, tmp_path):
    """`anomstream run` replays the same lines (block ids, event times) into the same `logs` topic on
    every run. Restarted within a run, its log detector continues from the run's changelog; the next
    run's log detector starts empty: it does not continue the earlier run's offsets and event time
    (ahead of every line replayed again, that event time would end the sessions open at the end of
    each batch at once, cutting them in two), and it flags the same sessions."""
    overrides = pipeline_settings | {"log_checkpoint_interval_s": 0.5}
    settings = as_settings(overrides)
    ensure_topics(settings)
    frame = read_sessions_csv(HDFS_DIR / "hdfs_100k_sessions.csv")
    frame = frame[frame["Split"] == "test"].head(40)
    lines = list(render_sessions(list(frame["BlockId"]), [list(s) for s in frame["events"]], step_s=0.01))

    def start(logs_env: dict) -> object:
        detector = services("logdetector", overrides, env=logs_env)
        wait_until(lambda: "sessions restored" in detector.log, 60, "the restore log line", [detector])
        return detector

    def restored(log: str) -> dict:
        return next(json.loads(line) for line in log.splitlines() if '"sessions restored"' in line)

    def replay(run_id: int) -> tuple[dict, str, set[str]]:
        """One run's log detector over the lines: (its environment, its log, the sessions it flagged)."""
        logs_env = log_detector_env(settings, tmp_path / f"run-{run_id}", run_id)
        group, changelog = logs_env["ANOMSTREAM_LOGDETECTOR_GROUP"], log_changelog(settings, logs_env)
        begin = end_offsets(settings, settings.topic_logs)
        anomalies_begin = end_offsets(settings, settings.topic_anomalies)
        wait_until(lambda: commit_at(settings, group, begin), 60, "the run's group offsets committed")
        detector = start(logs_env)
        send(settings, [line.encode() for line in lines])
        end = end_offsets(settings, settings.topic_logs)
        wait_until(lambda: log_detector_done(settings, group, changelog, end), 120,
                   "every line committed and every session ended", [detector])
        assert detector.stop() == 0
        flagged = {orjson.loads(m.value())["series"]
                   for m in read_topic(settings, settings.topic_anomalies, anomalies_begin, idle=2)}
        return logs_env, detector.log, flagged

    first_env, first_log, first_flagged = replay(1)
    assert restored(first_log)["source"] == "empty"
    # The same run's log detector restarted: it continues from this run's changelog.
    again = start(first_env)
    assert again.stop() == 0
    assert (restored(again.log)["source"], restored(again.log)["offset"]) == ("checkpoint", len(lines) - 1)

    second_env, second_log, second_flagged = replay(2)
    assert (restored(second_log)["source"], restored(second_log)["offset"]) == ("empty", -1)
    assert second_flagged == first_flagged
    changelogs = {log_changelog(settings, first_env), log_changelog(settings, second_env)}
    assert len(changelogs) == 2
    # Deleted when the run is over (each run would leave one more topic on the broker otherwise).
    for name in changelogs:
        delete_topic(settings, name)
    wait_until(lambda: not changelogs & set(make_admin(settings).list_topics(timeout=10).topics), 30,
               "the changelogs deleted")
