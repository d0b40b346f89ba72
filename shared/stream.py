"""The one consumer loop every service runs on: consume -> process -> produce -> acknowledged ->
state -> commit.

Guarantee (settings.delivery):

- exactly_once (default): the loop's producer is transactional (`transactional.id` stable per
  service instance, `transactional_id`). The first record produced after a commit begins a
  transaction; at the checkpoint the outputs and dead letters are acknowledged in it, the
  processor's `checkpoint` runs (records it produces through `loop.producer` join the same
  transaction), the committable input offsets are sent to the transaction, and it is committed.
  A reader with isolation.level=read_committed (every consumer shared.kafka makes) sees each
  input's outputs exactly once: a crash before the commit leaves an open transaction that the
  restarted instance aborts at init_transactions (fencing the dead one), and the input is read
  again. A transaction that must abort (a record refused, a delivery timeout in a broker outage)
  is aborted and the loop rewinds: the processor drops the assigned partitions' state
  (`on_revoke`), the consumer seeks back to the group's committed offsets and the processor loads
  the state again (`on_assign`). A producer fenced by another with its transactional.id raises
  shared.kafka.FencedError. Side effects outside Kafka (a Slack post) stay at-least-once.
- at_least_once (clusters without transactions): an input's offset is committed only after every
  output and dead letter it caused was acknowledged by the broker (idempotent producer,
  acks=all) and the processor's state that includes it is durable (its `checkpoint`). A crash
  anywhere before the commit means the input is consumed again: never a gap, maybe a repeat.

A service is a `Processor`: it turns a batch of messages into outputs and dead letters and keeps
whatever state it needs; this module owns the Kafka side. The hooks a processor may define:

- `process(messages, now) -> Result` (required): called per consumed batch, and with an empty
  batch when nothing came in if `ticks_when_idle` is true (event-time services close windows).
- `checkpoint()`: make the state durable; called after the outputs are acknowledged and before
  the offsets are committed.
- `committable(read_to) -> read_to`: the offsets that may be committed (a rules window still
  open holds its first message back).
- `on_assign(partitions)`, `on_revoke(partitions)`: restore or drop per-partition state.
- `attach(loop)`: the loop that runs it, e.g. to produce an action's output through its producer
  and tracker, so that output too is acknowledged before the commit.
- `refresh()`: called before every poll (e.g. reload definition files); `topics()` is read after
  it, and the consumer re-subscribes when the set changes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from shared.config import Settings
from shared.kafka import (
    COORDINATOR_ERRORS,
    REBALANCE_COMMIT_ERRORS,
    RESEND_ERRORS,
    DeliveryTracker,
    FencedError,
    UndeliveredError,
    ensure_topics,
    group_instance_id,
    make_consumer,
    make_producer,
    produce,
    usable,
)
from shared.poison import PoisonGuard
from shared.records.dead_letter import MAX_REASON_CHARS, dead_letter_record
from shared.signals import stop_on_signals
from shared.telemetry import (
    ANOMALIES,
    BATCH_SECONDS,
    COMMITS,
    CONSUMED,
    DEAD_LETTERED,
    LAG,
    PRODUCED,
    READY,
    Heartbeat,
    Probe,
    reason_kind,
    serve_http,
)

PROGRESS_EVERY_S = 10.0
LAG_EVERY_S = 5.0  # how often the consumer lag metric is updated (librdkafka's statistics interval)
# Under a backlog (the last batch was full) a checkpoint waits at least this long: each one writes
# every changed series' state and (exactly-once) commits a transaction, and behind a backlog the
# latency a shorter interval buys is lost anyway; the state written per message falls with it.
BACKLOG_CHECKPOINT_S = 1.0
# The broker or the group coordinator away for a while (an outage, a coordinator move).
TRANSIENT_COMMIT_ERRORS = COORDINATOR_ERRORS | {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._WAIT_COORD,
                                                KafkaError._ALL_BROKERS_DOWN, KafkaError.REQUEST_TIMED_OUT}

# Exactly-once mode. Each transactional call waits at most TXN_CALL_TIMEOUT_S; a retriable error
# (the broker or the transaction coordinator away) is retried for TXN_RETRY_FOR_S, then raised.
TXN_CALL_TIMEOUT_S = 10.0
TXN_RETRY_FOR_S = 600.0
# librdkafka does not always honour a transactional call's timeout: after a broker restart
# send_offsets_to_transaction can block for good waiting for a group coordinator it never asks for
# again (librdkafka issues #5456, #5511). A call still running this long after its timeout is
# given up on: the producer is abandoned and a new one with the same transactional.id fences it
# and aborts its transaction.
TXN_HUNG_AFTER_S = TXN_CALL_TIMEOUT_S + 10.0
# A transaction aborted this many times in a row because the broker refused an output for good
# (not a timeout): the batch would be refused forever, so the loop stops as the at-least-once
# mode does at once (UndeliveredError).
MAX_REFUSED_ABORTS = 3
FENCED_ERRORS = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
# Not a refusal of the record itself: a timeout, or the sequence gap an earlier refused record left
# (the transaction after one refused record fails with it once; its abort bumps the epoch).
NOT_REFUSED_ERRORS = RESEND_ERRORS | {KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER}


def refused_for_good(records) -> bool:
    return any(r.error.code() not in NOT_REFUSED_ERRORS for r in records)


def transactional_id(settings: Settings, group: str, processor_name: str, instance_id: str | None = None) -> str:
    """The loop's transactional.id: stable for this instance of the service, so that a worker
    started again in its place fences the dead one's producer and aborts its open transaction
    (init_transactions); unique per instance as the static group.instance.id is. From the group and
    the loop's group.instance.id, else the group, the processor's name and settings.instance_id."""
    base = instance_id or group_instance_id(settings, group, processor_name)
    return base if base.startswith(f"{group}-") else f"{group}-{base}"


class CallHung(KafkaException):
    """A transactional call that did not return long after its timeout; its producer is unusable."""


def bounded(what: str, fn, *args) -> None:
    """fn(*args) in a thread of its own, so that a call librdkafka never returns from (see
    TXN_HUNG_AFTER_S) raises CallHung here instead of stopping the loop; its exception, if any, is
    raised as if called directly. The abandoned thread stays blocked inside the old producer."""
    outcome: list = []

    def run() -> None:
        try:
            fn(*args)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=run, name=f"txn-{what}", daemon=True)
    thread.start()
    hung_after = TXN_HUNG_AFTER_S
    thread.join(hung_after)
    if not outcome:
        raise CallHung(KafkaError(KafkaError._TIMED_OUT, f"{what} did not return {hung_after:.0f} s after it was "
                                  "called (librdkafka ignores its timeout); the producer is abandoned", fatal=True))
    if outcome[0] is not None:
        raise outcome[0]


def _raise_if_fatal(error: KafkaError, transactional_id: str) -> None:
    if not error.fatal():
        return
    if error.code() in FENCED_ERRORS:
        raise FencedError(
            f"producer fenced: another producer started with this one's transactional.id {transactional_id!r} "
            f"(two copies with the same ANOMSTREAM_INSTANCE_ID, or this one stalled and was replaced): "
            f"{error.str()}")
    raise KafkaException(error)


class TransactionalProducer:
    """The loop's producer in exactly-once mode. The first produce() after a commit or abort begins
    the next transaction, so everything produced through it (the loop's outputs and dead letters, a
    processor's own records: a rules action's output, a changelog written at `checkpoint`) is in
    the transaction the input offsets are committed in. Everything else is the wrapped Producer's."""

    def __init__(self, producer, transactional_id: str, log, factory=None):
        self.producer = producer
        self.factory = factory  # makes a new producer with this transactional.id (None: cannot)
        self.transactional_id = transactional_id
        self.log = log
        self.initialized = False
        self.in_transaction = False
        # A produce() refused because the transaction is already in an abortable state (an output
        # the broker refused earlier): the whole transaction is aborted at the checkpoint.
        self.abortable: KafkaException | None = None

    def call(self, what: str, fn, *args) -> None:
        """A transactional call, retried while its error is retriable (for TXN_RETRY_FOR_S); a fatal
        error raises FencedError (or KafkaException); an abortable one is raised for the caller."""
        deadline = time.monotonic() + TXN_RETRY_FOR_S
        while True:
            try:
                bounded(what, fn, *args)
                return
            except CallHung:
                raise
            except KafkaException as exc:
                error = exc.args[0]
                _raise_if_fatal(error, self.transactional_id)
                if error.txn_requires_abort() or not error.retriable() or time.monotonic() > deadline:
                    raise
                self.log.warning(f"{what} failed for now; retrying", error=error.str())

    def init(self) -> None:
        """init_transactions: fences a previous producer with this transactional.id and aborts the
        transaction it left open (a crashed incarnation of this worker)."""
        if not self.initialized:
            self.call("init_transactions", self.producer.init_transactions, TXN_CALL_TIMEOUT_S)
            self.initialized = True

    def renew(self) -> bool:
        """After a fatal error that is not fencing (e.g. the broker's INVALID_TXN_STATE after
        delivery timeouts in an outage): a new producer with the same transactional.id, whose
        init_transactions fences the old one and aborts its transaction."""
        if self.factory is None:
            return False
        self.producer, self.initialized, self.in_transaction, self.abortable = self.factory(), False, False, None
        self.init()
        return True

    def begin(self) -> None:
        self.init()
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            _raise_if_fatal(exc.args[0], self.transactional_id)
            raise
        self.in_transaction = True

    def produce(self, *args, **kwargs) -> None:
        if not self.in_transaction:
            self.begin()
        if self.abortable is not None:
            return  # the transaction is aborted anyway; its inputs are read again
        try:
            self.producer.produce(*args, **kwargs)
        except KafkaException as exc:
            error = exc.args[0]
            _raise_if_fatal(error, self.transactional_id)
            if not (error.txn_requires_abort() or error.code() == KafkaError._STATE):
                raise
            self.abortable = exc

    def __len__(self) -> int:
        return len(self.producer)

    def __getattr__(self, name):
        return getattr(self.producer, name)


