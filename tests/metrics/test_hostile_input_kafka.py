"""A corpus of hostile messages (broken and run-on JSON, concatenation tricks, duplicate keys,
extreme numbers, odd timestamps, control characters, deep nesting, bad UTF-8, oversize)
interleaved with good ones, through the real detector on the real broker: every good message is
scored exactly once, every bad one is dead-lettered with its specific reason, no worker dies."""

from __future__ import annotations

import time

import orjson
import pytest
from helpers import as_settings, wait_until

from shared.kafka import end_offsets, ensure_topics, make_producer, read_topic
from shared.records.metrics import ScoreRecord

pytestmark = pytest.mark.kafka

T = b'"timestamp": 1700000000'
GOOD_TAIL = T + b', "value": 1.0}'

# (payload, what its dead-letter reason must say)
HOSTILE = [
    (b"", "Invalid JSON"),
    (None, "empty message"),
    (b"   ", "Invalid JSON"),
    (b"not json", "Invalid JSON"),
    (b'{"series": "a", ' + GOOD_TAIL + b" trailing", "trailing characters"),
    (b'\xef\xbb\xbf{"series": "a", ' + GOOD_TAIL, "Invalid JSON"),  # a byte-order mark
    (b'{"series": "a", ' + GOOD_TAIL + b'{"series": "b", ' + GOOD_TAIL, "trailing characters"),
    (b'[{"series": "a", ' + GOOD_TAIL + b"]", "should be an object"),
    # The three-message smuggling trick: each must fail on its own.
    (b'{"series": "a", ' + GOOD_TAIL + b'],[{"series": "x", ' + GOOD_TAIL, "trailing characters"),
    (b'{"series": "a", ' + T + b', "value": 1.0, "series":[[', "EOF while parsing"),
    (b']],"series":"x"}', "Invalid JSON"),
    (b'{"series": "a", "series": "b", ' + GOOD_TAIL, "series: duplicate key"),
    (b'{"series": "a", ' + T + b', "value": "oops", "value": 1.0}', "value: duplicate key"),
    (b'{"series": "a", ' + T + b", \"value\": NaN}", "finite number"),
    (b'{"series": "a", ' + T + b", \"value\": Infinity}", "finite number"),
    (b'{"series": "a", ' + T + b', "value": 1e309}', "finite number"),
    (b'{"series": "a", ' + T + b', "value": 1e308}', "outside the accepted range"),
    (b'{"series": "a", ' + T + b', "value": -1e13}', "outside the accepted range"),
    (b'{"series": "a", ' + T + b', "value": "1.5"}', "value: Input should be a valid number"),
    (b'{"series": "a", ' + T + b', "value": true}', "value: Input should be a valid number"),
    (b'{"series": "a", ' + T + b', "value": null}', "value: Input should be a valid number"),
    (b'{"series": "a", ' + T + b', "value": [1]}', "value: Input should be a valid number"),
    (b'{"series": "a", ' + T + b', "value": {"x": 1}}', "value: Input should be a valid number"),
    (b'{"series": "a", ' + T + b"}", "value: Field required"),
    (b"{" + GOOD_TAIL, "series: Field required"),
    (b'{"series": "", ' + GOOD_TAIL, "at least 1 character"),
    (b'{"series": "   ", ' + GOOD_TAIL, "blank"),
    (b'{"series": "a\\u0000b", ' + GOOD_TAIL, "U+0000"),
    (b'{"series": "a\\nb", ' + GOOD_TAIL, "U+000A"),
    (b'{"series": "a\\u202eb", ' + GOOD_TAIL, "U+202E"),  # right-to-left override
    (b'{"series": "\\ud800", ' + GOOD_TAIL, "Invalid JSON"),  # a lone surrogate
    (b'{"series": "' + b"x" * 300 + b'", ' + GOOD_TAIL, "at most 256 characters"),
    (b'{"series": 42, ' + GOOD_TAIL, "series: Input should be a valid string"),
    (b'{"series": "a", "timestamp": 25000000000, "value": 1.0}', "never as milliseconds"),  # year 2762
    (b'{"series": "a", "timestamp": 1700000000000, "value": 1.0}', "never as milliseconds"),
    (b'{"series": "a", "timestamp": -5, "value": 1.0}', "outside 1970-01-01..2200-01-01"),
    (b'{"series": "a", "timestamp": "yesterday", "value": 1.0}', "timestamp: Input should be a valid datetime"),
    (b'{"series": "a", "timestamp": "9999-12-31T00:00:00Z", "value": 1.0}', "outside 1970-01-01..2200-01-01"),
    (b'{"series": "a", ' + T + b', "value": 1.0, "extra": 1}', "extra: unknown field"),
    (b'{"series": "a", ' + T + b', "value": 1.0, "' + b"k" * 10000 + b'": 1}', "(10000 characters)"),
    (b'{"series": "a\xc0\xafb", ' + GOOD_TAIL, "Invalid JSON"),  # overlong UTF-8
    (b'{"series": "a\xff", ' + GOOD_TAIL, "Invalid JSON"),
    (b"[" * 5000 + b"]" * 5000, "recursion limit"),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "recursion limit"),
    (b'{"series": "a", ' + T + b', "value": 1.0', "EOF while parsing"),
    (b'"just a string"', "should be an object"),
    (b"123", "should be an object"),
    (b'{"series": "a", ' + GOOD_TAIL + b" " * 70000, "exceeds the 65536-byte limit"),
]


def test_hostile_corpus_leaves_every_good_message_scored_once_and_every_bad_one_dead_lettered(
        pipeline_settings, services):
    assert len(HOSTILE) >= 40
    overrides = pipeline_settings | {"workers": 2}
    settings = as_settings(overrides)
    ensure_topics(settings)
    producer = make_producer(settings)
    good, sent = [], 0
    for i, (payload, _) in enumerate(HOSTILE):  # good, hostile, good, ... on every partition
        for j in range(2):
            series = f"hostile-test-{(2 * i + j) % 5}"
            rec = {"series": series, "timestamp": 1_700_000_000 + 300 * (2 * i + j), "value": float(j)}
            producer.produce(settings.topic_input, orjson.dumps(rec), series.encode())
            good.append((series, rec["timestamp"]))
        producer.produce(settings.topic_input, payload, f"bad-{i}".encode())
        sent += 3
    assert producer.flush(30) == 0
    detector = services("detector", overrides)
    wait_until(lambda: sum(end_offsets(settings, settings.topic_scores).values()) >= len(good)
               and sum(end_offsets(settings, settings.topic_dead_letter).values()) >= len(HOSTILE),
               240, "every message scored or dead-lettered", [detector])
    time.sleep(2)  # a duplicate would show now
    scores = [ScoreRecord.model_validate_json(m.value()) for m in read_topic(settings, settings.topic_scores, idle=2)]
    assert sorted((r.series, int(r.timestamp.timestamp())) for r in scores) == sorted(good)  # each once
    letters = read_topic(settings, settings.topic_dead_letter, idle=2)
    assert len(letters) == len(HOSTILE)
    by_key = {m.key(): dict(m.headers()) for m in letters}
    for i, (payload, why) in enumerate(HOSTILE):
        headers = by_key[f"bad-{i}".encode()]
        reason = headers["dlq.error"].decode()
        assert why in reason, (i, payload[:80] if payload else payload, reason)
        assert len(reason) <= 1100
    assert {m.value() for m in letters} == {p for p, _ in HOSTILE}  # the original bytes, unchanged
    assert "worker died" not in detector.log and "Traceback" not in detector.log
    assert detector.stop() == 0
