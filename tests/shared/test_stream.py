"""The stream core's order and bookkeeping, with a fake consumer and producer that record every call
in one journal: outputs and dead letters produced -> all acknowledged -> processor checkpoint ->
offsets committed (exactly_once, the default: sent to the transaction and committed with it;
at_least_once: the consumer's commit); a commit refused by a rebalance is survived; what a
processor did not handle or still holds back is not committed; a transaction that must abort
rewinds the consumer to the last commit."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import tempfile
import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from helpers import FakeMsg

from shared.app_logging import setup_logging
from shared.config import Settings
from shared.kafka import FencedError, UndeliveredError, produce
from shared.stream import Output, Processor, Result, StreamLoop, transactional_id


class Journal(list):
    """The calls, in order; `stored` holds the offsets committed to the (fake) broker."""

    def __init__(self):
        super().__init__()
        self.stored: dict[tuple[str, int], int] = {}


class FakeProducer:
    """Acknowledges a message only at flush(), as a broker would some time after produce();
    `fail` is the error of the next `failures` delivery reports."""

    def __init__(self, journal: Journal, fail: int | None = None, failures: int = 10**9):
        self.journal, self.fail, self.failures, self.pending = journal, fail, failures, []
        self.calls: list[str] = []  # the transactional calls
        self.commit_errors: list[KafkaError] = []  # raised by the next commit_transaction calls
        self.sent: list = []

    def init_transactions(self, timeout=None):
        self.calls.append("init")

    def begin_transaction(self):
        assert "init" in self.calls
        self.calls.append("begin")
        self.sent = []

    def send_offsets_to_transaction(self, offsets, metadata, timeout=None):
        assert metadata == "group-metadata"
        self.sent = sorted((tp.topic, tp.partition, tp.offset) for tp in offsets)

    def commit_transaction(self, timeout=None):
        if self.pending:
            self.flush()
        if self.commit_errors:
            raise KafkaException(self.commit_errors.pop(0))
        self.calls.append("commit")
        self.journal.append(("commit", self.sent))
        self.journal.stored |= {(t, p): o for t, p, o in self.sent}

    def abort_transaction(self, timeout=None):
        self.calls.append("abort")
        self.pending = []
        self.journal.append(("abort",))

    def produce(self, topic, value=None, key=None, on_delivery=None, headers=None):
        self.journal.append(("produce", topic, value, tuple(headers or ())))
        self.pending.append((on_delivery, FakeMsg(value, key=key, topic=topic)))

    def poll(self, timeout=0):
        return 0

    def __len__(self):
        return len(self.pending)

    def flush(self, timeout=None):
        pending, self.pending = self.pending, []
        for callback, msg in pending:
            error = None
            if self.fail is not None and self.failures > 0:
                error, self.failures = KafkaError(self.fail), self.failures - 1
            callback(error, msg)
        self.journal.append(("acknowledged", len(pending)))
        return 0


class FakeConsumer:
    def __init__(self, journal: Journal, refuse: int | None = None):
        self.journal, self.refuse = journal, refuse
        self.assigned = [TopicPartition("in", 0), TopicPartition("in", 2)]

    def commit(self, offsets=None, asynchronous=True):
        assert asynchronous is False
        if self.refuse is not None:
            raise KafkaException(KafkaError(self.refuse))
        self.journal.append(("commit", sorted((tp.topic, tp.partition, tp.offset) for tp in offsets)))
        self.journal.stored |= {(tp.topic, tp.partition): tp.offset for tp in offsets}

    def consumer_group_metadata(self):
        return "group-metadata"

    def assignment(self):
        return list(self.assigned)

    def committed(self, partitions, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self.journal.stored.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def seek(self, tp):
        self.journal.append(("seek", tp.topic, tp.partition, tp.offset))

    def close(self):
        pass


class Doubler(Processor):
    """Writes each value twice to `out`; a message b"bad" is dead-lettered; stops handling at b"stop"."""

    name = "doubler"

    def __init__(self, journal: Journal, hold: dict | None = None):
        self.journal, self.hold = journal, hold or {}

    def topics(self):
        return ["in"]

    def process(self, messages, now):
        result = Result()
        for i, m in enumerate(messages):
            if m.value() == b"stop":
                result.handled = i
                break
            if m.value() == b"bad":
                result.dead_letters.append((m, "not a number"))
                continue
            result.outputs.append(Output("out", m.value() * 2, m.key()))
        return result

    def checkpoint(self):
        self.journal.append(("checkpoint",))

    def committable(self, read_to):
        return {tp: min(o, self.hold.get(tp, o)) for tp, o in read_to.items()}

    trace_membership = False  # journal on_assign / on_revoke too

    def on_assign(self, partitions):
        if self.trace_membership:
            self.journal.append(("on_assign", sorted((tp.topic, tp.partition) for tp in partitions)))

    def on_revoke(self, partitions):
        if self.trace_membership:
            self.journal.append(("on_revoke", sorted((tp.topic, tp.partition) for tp in partitions)))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_loop(processor, journal, fail=None, refuse=None, failures=10**9, **overrides) -> StreamLoop:
    overrides.setdefault("delivery", "exactly_once")  # the tests of the transactional path name no mode
    settings = Settings(bootstrap_servers=f"127.0.0.1:{closed_port()}", topic_dead_letter="dlq", instance_id="instance",
                        home=overrides.pop("home", None) or tempfile.mkdtemp(), **overrides)
    loop = StreamLoop(settings, processor, "g", setup_logging(settings, "test"),
                      producer=FakeProducer(journal, fail, failures))
    loop.consumer.close()
    loop.consumer = FakeConsumer(journal, refuse)
    return loop


def msgs(*values, partition=0, start=10):
    return [FakeMsg(v, key=b"k", topic="in", partition=partition, offset=start + i) for i, v in enumerate(values)]


BOTH_MODES = pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])


@BOTH_MODES
def test_outputs_acknowledged_then_checkpoint_then_commit(delivery):
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, delivery=delivery)
    loop.handle(msgs(b"1", b"bad", b"3"), 0.0)
    assert [e[0] for e in journal] == ["produce", "produce", "produce", "acknowledged", "checkpoint", "commit"]
    assert [e[2] for e in journal if e[0] == "produce"] == [b"11", b"33", b"bad"]  # outputs, then dead letters
    assert journal[-1] == ("commit", [("in", 0, 13)])  # the next offset to read
    assert loop.stats["consumed"] == 3 and loop.stats["dead_lettered"] == 1 and loop.stats["produced"] == 2


def test_dead_letter_keeps_the_bytes_and_says_why_and_where_from():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal)
    loop.handle(msgs(b"bad", partition=2, start=17), 0.0)
    (_, topic, value, headers), = [e for e in journal if e[0] == "produce"]
    assert topic == "dlq" and value == b"bad"
    assert dict(headers) == {"dlq.error": b"not a number", "dlq.topic": b"in", "dlq.partition": b"2",
                             "dlq.offset": b"17", "dlq.service": b"doubler"}


def test_an_output_the_broker_refused_stops_the_commit():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, fail=KafkaError.TOPIC_AUTHORIZATION_FAILED, delivery="at_least_once")
    with pytest.raises(KafkaException, match="failed delivery"):
        loop.handle(msgs(b"1"), 0.0)
    assert not [e for e in journal if e[0] in ("checkpoint", "commit")]


def test_a_commit_refused_by_a_rebalance_is_survived():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, refuse=KafkaError.REBALANCE_IN_PROGRESS, delivery="at_least_once")
    loop.handle(msgs(b"1"), 0.0)
    assert loop.stats["commits_lost_to_rebalance"] == 1 and ("checkpoint",) in journal


def test_a_commit_that_fails_while_the_broker_is_away_is_carried_by_the_next_one():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, refuse=KafkaError._TRANSPORT, delivery="at_least_once")
    loop.handle(msgs(b"1"), 0.0)
    assert loop.stats["commits_deferred"] == 1
    loop.consumer.refuse = None
    loop.handle(msgs(b"2", start=11), 0.0)
    assert journal[-1] == ("commit", [("in", 0, 12)])


def test_other_commit_errors_are_raised():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, refuse=KafkaError.GROUP_AUTHORIZATION_FAILED, delivery="at_least_once")
    with pytest.raises(KafkaException):
        loop.handle(msgs(b"1"), 0.0)


@BOTH_MODES
def test_messages_not_handled_are_not_committed(delivery):
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, delivery=delivery)
    loop.handle(msgs(b"1", b"stop", b"3"), 0.0)
    assert journal[-1] == ("commit", [("in", 0, 11)])  # "stop" (offset 11) is read again
    assert loop.stats["consumed"] == 1


@BOTH_MODES
def test_a_held_offset_is_committed_once_released(delivery):
    journal = Journal()
    processor = Doubler(journal, hold={("in", 0): 11})
    loop = make_loop(processor, journal, delivery=delivery)
    loop.handle(msgs(b"1", b"2", b"3"), 0.0)
    assert journal[-1] == ("commit", [("in", 0, 11)])
    processor.hold = {}
    loop.handle(msgs(b"4", start=13), 0.0)
    assert journal[-1] == ("commit", [("in", 0, 14)])


@BOTH_MODES
def test_checkpoint_interval_batches_the_commits_and_a_revoke_checkpoints_at_once(delivery):
    journal = Journal()
    processor = Doubler(journal)
    processor.checkpoint_interval_s = 3600
    loop = make_loop(processor, journal, delivery=delivery)
    loop.handle(msgs(b"1"), 0.0)
    loop.handle(msgs(b"2", start=11), 0.0)
    assert not [e for e in journal if e[0] in ("checkpoint", "commit")]
    loop._on_revoke(None, [TopicPartition("in", 0)])
    assert [e[0] for e in journal][-3:] == ["acknowledged", "checkpoint", "commit"]
    assert journal[-1] == ("commit", [("in", 0, 12)])
    assert loop.read_to == {}  # the partition is no longer ours


@BOTH_MODES
def test_a_quiet_input_commits_what_was_handled_once_the_interval_has_passed(delivery):
    """The last batches before the input goes quiet are committed by the empty polls that follow,
    not left until the next message (a detector that read its whole backlog committed all of it)."""
    journal = Journal()
    processor = Doubler(journal)
    processor.checkpoint_interval_s = 0.05
    loop = make_loop(processor, journal, delivery=delivery)
    loop.handle(msgs(b"1"), 0.0)
    loop.handle([], 0.0)
    assert not [e for e in journal if e[0] == "commit"], "not before the interval"
    time.sleep(0.06)
    loop.handle([], 0.0)
    assert journal[-1] == ("commit", [("in", 0, 11)])


def test_stopping_reaches_the_processor():
    journal = Journal()
    processor = Doubler(journal)
    loop = make_loop(processor, journal)
    loop.stopping = True
    assert processor.stopping is True


def test_after_a_refused_output_not_even_the_revoke_commits():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, fail=KafkaError.MSG_SIZE_TOO_LARGE, delivery="at_least_once")
    with pytest.raises(KafkaException):
        loop.handle(msgs(b"1"), 0.0)
    loop.producer.fail = None
    loop._on_revoke(None, [TopicPartition("in", 0)])  # what closing the consumer runs
    assert not [e for e in journal if e[0] in ("checkpoint", "commit")]


def test_a_batch_stopped_midway_stops_the_loop():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal)
    loop.handle(msgs(b"1", b"stop", b"3"), 0.0)
    assert loop.stopping  # reading on would commit past "stop" later


def test_a_commit_refused_by_a_rebalance_is_retried_at_revoke():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, refuse=KafkaError.REBALANCE_IN_PROGRESS, delivery="at_least_once")
    loop.handle(msgs(b"1"), 0.0)
    loop.consumer.refuse = None
    loop._on_revoke(None, [TopicPartition("in", 0)])
    assert journal[-1] == ("commit", [("in", 0, 11)])


def test_records_that_timed_out_in_a_broker_outage_are_sent_again_not_fatal():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, fail=KafkaError._MSG_TIMED_OUT, failures=2, delivery="at_least_once")
    loop.handle(msgs(b"1", b"2"), 0.0)
    sent = [e[2] for e in journal if e[0] == "produce"]
    assert sent == [b"11", b"22", b"11", b"22"]  # both again, after librdkafka gave up on them
    assert journal[-1] == ("commit", [("in", 0, 12)])


def test_a_refused_record_is_named_in_the_error():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, fail=KafkaError.TOPIC_AUTHORIZATION_FAILED, delivery="at_least_once")
    with pytest.raises(UndeliveredError) as info:
        loop.handle(msgs(b"7"), 0.0)
    (record,) = info.value.records
    assert (record.topic, record.value, record.key) == ("out", b"77", b"k")
    assert "out[" in str(info.value)


def test_a_message_too_large_to_write_again_is_dead_lettered_as_a_bounded_summary():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, max_produce_bytes=16 * 1024)
    big = b"x" * 50_000
    processor = loop.processor
    processor.process = lambda messages, now: Result(dead_letters=[(m, "too large: " + "k" * 5000) for m in messages])
    loop.handle(msgs(big), 0.0)
    (_, topic, value, headers), = [e for e in journal if e[0] == "produce"]
    headers = dict(headers)
    assert topic == "dlq" and len(value) < 4096 and headers["dlq.summary"] == b"true"
    summary = json.loads(value)
    assert summary["size"] == 50_000 and summary["sha256"] == hashlib.sha256(big).hexdigest()
    assert base64.b64decode(summary["prefix_base64"]) == big[:1024]
    assert (summary["topic"], summary["partition"], summary["offset"]) == ("in", 0, 10)
    assert len(headers["dlq.error"]) < 1100  # a reason quoting a huge name stays bounded
    assert journal[-1] == ("commit", [("in", 0, 11)])  # and the partition moves on


@BOTH_MODES
def test_a_message_that_makes_processing_raise_is_dead_lettered_and_the_rest_scored(delivery):
    journal = Journal()
    processor = Doubler(journal)
    real = processor.process

    def process(messages, now):
        if any(m.value() == b"boom" for m in messages):
            raise ZeroDivisionError("division by zero")
        return real(messages, now)

    processor.process = process
    loop = make_loop(processor, journal, delivery=delivery)
    loop.handle(msgs(b"1", b"boom", b"3"), 0.0)
    produced = [(e[1], e[2]) for e in journal if e[0] == "produce"]
    assert produced == [("out", b"11"), ("out", b"33"), ("dlq", b"boom")]
    (headers,) = [dict(e[3]) for e in journal if e[0] == "produce" and e[1] == "dlq"]
    assert headers["dlq.error"] == b"processing failed: ZeroDivisionError: division by zero"
    assert journal[-1] == ("commit", [("in", 0, 13)])


@BOTH_MODES
def test_a_message_the_process_dies_on_is_dead_lettered_after_two_deaths(tmp_path, delivery):
    """Each 'process' is a new loop (a new token) on the same data directory; dying = leaving the
    loop without a commit, as a crash (os._exit, out of memory) would."""
    payloads = (b"1", b"2", b"kill", b"4")

    def attempt(die_on: bytes | None) -> Journal:
        journal = Journal()
        processor = Doubler(journal)
        real = processor.process

        def process(messages, now):
            if any(m.value() == die_on for m in messages):
                raise SystemExit("the process dies")  # not an Exception: nothing catches it
            return real(messages, now)

        processor.process = process
        loop = make_loop(processor, journal, home=str(tmp_path), delivery=delivery)
        try:
            loop.handle(msgs(*payloads), 0.0)
        except SystemExit:
            pass
        return journal

    for _ in range(2):  # dies twice on the batch
        assert not [e for e in attempt(b"kill") if e[0] == "commit"]
    third = attempt(b"kill")  # taken one at a time; dies on "kill" after noting it
    assert not [e for e in third if e[0] == "commit"]
    fourth = attempt(b"kill")  # "kill" is dead-lettered, the others processed, the batch committed
    produced = [(e[1], e[2]) for e in fourth if e[0] == "produce"]
    assert produced == [("out", b"11"), ("out", b"22"), ("out", b"44"), ("dlq", b"kill")]
    (headers,) = [dict(e[3]) for e in fourth if e[0] == "produce" and e[1] == "dlq"]
    assert headers["dlq.error"].startswith(b"poison pill: the process died")
    assert fourth[-1] == ("commit", [("in", 0, 14)])
    assert not list((tmp_path / "state" / "in_hand").rglob("*.json"))  # the note is done with
    fifth = attempt(None)  # the same offsets again (say, a reset group): no note, a plain batch
    assert [(e[1], e[2]) for e in fifth if e[0] == "produce"] == [("out", b"11"), ("out", b"22"),
                                                                   ("out", b"killkill"), ("out", b"44")]


# -- exactly_once: the transaction ----------------------------------------------------------------
def fake(loop) -> FakeProducer:
    """The fake producer inside the loop's TransactionalProducer."""
    return loop.producer.producer


