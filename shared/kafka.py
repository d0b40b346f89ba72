"""Kafka clients built from Settings: the one place that knows librdkafka property names."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from shared.app_logging import librdkafka_logger
from shared.config import Settings


def client_config(settings: Settings, *properties: dict) -> dict:
    """The connection settings, then `properties` (the client's own tuning and guarantees, later
    ones winning), then ANOMSTREAM_KAFKA_EXTRA, which wins over the tuning (the properties the
    guarantees depend on are refused in it: shared.config.GUARANTEE_PROPERTIES). librdkafka's own
    log lines go through the structured logger."""
    conf: dict = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        conf["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username:
        conf["sasl.username"] = settings.sasl_username
    if settings.sasl_password:
        conf["sasl.password"] = settings.sasl_password.get_secret_value()
    if settings.ssl_ca_location:
        conf["ssl.ca.location"] = settings.ssl_ca_location
    for props in properties:
        conf.update(props)
    conf.update(settings.kafka_extra)
    conf["logger"] = librdkafka_logger()
    return conf


# Every consumer reads committed records only: the stream core's exactly-once mode writes its
# outputs in transactions, and a reader must not see those of a transaction that was aborted (or
# is still open). Harmless where nothing is transactional. A property of its own here, so that
# ANOMSTREAM_KAFKA_EXTRA (in client_config) still applies to everything else.
READ_COMMITTED = {"isolation.level": "read_committed"}


def make_producer(settings: Settings, **overrides) -> Producer:
    conf = client_config(settings, {
        # Idempotence gives ordered, de-duplicated retries per partition: a retry after a
        # lost ack does not write the output twice.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        # The dead_letter topic is created with the same max.message.bytes (ensure_topics); a
        # dead letter over it goes out as a bounded summary (shared.stream).
        "message.max.bytes": settings.max_produce_bytes,
    }, overrides)
    return Producer(conf)


class GroupConsumer(Consumer):
    """A Consumer that leaves its group on close() also as a static member (group.instance.id).

    librdkafka's close() keeps a static member in the group until session.timeout.ms (KIP-345), so
    that the same member, started again, takes its partitions back without a rebalance. A service
    that stops on purpose (SIGTERM, its supervisor gone) leaves instead, as a dynamic member does:
    its partitions go to the other members at once, whether or not it comes back. Only a member
    that dies without closing stays, and the copy started in its place under the same id resumes
    its partitions at once (without static membership it waited for the session timeout)."""

    def __init__(self, conf: dict, leave_on_close: bool = True):
        super().__init__(conf)
        self.instance_id: str | None = conf.get("group.instance.id") or None
        self.static = self.instance_id is not None
        self.leave_on_close = leave_on_close
        self.subscribed = False

    def subscribe(self, topics, *args, **kwargs):
        super().subscribe(topics, *args, **kwargs)
        self.subscribed = True

    def unsubscribe(self):
        super().unsubscribe()
        self.subscribed = False

    def leave_group(self, timeout: float = 10) -> None:
        """Unsubscribe (a static member then leaves, librdkafka sends LeaveGroup) and serve the
        revoke, which runs the on_revoke callback as close() would (the stream core commits there)."""
        try:
            self.unsubscribe()
        except KafkaException:  # a fatal state (fenced): nothing to leave
            return
        deadline = time.monotonic() + timeout
        # The revoke is served by a poll; librdkafka sends LeaveGroup once the partitions are given
        # up, and forgets the member id then.
        while (self.assignment() or self.memberid()) and time.monotonic() < deadline:
            self.poll(0.05)  # a message polled now is not handled: the next owner reads it again

    def close(self) -> None:
        try:
            if self.static and self.leave_on_close and self.subscribed:
                self.leave_group()
        finally:
            super().close()


def make_consumer(settings: Settings, group_id: str, instance_id: str | None = None, leave_on_close: bool = True,
                  **overrides) -> GroupConsumer:
    """A consumer of `group_id`; with `instance_id` a static member of it (group_instance_id())."""
    conf = client_config(settings, READ_COMMITTED, {
        "group.id": group_id,
        # Offsets are committed by hand, after the batch's outputs are acknowledged.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        "fetch.max.bytes": 52_428_800,
        "queued.min.messages": 200_000,
        # range balances each topic on its own: every worker gets an input_data partition (the
        # cooperative-sticky balance over both topics together often left one worker without any).
        "partition.assignment.strategy": "range",
    }, {"group.instance.id": instance_id} if instance_id else {}, overrides)
    return GroupConsumer(conf, leave_on_close)


def group_instance_id(settings: Settings, group_id: str, service: str, worker: int | None = None) -> str:
    """The static member id of this copy of `service` in `group_id`: stable across restarts, unique
    per member as long as settings.instance_id differs between copies (its default: the host name).
    The service's name keeps two services that share a group name apart."""
    parts = [group_id, service, settings.instance_id] + ([str(worker)] if worker is not None else [])
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))[:249]  # the broker's rule for the id


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def ensure_topics(settings: Settings, topics: dict[str, int] | None = None, timeout: float = 30) -> None:
    """Create the missing topics (name -> partitions); existing ones are left as they are."""
    topics = settings.topic_partitions() if topics is None else topics
    admin = make_admin(settings)
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(name, num_partitions=parts, replication_factor=settings.replication_factor,
                 config=({"max.message.bytes": str(settings.max_produce_bytes)}
                         if name == settings.topic_dead_letter else {}))
        for name, parts in topics.items()
        if name not in existing
    ]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    # A new topic's metadata and partition leaders reach the client a moment after creation.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        known = admin.list_topics(timeout=timeout).topics
        if all(t.topic in known and not known[t.topic].error and known[t.topic].partitions
               and all(p.leader >= 0 for p in known[t.topic].partitions.values()) for t in missing):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics not visible after creation: {[t.topic for t in missing]}")


