"""bench: throughput and latency of the detector service on a real broker (what `make bench` does).

First, unless --no-sweep, the cardinality sweep (services.jobs.bench_sweep: no broker): the Scorer
in this process, one thread, on 5000-message batches at 8, 1000 and 100000 series (--sweep-series),
each series starting from a steady state and seen several times; per-message CPU cost (target: at
the most series within 1.5x of at 8) and streaming state per series (target: <= 2 KB), as the
store's record size and as this process's resident memory growth per series. --sweep-only: the
sweep alone (its JSON line also in bench_results/sweep.json).

Then these phases, each against the real `python -m services.detector` (its worker processes in
one consumer group) on fresh topics of this run, the messages spread over --series series (10,000
by default), computing what --scoring asks (setting `scoring`; default lean: the decision's
detectors only). Each detector's start-up is timed (start of the process to its first score
record: first_score_s) and its workers' resident memory sampled (the largest: worker_rss_mb):

1. throughput: the detector is started and warmed up; once its consumer group has settled,
   --msgs EC2-like messages are released at once (one Kafka transaction, so they appear to the
   detector as a backlog already in the broker) and msgs_per_s = messages / (last score's
   timestamp - release); see measure_rate. Run in both delivery modes (ANOMSTREAM_DELIVERY=
   exactly_once / at_least_once in the detector's environment), each with a detector of its own:
   first the configured mode (settings' `delivery`; exactly_once where the settings have none),
   whose detector then runs phase 2, then the other; target: exactly-once >= 80% of at-least-once.
2. latency: with that detector still running, messages are offered at --rate msgs/s for
   --latency-seconds; a message's latency is its score record's timestamp (CreateTime, stamped by
   the detector's producer when it hands the record over) minus its input record's CreateTime
   (carried in the score as source_timestamp_ms); p50/p99 over this phase only, after the first
   --latency-warmup seconds of it (offered at the same rate but not measured).
   visible_p50_ms/visible_p99_ms: what a consumer of `scores` sees (arrival here - input CreateTime).
2b. design (--design, on by default): phase 1 again, exactly-once, with scoring=design (the design
   card's IsolationForest and LSTM autoencoder scored on every message as well): design_msgs_per_s.
3. baseline: the reference design, the same detector with a batch size of 1 (configured delivery
   mode), over --baseline-msgs messages, measured like phase 1; speedup = msgs_per_s /
   baseline_msgs_per_s.

--spark-only: instead of all that, phase 1 (exactly-once) and then the same backlog scored by the
Spark detector (`anomstream spark-detect`, local[2], a long-running query warmed up the same way);
both throughputs, measured alike, in bench_results/spark.json.

Progress goes to stderr; the last line on stdout is one JSON object (also written to
bench_results/bench.json), with the CPU each part used while it was measured (broker, detector,
this process, and "other": anything else on the machine). Numbers depend on the machine and on
what else runs on it: the bench reports them and asserts nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import click
import numpy as np
import orjson
import pandas as pd
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, TopicPartition

from models.base import ArtifactError
from models.metrics.features import replay_frame
from models.metrics.model_set import ModelSet
from services.jobs.bench_sweep import cardinality_sweep, summary
from shared.cli import CONTEXT, PATH, run_command, verbatim
from shared.config import Settings, anomstream_home, load_settings
from shared.kafka import (
    DeliveryTracker,
    client_config,
    end_offsets,
    ensure_topics,
    make_admin,
    make_producer,
    produce,
    read_topic,
    send,
)
from shared.local_broker import LocalBroker, free_port
from shared.records.metrics import encode_metric_frame

RESULTS = Path("bench_results")  # in the current directory


def work_dir() -> Path:
    """The bench's logs and quick models: <ANOMSTREAM_HOME>/bench."""
    return anomstream_home() / "bench"


def bench_model_dir() -> Path:
    """Where missing models are trained when --model-dir is not given."""
    return work_dir() / "models"


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Stop(Exception):
    """SIGTERM (or SIGINT) to the bench: unwind through every `finally`, stopping what it started."""


def _on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


# --------------------------------------------------------------------------- data

def bench_frame(settings: Settings, n: int, tag: str, series: int = 64) -> pd.DataFrame:
    """n EC2 CPU points over `series` distinct series (all of them when n >= series): the NAB EC2
    series replicated as new series (`<name>-<tag><rep>`; series i replicates NAB series i mod 8),
    moved in time to start together (by whole days), interleaved point by point as a fleet of instances reporting together would be, each series in
    time order (a replica past the end of its NAB series starts it again, shifted forward in time).
    With every series live at once the load spreads over the input partitions by key from the
    first message (series replayed one after another would load one or two partitions at a time)."""
    paths = settings.nab_csvs()
    if not paths:
        raise SystemExit(f"no NAB EC2 CSVs under {settings.data_dir}; set ANOMSTREAM_DATA_DIR")
    groups = [g for _, g in replay_frame(paths).groupby("series", sort=True)]
    k, count = len(groups), max(1, min(series, n))
    lengths = np.array([len(g) for g in groups])
    times, values = np.zeros((k, lengths.max())), np.zeros((k, lengths.max()))
    for b, g in enumerate(groups):
        times[b, :len(g)], values[b, :len(g)] = g["epoch_s"].to_numpy(), g["value"].to_numpy()
    # All NAB series moved to start within a day of the latest first point (by whole days, so each
    # keeps its time of day): a fleet reports at the same time. (Months apart, as recorded, the
    # series behind the newest looked idle to the detector and were evicted and brought back over
    # and over.)
    shift = np.round((times[:, 0].max() - times[:, 0]) / 86400.0) * 86400.0
    for b in range(k):
        times[b, :lengths[b]] += shift[b]
    step = np.array([np.median(np.diff(times[b, :lengths[b]])) if lengths[b] > 1 else 300.0 for b in range(k)])
    periods = times[np.arange(k), lengths - 1] - times[:, 0] + step
    base = [g["series"].iat[0] for g in groups]
    names = np.array([f"{base[i % k]}-{tag}{i // k}" for i in range(count)], dtype=object)
    r = np.arange(n)
    s, p = r % count, r // count
    b = s % k
    q, wraps = p % lengths[b], p // lengths[b]
    return pd.DataFrame({"series": names[s], "epoch_s": times[b, q] + wraps * periods[b], "value": values[b, q]})


