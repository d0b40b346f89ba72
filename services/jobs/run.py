"""run: the whole pipeline end to end (what `make run` does).

Starts the local broker with its JMX exporter (unless KAFKA_BOOTSTRAP_SERVERS names a cluster),
trains the models if they are missing, starts the detector, rules and alerter services as their
own processes, replays the EC2 CPU series and some synthetic transactions through the producer,
then runs a short `scenario kafka-load` that puts a known load (with one burst and one large
message) on the broker and publishes a scrape of the broker's metrics every second. Then it
starts the log detector and replays raw HDFS log lines into `logs`: the raw HDFS_2k sample, then
the labelled test sessions of the HDFS 100k sample written back as raw lines (models.logs.render),
so the stream's decisions can be scored against the labels. It waits until every input and every
scrape is scored, every message read by the rules service, every log session ended and every
anomaly handled by the alerter, prints a summary, writes a chart per fired definition and stops
all it started.

The rules service gets a consumer group and run history of this run alone, starting at the
topics' ends: the replay repeats the same event times on every run, which a long-lived rules
service would rightly call late. Likewise every service keeps its state in changelogs of this run
alone (run_state_prefix), deleted at the end, so that the detector does not continue the series and
K-Means state of an earlier run on the same broker, nor the log detector its open sessions and
event time; the log detector also gets a consumer group and drain3 folder of this run alone
(log_detector_env).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import click
import numpy as np
import orjson
import pandas as pd
from confluent_kafka import KafkaException

from models.evaluation.metrics import point_metrics
from models.logs.render import START as RENDER_START
from models.logs.render import render_sessions
from models.logs.sessions import encode_log_lines, read_sessions_csv, session_keys
from models.metrics.features import replay_frame
from models.metrics.model_set import ModelSet
from models.metrics.synthetic import transactions
from models.rules.run_history import RunHistory
from shared.app_logging import setup_logging
from shared.changelog import changelog_topic, restore
from shared.cli import CONTEXT, run_command
from shared.config import load_settings
from shared.kafka import (
    caught_up,
    commit_group_offsets,
    committed_offsets,
    end_offsets,
    ensure_topics,
    make_admin,
    read_topic,
    send,
)
from shared.local_broker import LocalBroker
from shared.records.metrics import encode_metric_frame


def delta(before: dict[int, int], after: dict[int, int]) -> int:
    return sum(after[p] - before.get(p, 0) for p in after)


def detector_caught_up(settings) -> bool:
    """The detector committed every input (metrics, transactions, broker-metric scrapes) written so
    far: their scores are written (and, exactly-once, visible). Not the scores topic's end offset:
    transaction markers take offsets there too."""
    return all(committed_offsets(settings, settings.consumer_group, topic, ends) == ends
               for topic in (settings.topic_input, settings.topic_transactions, settings.topic_kafka_metrics)
               for ends in [end_offsets(settings, topic)])


def records_since(settings, topic: str, start: dict[int, int]) -> list:
    """The committed records written to `topic` from `start` on (counted, not inferred from offsets,
    which transaction markers take too)."""
    return read_topic(settings, topic, start, idle=3, timeout=600)


def wait_for(condition, timeout: float, what: str, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def render_labelled_log(settings, out: Path) -> dict[str, bool]:
    """The test sessions of the HDFS 100k sample as raw lines (models.logs.render); block -> anomalous."""
    frame = read_sessions_csv(settings.data_dir / "hdfs" / "hdfs_100k_sessions.csv")
    frame = frame[frame["Split"] == "test"]
    out.write_text("\n".join(render_sessions(list(frame["BlockId"]), list(frame["events"]), step_s=0.01)) + "\n")
    return dict(zip(frame["BlockId"], frame["y"].astype(bool)))


def run_state_prefix(settings, run_id: int) -> str:
    """The state changelogs' topic prefix of run `run_id`: every service of a run keeps its state
    (series, K-Means, log sessions, the alerter's markers) in changelogs of that run alone. The
    replay sends the same points again on every run: with an earlier run's state the detector would
    rightly continue those series (as after a restart) and see them go back in time."""
    return f"{settings.state_topic_prefix}-run-{run_id}"


def log_detector_env(settings, state_dir: Path, run_id: int) -> dict[str, str]:
    """The log detector's settings for run `run_id`: a consumer group, a drain3 folder and a state
    changelog (ANOMSTREAM_STATE_TOPIC_PREFIX) of this run alone. The replay repeats the same block
    ids and event times on every run, into the same `logs` topic: with the changelog of an earlier
    run the detector would rightly continue that run's partition (as after a restart), i.e. with
    its event time, which is ahead of every line replayed again, so the sessions open at the end of
    each batch would end at once (cut in two: false alarms). Sessions end after 5 s of event time
    without a line (the labelled lines are 10 ms apart), and when the replay is over, after 5 s of
    quiet."""
    return {"ANOMSTREAM_LOGDETECTOR_GROUP": f"anomstream-logdetector-run-{run_id}",
            "ANOMSTREAM_STATE_TOPIC_PREFIX": run_state_prefix(settings, run_id),
            "ANOMSTREAM_LOG_STATE_DIR": str(state_dir), "ANOMSTREAM_LOG_SESSION_TIMEOUT_S": "5"}


def log_changelog(settings, logs_env: dict[str, str]) -> str:
    """The changelog of the log detector started with `logs_env` (see log_detector_env)."""
    run_settings = settings.model_copy(update={"state_topic_prefix": logs_env["ANOMSTREAM_STATE_TOPIC_PREFIX"]})
    return changelog_topic(run_settings, "logdetector", settings.topic_logs)


def log_detector_done(settings, group: str, changelog: str, logs_end: dict[int, int]) -> bool:
    """The log detector committed every line, and its changelog holds no open session (each ended
    session is a tombstone there)."""
    committed = committed_offsets(settings, group, settings.topic_logs, logs_end)
    if any(committed.get(p, 0) < o for p, o in logs_end.items()):
        return False
    state = restore(settings, changelog, list(logs_end))
    return not any(key.startswith(b"session:") for keys in state.values() for key in keys)


def delete_topic(settings, name: str) -> None:
    """Delete topic `name` (KafkaException if that fails)."""
    admin = make_admin(settings)  # referenced until the result: a client destroyed first fails its request
    admin.delete_topics([name], operation_timeout=30)[name].result()


def delete_run_state(settings, prefix: str) -> list[str]:
    """Delete the state changelogs of a finished run (those named `<prefix>-...`); returns them."""
    admin = make_admin(settings)
    names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(f"{prefix}-")]
    for name in names:
        delete_topic(settings, name)
    return names


def log_summary(raw_sample: Path, labels: dict[str, bool], flagged: dict[str, set[str]], settings) -> str:
    """The log detector's sessions: the raw sample's, and the labelled ones scored against their labels."""
    raw_blocks = set()
    for line in raw_sample.read_text(errors="replace").splitlines():
        raw_blocks.update(session_keys(line, settings.log_session_key))
    truth = np.array(list(labels.values()))
    alarms = np.array([block in flagged["labelled"] for block in labels])
    m = point_metrics(alarms, truth)
    normals = int((~truth).sum())
    fpr = m["fp"] / normals if normals else 0.0
    offline = json.loads((settings.model_dir / settings.model_logs / "manifest.json").read_text())["test"]
    # A model trained before the rate figures were recorded has no offline FPR.
    offline_fpr = f" fpr={offline['fpr']:.2%}" if "fpr" in offline else ""
    return (f"LOGS raw_sample_sessions={len(raw_blocks)} raw_sample_flagged={len(raw_blocks & flagged['raw'])} "
            f"labelled_sessions={len(labels)} labelled_anomalous={int(truth.sum())} flagged={int(alarms.sum())} "
            f"tp={m['tp']} fp={m['fp']} fn={m['fn']} precision={m['precision']:.3f} recall={m['recall']:.3f} "
            f"f1={m['f1']:.3f} fpr={fpr:.2%} ({m['fp']}/{normals} normal sessions) (offline on the same split: "
            f"f1={offline['f1']:.3f}{offline_fpr})")


def remote_hosts(bootstrap: str) -> list[str]:
    """The hosts of a bootstrap list that are not this machine (loopback or this host's name)."""
    local = {"localhost", "127.0.0.1", "::1", "[::1]", socket.gethostname()}
    hosts = [server.strip().rsplit(":", 1)[0] for server in bootstrap.split(",") if server.strip()]
    return [h for h in hosts if h not in local and not h.startswith("127.")]


@click.command("run", help=__doc__, context_settings=CONTEXT)
@click.option("--epochs", type=int, default=10, show_default=True, help="LSTM epochs if models must be trained")
@click.option("--transactions", "n_transactions", type=int, default=5000, show_default=True,
              help="synthetic transactions to send")
@click.option("--timeout", type=float, default=600, show_default=True)
@click.option("--scrapes", "scenario_rows", type=int, default=60, show_default=True,
              help="rows of the broker-metrics scenario (1 per second)")
@click.option("--into-cluster", is_flag=True,
              help="with KAFKA_BOOTSTRAP_SERVERS naming a cluster that is not on this machine: write the "
                   "demo's data and load scenario into it anyway")
def command(epochs: int, n_transactions: int, timeout: float, scenario_rows: int, into_cluster: bool) -> int:
    settings = load_settings()
    log = setup_logging(settings, "run")
    remote = remote_hosts(settings.bootstrap_servers) if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else []
    if remote and not into_cluster:
        raise click.UsageError(
            f"KAFKA_BOOTSTRAP_SERVERS names {', '.join(remote)}, not this machine: `anomstream run` would write "
            "its demo replay and a load scenario (30,000-message bursts) into that cluster. Unset it to run on "
            "the embedded local broker, or pass --into-cluster if that is what you want. To run the services "
            "on your own cluster and data, see the README's \"With your own cluster and data\".")
    started = time.monotonic()
    broker = None
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        broker = LocalBroker(port=int(settings.bootstrap_servers.rsplit(":", 1)[1]),
                             jmx_port=urlsplit(settings.metrics_exporter_url).port)
        broker.start()
        log.info("local kafka broker ready", bootstrap=broker.bootstrap)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in (settings.model_input, settings.model_transactions):
            if not (ModelSet.folder(settings.model_dir, name) / "manifest.json").exists():
                log.info("no trained model set; training", name=name, epochs=epochs)
                subprocess.run([sys.executable, "-m", "services.jobs.train", "--name", name,
                                "--epochs", str(epochs)], check=True)
        if not (settings.model_dir / settings.model_kafka_metrics / "realtime_kmeans.json").exists():
            subprocess.run([sys.executable, "-m", "services.jobs.train", "--name", settings.model_kafka_metrics],
                           check=True)
        subprocess.run([sys.executable, "-m", "services.jobs.logs", "train", "--if-missing"], check=True)
        ensure_topics(settings)
        topics = [settings.topic_input, settings.topic_transactions, settings.topic_scores,
                  settings.topic_anomalies, settings.topic_dead_letter, settings.topic_kafka_metrics,
                  settings.topic_logs]
        before = {t: end_offsets(settings, t) for t in topics}

        log_dir = settings.home / "run"
        log_dir.mkdir(parents=True, exist_ok=True)
        run_id = int(time.time())
        env = os.environ | {"ANOMSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
                            "ANOMSTREAM_AUTO_OFFSET_RESET": "earliest",  # the replay is sent as they start
                            "ANOMSTREAM_STATE_TOPIC_PREFIX": run_state_prefix(settings, run_id)}
        # One /metrics port per service on this host: the setting's for the detector, the next ones
        # for the rules service, the alerter and the log detector (0: none).
        ports = {name: settings.http_port + i if settings.http_port else 0
                 for i, name in enumerate(("detector", "rules", "alerter", "logdetector"))}
        with open(log_dir / "detector.log", "ab") as detector_log:
            procs["detector"] = subprocess.Popen([sys.executable, "-m", "services.detector"],
                                                 env=env | {"ANOMSTREAM_HTTP_PORT": str(ports["detector"])},
                                                 stdout=detector_log, stderr=subprocess.STDOUT)
        rules_db = log_dir / "rules_history.db"
        rules_db.unlink(missing_ok=True)
        rules_env = env | {"ANOMSTREAM_RULES_GROUP": f"anomstream-rules-run-{int(time.time())}",
                           "ANOMSTREAM_RULES_DB_URL": f"sqlite:///{rules_db}",
                           "ANOMSTREAM_HTTP_PORT": str(ports["rules"])}
        rules_topics = (settings.topic_input, settings.topic_transactions)
        for topic in rules_topics:
            commit_group_offsets(settings, rules_env["ANOMSTREAM_RULES_GROUP"], topic, before[topic])
        with open(log_dir / "rules.log", "ab") as rules_log:
            procs["rules"] = subprocess.Popen([sys.executable, "-m", "services.rules"],
                                              env=rules_env, stdout=rules_log, stderr=subprocess.STDOUT)
        # The alerter writes each alert as it arrives to its log (and posts it, when Slack is
        # configured); the raw log sample alone gives some 2,000 of them (see the LOGS line).
        with open(log_dir / "alerter.log", "ab") as alerter_log:
            procs["alerter"] = subprocess.Popen([sys.executable, "-m", "services.alerter"],
                                                env=env | {"ANOMSTREAM_LOG_FORMAT": "console",
                                                           "ANOMSTREAM_HTTP_PORT": str(ports["alerter"]),
                                                           # a demo's pace: groups notified within seconds
                                                           "ANOMSTREAM_ALERT_GROUP_WAIT_S": "2",
                                                           "ANOMSTREAM_ALERT_GROUP_INTERVAL_S": "10"},
                                                stdout=alerter_log,
                                                stderr=subprocess.STDOUT)
        log.info("detector, log detector, rules and alerter started", detector_log=str(log_dir / "detector.log"),
                 logdetector_log=str(log_dir / "logdetector.log"), rules_log=str(log_dir / "rules.log"),
                 alerter_log=str(log_dir / "alerter.log"), metrics_ports=ports)
        keys, values = encode_metric_frame(replay_frame(settings.nab_csvs()))
        sent = send(settings, settings.topic_input, keys, values, log=log)
        keys, values = encode_metric_frame(transactions(n_transactions, outlier_prob=0.01, seed=int(time.time())))
        sent += send(settings, settings.topic_transactions, keys, values, log=log)
        scores_start = before[settings.topic_scores]

        def scrapes() -> int:
            return delta(before[settings.topic_kafka_metrics], end_offsets(settings, settings.topic_kafka_metrics))

        wait_for(lambda: detector_caught_up(settings), timeout, f"{sent} scores", procs)
        # The rules service records how far it read with each batch of checks; once it read
        # everything and the partitions went idle, every window the watermark passed is checked.
        inputs_end = {t: end_offsets(settings, t) for t in rules_topics}
        history = RunHistory(rules_env["ANOMSTREAM_RULES_DB_URL"])
        wait_for(lambda: all(history.progress(rules_env["ANOMSTREAM_RULES_GROUP"]).get((t, p), 0) >= o
                             for t in rules_topics for p, o in inputs_end[t].items()),
                 timeout, "the rules service to read every input", procs)
        time.sleep(settings.rules_idle_partition_s + 3)
        # The scenario's broker metrics are compared with a recording made on a quiet broker: the
        # replay's alerts handled first (the scenario used to start while the rules service and the
        # alerter were still at work, whose traffic the model rightly flagged in most scrapes).
        wait_for(lambda: caught_up(settings, settings.alerter_group, settings.topic_anomalies),
                 timeout, "the alerter to handle the replay's anomalies", procs)
        # The broker's own metrics, once the replay is scored and checked (the model knows the
        # scenario's traffic, not the replay's): a known load with one burst and one large message,
        # scraped every second to kafka_metrics, where the Real-Time K-Means scores them.
        scenario_csv = log_dir / "kafka_load.csv"
        metrics_url = broker.metrics_url if broker is not None else settings.metrics_exporter_url
        with open(log_dir / "scenario.log", "ab") as scenario_log:
            procs["scenario"] = subprocess.Popen(
                [sys.executable, "-m", "services.jobs.scenario", "kafka-load", "--rows", str(scenario_rows),
                 "--bursts", "1", "--large-messages", "1", "--quiet-fraction", "0.5", "--min-gap", "10",
                 "--bootstrap", settings.bootstrap_servers, "--url", metrics_url, "--out", str(scenario_csv)],
                env=env, stdout=scenario_log, stderr=subprocess.STDOUT)
        log.info("broker-metrics scenario started", rows=scenario_rows, log=str(log_dir / "scenario.log"))

        scenario = procs.pop("scenario")
        if scenario.wait(timeout) != 0:
            raise RuntimeError(f"the broker-metrics scenario exited with {scenario.returncode}; see "
                               f"{log_dir / 'scenario.log'}")
        n_scrapes = scrapes()
        wait_for(lambda: detector_caught_up(settings), timeout, f"{n_scrapes} scrapes of the broker's metrics scored",
                 procs)
        # Raw log lines for the log detector, once the rest is done: its load during the metric replay
        # would hold a rules partition back past the idle limit (making its messages late), and
        # during the scenario it would be a burst of traffic the broker-metrics model rightly flags.
        # The log detector: a group, templates and open sessions of this run alone (see
        # log_detector_env); its changelog is deleted when the run is over.
        log_state = log_dir / "logdetector-state"
        shutil.rmtree(log_state, ignore_errors=True)
        logs_env = env | log_detector_env(settings, log_state, run_id) | {
            "ANOMSTREAM_HTTP_PORT": str(ports["logdetector"])}
        logs_changelog = log_changelog(settings, logs_env)
        commit_group_offsets(settings, logs_env["ANOMSTREAM_LOGDETECTOR_GROUP"], settings.topic_logs,
                             before[settings.topic_logs])
        with open(log_dir / "logdetector.log", "ab") as logdetector_log:
            procs["logdetector"] = subprocess.Popen([sys.executable, "-m", "services.logdetector"],
                                                    env=logs_env, stdout=logdetector_log, stderr=subprocess.STDOUT)
        raw_sample, labelled_log = settings.data_dir / "hdfs" / "HDFS_2k.log", log_dir / "hdfs_test.log"
        log_labels = render_labelled_log(settings, labelled_log)
        log_lines = 0
        for path in (raw_sample, labelled_log):
            keys, values = encode_log_lines(path, settings.log_session_key)
            log_lines += send(settings, settings.topic_logs, keys, values, log=log)
        # The log detector is done when it committed every line and no session is open.
        logs_end = end_offsets(settings, settings.topic_logs)
        wait_for(lambda: log_detector_done(settings, logs_env["ANOMSTREAM_LOGDETECTOR_GROUP"], logs_changelog,
                                           logs_end),
                 timeout, "the log detector to read every line and end every session", procs)
        wait_for(lambda: caught_up(settings, settings.alerter_group, settings.topic_anomalies),
                 timeout, "the alerter to handle every anomaly", procs)

        anomalies = records_since(settings, settings.topic_anomalies, before[settings.topic_anomalies])
        n_anomalies = len(anomalies)
        fired = Counter()
        cluster_flagged: list[float] = []
        log_flagged: dict[str, set[str]] = {"raw": set(), "labelled": set()}
        for msg in anomalies:
            rec = orjson.loads(msg.value())
            if rec.get("kind") == "cluster":
                cluster_flagged.append(datetime.fromisoformat(rec["timestamp"]).timestamp())
            if rec.get("kind") == "log":  # the labelled replay's clock starts after the raw sample's end
                part = "labelled" if datetime.fromisoformat(rec["timestamp"]).replace(tzinfo=None) >= RENDER_START else "raw"
                log_flagged[part].add(rec["series"])
            if rec.get("kind") in ("rule", "cluster", "log"):
                fired[rec["kind"]] += 1
                continue
            fired[rec["source_topic"]] += 1
            fired["isolation_forest"] += rec["if_anomaly"]
            fired["lstm_autoencoder"] += rec["lstm_anomaly"]
        scored = len(records_since(settings, settings.topic_scores, scores_start))
        dead = len(records_since(settings, settings.topic_dead_letter, before[settings.topic_dead_letter]))
        rule_counts = Counter()
        for name in history.definitions():
            for group, n in history.groups(name).items():
                rule_counts["checks"] += n
            frame = history.frame(name)
            n_fired = int(frame["fired"].sum())
            rule_counts["fired"] += n_fired
            if n_fired:
                chart = log_dir / f"rules-{name}.png"
                subprocess.run([sys.executable, "-m", "services.cli", "chart", name, "--out", str(chart),
                                "--db", rules_env["ANOMSTREAM_RULES_DB_URL"]], check=True)
        history.close()
        labels = pd.read_csv(scenario_csv)
        injected = labels.loc[labels["is_anomaly"] == 1, "timestamp"].to_numpy()
        caught = sum(any(abs(t - f) < 0.01 for f in cluster_flagged) for t in injected)
        print(f"BROKER METRICS scrapes={n_scrapes} injected={len(injected)} injected_flagged={caught} "
              f"other_scrapes_flagged={len(cluster_flagged) - caught} "
              f"labelled CSV {scenario_csv}", flush=True)
        print(log_summary(raw_sample, log_labels, log_flagged, settings), flush=True)
        print(f"SUMMARY produced={sent} log_lines={log_lines} scored={scored} anomalies={n_anomalies} "
              f"(input_data={fired[settings.topic_input]} transactions={fired[settings.topic_transactions]} "
              f"rules={fired['rule']} kafka_metrics={fired['cluster']} log_sessions={fired['log']}; "
              f"isolation_forest={fired['isolation_forest']} "
              f"lstm_autoencoder={fired['lstm_autoencoder']}) rule_checks={rule_counts['checks']} "
              f"rule_checks_fired={rule_counts['fired']} broker_metric_scrapes={n_scrapes} dead_letter={dead} "
              f"elapsed_s={time.monotonic() - started:.1f}", flush=True)
        print(f"run history: anomstream runs NAME --db {rules_env['ANOMSTREAM_RULES_DB_URL']}", flush=True)
        return 0 if scored >= sent + n_scrapes else 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if procs:  # they stopped: the state of this run's replay is of no further use
            prefix = run_state_prefix(settings, run_id)
            try:
                log.info("the state changelogs of this run deleted", topics=delete_run_state(settings, prefix))
            except KafkaException as exc:
                log.warning("could not delete the state changelogs of this run", prefix=prefix, error=str(exc))
        if broker is not None:
            broker.stop()
            log.info("local kafka broker stopped")


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream run")


if __name__ == "__main__":
    sys.exit(main())