@dataclass
class Undelivered:
    """A record the broker did not take, kept whole so it can be sent again or named exactly."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list | None
    error: KafkaError

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}] key={(self.key or b'')[:64]!r}: {self.error.str()}"


class UndeliveredError(KafkaException):
    """Records the broker refused for good (not a timeout); nothing of theirs may be committed."""

    def __init__(self, records: list[Undelivered]):
        self.records = records
        shown = "; ".join(str(r) for r in records[:10])
        more = f" (+{len(records) - 10} more)" if len(records) > 10 else ""
        super().__init__(f"{len(records)} messages failed delivery: {shown}{more}")


# librdkafka gave up after message.timeout.ms (the broker was away): worth sending again.
RESEND_ERRORS = {KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
                 KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_ENOUGH_REPLICAS,
                 KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, KafkaError.LEADER_NOT_AVAILABLE,
                 KafkaError.NOT_LEADER_FOR_PARTITION}


class DeliveryTracker:
    """Counts delivery reports and keeps every record the broker did not take, so that a caller
    can tell that everything it produced is durable."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed: list[Undelivered] = []

    def __call__(self, err, msg) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed.append(Undelivered(msg.topic(), msg.partition(), msg.key(), msg.value(), msg.headers(), err))

    def take_failed(self) -> list[Undelivered]:
        failed, self.failed = self.failed, []
        return failed

    def flush(self, producer: Producer, log=None, timeout: float | None = None, resend: bool = True) -> None:
        """Wait until every record is acknowledged, however long the broker is away (or at most
        `timeout` s, then KafkaException): a record that librdkafka gave up on after its
        message.timeout.ms for a transient reason is sent again (at-least-once: it may have been
        written). Raises UndeliveredError, naming each record, for records refused for good, and
        without `resend` for every record not acknowledged (in a transaction, which must then be
        aborted: nothing may be sent again in it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waited = 0.0
            while producer.flush(5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))) > 0:
                if deadline is not None and time.monotonic() >= deadline:
                    raise KafkaException(f"{len(producer)} messages not acknowledged within {timeout}s")
                waited += 5.0
                if log is not None:
                    log.warning("waiting for the broker to acknowledge outputs", waited_s=waited,
                                outstanding=len(producer))
            failed = self.take_failed()
            if not failed:
                return
            refused = [r for r in failed if r.error.code() not in RESEND_ERRORS or not resend]
            if refused:
                raise UndeliveredError(refused)
            if log is not None:
                log.warning("sending again records the broker did not acknowledge in time", count=len(failed),
                            error=failed[0].error.str(), example=f"{failed[0].topic}[{failed[0].partition}]")
            for r in failed:
                produce(producer, r.topic, r.value, r.key, on_delivery=self, headers=r.headers)


def produce(producer: Producer, topic: str, value: bytes, key: bytes | None = None, **kwargs) -> None:
    """produce() that waits for room when librdkafka's local queue is full instead of failing."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


