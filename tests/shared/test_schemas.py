"""decode_metrics: good messages become columns at their positions, every bad one is named with a reason."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from pydantic import ValidationError

from shared.records.common import iso_utc
from shared.records.metrics import (
    DecodedBatch,
    ScoreRecord,
    decode_metric,
    decode_metrics,
)

MAX = 4096
UTC = timezone.utc


def msg(series="cpu-1", timestamp="2024-03-01T12:00:00Z", value=1.5, **extra) -> bytes:
    return json.dumps({"series": series, "timestamp": timestamp, "value": value, **extra}).encode()


GOOD = msg()
GOOD_EPOCH = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()

# (payload, words the reason must mention); each one a different way a message can be bad.
BAD = {
    "malformed_json": (b'{"series": "cpu-1", "timestamp": ', ["invalid json"]),
    "missing_value": (b'{"series": "cpu-1", "timestamp": "2024-03-01T12:00:00Z"}', ["value", "required"]),
    "missing_series": (b'{"timestamp": 1709294400, "value": 1.0}', ["series", "required"]),
    "value_string": (msg(value="1.5"), ["value", "number"]),
    "value_bool": (msg(value=True), ["value", "number"]),
    "value_null": (msg(value=None), ["value"]),
    "value_nan": (b'{"series": "cpu-1", "timestamp": 1709294400, "value": NaN}', ["value", "finite"]),
    "value_infinity": (b'{"series": "cpu-1", "timestamp": 1709294400, "value": Infinity}', ["value", "finite"]),
    "value_minus_infinity": (b'{"series": "cpu-1", "timestamp": 1709294400, "value": -Infinity}',
                             ["value", "finite"]),
    "value_overflow": (b'{"series": "cpu-1", "timestamp": 1709294400, "value": 1e999}', ["value", "finite"]),
    "bad_timestamp": (msg(timestamp="yesterday at noon"), ["timestamp"]),
    "timestamp_month_13": (msg(timestamp="2024-13-01T00:00:00Z"), ["timestamp"]),
    "unknown_key": (msg(host="web-1"), ["host", "extra"]),
    "series_number": (msg(series=42), ["series", "string"]),
    "series_list": (msg(series=["a"]), ["series", "string"]),
    "series_empty": (msg(series=""), ["series"]),
    "oversize": (msg(series="x" * 200, pad="y" * MAX), ["bytes", str(MAX)]),
    "empty_bytes": (b"", ["json"]),
    "null": (None, ["empty", "null"]),
    "two_records_in_one": (GOOD + b"," + GOOD, ["json", "trailing"]),
    "json_array": (b"[" + GOOD + b"]", ["object"]),
    "json_string": (b'"cpu-1"', ["object"]),
    "not_json": (b"\x00\xff garbage", ["json"]),
}


def assert_good(out: DecodedBatch, j: int, series: str, epoch: float, value: float) -> None:
    assert out.series[j] == series
    assert out.timestamps[j] == pytest.approx(epoch, abs=1e-6)
    assert out.values[j] == value


def test_good_batch_values_and_epochs():
    base = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    plus2 = timezone(timedelta(hours=2))
    cases = [  # (timestamp as sent, the instant it denotes)
        ("2024-03-01T12:00:00Z", base),
        ("2024-03-01T14:00:00+02:00", datetime(2024, 3, 1, 14, tzinfo=plus2)),
        ("2024-03-01T12:00:00.250Z", base + timedelta(milliseconds=250)),
        (1709294400, base),  # epoch seconds as a number
        (1709294400.5, base + timedelta(seconds=0.5)),
        ("2024-03-01T12:00:00", base),  # naive means UTC
        ("1999-12-31T23:59:59Z", datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ]
    payloads = [msg(series=f"s{i}", timestamp=ts, value=i * 1.25 - 3) for i, (ts, _) in enumerate(cases)]
    out = decode_metrics(payloads, MAX)
    assert out.errors == []
    assert out.index == list(range(len(cases)))
    assert out.timestamps.dtype == np.float64 and out.values.dtype == np.float64
    for j, (_, when) in enumerate(cases):
        assert_good(out, j, f"s{j}", when.timestamp(), j * 1.25 - 3)
    # The +02:00 stamp is the same instant as 12:00Z.
    assert out.timestamps[1] == out.timestamps[0]


def test_integer_value_and_unicode_series():
    out = decode_metrics([msg(series="ŝeries/ü 1", value=7)], MAX)
    assert out.errors == [] and out.series == ["ŝeries/ü 1"] and out.values[0] == 7.0


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_message_is_named_and_neighbours_survive(case):
    payload, words = BAD[case]
    before, after = msg(series="before", value=1.0), msg(series="after", value=2.0)
    out = decode_metrics([before, payload, after], MAX)
    assert [pos for pos, _ in out.errors] == [1]
    reason = out.errors[0][1].lower()
    for word in words:
        assert word.lower() in reason, f"{case}: {word!r} not in {reason!r}"
    assert out.index == [0, 2]
    assert_good(out, 0, "before", GOOD_EPOCH, 1.0)
    assert_good(out, 1, "after", GOOD_EPOCH, 2.0)
    # decode_metric gives the same reason for the message alone.
    with pytest.raises(ValueError) as info:
        decode_metric(payload, MAX)
    assert str(info.value) == out.errors[0][1]


def test_mixed_batch_positions():
    rng = random.Random(7)
    bad_cases = sorted(BAD)
    payloads, expected_good, expected_bad = [], [], []
    for i in range(60):
        if i % 3 == 1:
            payloads.append(BAD[bad_cases[(i // 3) % len(bad_cases)]][0])
            expected_bad.append(i)
        else:
            value = round(rng.uniform(-100, 100), 3)
            epoch = 1_700_000_000 + 60 * i
            payloads.append(msg(series=f"s{i % 4}", timestamp=epoch, value=value))
            expected_good.append((i, f"s{i % 4}", float(epoch), value))
    out = decode_metrics(payloads, MAX)
    assert [pos for pos, _ in out.errors] == expected_bad
    assert out.index == [i for i, *_ in expected_good]
    assert len(out.series) == len(out.timestamps) == len(out.values) == len(out.index)
    for j, (_, series, epoch, value) in enumerate(expected_good):
        assert_good(out, j, series, epoch, value)


def test_all_good_and_one_bad_decode_the_good_ones_alike():
    good = [msg(series=f"s{i}", timestamp=1_700_000_000 + i, value=i / 7) for i in range(20)]
    fast = decode_metrics(good, MAX)
    slow = decode_metrics(good[:10] + [b"{"] + good[10:], MAX)
    assert fast.index == list(range(20))
    assert slow.index == list(range(10)) + list(range(11, 21))
    assert fast.series == slow.series
    np.testing.assert_array_equal(fast.timestamps, slow.timestamps)
    np.testing.assert_array_equal(fast.values, slow.values)


def test_size_limit_is_inclusive():
    payload = msg()
    out = decode_metrics([payload, payload], len(payload))
    assert out.errors == [] and out.index == [0, 1]
    out = decode_metrics([payload, payload], len(payload) - 1)
    assert [pos for pos, _ in out.errors] == [0, 1] and out.index == []


def test_smuggling_across_messages_is_caught():
    """Three bad messages that, joined naively with commas, parse as three good records: the first
    two run into each other through a string (or an unclosed object), the third holds two records."""
    split = GOOD + b"," + GOOD
    for first, second in [
        (b'{"series": "a', b'b", "timestamp": 1709294400, "value": 1.0}'),
        (b'{"series": "a"', b'"timestamp": 1709294400, "value": 1.0}'),
    ]:
        for payloads in ([first, second, split], [split, first, second]):
            out = decode_metrics(payloads, MAX)
            assert out.index == [] and [p for p, _ in out.errors] == [0, 1, 2], payloads


def test_smuggling_through_array_brackets_is_caught():
    out = decode_metrics([GOOD + b"],[" + GOOD, GOOD], MAX)
    assert [p for p, _ in out.errors] == [0] and out.index == [1]


def test_empty_batch():
    out = decode_metrics([], MAX)
    assert out.index == [] and out.errors == [] and len(out.values) == 0 and len(out.timestamps) == 0


def test_naive_timestamp_is_utc():
    out = decode_metrics([msg(timestamp="2021-06-15T03:04:05"), msg(timestamp="2021-06-15T03:04:05Z")], MAX)
    expected = datetime(2021, 6, 15, 3, 4, 5, tzinfo=UTC).timestamp()
    assert out.timestamps.tolist() == [expected, expected]


def test_iso_utc_matches_datetime_and_round_trips():
    rng = np.random.default_rng(3)
    epochs = np.concatenate([[0, 86_399, 951_782_400], rng.integers(0, 4_000_000_000, 200)]).astype(np.float64)
    stamps = iso_utc(epochs)
    for e, s in zip(epochs.tolist(), stamps):
        assert s == datetime.fromtimestamp(e, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert datetime.fromisoformat(s).timestamp() == e
    # and through the decoder back again
    out = decode_metrics([msg(timestamp=s) for s in stamps], MAX)
    np.testing.assert_array_equal(out.timestamps, epochs)


def test_iso_utc_drops_fractions_of_a_second():
    assert iso_utc(np.array([1.999, 60.0])) == ["1970-01-01T00:00:01Z", "1970-01-01T00:01:00Z"]


def test_score_record_schema():
    rec = {
        "series": "s", "timestamp": "2024-03-01T12:00:00Z", "value": 1.0, "is_anomaly": True,
        "if_anomaly": True, "lstm_anomaly": False, "reconstruction_error": 0.5, "if_score": 0.6,
        "model_version": "v1", "source_topic": "t", "source_partition": 0, "source_offset": 5,
        "source_timestamp_ms": 1, "detected_at": "2024-03-01T12:00:01Z",
    }
    parsed = ScoreRecord.model_validate_json(json.dumps(rec))
    assert parsed.kind == "score" and parsed.timestamp.timestamp() == GOOD_EPOCH
    with pytest.raises(ValidationError):
        ScoreRecord.model_validate_json(json.dumps(rec | {"unexpected": 1}))
    with pytest.raises(ValidationError):
        ScoreRecord.model_validate_json(json.dumps({k: v for k, v in rec.items() if k != "series"}))