def test_exactly_once_commits_outputs_and_offsets_in_one_transaction_not_through_the_consumer():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal)
    loop.consumer.refuse = KafkaError.GROUP_AUTHORIZATION_FAILED  # the consumer's own commit is not used
    loop.handle(msgs(b"1", b"2"), 0.0)
    loop.handle(msgs(b"3", start=12), 0.0)
    assert loop.producer.calls == ["init", "begin", "commit", "begin", "commit"]
    assert [e for e in journal if e[0] == "commit"] == [("commit", [("in", 0, 12)]), ("commit", [("in", 0, 13)])]
    assert loop.stats["transactions"] == 2 and loop.stats["commits"] == 2


def test_exactly_once_records_a_processor_produces_at_checkpoint_are_in_the_transaction():
    journal = Journal()
    processor = Doubler(journal)
    loop = make_loop(processor, journal)
    processor.checkpoint = lambda: produce(loop.producer, "changelog", b"state", b"k", on_delivery=loop.tracker)
    loop.handle(msgs(b"1"), 0.0)
    assert [e[:2] for e in journal if e[0] in ("produce", "commit")] == [("produce", "out"), ("produce", "changelog"),
                                                                         ("commit", [("in", 0, 11)])]
    assert loop.producer.calls == ["init", "begin", "commit"]  # one transaction for both