def send(settings: Settings, topic: str, keys: list[bytes], values: list[bytes], rate: float | None = None,
         log=None) -> int:
    """Produce every message, paced at `rate` msgs/s if given; returns the count acknowledged.
    Raises if any message was not acknowledged by the broker."""
    ensure_topics(settings)
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    start = time.monotonic()
    for i, (key, value) in enumerate(zip(keys, values)):
        if rate:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        produce(producer, topic, value, key, on_delivery=tracker)
        if i % 10000 == 0:
            producer.poll(0)
    tracker.flush(producer)
    elapsed = time.monotonic() - start
    if log:
        log.info("produced", topic=topic, messages=tracker.delivered, seconds=round(elapsed, 3),
                 msgs_per_s=round(tracker.delivered / max(elapsed, 1e-9)))
    return tracker.delivered


class FencedError(RuntimeError):
    """Another consumer joined the group with this one's group.instance.id and took its place, or
    another producer started with this one's transactional.id (exactly-once mode): either way a
    second copy runs under this one's identity, and this one must stop."""


def usable(msg, log) -> bool:
    """False for a consumer event that is not a message (logged); raises on a fatal error."""
    if not msg.error():
        return True
    err = msg.error()
    # librdkafka hands a fatal error to the consumer as an event of code _FATAL, whose own fatal()
    # is false; after it the consumer receives nothing more.
    if err.fatal() or err.code() == KafkaError._FATAL:
        if "group.instance.id" in err.str():
            raise FencedError(f"fenced out of the consumer group: another member joined with this one's "
                              f"group.instance.id (two copies with the same ANOMSTREAM_INSTANCE_ID?): {err.str()}")
        raise RuntimeError(f"fatal consumer error: {err}")
    log.warning("consumer error", error=str(msg.error()))
    return False


def dead_letter(producer: Producer, settings: Settings, msg, reason: str, service: str, tracker) -> None:
    """The original bytes and key, unchanged, with where they came from and why in headers."""
    produce(producer, settings.topic_dead_letter, msg.value(), msg.key(), on_delivery=tracker, headers=[
        ("dlq.error", reason.encode()),
        ("dlq.topic", msg.topic().encode()),
        ("dlq.partition", str(msg.partition()).encode()),
        ("dlq.offset", str(msg.offset()).encode()),
        ("dlq.service", service.encode()),
    ])


# A commit refused because the group rebalanced: the batch's outputs are durable already and the
# new owner re-reads from the last commit, so the worker carries on (at-least-once, no gap).
REBALANCE_COMMIT_ERRORS = {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
                           KafkaError.UNKNOWN_MEMBER_ID}

COORDINATOR_ERRORS = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                      KafkaError.COORDINATOR_NOT_AVAILABLE}

TRANSIENT_PARTITION_ERRORS = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION}