# --------------------------------------------------------------------------- models

def ensure_models(model_dir: Path, explicit: bool, settings: Settings) -> tuple[Path, bool]:
    """The folder holding both model sets; trains them (2 epochs) when missing. Without an explicit
    --model-dir, missing models are trained under <home>/bench, not in settings.model_dir, so that
    `anomstream run` never picks up these quick models as if they were the real ones."""
    names = (settings.model_input, settings.model_transactions)

    def present(folder: Path) -> bool:
        return all((ModelSet.folder(folder, n) / "manifest.json").exists() for n in names)

    if not present(model_dir) and not explicit:
        model_dir = bench_model_dir()
    if model_dir == bench_model_dir():  # the bench's own quick models: retrain any the code no longer reads
        for n in names:
            try:
                ModelSet.read_manifest(model_dir, n)
            except ArtifactError as exc:
                if (ModelSet.folder(model_dir, n) / "manifest.json").exists():
                    say(f"retraining the bench's model set {n}: {exc}")
                    shutil.rmtree(ModelSet.folder(model_dir, n))
    trained = False
    if not present(model_dir):
        say(f"model sets {list(names)} missing in {model_dir}: training them with 2 LSTM epochs "
            "(the bench measures speed, not detection quality)")
        subprocess.run([sys.executable, "-m", "services.jobs.train", "--model-dir", str(model_dir), "--epochs", "2",
                        "--if-missing"], check=True, stdout=sys.stderr)
        trained = True
    for n in names:
        ModelSet.read_manifest(model_dir, n)  # raises ArtifactError with the reason if unusable
    return model_dir, trained


# --------------------------------------------------------------------------- processes

DETECTOR = "services.detector"
SPARK_DETECTOR = "services.detector.spark"  # `anomstream spark-detect`, on local[2]


class Detector:
    """`python -m services.detector` (or `module`: the Spark detector) in its own session, so that it
    and its workers form one process group that can be stopped (and measured) as a whole;
    configured by ANOMSTREAM_*."""

    def __init__(self, overrides: dict, log_path: Path, module: str = DETECTOR):
        env = os.environ | {f"ANOMSTREAM_{k.upper()}": orjson.dumps(v).decode() if isinstance(v, (dict, list))
                            else str(v) for k, v in overrides.items()}
        env["ANOMSTREAM_LOG_FORMAT"] = "json"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(log_path, "wb")
        self.started = time.monotonic()
        self.worker_pids: set[int] = set()  # filled in by the CpuMeter
        self.proc = subprocess.Popen([sys.executable, "-m", module], env=env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"detector exited with {self.proc.returncode}; log {self.log_path}:\n{tail}")

    def _log_count(self, event: str) -> int:
        return self.log_path.read_text(errors="replace").count(f'"event": "{event}"')

    def workers_ready(self) -> int:
        return self._log_count("worker ready")

    def restarts(self) -> int:
        return self._log_count("worker died; restarting")

    def scored_per_worker(self) -> dict[str, int]:
        """worker id -> messages it scored (summed over restarts), from the workers' stop lines;
        call after stop(). An idle worker got no partition of the input topic."""
        out: dict[str, int] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"stream loop stopped"' in line:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                key = str(rec.get("worker"))
                out[key] = out.get(key, 0) + rec.get("scored", 0)
        return dict(sorted(out.items()))

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM (workers finish their batch and commit), then SIGKILL for anything left in the
        detector's process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say("detector did not stop in time; killing it")
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log_file.close()


