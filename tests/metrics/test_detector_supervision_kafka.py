"""The detector's process supervision on the real broker: its workers stop, commit and leave the
consumer group when the supervisor is killed; a worker that dies at every start is restarted ever
more slowly; static membership gives a restarted worker its slot's identity."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime

import pytest
from confluent_kafka import KafkaException
from helpers import as_settings, running, series_frame, wait_until, worker_pids

from services.detector.service import RestartBackoff
from shared.kafka import (
    COORDINATOR_ERRORS,
    committed_offsets,
    end_offsets,
    ensure_topics,
    make_admin,
    send,
)
from shared.records.metrics import encode_metric_frame


def group_members(settings, group: str) -> list:
    admin = make_admin(settings)
    deadline = time.monotonic() + 15
    while True:
        try:
            return admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15).members
        except KafkaException as exc:  # a new group's coordinator still loading, or moving
            if exc.args[0].code() not in COORDINATOR_ERRORS or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def log_lines(log: str, event: str) -> list[dict]:
    """The JSON records of `event`. The three workers and the libraries in them (librdkafka,
    TensorFlow) write to one file, and another process's text can land on the same line before or
    after a record: each record is decoded from where it starts."""
    decoder, records = json.JSONDecoder(), []
    for line in log.splitlines():
        if f'"event": "{event}"' not in line:
            continue
        start = line.find('{"')
        while start >= 0:
            try:
                record, end = decoder.raw_decode(line, start)
            except ValueError:
                start = line.find('{"', start + 1)
                continue
            if isinstance(record, dict) and record.get("event") == event:
                records.append(record)
            start = line.find('{"', end)
    return records


@pytest.mark.kafka
def test_workers_stop_commit_and_leave_the_group_when_the_supervisor_is_killed(pipeline_settings, services):
    settings = as_settings(pipeline_settings)
    ensure_topics(settings)
    detector = services("detector", pipeline_settings)
    wait_until(lambda: detector.log.count("worker ready") >= 3, 120, "3 workers ready", [detector])
    wait_until(lambda: len(group_members(settings, settings.consumer_group)) == 3, 60, "3 members in the group",
               [detector])
    # ... and each has its partitions (its series state restored): the kill hits a settled group
    # scoring, not a member still joining (whose LeaveGroup the coordinator may not take).
    wait_until(lambda: len({line["worker"] for line in log_lines(detector.log, "series state restored")
                            if settings.topic_input in line["changelog"]}) == 3, 60, "3 workers assigned",
               [detector])
    members = group_members(settings, settings.consumer_group)
    host = settings.instance_id
    assert sorted(m.group_instance_id for m in members) == [
        f"{settings.consumer_group}-detector-{host}-{i}" for i in range(3)]
    keys, values = encode_metric_frame(series_frame().head(600))
    send(settings, settings.topic_input, keys, values)
    wait_until(lambda: sum(end_offsets(settings, settings.topic_scores).values()) >= 600, 120, "scoring under way",
               [detector])

    workers = worker_pids(detector.proc.pid)
    assert len(workers) == 3
    try:
        os.kill(detector.proc.pid, signal.SIGKILL)
        detector.proc.wait()
        killed = time.monotonic()
        wait_until(lambda: not any(running(pid) for pid in workers), 20, "the orphaned workers to exit")
        exited = time.monotonic() - killed
        # Each worker leaves as it closes (0.5 s here when run alone), but three members leaving at
        # once rebalance each other, and late in the whole suite a leave has been seen to time out,
        # leaving a static member until its 45 s session expires. An orphan, alive, would stay for good.
        try:
            wait_until(lambda: not group_members(settings, settings.consumer_group), 60, "the group to be empty")
        except AssertionError:
            raise AssertionError(f"members left: {group_members(settings, settings.consumer_group)}\n"
                                 f"{detector.log[-4000:]}") from None
        emptied = time.monotonic() - killed
        print(f"workers exited {exited:.1f}s and the group was empty {emptied:.1f}s after the supervisor's SIGKILL")
        assert exited < 10 and emptied < 60
    finally:
        for pid in workers:  # never leave orphans consuming behind the test, whatever happened
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    # Each stopped as on SIGTERM: finished its batch, committed, said so.
    assert len(log_lines(detector.log, "supervisor gone; stopping")) == 3
    assert len(log_lines(detector.log, "stream loop stopped")) == 3
    end = end_offsets(settings, settings.topic_input)
    assert committed_offsets(settings, settings.consumer_group, settings.topic_input, end) == end


# Every detector worker (a multiprocessing spawn child: "--multiprocessing-fork" on its command
# line) dies as it starts, with an exit code that is not the config error's 2; the supervisor, and
# multiprocessing's resource tracker, start normally.
CRASH_AT_START = """\
import os, sys
if "--multiprocessing-fork" in sys.orig_argv:
    os._exit(3)
"""


@pytest.mark.kafka
def test_a_worker_dying_at_every_start_is_restarted_ever_more_slowly(pipeline_settings, services, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASH_AT_START)
    detector = services("detector", pipeline_settings | {"workers": 1}, env={"PYTHONPATH": str(site)})
    wait_until(lambda: len(log_lines(detector.log, "worker died; restarting")) >= 5, 90, "five deaths",
               [detector])
    deaths = log_lines(detector.log, "worker died; restarting")[:5]
    assert all(d["exitcode"] == 3 and d["worker"] == 0 for d in deaths)
    delays = [d["restart_in_s"] for d in deaths]
    assert delays == [1, 2, 4, 8, 16]
    # Measured between the deaths (restart delay + a start that fails at once): growing too.
    at = [datetime.fromisoformat(d["timestamp"].replace("Z", "+00:00")).timestamp() for d in deaths]
    gaps = [b - a for a, b in zip(at, at[1:])]
    print(f"logged delays {delays}, seconds between deaths {[round(g, 1) for g in gaps]}")
    assert all(gap >= delay for gap, delay in zip(gaps, delays))
    assert all(b > a for a, b in zip(gaps, gaps[1:]))
    # SIGTERM stops the supervisor while a restart is pending, and leaves no worker behind.
    supervisor = detector.proc.pid
    assert detector.stop() == 0
    assert not [pid for pid in worker_pids(supervisor) if running(pid)]


def test_restart_backoff_doubles_to_the_cap_and_resets_after_a_stable_run():
    backoff = RestartBackoff(first=1, most=60, stable=60)
    assert [backoff.delay(uptime=0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(uptime=61) == 1  # the worker had stayed up: start over
    assert backoff.delay(uptime=3) == 2