def end_offsets(settings: Settings, topic: str, timeout: float = 10) -> dict[int, int]:
    """partition -> high watermark (the offset the next message will get)."""
    consumer = Consumer(client_config(settings) | READ_COMMITTED | {"group.id": "anomstream-offsets",
                                                                   "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                parts = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
                return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
                        for p in parts}
            except KafkaException as exc:
                # A partition created a moment ago can still answer "not leader" although the
                # metadata already names its leader.
                if exc.args[0].code() not in TRANSIENT_PARTITION_ERRORS or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def record_ends(settings: Settings, topic: str, timeout: float = 30) -> dict[int, int]:
    """partition -> the offset after its last record a read_committed reader sees (its first
    offset when it has none). A consumer that read everything commits this, not the end offset:
    under exactly-once each transaction ends with a commit marker, which takes an offset too."""
    ends = end_offsets(settings, topic, timeout)
    consumer = Consumer(client_config(settings) | READ_COMMITTED | {
        "group.id": "anomstream-offsets", "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        out = {}
        for p, high in ends.items():
            low = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[0]
            out[p], back = low, 16
            while high > low:  # look back from the end, further each time, for a record
                start = max(low, high - back)
                consumer.assign([TopicPartition(topic, p, start)])
                last, deadline = None, time.monotonic() + timeout
                while time.monotonic() < deadline:
                    msg = consumer.poll(1.0)
                    if msg is None:
                        continue
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            break
                        raise KafkaException(msg.error())
                    last = msg.offset()
                else:
                    raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"reading the end of {topic}[{p}]"))
                if last is not None or start == low:
                    out[p] = low if last is None else last + 1
                    break
                back *= 16
        return out
    finally:
        consumer.close()


def caught_up(settings: Settings, group: str, topic: str) -> bool:
    """`group` has committed every record of `topic` (see record_ends)."""
    ends = record_ends(settings, topic)
    committed = committed_offsets(settings, group, topic, ends)
    return all(committed[p] >= o for p, o in ends.items())


def _while_coordinator_moves(call, timeout: float):
    """call(), again while the group's coordinator is moving or still loading (a new group, a
    broker just started: NOT_COORDINATOR), until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as exc:
            if exc.args[0].code() not in COORDINATOR_ERRORS or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def committed_offsets(settings: Settings, group: str, topic: str, partitions, timeout: float = 10) -> dict[int, int]:
    """partition -> the offset `group` has committed (0 when it has committed nothing)."""
    consumer = Consumer(client_config(settings) | READ_COMMITTED | {"group.id": group, "enable.auto.commit": False})
    try:
        tps = _while_coordinator_moves(
            lambda: consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout), timeout)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    finally:
        consumer.close()


def commit_group_offsets(settings: Settings, group: str, topic: str, offsets: dict[int, int],
                         timeout: float = 30) -> None:
    """Set where `group` starts reading `topic` (partition -> offset), before any member joins."""
    consumer = Consumer(client_config(settings) | READ_COMMITTED | {"group.id": group, "enable.auto.commit": False})
    try:
        _while_coordinator_moves(lambda: consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False), timeout)
    finally:
        consumer.close()


def read_topic(settings: Settings, topic: str, start: dict[int, int] | None = None, count: int | None = None,
               timeout: float = 60, idle: float | None = None) -> list:
    """Messages of `topic` from `start` offsets (default: the beginning), without a consumer group:
    stops at `count` messages, after `idle` seconds with nothing new, or at `timeout`."""
    consumer = Consumer(client_config(settings) | READ_COMMITTED | {"group.id": "anomstream-reader",
                                                                   "enable.auto.commit": False})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, (start or {}).get(p, OFFSET_BEGINNING)) for p in parts])
    out = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline and (count is None or len(out) < count):
            batch = [m for m in consumer.consume(10000, 0.2) if not m.error()]
            out.extend(batch)
            if batch:
                last_new = time.monotonic()
            elif idle is not None and time.monotonic() - last_new > idle:
                break
    finally:
        consumer.close()
    return out