def test_exactly_once_a_retriable_commit_error_is_retried():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal)
    fake(loop).commit_errors = [KafkaError(KafkaError._TIMED_OUT, "coordinator away", retriable=True)] * 2
    loop.handle(msgs(b"1"), 0.0)
    assert loop.producer.calls == ["init", "begin", "commit"]
    assert journal[-1] == ("commit", [("in", 0, 11)])


def test_exactly_once_a_transaction_that_must_abort_rewinds_to_the_last_commit_and_reloads_the_state():
    journal = Journal()
    processor = Doubler(journal)
    processor.trace_membership = True
    loop = make_loop(processor, journal)
    loop.handle(msgs(b"1", b"2"), 0.0)  # committed: next offset 12
    fake(loop).commit_errors = [KafkaError(KafkaError.INVALID_TXN_STATE, "abort it", txn_requires_abort=True)]
    loop.handle(msgs(b"3", b"4", start=12), 0.0)
    tail = journal[journal.index(("commit", [("in", 0, 12)])) + 1:]
    assert [e for e in tail if e[0] != "produce"] == [
        ("acknowledged", 2), ("checkpoint",), ("abort",), ("on_revoke", [("in", 0), ("in", 2)]),
        ("seek", "in", 0, 12), ("on_assign", [("in", 0), ("in", 2)])]
    assert loop.read_to == {} and not loop.dirty
    assert loop.stats["transactions_aborted"] == 1 and loop.stats["rewinds"] == 1
    loop.handle(msgs(b"3", b"4", start=12), 0.0)  # read again: committed once
    assert journal[-1] == ("commit", [("in", 0, 14)])
    assert loop.producer.calls == ["init", "begin", "commit", "begin", "abort", "begin", "commit"]