@dataclass
class Output:
    """One record to produce; built by its record module's encoder."""

    topic: str
    value: bytes
    key: bytes | None = None


@dataclass
class Result:
    """What a processor made of one batch."""

    outputs: list[Output] = field(default_factory=list)
    dead_letters: list[tuple[object, str]] = field(default_factory=list)  # (message, reason)
    # Set when the processor stopped mid-batch (the alerter on SIGTERM during a Slack retry): the
    # messages from the start that were handled. The loop commits those and stops; the rest are
    # read again on the next start. None: all of them.
    handled: int | None = None
    state_changed: bool = False  # a checkpoint is due even if no offset moved (a closed window)


class Processor:
    """Defaults for the optional hooks; a service overrides what it needs."""

    name = "service"
    stopping = False  # set with the loop's: a long retry inside `process` gives up
    ticks_when_idle = False
    checkpoint_interval_s = 0.0  # 0: make durable and commit after every batch
    batch_size: int | None = None  # None: settings.batch_size

    def topics(self) -> list[str]:
        raise NotImplementedError

    def process(self, messages: list, now: float) -> Result:
        raise NotImplementedError

    def attach(self, loop: "StreamLoop") -> None:
        """Called once by the loop that runs it (e.g. to produce through its producer)."""

    def refresh(self) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def committable(self, read_to: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        return read_to

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        pass

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        pass

    def progress(self) -> dict:
        """Extra figures for the progress log line."""
        return {}

    def close(self) -> None:
        pass


class StreamLoop:
    """Runs one processor on one consumer and one producer until `stopping` is set."""

    def __init__(self, settings: Settings, processor: Processor, group: str, log, producer=None,
                 instance_id: str | None = None):
        self.settings = settings
        self.processor = processor
        self.log = log
        # A static member (shared.kafka.group_instance_id): a restart takes its partitions back at once.
        self.consumer = make_consumer(settings, group, instance_id, **{
            "statistics.interval.ms": int(LAG_EVERY_S * 1000), "stats_cb": self._on_stats})
        # exactly_once: a transactional producer; outputs, dead letters and the input offsets of a
        # batch are committed together (commit_transaction), the consumer commits nothing itself.
        self.exactly_once = settings.delivery == "exactly_once"
        if self.exactly_once:
            txn_id = transactional_id(settings, group, processor.name, instance_id)
            factory = (lambda: make_producer(settings, **{"transactional.id": txn_id})) if producer is None else None
            if producer is None:
                producer = factory()
            self.producer = TransactionalProducer(producer, txn_id, log, factory)
        else:
            self.producer = producer if producer is not None else make_producer(settings)
        self.tracker = DeliveryTracker()
        self.stats: Counter = Counter()
        self.read_to: dict[tuple[str, int], int] = {}  # next offset to read, per partition read so far
        self.committed: dict[tuple[str, int], int] = {}
        self.first_read: dict[tuple[str, int], int] = {}  # first offset read since assigned (rewind target)
        self.revoking: set[tuple[str, int]] = set()  # partitions being revoked: not rewound
        self.revoked_meanwhile: set[tuple[str, int]] = set()  # revoked during the batch in hand
        self.refused_aborts = 0  # transactions aborted in a row for an output refused for good
        self.subscribed: list[str] | None = None
        self.dirty = False  # outputs or state not yet checkpointed
        self.failed = False  # an output was not acknowledged: nothing more may be committed
        self.guard = PoisonGuard(settings.home / "state" / "in_hand" / group)
        self.paused = False  # keep_alive paused the assignment
        self.keeping_alive = False
        self.last_checkpoint = time.monotonic()
        self.backlog = False  # the last batch was full: the input is behind
        self._stopping = False
        self.heartbeat = Heartbeat()  # /healthz: the loop turns
        self.ready = False  # /readyz: subscribed and polling
        processor.attach(self)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        # The processor sees it too: a long retry inside `process` (a Slack outage) gives up.
        self._stopping = value
        self.processor.stopping = value

    # -- one batch ---------------------------------------------------------------------------
    def handle(self, messages: list, now: float) -> None:
        messages = [m for m in messages if usable(m, self.log)]
        if not messages and not self.processor.ticks_when_idle:
            # Input gone quiet: what was handled within the last checkpoint interval is made
            # durable and committed now, not when the next message comes (which may be never).
            if self.dirty and time.monotonic() - self.last_checkpoint >= self.processor.checkpoint_interval_s:
                self.checkpoint()
            return
        # Partitions revoked while `process` ran (only a processor that polls inside it, through
        # keep_alive, serves a rebalance there): their messages are the new owner's to read again.
        self.revoked_meanwhile: set[tuple[str, int]] = set()
        careful, poison = self.guard.begin(messages) if messages else (False, {})
        pills = [m for m in messages if (m.topic(), m.partition(), m.offset()) in poison]
        if pills:
            messages = [m for m in messages if (m.topic(), m.partition(), m.offset()) not in poison]
        if careful:
            self.log.warning("a process died with these messages in hand; taking them one at a time",
                             messages=len(messages))
            result = self.process_one_by_one(messages, now, note=True)
        else:
            started = time.perf_counter()
            try:
                result = self.processor.process(messages, now)
            except Exception:
                self.log.exception("processing a batch failed; retrying its messages one at a time",
                                   messages=len(messages))
                result = self.process_one_by_one(messages, now)
            BATCH_SECONDS.labels(self.processor.name).observe(time.perf_counter() - started)
        if pills and result.handled is None:  # a poison pill is done with once dead-lettered
            for m in pills:
                deaths = poison[(m.topic(), m.partition(), m.offset())]
                result.dead_letters.append((m, f"poison pill: the process died {deaths} times while processing it"))
            messages += pills
        produced: Counter = Counter()
        for out in result.outputs:
            produce(self.producer, out.topic, out.value, out.key, on_delivery=self.tracker)
            produced[out.topic] += 1
        self.count(PRODUCED, produced)
        if produced[self.settings.topic_anomalies]:
            ANOMALIES.labels(self.processor.name).inc(produced[self.settings.topic_anomalies])
        for msg, reason in result.dead_letters:
            self.dead_letter(msg, reason)
        handled = messages if result.handled is None else messages[:result.handled]
        if self.revoked_meanwhile:
            handled = [m for m in handled if (m.topic(), m.partition()) not in self.revoked_meanwhile]
        consumed: Counter = Counter()
        for m in handled:
            tp = (m.topic(), m.partition())
            self.read_to[tp] = max(self.read_to.get(tp, 0), m.offset() + 1)
            self.first_read.setdefault(tp, m.offset())
            consumed[tp[0]] += 1
        self.count(CONSUMED, consumed)
        self.stats["consumed"] += len(handled)
        self.stats["produced"] += len(result.outputs)
        if handled or result.outputs or result.dead_letters or result.state_changed:
            self.dirty = True
        if result.handled is not None:
            self.stopping = True  # a later commit past the unhandled messages would leave a gap
        interval = self.processor.checkpoint_interval_s
        if self.backlog and interval > 0:  # a processor that checkpoints every batch keeps doing so
            interval = max(interval, BACKLOG_CHECKPOINT_S)
        if self.dirty and (self.stopping or time.monotonic() - self.last_checkpoint >= interval):
            self.checkpoint()

    def count(self, metric, by_topic: Counter) -> None:
        for topic, n in by_topic.items():
            metric.labels(self.processor.name, topic).inc(n)

    def _on_stats(self, stats_json: str) -> None:
        """librdkafka's statistics (every LAG_EVERY_S, served by the consumer's poll) -> the lag metric
        of each partition it fetches."""
        try:
            stats = orjson.loads(stats_json)
            for topic, t in stats.get("topics", {}).items():
                for partition, p in t.get("partitions", {}).items():
                    # The end a read_committed reader can reach (last stable offset) less the position
                    # (librdkafka's own consumer_lag counts from the committed offset, which a
                    # transaction commits without this consumer knowing).
                    end, position = p.get("ls_offset", -1), p.get("app_offset", -1)
                    if position < 0:  # nothing read since the assignment: from the group's commit
                        position = p.get("committed_offset", -1)
                    if partition != "-1" and p.get("fetch_state") == "active" and end >= 0 and position >= 0:
                        LAG.labels(self.processor.name, topic, partition).set(max(end - position, 0))
        except Exception:  # noqa: BLE001 - a metric must never stop the loop
            pass

    def process_one_by_one(self, messages: list, now: float, note: bool = False) -> Result:
        """After a batch raised: each message on its own, so only the one that raises (a poison
        pill) is dead-lettered with the exception, and the partition moves on. Work the failed
        batch call did before raising may be done again: at-least-once. With `note`, each message
        is noted on disk before it starts (shared.poison), for the process that may die on it."""
        merged = Result()
        for i, m in enumerate(messages):
            if note:
                self.guard.at(m)
            try:
                one = self.processor.process([m], now)
            except Exception as exc:
                self.log.exception("processing a message failed; dead-lettered", topic=m.topic(),
                                   partition=m.partition(), offset=m.offset())
                merged.dead_letters.append((m, f"processing failed: {type(exc).__name__}: {exc}"))
                self.stats["processing_failures"] += 1
                continue
            merged.outputs += one.outputs
            merged.dead_letters += one.dead_letters
            merged.state_changed |= one.state_changed
            if one.handled is not None:
                merged.handled = i + one.handled
                break
        if note:
            self.guard.clear_at(messages)
        return merged

    def dead_letter(self, msg, reason: str) -> None:
        """The original bytes and key, unchanged, with where they came from and why in headers; a
        message too large to write again (over max_produce_bytes) as a bounded summary."""
        value, key, headers, summarised = dead_letter_record(
            msg.value(), msg.key(), reason, msg.topic(), msg.partition(), msg.offset(), self.processor.name,
            self.settings.max_produce_bytes)
        if summarised:
            self.stats["dead_letter_summaries"] += 1
        produce(self.producer, self.settings.topic_dead_letter, value, key, on_delivery=self.tracker,
                headers=headers)
        self.log.warning("dead-lettered", topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                         reason=reason[:MAX_REASON_CHARS])
        self.stats["dead_lettered"] += 1
        DEAD_LETTERED.labels(self.processor.name, reason_kind(reason)).inc()

    def checkpoint(self) -> None:
        """Outputs acknowledged -> processor state durable -> offsets committed."""
        if self.failed:
            return
        if self.exactly_once:
            self.checkpoint_transaction()
            return
        try:
            self.tracker.flush(self.producer, self.log)  # raises if an output was refused for good
        except Exception:
            # Nothing from here on is committed, not even by the revoke that closing the consumer
            # runs: the unacknowledged outputs' inputs are read again after the restart.
            self.failed = True
            raise
        self.processor.checkpoint()
        self.dirty, self.last_checkpoint = False, time.monotonic()
        self.commit()

    def commit(self) -> None:
        if self.exactly_once:
            self.commit_transaction()
            return
        allowed = self.processor.committable(self.read_to)
        offsets = [TopicPartition(t, p, o) for (t, p), o in allowed.items() if o > self.committed.get((t, p), -1)]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in REBALANCE_COMMIT_ERRORS:
                # The outputs are durable already; the partition's new owner re-reads from the last commit.
                self.log.warning("commit refused by a rebalance; the new owner re-reads the batch", error=str(error))
                self.stats["commits_lost_to_rebalance"] += 1
                return
            if error.retriable() or error.code() in TRANSIENT_COMMIT_ERRORS:
                # The broker or the group coordinator is away: the next commit (cumulative) or the
                # one at revoke/stop carries these offsets; a crash meanwhile only re-reads.
                self.log.warning("commit failed for now; the next one carries it", error=str(error))
                self.stats["commits_deferred"] += 1
                return
            raise
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset
        self.guard.committed({(tp.topic, tp.partition): tp.offset for tp in offsets})
        self.stats["commits"] += 1
        COMMITS.labels(self.processor.name).inc()

    # -- exactly-once: one transaction per checkpoint ---------------------------------------------
    def checkpoint_transaction(self) -> None:
        """Outputs and dead letters acknowledged in the open transaction -> processor state durable
        (records it produces now join the transaction) -> the input offsets sent to the transaction
        -> commit_transaction. A transaction that cannot commit is aborted and its inputs read
        again (rewind)."""
        try:
            self.tracker.flush(self.producer, self.log, resend=False)
        except UndeliveredError as exc:
            self.abort(exc, refused_for_good(exc.records))
            return
        if self.producer.abortable is not None:
            self.abort(self.producer.abortable)
            return
        self.processor.checkpoint()
        self.dirty, self.last_checkpoint = False, time.monotonic()
        self.commit_transaction()

    def commit_transaction(self) -> None:
        allowed = self.processor.committable(self.read_to)
        offsets = [TopicPartition(t, p, o) for (t, p), o in allowed.items() if o > self.committed.get((t, p), -1)]
        if not offsets and not self.producer.in_transaction:
            return
        if self.producer.abortable is not None:
            self.abort(self.producer.abortable)
            return
        try:
            if not self.producer.in_transaction:
                self.producer.begin()
            if offsets:
                # Not retried in place: after an outage the group may need this member to poll
                # (rejoin) before it takes the offsets, and a retry that waits for that never ends.
                # Any failure aborts the transaction; its inputs are read again.
                try:
                    bounded("send_offsets_to_transaction", self.producer.send_offsets_to_transaction, offsets,
                            self.consumer.consumer_group_metadata(), TXN_CALL_TIMEOUT_S)
                except CallHung as exc:
                    self.abort(exc)
                    return
                except KafkaException as exc:
                    _raise_if_fatal(exc.args[0], self.producer.transactional_id)
                    self.abort(exc)
                    return
            self.producer.call("commit_transaction", self.producer.commit_transaction, TXN_CALL_TIMEOUT_S)
        except CallHung as exc:
            self.abort(exc)
            return
        except FencedError:
            self.failed = True  # nothing more may be committed, not even by the revoke at close
            raise
        except KafkaException as exc:
            if not (exc.args[0].txn_requires_abort() or exc.args[0].fatal()):
                raise
            self.abort(exc, refused_for_good(self.tracker.failed))
            return
        self.producer.in_transaction = False
        self.tracker.take_failed()
        self.refused_aborts = 0
        self.stats["transactions"] += 1
        if not offsets:
            return
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset
        self.guard.committed({(tp.topic, tp.partition): tp.offset for tp in offsets})
        self.stats["commits"] += 1
        COMMITS.labels(self.processor.name).inc()

    def abort(self, reason: Exception, refused: bool = False) -> None:
        """Abort the open transaction (none of its records is ever visible to a read_committed
        reader) and rewind to the last committed offsets, so its inputs are processed again."""
        self.log.warning("transaction aborted; its inputs are read again from the last commit", reason=str(reason))
        try:
            fatal = isinstance(reason, KafkaException) and reason.args and isinstance(reason.args[0], KafkaError) \
                and reason.args[0].fatal()
            if fatal:
                raise reason
            self.producer.call("abort_transaction", self.producer.abort_transaction, TXN_CALL_TIMEOUT_S)
        except FencedError:
            self.failed = True
            raise
        except KafkaException as exc:
            if not exc.args[0].fatal() or not self.producer.renew():
                self.failed = True
                raise
            self.log.warning("the producer failed for good; a new one with its transactional.id aborted the "
                             "transaction", error=str(exc))
            self.stats["producers_renewed"] += 1
        self.producer.in_transaction, self.producer.abortable = False, None
        self.producer.poll(0)  # the delivery reports of the records the abort purged ...
        self.tracker.take_failed()  # ... are not the next transaction's failures
        self.dirty = False
        self.stats["transactions_aborted"] += 1
        self.refused_aborts = self.refused_aborts + 1 if refused else 0
        if self.refused_aborts >= MAX_REFUSED_ABORTS:
            # Refused again and again (too large for the topic, not authorized): stop, as the
            # at-least-once mode does at the first refusal; the inputs are read again after a restart.
            self.failed = True
            raise reason if isinstance(reason, KafkaException) else KafkaException(KafkaError._FAIL, str(reason))
        self.rewind()

    def rewind(self) -> None:
        """After an abort: the processor drops the assigned partitions' state (on_revoke), the
        consumer goes back to the offsets the group committed (asked of the broker), and the
        processor loads their state again (on_assign), as after a rebalance. Partitions being
        revoked are left to their next owner."""
        partitions = [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) not in self.revoking]
        if not partitions:
            return
        keys = {(tp.topic, tp.partition) for tp in partitions}
        read = {k: self.first_read[k] for k in keys if k in self.first_read}
        self.processor.on_revoke(partitions)
        for k in keys:
            self.read_to.pop(k, None)
            self.committed.pop(k, None)
            self.first_read.pop(k, None)
        committed = self.broker_committed([TopicPartition(t, p) for t, p in read]) if read else []
        for tp in committed:
            key = (tp.topic, tp.partition)
            offset = tp.offset if tp.offset >= 0 else read.get(key, OFFSET_BEGINNING)
            if tp.offset >= 0:
                self.committed[key] = tp.offset
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        self.processor.on_assign(partitions)
        self.log.warning("rewound to the last committed offsets; the processor reloaded its state",
                         partitions=sorted(f"{t}[{p}]@{self.committed.get((t, p), read.get((t, p)))}" for t, p in read))
        self.stats["rewinds"] += 1

    def broker_committed(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The group's committed offsets, asked of the broker; retried while it is away."""
        deadline = time.monotonic() + TXN_RETRY_FOR_S
        while True:
            try:
                return self.consumer.committed(partitions, timeout=TXN_CALL_TIMEOUT_S)
            except KafkaException as exc:
                error = exc.args[0]
                if not (error.retriable() or error.code() in TRANSIENT_COMMIT_ERRORS) or time.monotonic() > deadline:
                    raise
                self.log.warning("reading the committed offsets failed for now; retrying", error=error.str())
                time.sleep(1.0)

    # -- group membership --------------------------------------------------------------------
    def keep_alive(self) -> None:
        """For a processor that waits long inside `process` (the alerter while Slack is down):
        pause the assignment and poll, so this member stays in the group past
        max.poll.interval.ms and rebalances are served. The next poll resumes the partitions at
        the position after the batch in hand: nothing is skipped or read twice."""
        self.keeping_alive = True
        try:
            self.consumer.pause(self.consumer.assignment())
            msg = self.consumer.poll(0)
            if msg is not None and not msg.error():  # a partition assigned meanwhile: read it later
                self.consumer.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
            self.paused = True
        finally:
            self.keeping_alive = False

    def _on_assign(self, _consumer, partitions) -> None:
        if self.keeping_alive:
            self.consumer.pause(partitions)
        self.processor.on_assign(partitions)

    def _on_revoke(self, _consumer, partitions) -> None:
        # What was read so far is made durable (exactly_once: the open transaction committed) while
        # the partitions are still ours.
        self.revoking = {(tp.topic, tp.partition) for tp in partitions}
        self.revoked_meanwhile |= self.revoking
        try:
            self.finish()
        finally:
            self.revoking = set()
        for tp in partitions:
            self.read_to.pop((tp.topic, tp.partition), None)
            self.committed.pop((tp.topic, tp.partition), None)
            self.first_read.pop((tp.topic, tp.partition), None)
        self.processor.on_revoke(partitions)

    def _subscribe(self) -> None:
        topics = sorted(self.processor.topics())
        if topics == self.subscribed:
            return
        if topics:
            self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        elif self.subscribed:
            self.consumer.unsubscribe()
        self.subscribed = topics

    # -- the loop ----------------------------------------------------------------------------
    def serve(self, **ready) -> None:
        """Run as a service's main loop: SIGTERM / Ctrl-C finish the batch, make it durable, commit
        and stop; `ready` goes into the start-up log line."""
        stop_on_signals(self)
        server = serve_http(self.settings.http_port, self.probe(), host=self.settings.http_host, log=self.log)
        self.log.info(f"{self.processor.name} ready", topics=self.processor.topics(), **ready)
        try:
            self.run()
        finally:
            if server is not None:
                server.shutdown()

    def probe(self) -> Probe:
        return Probe(self.heartbeat.alive, lambda: self.ready and not self.stopping)

    def run(self) -> None:
        s = self.settings
        ensure_topics(s)
        if self.exactly_once:
            self.producer.init()  # fences a dead incarnation and aborts its open transaction
        batch_size = self.processor.batch_size or s.batch_size
        last_report = time.monotonic()
        try:
            while not self.stopping:
                self.processor.refresh()
                self._subscribe()
                if self.paused:
                    self.consumer.resume(self.consumer.assignment())
                    self.paused = False
                if self.subscribed:
                    msgs = self.next_batch(batch_size)
                    if not self.ready:
                        self.ready = True
                        READY.labels(self.processor.name).set(1)
                else:
                    msgs = []
                    time.sleep(s.poll_timeout_s)
                self.handle(msgs, time.monotonic())
                self.heartbeat.beat()
                if time.monotonic() - last_report > PROGRESS_EVERY_S:
                    self.log.info("progress", **self.figures())
                    last_report = time.monotonic()
            self.finish()
        except FencedError:
            self.failed = True  # the revoke that closing the consumer runs commits nothing
            raise
        finally:
            self.ready = False
            READY.labels(self.processor.name).set(0)
            try:
                self.consumer.close()
            finally:
                self.abandon_transaction()
                self.processor.close()
                self.log.info("stream loop stopped", processor=self.processor.name, **self.figures())

    def next_batch(self, batch_size: int) -> list:
        """Adaptive batching: wait (up to poll_timeout_s) for the first message only, then take
        what the client already holds, up to batch_size, without waiting. Light input goes out in
        small batches at once (no fixed poll wait in a message's latency); under a backlog the
        client holds plenty and the batches are full."""
        first = self.consumer.consume(1, self.settings.poll_timeout_s)
        if not first or batch_size == 1:
            self.backlog = False
            return first
        batch = first + self.consumer.consume(batch_size - 1, 0)
        self.backlog = len(batch) == batch_size
        return batch

    def finish(self) -> None:
        """Checkpoint what is pending; retry a commit an earlier rebalance refused."""
        if self.dirty:
            self.checkpoint()
        elif not self.failed:
            self.commit()

    def abandon_transaction(self) -> None:
        """On the way out after an error: abort a transaction left open (best effort; a successor
        with this transactional.id aborts it anyway at its init_transactions)."""
        if not (self.exactly_once and self.producer.in_transaction):
            return
        try:
            self.producer.abort_transaction(TXN_CALL_TIMEOUT_S)
            self.producer.in_transaction = False
        except KafkaException as exc:
            self.log.warning("could not abort the open transaction on the way out", error=str(exc))

    def figures(self) -> dict:
        return dict(self.stats) | self.processor.progress()