class CpuMeter(threading.Thread):
    """Samples, every 0.25 s, the CPU seconds used so far by the broker JVM, the detector process
    groups, this process and everything else on the machine (Linux /proc), so a phase's measured
    window can be charged to each; "other" > 0 means something else competed for the CPU."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, broker: LocalBroker | None, detectors: list[Detector]):
        super().__init__(daemon=True)
        self.broker_pid = broker.running_pid() if broker else None
        self.detectors = detectors
        self.samples: list[tuple[float, ...]] = []  # (epoch s, broker, detector, bench, other)
        self.rss_max: dict[int, int] = {}  # detector worker pid -> largest resident set seen (bytes)
        self.done = threading.Event()
        self._pids: list[int] = []
        self._scanned = 0.0
        self._known = -1

    @staticmethod
    def _stat(pid: str) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None

    PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * self.PAGE
        except (OSError, IndexError, ValueError):
            return 0

    def worker_rss_mb(self, detector: "Detector") -> float | None:
        """The largest resident memory any worker of `detector` reached (MB)."""
        pids = set(detector.worker_pids)
        seen = [v for pid, v in self.rss_max.items() if pid in pids]
        return round(max(seen) / 2**20, 1) if seen else None

    def _members(self) -> list[int]:
        """The detectors' supervisor processes and their children (the workers)."""
        pids = []
        for d in self.detectors:
            leader = d.proc.pid
            pids.append(leader)
            try:
                with open(f"/proc/{leader}/task/{leader}/children") as f:
                    children = [int(p) for p in f.read().split()]
            except OSError:  # exited, or a kernel without the children file: the leader only
                children = []
            pids.extend(children)
            d.worker_pids.update(children)
        return pids

    def sample(self) -> None:
        if time.monotonic() - self._scanned > 1 or len(self.detectors) != self._known:
            self._pids, self._scanned, self._known = self._members(), time.monotonic(), len(self.detectors)
        leaders = {d.proc.pid for d in self.detectors}
        broker = detector = 0.0
        if self.broker_pid:
            f = self._stat(str(self.broker_pid))
            broker = int(f[11]) + int(f[12]) if f else 0
        for pid in self._pids:
            if pid not in leaders:
                rss = self._rss(pid)
                if rss:
                    self.rss_max[pid] = max(self.rss_max.get(pid, 0), rss)
            f = self._stat(str(pid))
            if f is not None:
                # utime + stime; a group leader's cutime/cstime holds its reaped children (restarts)
                detector += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if pid in leaders else 0)
        t = os.times()
        try:
            with open("/proc/stat") as f:  # cpu user nice system idle iowait irq softirq steal ...
                ticks = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / self.TICK
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        mine = (broker + detector) / self.TICK + t.user + t.system
        self.samples.append((time.time(), broker / self.TICK, detector / self.TICK, t.user + t.system, busy - mine))

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.sample()

    def cores(self, t0: float, t1: float) -> dict | None:
        """Average cores each part used over [t0, t1] (epoch seconds), widened to the samples
        around it; None if the run has no samples there."""
        before = [s for s in self.samples if s[0] <= t0]
        after = [s for s in self.samples if s[0] >= t1]
        if not before or not after:
            return None
        a, b = before[-1], after[0]
        dt = b[0] - a[0]
        if dt <= 0:
            return None
        names = ("broker", "detector", "bench", "other")
        out = {name: round((b[i] - a[i]) / dt, 2) for i, name in enumerate(names, 1)}
        return out | {"window_s": round(dt, 2)}


# --------------------------------------------------------------------------- scores

def scored(settings: Settings, start: dict[int, int] | None = None) -> int:
    return sum(o - (start or {}).get(p, 0) for p, o in end_offsets(settings, settings.topic_scores).items())


def wait_scored(settings: Settings, detector: Detector, target: int, deadline: float, what: str,
                start: dict[int, int] | None = None, poll: float = 0.5) -> None:
    last_report = time.monotonic()
    while True:
        n = scored(settings, start)
        if n >= target:
            return
        detector.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: only {n}/{target} score records before the timeout; log {detector.log_path}")
        if time.monotonic() - last_report > 5:
            restarts = detector.restarts()
            say(f"{what}: {n}/{target} scored, {detector.workers_ready()} worker start(s)"
                + (f", {restarts} worker restart(s)" if restarts else ""))
            last_report = time.monotonic()
        time.sleep(poll)


def collect_scores(settings: Settings, detector: Detector, sent: int, timeout: float, what: str,
                   start: dict[int, int] | None = None) -> tuple[dict, int]:
    """Waits until each of the `sent` inputs has a score, and reads them back:
    {(source partition, source offset): (score timestamp ms, input timestamp ms, score partition,
    score offset)} for the first score of each input, and the number of duplicate scores (an input
    scored again after a worker died before committing it: at-least-once). With exactly-once
    delivery the detector's transaction markers take offsets too: the offsets are an upper bound of
    the records, so the read stops when nothing new comes for a moment, and waits for more if
    inputs are still missing a score."""
    deadline = time.monotonic() + timeout
    target = sent
    while True:
        wait_scored(settings, detector, target, deadline, what, start)
        end = end_offsets(settings, settings.topic_scores)
        total = sum(o - (start or {}).get(p, 0) for p, o in end.items())
        first: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        records = read_topic(settings, settings.topic_scores, start=start, count=total, timeout=120, idle=2)
        for m in records:
            rec = orjson.loads(m.value())
            key = (rec["source_partition"], rec["source_offset"])
            ts = m.timestamp()[1]
            if key not in first or ts < first[key][0]:
                first[key] = (ts, rec["source_timestamp_ms"], m.partition(), m.offset())
        if len(first) >= sent:
            return first, len(records) - len(first)
        target = total + sent - len(first)