def test_exactly_once_a_rewind_without_a_committed_offset_goes_back_to_the_first_offset_read():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal)
    fake(loop).commit_errors = [KafkaError(KafkaError.INVALID_TXN_STATE, "abort it", txn_requires_abort=True)]
    loop.handle(msgs(b"1", partition=2, start=40) + msgs(b"2", partition=2, start=41), 0.0)
    assert ("seek", "in", 2, 40) in journal and not [e for e in journal if e[0] == "seek" and e[2] == 0]


def test_exactly_once_outputs_timed_out_in_an_outage_abort_and_rewind_instead_of_being_sent_again():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, fail=KafkaError._MSG_TIMED_OUT, failures=2)
    loop.handle(msgs(b"1", b"2"), 0.0)
    assert [e[2] for e in journal if e[0] == "produce"] == [b"11", b"22"]  # not again in the doomed transaction
    assert ("abort",) in journal and ("seek", "in", 0, 10) in journal
    assert not [e for e in journal if e[0] == "commit"]
    loop.handle(msgs(b"1", b"2"), 0.0)  # the inputs again, the broker back
    assert journal[-1] == ("commit", [("in", 0, 12)])


def test_exactly_once_an_output_refused_for_good_again_and_again_stops_the_loop():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal, fail=KafkaError.MSG_SIZE_TOO_LARGE)
    for _ in range(2):  # aborted, rewound, read again
        loop.handle(msgs(b"1"), 0.0)
    with pytest.raises(UndeliveredError):
        loop.handle(msgs(b"1"), 0.0)
    assert loop.failed and loop.stats["transactions_aborted"] == 3
    fake(loop).fail = None
    loop._on_revoke(None, [TopicPartition("in", 0)])  # what closing the consumer runs: commits nothing
    assert not [e for e in journal if e[0] in ("checkpoint", "commit")]


