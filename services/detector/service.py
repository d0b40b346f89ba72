"""detector: worker processes in one consumer group score every message of the input topics.

Each worker runs the stream core (shared.stream) with a `DetectorProcessor`: validate (bad ones to
dead_letter with the reason) -> score with the model set of the message's topic -> one ScoreRecord
per input to `scores`, anomalies also to `anomalies`; `kafka_metrics` scrapes are scored by the
Real-Time K-Means, whose per-partition state goes to its changelog before the commit. The core commits a batch's
offsets only after the broker acknowledged all of it: a crash anywhere before the commit means the
batch is consumed again (at-least-once, never a gap).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

import click
import numpy as np
from prometheus_client import multiprocess

from models.base import ArtifactError
from services.detector.kmeans import BrokerMetricsScoring
from services.detector.series_state import SeriesChangelog, by_topic
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, run_command
from shared.config import Settings, load_settings
from shared.kafka import FencedError, ensure_topics, group_instance_id
from shared.records.metrics import MetricInput, decode_metrics, encode_score_records
from shared.stream import Output, Processor, Result, StreamLoop
from shared.telemetry import (
    Heartbeat,
    Probe,
    multiprocess_registry,
    sample_sum,
    serve_http,
)

EXIT_CONFIG_ERROR = 2  # a worker that cannot load its models (or was fenced out) is not restarted


class RestartBackoff:
    """The wait before restarting one worker slot's dead worker: `first` seconds, doubling up to
    `most` while its workers keep dying young; back to `first` once one stayed up `stable` seconds."""

    def __init__(self, first: float = 1.0, most: float = 60.0, stable: float = 60.0):
        self.first, self.most, self.stable = first, most, stable
        self.next = first

    def delay(self, uptime: float) -> float:
        if uptime >= self.stable:
            self.next = self.first
        delay, self.next = self.next, min(self.next * 2, self.most)
        return delay


def watch_supervisor(on_gone) -> bool:
    """Call `on_gone()` from a daemon thread as soon as the process that spawned this one exits,
    however it died (SIGKILL included); False if this process was not started by multiprocessing.

    multiprocessing's parent sentinel is the read end of the pipe the parent spawned this process
    through; the parent's end closes when it exits, and the read end becomes readable. The parent
    pid check confirms it (this process was re-parented) and closes the race with a parent that
    died before the thread started: the sentinel is readable already then."""
    parent = mp.parent_process()
    if parent is None:
        return False

    def watch() -> None:
        while True:
            parent.join(5)  # returns at once when the parent has exited
            if os.getppid() != parent.pid:
                on_gone()
                return

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
    return True


class DetectorProcessor(Processor):
    """Scores each input topic with its model set, and `kafka_metrics` with the Real-Time K-Means."""

    name = "detector"

    def __init__(self, settings: Settings, scorers: dict, cluster: BrokerMetricsScoring | None = None, log=None):
        self.settings = settings
        self.scorers = scorers  # topic -> Scorer
        self.cluster = cluster  # scores settings.topic_kafka_metrics when a K-Means model is trained
        self.stats = Counter()
        self.loop: StreamLoop | None = None
        self.checkpoint_interval_s = settings.detector_commit_interval_s
        self.metric_input = MetricInput.of(settings)
        # Each Scorer's per-series state, backed by its input topic's changelog.
        self.state = {topic: SeriesChangelog(settings, topic, scorer.store, log) for topic, scorer in scorers.items()}

    def attach(self, loop: StreamLoop) -> None:
        self.loop = loop
        partitions = self.settings.topic_partitions()
        for topic, changelog in self.state.items():
            changelog.ensure(partitions.get(topic, 1))
        if self.cluster is not None:
            self.cluster.ensure()

    def topics(self) -> list[str]:
        return list(self.scorers) + ([self.settings.topic_kafka_metrics] if self.cluster is not None else [])

    def process(self, messages: list, now: float) -> Result:
        result = Result()
        by_topic = defaultdict(list)
        for m in messages:
            by_topic[m.topic()].append(m)
        for topic, msgs in by_topic.items():
            if self.cluster is not None and topic == self.settings.topic_kafka_metrics:
                self.cluster.score(msgs, result)
            elif topic in self.scorers:
                self.score_metrics(topic, msgs, result)
            else:
                result.dead_letters += [(m, f"no model set is configured for topic {topic}") for m in msgs]
        return result

    def score_metrics(self, topic: str, msgs: list, result: Result) -> None:
        s, scorer = self.settings, self.scorers[topic]
        decoded = decode_metrics([m.value() for m in msgs], s.max_message_bytes, s.max_abs_value, self.metric_input)
        result.dead_letters += [(msgs[i], reason) for i, reason in decoded.errors]
        if not decoded.index:
            return
        good = [msgs[i] for i in decoded.index]
        self.state[topic].bring_back(decoded.series)
        scored = scorer.score(decoded.series, decoded.timestamps, decoded.values,
                              np.fromiter((m.partition() for m in good), np.int32, len(good)))
        values = encode_score_records(
            decoded.series, decoded.timestamps, decoded.values, scored.is_anomaly, scored.scores, scored.flags,
            scorer.decision, scorer.model_set.version, topic,
            [(m.partition(), m.offset(), m.timestamp()[1]) for m in good], scored.why)
        anomalous = scored.is_anomaly.tolist()
        for series, value, is_anomaly in zip(decoded.series, values, anomalous):
            key = series.encode()
            result.outputs.append(Output(s.topic_scores, value, key))
            if is_anomaly:
                result.outputs.append(Output(s.topic_anomalies, value, key))
        self.stats["scored"] += len(values)
        self.stats["anomalies"] += sum(anomalous)

    def checkpoint(self) -> None:
        """Called after the outputs are acknowledged (at-least-once) or inside the batch's
        transaction (exactly-once): the changed series' state goes to the changelog before the
        offsets move."""
        loop = self.loop
        for changelog in self.state.values():
            changelog.write_changed(loop.producer, loop.tracker)
        if self.cluster is not None:
            self.cluster.checkpoint(loop.producer, loop.tracker)
        if self.settings.delivery != "exactly_once":
            loop.tracker.flush(loop.producer, loop.log)  # durable before the commit
        for changelog in self.state.values():
            changelog.maybe_evict()

    def on_assign(self, partitions) -> None:
        for topic, parts in by_topic(partitions).items():
            if topic in self.state:
                self.state[topic].restore(parts)
        if self.cluster is not None:
            self.cluster.on_assign(partitions)

    def on_revoke(self, partitions) -> None:
        for topic, parts in by_topic(partitions).items():
            if topic in self.state:
                self.state[topic].drop(parts)
        if self.cluster is not None:
            self.cluster.on_revoke(partitions)

    def close(self) -> None:
        for changelog in self.state.values():
            changelog.close()

    def progress(self) -> dict:
        figures = dict(self.stats)
        for changelog in self.state.values():
            figures.update({k: figures.get(k, 0) + v for k, v in changelog.stats.items()})
        figures["series_in_memory"] = sum(len(s.store) for s in self.scorers.values())
        return figures | (dict(self.cluster.stats) if self.cluster is not None else {})


def worker_main(settings: Settings, worker_id: int) -> None:
    # Ctrl-C reaches every process in the group; both signals mean "finish the batch, commit, exit".
    # So does the supervisor's death: a worker left behind would stay in the consumer group, and a
    # new detector would start a second set beside it.
    stop = {"flag": False}
    worker: StreamLoop | None = None

    def request_stop() -> None:
        stop["flag"] = True
        if worker is not None:
            worker.stopping = True

    def on_signal(_sig, _frame):
        request_stop()

    def on_supervisor_gone() -> None:
        request_stop()
        log.warning("supervisor gone; stopping", worker=worker_id)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log = setup_logging(settings, "detector").bind(worker=worker_id)
    watch_supervisor(on_supervisor_gone)
    from models.inference import limit_threads
    from models.metrics.scorer import load_scorer

    limit_threads(1)
    try:
        scorers = {topic: load_scorer(settings.model_dir, name, settings.combine, settings.decision,
                                      settings.scoring, settings.outputs)
                   for topic, name in settings.topic_models().items()}
    except (ArtifactError, ValueError) as exc:
        log.error("cannot load models", error=str(exc))
        sys.exit(EXIT_CONFIG_ERROR)
    try:
        cluster = BrokerMetricsScoring.load(settings, log)
    except (ArtifactError, ValueError, KeyError) as exc:  # trained but broken: stop like a broken model set
        log.error("cannot load the Real-Time K-Means model", error=str(exc))
        sys.exit(EXIT_CONFIG_ERROR)
    # The models are loaded for good: move them out of the garbage collector's sight, or every
    # full collection walks ~500k TensorFlow objects (about 30% of a worker's time).
    gc.collect()
    gc.freeze()
    # A static member, "<group>-detector-<instance>-<worker>": the worker restarted in this slot takes
    # the dead one's partitions back at once.
    worker = StreamLoop(settings, DetectorProcessor(settings, scorers, cluster, log), settings.consumer_group, log,
                        instance_id=group_instance_id(settings, settings.consumer_group, "detector", worker_id))
    worker.stopping = stop["flag"]
    log.info("worker ready", topics=worker.processor.topics(), batch_size=settings.batch_size,
             group_instance_id=worker.consumer.instance_id)
    try:
        worker.run()
    except FencedError as exc:
        # Another detector runs with this one's ANOMSTREAM_INSTANCE_ID: restarting would fence it in
        # turn, back and forth. Stop, and let the supervisor say why.
        log.error("fenced out of the consumer group; stopping", error=str(exc))
        sys.exit(EXIT_CONFIG_ERROR)


# How long the supervisor waits, on SIGTERM, for its workers to finish their batches and commit
# before it kills them (docker/docker-compose.yml's stop_grace_period outlasts it).
WORKER_STOP_TIMEOUT_S = 60.0


def supervise(settings: Settings) -> int:
    """Run settings.workers worker processes; restart one that dies (after a delay that grows while
    the slot's workers keep dying young: RestartBackoff); stop all on SIGTERM/SIGINT. A worker stops
    by itself when the supervisor is gone (watch_supervisor)."""
    from models.metrics.model_set import ModelSet

    log = setup_logging(settings, "detector")
    for name in set(settings.topic_models().values()):
        ModelSet.read_manifest(settings.model_dir, name)  # fail here, clearly, not in N workers
    ensure_topics(settings)
    # The workers' metrics: files in a folder of this run, added up by the supervisor's /metrics
    # (set before any worker starts: prometheus-client reads it when a worker imports it).
    metrics_dir = tempfile.mkdtemp(prefix="anomstream-detector-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    registry = multiprocess_registry(metrics_dir)
    heartbeat = Heartbeat()
    ready = lambda: sample_sum(registry, "anomstream_ready", service="detector") >= settings.workers  # noqa: E731
    server = serve_http(settings.http_port, Probe(heartbeat.alive, ready), registry, settings.http_host, log)
    ctx = mp.get_context("spawn")  # TensorFlow is not fork-safe
    procs: dict[int, mp.Process] = {}
    started: dict[int, float] = {}  # slot -> when its worker was started
    backoff = {i: RestartBackoff() for i in range(settings.workers)}
    restart_at: dict[int, float] = {}  # slot -> when its dead worker is started again
    stopping = False

    def start(i: int) -> None:
        procs[i] = ctx.Process(target=worker_main, args=(settings, i), name=f"detector-{i}")
        procs[i].start()
        started[i] = time.monotonic()

    def on_signal(_sig, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(settings.workers):
        start(i)
    log.info("detector started", workers=settings.workers, topics=settings.topic_models())
    exit_code = 0
    while not stopping:
        time.sleep(0.2)
        heartbeat.beat()
        for i, p in list(procs.items()):
            if stopping:
                break
            if i in restart_at:
                if time.monotonic() >= restart_at[i]:
                    del restart_at[i]
                    start(i)
                continue
            if p.is_alive():
                continue
            multiprocess.mark_process_dead(p.pid, metrics_dir)  # its live gauges (ready, lag) go
            if p.exitcode == EXIT_CONFIG_ERROR:
                log.error("worker cannot start; stopping", worker=i)
                stopping, exit_code = True, 1
                break
            # A worker that dies on every start is restarted ever more slowly, not in a tight loop.
            uptime = time.monotonic() - started[i]
            delay = backoff[i].delay(uptime)
            log.warning("worker died; restarting", worker=i, exitcode=p.exitcode, uptime_s=round(uptime, 1),
                        restart_in_s=delay)
            restart_at[i] = time.monotonic() + delay
    for p in procs.values():
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker finishes its batch and commits
    # The workers drain side by side: one deadline for all of them, not WORKER_STOP_TIMEOUT_S each.
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
    for p in procs.values():
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    if server is not None:
        server.shutdown()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("detector stopped")
    return exit_code


@click.command("detect", help=__doc__, context_settings=CONTEXT)
@click.option("--workers", type=int, default=None, help="worker processes (default: setting ANOMSTREAM_WORKERS)")
def command(workers: int | None) -> int:
    settings = load_settings(**({"workers": workers} if workers else {}))
    try:
        return supervise(settings)
    except ArtifactError as exc:
        setup_logging(settings, "detector").error("cannot start", error=str(exc))
        return 1


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream detect")


if __name__ == "__main__":
    sys.exit(main())