def measure_rate(stamps_ms, released: float) -> dict:
    """Throughput of a released backlog (see release_backlog), from the `scores` records' timestamps
    (CreateTime: when a worker handed the record to its producer) and the release time.

    msgs_per_s = messages / (last score's timestamp - release): the whole drain, first batch
    included. steady_msgs_per_s counts only the middle 90% of the score records (5th to 95th
    percentile timestamps), leaving out the ramp-up and the tail."""
    ts = np.sort(np.asarray(stamps_ms, dtype=np.int64))
    n = len(ts)
    span_s = max(ts[-1] / 1000 - released, 1e-3)
    lo, hi = int(0.05 * (n - 1)), int(0.95 * (n - 1))
    steady_s = max((ts[hi] - ts[lo]) / 1000, 1e-3)
    return {"msgs_per_s": float(n / span_s), "span_s": float(span_s),
            "steady_msgs_per_s": float((hi - lo) / steady_s), "window": (released, float(ts[-1]) / 1000)}


class LiveLatency(threading.Thread):
    """Reads `scores` during the latency phase and notes when each record arrived here, for the
    latency a downstream consumer sees (adds the wait for the broker's ack and the fetch). Kept
    light (no parsing here) so as not to take CPU from the detector."""

    def __init__(self, settings: Settings, start: dict[int, int]):
        super().__init__(daemon=True)
        self.consumer = Consumer(client_config(settings) | {
            "group.id": f"anomstream-bench-live-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(settings.topic_scores, p, o) for p, o in start.items()])
        self.arrived: dict[tuple[int, int], float] = {}  # (partition, offset) -> epoch ms
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                batch = self.consumer.consume(10000, 0.1)
                now_ms = time.time() * 1000
                for m in batch:
                    if not m.error():
                        self.arrived[(m.partition(), m.offset())] = now_ms
        finally:
            self.consumer.close()


def paced_send(settings: Settings, topic: str, keys: list[bytes], values: list[bytes],
               rate: float) -> tuple[int, float, float]:
    """Offers the messages at `rate` msgs/s with the producer service's client settings
    (make_producer); returns (acknowledged, start and end of the offering in epoch seconds). Paced
    in 5 ms steps (the producer's linger.ms, so batching is unchanged), not per message as
    services.producer.service.send is: a sleep per message costs half a core at 10000 msgs/s, and finer
    steps a third of one, which on a small machine would be taken from the detector."""
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    n, i = len(values), 0
    start, wall_start = time.monotonic(), time.time()
    while i < n:
        due = min(n, int((time.monotonic() - start) * rate) + 1)
        while i < due:
            produce(producer, topic, values[i], keys[i], on_delivery=tracker)
            i += 1
        producer.poll(0)
        time.sleep(0.005)
    wall_end = time.time()
    tracker.flush(producer)
    return tracker.delivered, wall_start, wall_end


def pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


# --------------------------------------------------------------------------- phases

def run_overrides(base: dict, run: str, workers: int, batch_size: int) -> dict:
    return base | {
        "topic_input": f"bench_input_{run}", "topic_transactions": f"bench_tx_{run}",
        "topic_scores": f"bench_scores_{run}", "topic_anomalies": f"bench_anomalies_{run}",
        "topic_dead_letter": f"bench_dead_letter_{run}", "consumer_group": f"bench_detector_{run}",
        "partitions_input": 3, "partitions_scores": 3, "workers": workers, "batch_size": batch_size,
        "auto_offset_reset": "earliest", "http_port": 0,  # a fresh group reads the backlog made before it
    }


def group_assignment(settings: Settings, admin) -> tuple[bool, list[int]]:
    """(stable, input partitions held by each member, most first) of the detector's group."""
    group = settings.consumer_group
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
    except Exception:  # not formed yet, or the broker is slow to answer
        return False, []
    held = sorted((sum(tp.topic == settings.topic_input for tp in m.assignment.topic_partitions)
                   for m in desc.members), reverse=True)
    stable = desc.state == ConsumerGroupState.STABLE and len(desc.members) == settings.workers
    return stable and sum(held) == settings.partitions_input, held


def wait_group_stable(settings: Settings, detector: Detector, what: str, timeout: float = 60) -> list[int]:
    """Waits until every worker is in the group and the assignment has not changed for 2 s."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    admin = make_admin(settings)
    while time.monotonic() < deadline:
        detector.check()
        stable, held = group_assignment(settings, admin)
        if not stable or held != last:
            last, since = (held if stable else None), time.monotonic()
        elif time.monotonic() - since >= 2:
            return held
        time.sleep(0.5)
    say(f"{what}: the consumer group did not settle within {timeout:.0f}s (input partitions per worker: "
        f"{last}); measuring anyway")
    return last or []


def release_backlog(settings: Settings, topic: str, keys: list[bytes], values: list[bytes]) -> tuple[int, float]:
    """Produces the messages in one Kafka transaction: the detector's consumers (read_committed, the
    librdkafka default) see none of them until the commit, then all at once, as a backlog that is
    already in the broker. Returns (messages, epoch seconds of the commit)."""
    producer = make_producer(settings, **{"transactional.id": f"anomstream-bench-{uuid.uuid4().hex[:8]}"})
    tracker = DeliveryTracker()
    producer.init_transactions(60)
    producer.begin_transaction()
    for key, value in zip(keys, values):
        produce(producer, topic, value, key, on_delivery=tracker)
    producer.commit_transaction(300)
    released = time.time()
    tracker.flush(producer)
    return tracker.delivered, released


def backlog_phase(overrides: dict, n: int, tag: str, what: str, timeout: float, detectors: list[Detector],
                  meter: CpuMeter, series: int = 64, delivery: str | None = None, module: str = DETECTOR
                  ) -> tuple[Settings, Detector, dict]:
    """Start the detector, warm it up, wait for its consumer group to settle, then release n messages
    over `series` series at once (release_backlog) and measure how fast it scores them all.
    `delivery`: the detector's delivery guarantee (ANOMSTREAM_DELIVERY in its environment only; None:
    its settings' default). Measuring a warm detector
    with all its workers in the group keeps the workers' staggered start (TensorFlow import, model
    load, group joins: seconds on a small machine) and the first-call tracing out of the number."""
    settings = load_settings(**overrides)
    ensure_topics(settings)
    detector = Detector(overrides | ({"delivery": delivery} if delivery else {}),
                        work_dir() / f"detector_{settings.consumer_group}.log", module)
    detectors.append(detector)
    say(f"{what}: started the detector ({settings.workers} workers, batch size {settings.batch_size}"
        + (f", {delivery}" if delivery else "") + "); waiting for it to warm up")
    deadline = time.monotonic() + timeout
    warmup = min(3000, 20 * settings.batch_size)
    keys, values = encode_metric_frame(bench_frame(settings, warmup, f"w{tag}", series))
    send(settings, settings.topic_input, keys, values)
    wait_scored(settings, detector, 1, deadline, f"{what} first score", poll=0.05)
    first_score_s = time.monotonic() - detector.started  # start of `python -m services.detector` to a score
    say(f"{what}: first score {first_score_s:.1f}s after the detector was started")
    wait_scored(settings, detector, warmup, deadline, f"{what} warm-up")
    # (Spark's Kafka source assigns the partitions itself: no consumer group to wait for.)
    held = wait_group_stable(settings, detector, what) if module == DETECTOR else []
    start = end_offsets(settings, settings.topic_scores)
    keys, values = encode_metric_frame(bench_frame(settings, n, tag, series))
    sent, released = release_backlog(settings, settings.topic_input, keys, values)
    say(f"{what}: released {sent} messages of {min(series, n)} series at once (input partitions per worker: {held})")
    t0 = time.monotonic()
    first, duplicates = collect_scores(settings, detector, sent, max(deadline - time.monotonic(), 60), what, start)
    say(f"{what}: all {sent} scored {time.monotonic() - t0:.1f}s after their release")
    rate = measure_rate([v[0] for v in first.values()], released)
    rate |= {"duplicates": duplicates, "restarts": detector.restarts(), "input_partitions_per_worker": held,
             "first_score_s": round(first_score_s, 2), "worker_rss_mb": meter.worker_rss_mb(detector),
             "cpu": meter.cores(*rate.pop("window")),
             "dead_lettered": int(sum(end_offsets(settings, settings.topic_dead_letter).values()))}
    say(f"{what}: {rate['msgs_per_s']:.0f} msgs/s over {rate['span_s']:.2f}s from release to last score "
        f"(middle 90%: {rate['steady_msgs_per_s']:.0f} msgs/s); cores used meanwhile: {rate['cpu']}"
        + (f"; {rate['restarts']} worker restart(s), {duplicates} duplicate score(s), see {detector.log_path}"
           if rate["restarts"] or duplicates else ""))
    return settings, detector, rate


def latency_phase(settings: Settings, detector: Detector, rate: float, seconds: float, warmup: float,
                  timeout: float, meter: CpuMeter, series: int = 64) -> dict:
    """Offers messages at `rate` for warmup + seconds; latencies of the messages offered after the
    warm-up only (by their CreateTime): the steady state at that load, with the broker's JIT and
    the detector's per-series state warm, and any backlog the warm-up left still counted."""
    n = max(1, int(rate * (warmup + seconds)))
    keys, values = encode_metric_frame(bench_frame(settings, n, "lat", series))
    start = end_offsets(settings, settings.topic_scores)
    restarts_before = detector.restarts()
    live = LiveLatency(settings, start)
    live.start()
    try:
        say(f"latency: offering {n} messages at {rate:.0f} msgs/s for {warmup:g}s of warm-up + {seconds:g}s measured")
        sent, t0, t1 = paced_send(settings, settings.topic_input, keys, values, rate)
        first, duplicates = collect_scores(settings, detector, sent, timeout, "latency", start)
        time.sleep(0.5)  # let the live reader catch the last records
    finally:
        live.done.set()
        live.join(10)
    t_measure = t0 + warmup
    measured = [v for v in first.values() if v[1] >= t_measure * 1000]
    lat = [score - source for score, source, _, _ in measured]
    visible = [live.arrived[(p, o)] - source for _, source, p, o in measured if (p, o) in live.arrived]
    out = {"latency_msgs": len(lat), "offered_rate": rate,
           "achieved_rate": round(sent / max(t1 - t0, 1e-9), 1), "latency_warmup_s": warmup,
           "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100),
           "visible_p50_ms": pct(visible, 50), "visible_p99_ms": pct(visible, 99),
           "latency_restarts": detector.restarts() - restarts_before, "latency_duplicates": duplicates,
           "latency_cpu": meter.cores(t_measure, t1)}
    say(f"latency: {len(lat)} messages after the warm-up, at {out['achieved_rate']:.0f} msgs/s: "
        f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms (as a consumer of scores "
        f"sees it: p50 {out['visible_p50_ms']} ms, p99 {out['visible_p99_ms']} ms); cores used meanwhile: "
        f"{out['latency_cpu']}")
    return out


def spark_comparison(base: dict, msgs: int, series: int, timeout: float, detectors: list[Detector],
                     meter: CpuMeter, workers: int, batch_size: int, used: list[Settings]) -> dict:
    """--spark-only: the same backlog (phase 1, exactly-once) scored by the consumer-group detector,
    then by the Spark detector (a long-running query, 1 s trigger, warmed up like the detector)."""
    overrides = run_overrides(base, uuid.uuid4().hex[:8], workers, batch_size)
    used.append(load_settings(**overrides))
    _, detector, rate = backlog_phase(overrides, msgs, "r", "throughput (consumer group, exactly_once)", timeout,
                                      detectors, meter, series, "exactly_once")
    detector.stop()
    run = uuid.uuid4().hex[:8]
    overrides = run_overrides(base, run, workers, batch_size) | {
        "spark_checkpoint": str(work_dir() / f"spark_checkpoint_{run}"), "spark_trigger_s": 1.0,
        "spark_conf": {"spark.ui.enabled": "false"}}
    used.append(load_settings(**overrides))
    _, spark, spark_rate = backlog_phase(overrides, msgs, "s", "throughput (spark, local[2])", timeout, detectors,
                                         meter, series, module=SPARK_DETECTOR)
    spark.stop()
    shutil.rmtree(overrides["spark_checkpoint"], ignore_errors=True)
    result = {"msgs": msgs, "series": series, "scoring": base["scoring"], "cores": os.cpu_count(),
              "consumer_group": rate, "spark": spark_rate}
    say(f"Spark detector (local[2]): {spark_rate['msgs_per_s']:.0f} msgs/s (first score "
        f"{spark_rate['first_score_s']} s, duplicates {spark_rate['duplicates']}); consumer-group detector "
        f"({workers} workers, exactly-once): {rate['msgs_per_s']:.0f} msgs/s; written to {RESULTS / 'spark.json'}")
    return result


def run_sweep(settings: Settings, model_dir: Path, counts: list[int], scoring: str = "lean") -> dict:
    """The cardinality sweep (services.jobs.bench_sweep) on the input topic's model set."""
    paths = settings.nab_csvs()
    if not paths:
        raise SystemExit(f"no NAB EC2 CSVs under {settings.data_dir}; set ANOMSTREAM_DATA_DIR")
    say(f"sweep: the Scorer in this process, one thread, at {counts} series")
    out = cardinality_sweep(model_dir, settings.model_input, paths, counts, say=say, scoring=scoring)
    say(summary(out) + f" ({out['seconds']:.0f}s)")
    return out


def sweep_keys(swept: dict | None) -> dict:
    """The sweep's figures as the result's keys (series counts as JSON object keys)."""
    if swept is None:
        return {"us_per_msg_by_series": None, "wall_us_per_msg_by_series": None, "state_bytes_per_series": None,
                "rss_bytes_per_series": None}
    return {"us_per_msg_by_series": {str(n): v for n, v in swept["us_per_msg"].items()},
            "wall_us_per_msg_by_series": {str(n): v for n, v in swept["wall_us_per_msg"].items()},
            "state_bytes_per_series": swept["state_bytes_per_series"],
            "rss_bytes_per_series": swept["rss_bytes_per_series"], "rss_series": swept["rss_series"]}


def delete_topics(settings_list: list[Settings]) -> None:
    """On an external cluster, remove this run's topics (a local bench broker is thrown away)."""
    topics = [t for s in settings_list for t in s.topic_partitions()]
    try:
        admin = make_admin(settings_list[0])
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            try:
                future.result()
            except Exception:  # one that was never created
                pass
    except Exception as exc:  # best effort: the numbers are already printed
        say(f"could not delete the bench topics: {exc}")


@click.command("bench", help=verbatim(__doc__), context_settings=CONTEXT)
@click.option("--msgs", type=int, default=200_000, show_default=True, help="messages for the throughput phase")
@click.option("--rate", "offered_rate", type=float, default=10_000, show_default=True,
              help="offered load of the latency phase (msgs/s)")
@click.option("--latency-seconds", type=float, default=10, show_default=True,
              help="measured part of the latency phase")
@click.option("--latency-warmup", type=float, default=5, show_default=True,
              help="seconds offered at --rate before the latency measurement starts")
@click.option("--baseline-msgs", type=int, default=3000, show_default=True,
              help="messages for the batch-size-1 baseline")
@click.option("--workers", "workers_option", type=int, default=None, help="detector workers (default: settings, 3)")
@click.option("--batch-size", "batch_size_option", type=int, default=None,
              help="detector batch size (default: settings)")
@click.option("--model-dir", "model_dir_option", type=PATH, default=None,
              help="model sets to load (default: settings; if missing there, trained in <home>/bench)")
@click.option("--timeout", type=float, default=900, show_default=True,
              help="longest wait for one phase to be scored (s)")
@click.option("--scoring", type=click.Choice(["lean", "design", "all"]), default="lean", show_default=True,
              help="what the detector computes in the main phases (setting `scoring`)")
@click.option("--design/--no-design", "design_phase", default=True, show_default=True,
              help="also measure exactly-once throughput with scoring=design (IsolationForest and LSTM too)")
@click.option("--series", type=int, default=10_000, show_default=True,
              help="distinct series the throughput and latency phases' messages spread over")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="include the cardinality sweep (the Scorer in this process at --sweep-series series)")