def test_exactly_once_a_fenced_producer_raises_fenced_error_and_commits_nothing_more():
    journal = Journal()
    loop = make_loop(Doubler(journal), journal)
    fake(loop).commit_errors = [KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True)]
    with pytest.raises(FencedError, match="transactional.id 'g-doubler-instance'"):
        loop.handle(msgs(b"1"), 0.0)
    assert loop.failed
    loop._on_revoke(None, [TopicPartition("in", 0)])
    assert not [e for e in journal if e[0] in ("commit", "abort")]


def test_exactly_once_a_revoke_commits_the_open_transaction_and_an_abort_then_rewinds_only_what_stays():
    journal = Journal()
    processor = Doubler(journal)
    processor.checkpoint_interval_s = 3600
    loop = make_loop(processor, journal)
    loop.handle(msgs(b"1"), 0.0)
    loop.handle(msgs(b"2", partition=2, start=5), 0.0)
    assert loop.producer.calls == ["init", "begin"]  # open, not committed yet
    fake(loop).commit_errors = [KafkaError(KafkaError.INVALID_TXN_STATE, "abort it", txn_requires_abort=True)]
    loop._on_revoke(None, [TopicPartition("in", 0)])
    assert ("abort",) in journal and ("seek", "in", 2, 5) in journal
    assert not [e for e in journal if e[0] == "seek" and e[2] == 0]  # in[0] is left to its next owner
    loop.handle(msgs(b"2", partition=2, start=5), 0.0)
    loop._on_revoke(None, [TopicPartition("in", 2)])
    assert journal[-1] == ("commit", [("in", 2, 6)])


def test_the_transactional_id_is_stable_per_instance():
    settings = Settings(instance_id="host-a")
    assert transactional_id(settings, "grp", "rules") == "grp-rules-host-a"
    assert transactional_id(settings, "grp", "detector", "grp-detector-host-a-2") == "grp-detector-host-a-2"
    assert transactional_id(settings, "grp", "x", "other-id") == "grp-other-id"