@click.option("--sweep-only", is_flag=True, help="run the cardinality sweep alone: no broker, no detector")
@click.option("--sweep-series", default="8,1000,100000", show_default=True,
              help="series counts of the sweep, comma-separated")
@click.option("--spark-only", is_flag=True,
              help="only the Spark detector's throughput (anomstream spark-detect, local[2]) beside the "
                   "consumer-group detector's, on the same backlog of --msgs messages (needs anomstream[spark])")
def command(msgs: int, offered_rate: float, latency_seconds: float, latency_warmup: float, baseline_msgs: int,
            workers_option: int | None, batch_size_option: int | None, model_dir_option: Path | None,
            timeout: float, scoring: str, design_phase: bool, series: int, sweep: bool, sweep_only: bool,
            sweep_series: str, spark_only: bool) -> int:
    if min(msgs, baseline_msgs) < 1 or offered_rate <= 0 or latency_seconds <= 0 or latency_warmup < 0:
        raise click.UsageError("--msgs, --baseline-msgs, --rate and --latency-seconds must be positive")
    if not 1 <= series <= msgs:
        raise click.UsageError("--series must be between 1 and --msgs")
    try:
        sweep_counts = sorted({int(x) for x in sweep_series.split(",") if x.strip()})
    except ValueError:
        raise click.UsageError("--sweep-series: comma-separated series counts, e.g. 8,1000,100000") from None
    if not sweep_counts or sweep_counts[0] < 1:
        raise click.UsageError("--sweep-series: comma-separated positive series counts")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    settings = load_settings()
    workers = workers_option or settings.workers
    batch_size = batch_size_option or settings.batch_size
    work_dir().mkdir(parents=True, exist_ok=True)
    broker: LocalBroker | None = None
    broker_dir: str | None = None
    meter: CpuMeter | None = None
    detectors: list[Detector] = []
    used: list[Settings] = []
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        say(f"load average is {load_start:.2f} as the bench starts: if something else is using the CPU, "
            "the numbers will be lower than on an idle machine")
    try:
        model_dir, trained = ensure_models(model_dir_option or settings.model_dir, model_dir_option is not None,
                                           settings)
        swept = None
        if sweep or sweep_only:
            swept = run_sweep(settings, model_dir, sweep_counts, scoring)
        if sweep_only:
            result = {**sweep_keys(swept), "sweep_cost_ratio": swept["cost_ratio"],
                      "sweep_batch": swept["batch"], "sweep_seconds": swept["seconds"], "cores": os.cpu_count(),
                      "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                      "models": {"dir": str(model_dir), "trained_for_bench": trained}}
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "sweep.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
            print(orjson.dumps(result).decode(), flush=True)
            return 0
        if external:
            bootstrap = settings.bootstrap_servers
            say(f"using the cluster at {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)")
        else:
            broker_dir = tempfile.mkdtemp(prefix="anomstream-bench-kafka-")
            broker = LocalBroker(Path(broker_dir), port=free_port(), controller_port=free_port())
            say(f"starting a local Kafka broker on {broker.bootstrap}")
            broker.start()
            bootstrap = broker.bootstrap
        meter = CpuMeter(broker, detectors)
        meter.start()
        base = {"bootstrap_servers": bootstrap, "model_dir": str(model_dir), "scoring": scoring}
        if spark_only:
            result = spark_comparison(base, msgs, series, timeout, detectors, meter, workers, batch_size, used)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "spark.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
            print(orjson.dumps(result).decode(), flush=True)
            return 0

        # Phases 1 and 2: the detector as configured, in its delivery mode ...
        delivery = settings.delivery
        other = "at_least_once" if delivery == "exactly_once" else "exactly_once"
        overrides = run_overrides(base, uuid.uuid4().hex[:8], workers, batch_size)
        used.append(load_settings(**overrides))  # its topics are deleted at the end on an external cluster
        tp, detector, rate = backlog_phase(overrides, msgs, "r", f"throughput ({delivery})", timeout, detectors,
                                           meter, series, delivery)
        latency = latency_phase(tp, detector, offered_rate, latency_seconds, latency_warmup, timeout,
                                meter, series)
        detector.stop()

        # ... and phase 1 again in the other delivery mode, with a detector of its own.
        overrides = run_overrides(base, uuid.uuid4().hex[:8], workers, batch_size)
        used.append(load_settings(**overrides))
        _, detector_o, rate_o = backlog_phase(overrides, msgs, "o", f"throughput ({other})", timeout, detectors,
                                              meter, series, other)
        detector_o.stop()
        by_mode = {delivery: rate, other: rate_o}
        eos, alo = by_mode["exactly_once"]["msgs_per_s"], by_mode["at_least_once"]["msgs_per_s"]

        # ... and, with --design, exactly-once throughput with the design card's IF and LSTM scored too.
        design = None
        if design_phase and scoring != "design":
            overrides = run_overrides(base | {"scoring": "design"}, uuid.uuid4().hex[:8], workers, batch_size)
            used.append(load_settings(**overrides))
            _, detector_d, design = backlog_phase(overrides, msgs, "d", "throughput (design, exactly_once)",
                                                  timeout, detectors, meter, series, "exactly_once")
            detector_d.stop()

        # Phase 3: the reference design, one message per batch (in the configured delivery mode).
        overrides = run_overrides(base, uuid.uuid4().hex[:8], workers, 1)
        used.append(load_settings(**overrides))
        _, detector_b, base_rate = backlog_phase(overrides, baseline_msgs, "b", "baseline", timeout,
                                                 detectors, meter, series, delivery)
        detector_b.stop()

        result = {
            "msgs": msgs,
            "series": series,
            "scoring": scoring,
            "msgs_per_s": round(rate["msgs_per_s"], 1),
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
            "baseline_msgs_per_s": round(base_rate["msgs_per_s"], 1),
            "speedup": round(rate["msgs_per_s"] / base_rate["msgs_per_s"], 1),
            "steady_msgs_per_s": round(rate["steady_msgs_per_s"], 1),
            "throughput_span_s": round(rate["span_s"], 3),
            "throughput_cpu": rate["cpu"],
            "throughput_restarts": rate["restarts"],
            "throughput_duplicates": rate["duplicates"],
            "input_partitions_per_worker": rate["input_partitions_per_worker"],
            "first_score_s": rate["first_score_s"],
            "worker_rss_mb": rate["worker_rss_mb"],
            "design_msgs_per_s": design and round(design["msgs_per_s"], 1),
            "design_first_score_s": design and design["first_score_s"],
            "design_worker_rss_mb": design and design["worker_rss_mb"],
            **{k: v for k, v in latency.items() if k not in ("p50_ms", "p99_ms")},
            "baseline_msgs": baseline_msgs,
            "baseline_steady_msgs_per_s": round(base_rate["steady_msgs_per_s"], 1),
            "baseline_cpu": base_rate["cpu"],
            "baseline_restarts": base_rate["restarts"],
            "baseline_duplicates": base_rate["duplicates"],
            "baseline_input_partitions_per_worker": base_rate["input_partitions_per_worker"],
            "dead_lettered": rate["dead_lettered"] + base_rate["dead_lettered"],
            # Inputs each worker scored (throughput + latency phases; baseline): a worker with
            # ~0 got no partition of the input topic from the consumer group.
            "scored_per_worker": detector.scored_per_worker(),
            "baseline_scored_per_worker": detector_b.scored_per_worker(),
            "workers": workers,
            "batch_size": batch_size,
            "cores": os.cpu_count(),
            "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "models": {"dir": str(model_dir), "trained_for_bench": trained},
            "broker": "external" if external else "local",
            # Throughput in both delivery modes (msgs_per_s above: the configured one, `delivery`).
            "delivery": delivery,
            "msgs_per_s_exactly_once": round(eos, 1),
            "msgs_per_s_at_least_once": round(alo, 1),
            "exactly_once_ratio": round(eos / alo, 3),
            f"{other}_steady_msgs_per_s": round(rate_o["steady_msgs_per_s"], 1),
            f"{other}_cpu": rate_o["cpu"],
            f"{other}_restarts": rate_o["restarts"],
            f"{other}_duplicates": rate_o["duplicates"],
            f"{other}_scored_per_worker": detector_o.scored_per_worker(),
            # The cardinality sweep (services.jobs.bench_sweep), None with --no-sweep.
            **sweep_keys(swept),
            "sweep_cost_ratio": swept and swept["cost_ratio"],
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bench.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        say(f"targets on this machine ({scoring} scoring, {series} series): exactly-once >= 100000 msgs/s "
            f"({eos:.0f}), at-least-once {alo:.0f} msgs/s (exactly-once {eos / alo:.0%} of it, target >= 80%); "
            f"p99 <= 250 ms at {offered_rate:.0f} msgs/s offered ({result['p99_ms']}; p50 {result['p50_ms']}); "
            f"design card's scoring >= 50000 msgs/s ({result['design_msgs_per_s']}); worker RSS <= 300 MB "
            f"({result['worker_rss_mb']}; design {result['design_worker_rss_mb']}); start to first score <= 5 s "
            f"({result['first_score_s']}); speedup over one message per batch >= 100 ({result['speedup']}); "
            f"written to {RESULTS / 'bench.json'}")
        if swept:
            say(summary(swept))
        print(orjson.dumps(result).decode(), flush=True)
        return 0
    except Stop as exc:
        say(f"stopped by {exc}; cleaning up")
        return 130
    except (ArtifactError, RuntimeError, TimeoutError, KafkaException, subprocess.CalledProcessError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if meter is not None:
            meter.done.set()
        for d in detectors:
            d.stop()
        if external and used:
            delete_topics(used)
        if broker is not None:
            broker.stop()
            say("local Kafka broker stopped")
        if broker_dir:
            try:  # kept for a look after the run: the broker's data folder is removed
                shutil.copyfile(Path(broker_dir) / "broker.log", work_dir() / "broker.log")
            except OSError:
                pass
            shutil.rmtree(broker_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream bench")


if __name__ == "__main__":
    sys.exit(main())
