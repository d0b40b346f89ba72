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
    MetricRecord,
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
    "unknown_key": (msg(host="web-1"), ["host", "unknown field"]),
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


# --- Validation is per message in effect (issue 13)

SMUGGLE_A = b'{"timestamp": 1709294400, "value": 1.0, "series": [['  # ends inside an array...
SMUGGLE_B = b']], "series": "x"}'  # ...that this one closes, then re-sets "series" (the last wins)
SMUGGLE_C = msg(series="c1") + b"],[" + msg(series="c2")  # two records in one message


def alone(payload: bytes | None) -> DecodedBatch:
    return decode_metrics([payload], MAX)


def test_three_message_smuggling_is_decoded_as_each_message_alone():
    """A message ending in `"series":[[`, the next starting with `]],"series":"x"}` and a third of
    the form `{..}],[{..}` were once one array of three records, attached to the wrong offsets."""
    payloads = [msg(series="g0"), SMUGGLE_A, SMUGGLE_B, SMUGGLE_C, msg(series="g4")]
    out = decode_metrics(payloads, MAX)
    assert [pos for pos, _ in out.errors] == [1, 2, 3]
    assert out.index == [0, 4] and out.series == ["g0", "g4"]
    for pos, reason in out.errors:
        assert alone(payloads[pos]).errors == [(0, reason)]
    # the three alone, in both orders, and next to each other only
    for batch in ([SMUGGLE_A, SMUGGLE_B, SMUGGLE_C], [SMUGGLE_C, SMUGGLE_A, SMUGGLE_B]):
        out = decode_metrics(batch, MAX)
        assert out.index == [] and [pos for pos, _ in out.errors] == [0, 1, 2]


DUPLICATES = {  # case -> (payload, the key named in the reason)
    "value_twice": (b'{"series": "a", "timestamp": 1709294400, "value": 1.0, "value": 2.0}', "value"),
    "invalid_first_value": (b'{"series": "a", "timestamp": 1709294400, "value": "oops", "value": 1.0}', "value"),
    "series_twice": (b'{"series": "evil", "series": "a", "timestamp": 1709294400, "value": 1.0}', "series"),
    "timestamp_twice": (b'{"series": "a", "timestamp": 99999999999999, "timestamp": 1709294400, "value": 1.0}',
                        "timestamp"),
    "escaped_key": (b'{"series": "a", "timestamp": 1709294400, "value": 1.0, "v\\u0061lue": 2.0}', "value"),
    "nested_value_first": (b'{"series": "a", "timestamp": 1709294400, "value": [1, 2], "value": 3}', "value"),
    "commas_in_series": (b'{"series": "a,b,c", "timestamp": 1709294400, "value": 1.0, "value": 2.0}', "value"),
    "escaped_and_commas": (b'{"series": "a,b", "timestamp": 1709294400, "value": 1.0, "\\u0076alue": 2.0}', "value"),
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_keys_are_refused(case):
    payload, key = DUPLICATES[case]
    out = decode_metrics([msg(series="before"), payload, msg(series="after")], MAX)
    assert out.index == [0, 2] and [pos for pos, _ in out.errors] == [1]
    reason = out.errors[0][1]
    assert reason.startswith(f"{key}: duplicate key"), reason
    with pytest.raises(ValueError, match="duplicate"):
        decode_metric(payload, MAX)


def test_a_series_value_equal_to_a_key_name_is_not_a_duplicate():
    names = ["value", "series", "timestamp", "a,b,c", "value,", '"value"', "a\\b, c"]
    out = decode_metrics([msg(series=n) for n in names], MAX)
    assert out.errors == [] and out.series == names


BAD_SERIES = {
    "blank": " ", "spaces": "    ", "tab_only": "\t", "ideographic_space": "\u3000", "nul": "cpu\x00-1",
    "newline": "cpu-1\nFAKE LOG LINE", "tab": "cpu\t1", "carriage_return": "cpu\r1", "escape": "cpu\x1b[31m",
    "delete": "cpu\x7f", "c1_nel": "cpu\x85", "c1_csi": "cpu\x9b", "rlo": "cpu-\u202e1-gnp", "lre": "\u202acpu",
    "lri": "cpu\u2066", "pdi": "cpu\u2069", "lrm": "cpu\u200e", "rlm": "\u200fcpu",
}


@pytest.mark.parametrize("case", sorted(BAD_SERIES))
def test_series_names_blank_or_with_control_or_bidi_characters_are_refused(case):
    out = decode_metrics([msg(series="ok"), msg(series=BAD_SERIES[case])], MAX)
    assert out.index == [0] and [pos for pos, _ in out.errors] == [1]
    reason = out.errors[0][1]
    assert reason.startswith("series:"), reason
    assert ("blank" if case in ("blank", "spaces", "tab_only", "ideographic_space") else "character") in reason
    assert all(c.isprintable() for c in reason), repr(reason)  # the reason does not carry the character itself


def test_series_names_that_are_fine():
    names = ["cpu-1", "a b", "ŝeries/ü 1", "名前", "emoji 😀", "x" * 256, " leading", "trailing "]
    out = decode_metrics([msg(series=n) for n in names], MAX)
    assert out.errors == [] and out.series == names


YEAR_2773 = datetime(2773, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("stamp", [YEAR_2773, int(YEAR_2773), str(int(YEAR_2773)), 1709294400000, "1709294400000",
                                   2.6e10, -1, -1709294400, datetime(2200, 1, 1, tzinfo=UTC).timestamp(), 1e300])
def test_epoch_seconds_outside_1970_to_2200_are_refused_not_read_as_milliseconds(stamp):
    out = decode_metrics([msg(), msg(timestamp=stamp)], MAX)
    assert out.index == [0] and [pos for pos, _ in out.errors] == [1]
    reason = out.errors[0][1]
    assert reason.startswith("timestamp:") and "epoch seconds" in reason and "milliseconds" in reason, reason


def test_epoch_seconds_inside_the_range_are_seconds():
    stamps = [0, 1, 1709294400, "1709294400", 1709294400.25, datetime(2199, 12, 31, 23, 59, tzinfo=UTC).timestamp()]
    out = decode_metrics([msg(timestamp=s) for s in stamps], MAX)
    assert out.errors == []
    assert out.timestamps.tolist() == [float(s) for s in stamps]



@pytest.mark.parametrize("stamp", ["2773-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "2200-01-01T00:00:00",
                                   "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_iso_timestamps_outside_1970_to_2200_are_refused_too(stamp):
    out = decode_metrics([msg(timestamp=stamp)], MAX)
    (pos, reason), = out.errors
    assert reason.startswith(f"timestamp: {stamp} is outside 1970-01-01..2200-01-01"), reason


def test_the_timestamp_range_holds_for_the_instant_whatever_the_offset():
    """1970-01-01T00:00:00Z is in, 2200-01-01T00:00:00Z out."""
    out = decode_metrics([msg(timestamp=s) for s in ("1970-01-01T00:00:00Z", "1970-01-01T01:00:00+01:00",
                                                     "2199-12-31T23:59:59.999Z", "2200-01-01T00:30:00+01:00")], MAX)
    assert out.errors == [] and out.timestamps.tolist() == [0.0, 0.0, 7258118399.999, 7258116600.0]


@pytest.mark.parametrize("value", [1e13, -1e13, 1e300, 1.0000000001e12])
def test_values_beyond_the_absolute_limit_are_refused(value):
    out = decode_metrics([msg(value=1.0), msg(value=value)], MAX)
    assert out.index == [0] and [pos for pos, _ in out.errors] == [1]
    reason = out.errors[0][1]
    assert reason.startswith("value:") and "range" in reason and "1e+12" in reason and "max_abs_value" in reason.lower()


def test_the_absolute_limit_is_inclusive_and_a_parameter():
    out = decode_metrics([msg(value=1e12), msg(value=-1e12), msg(value=5e-324)], MAX)
    assert out.errors == [] and out.values.tolist() == [1e12, -1e12, 5e-324]
    out = decode_metrics([msg(value=100.0), msg(value=-100.5), msg(value=7)], MAX, max_abs_value=100.0)
    assert out.index == [0, 2] and [pos for pos, _ in out.errors] == [1]
    assert "100" in out.errors[0][1]


def test_reasons_are_bounded_and_printable():
    """A 10 KB key name, thousands of unknown keys, or control characters in a key are not copied
    whole into a dead letter's reason."""
    huge_key = msg(**{"k" * 10_000: 1})
    many_keys = msg(**{f"key{i}": i for i in range(3000)})
    nasty_key = msg(**{"a\nb\u202e\x00c": 1})
    for payload in (huge_key, many_keys, nasty_key):
        out = decode_metrics([payload], 1 << 20)
        (pos, reason), = out.errors
        assert len(reason) <= 1000, len(reason)
        assert "unknown field" in reason
        assert all(c.isprintable() for c in reason), repr(reason[:300])
    reason = decode_metrics([huge_key], 1 << 20).errors[0][1]
    assert "10000 characters" in reason


def good_values(out: DecodedBatch) -> list:
    return [(i, s, t, v) for i, s, t, v in zip(out.index, out.series, out.timestamps.tolist(), out.values.tolist())]


GOOD_A = msg(series="a", timestamp=1709294400, value=2.5)
GOOD_B = msg(series="b", timestamp="2024-03-01T12:00:00Z", value=-7)
TRICKY = [
    # concatenation tricks: one message running on into the next, or holding two
    SMUGGLE_A, SMUGGLE_B, SMUGGLE_C,
    b'{"series": "a', b'b", "timestamp": 1709294400, "value": 1.0}',
    b'{"series": "a"', b'"timestamp": 1709294400, "value": 1.0}',
    GOOD_A + b",", b"," + GOOD_A, GOOD_A + b"],[", b"],[" + GOOD_A, GOOD_A + b"]\n,[" + GOOD_B, b"]", b"[", b",",
    b"]]", b"[[", GOOD_A + b"]", b"[" + GOOD_A, b'{"series": "a", "timestamp": 1709294400, "value": 1.0',
    b'"series": "a", "timestamp": 1709294400, "value": 1.0}', GOOD_A + GOOD_B, GOOD_A + b"\n" + GOOD_B,
    b'{"series": "a", "timestamp": 1709294400, "value": 1.0, "x": "\n"}',
    # BOM, trailing garbage, whitespace, other encodings
    b"\xef\xbb\xbf" + GOOD_A, GOOD_A + b"\x00", GOOD_A + b" garbage", GOOD_A + b"  \n\t", b" \n" + GOOD_B,
    GOOD_A.decode().encode("utf-16"), GOOD_A.decode().encode("utf-32"), GOOD_A + b"//", GOOD_A + b"/* */",
    # deep nesting
    b"[" * 3000 + b"]" * 3000, b"[" * 100_000,
    b'{"series": "a", "timestamp": 1709294400, "value": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"series": "a", "timestamp": 1709294400, "value": 1, "x": ' + b'{"y":' * 1500 + b"1" + b"}" * 1501,
    # surrogates and malformed / overlong UTF-8
    msg(series="\ud83d\ude00 ok"), b'{"series": "\\ud83d\\ude00", "timestamp": 1709294400, "value": 1}',
    b'{"series": "\\ud800", "timestamp": 1709294400, "value": 1}',
    b'{"series": "\\udc00x", "timestamp": 1709294400, "value": 1}',
    b'{"series": "a\xc0\xaf", "timestamp": 1709294400, "value": 1}',
    b'{"series": "a\xe0\x80\xaf", "timestamp": 1709294400, "value": 1}',
    b'{"series": "a\xed\xa0\x80", "timestamp": 1709294400, "value": 1}',
    b'{"series": "a\xff", "timestamp": 1709294400, "value": 1}',
    b'{"ser\\u0069es": "a", "timestamp": 1709294400, "value": 1}',
    b'{"series": "a\\u0000", "timestamp": 1709294400, "value": 1}',
    b'{"series": "\\u202e", "timestamp": 1709294400, "value": 1}',
    # NaN / Infinity literals, huge and tiny exponents, number forms
    b'{"series": "a", "timestamp": 1709294400, "value": NaN}',
    b'{"series": "a", "timestamp": 1709294400, "value": Infinity}',
    b'{"series": "a", "timestamp": 1709294400, "value": -Infinity}',
    b'{"series": "a", "timestamp": NaN, "value": 1}',
    b'{"series": "a", "timestamp": Infinity, "value": 1}',
    b'{"series": "a", "timestamp": 1709294400, "value": 1e400}',
    b'{"series": "a", "timestamp": 1709294400, "value": -1e400}',
    b'{"series": "a", "timestamp": 1709294400, "value": 1e-400}',
    b'{"series": "a", "timestamp": 1709294400, "value": 1e308}',
    b'{"series": "a", "timestamp": 1709294400, "value": 5e-324}',
    b'{"series": "a", "timestamp": 1709294400, "value": 1e999999999999}',
    b'{"series": "a", "timestamp": 1e99999, "value": 1}',
    b'{"series": "a", "timestamp": 1709294400, "value": 123456789012345678901234567890}',
    b'{"series": "a", "timestamp": 1709294400, "value": 1E3}',
    b'{"series": "a", "timestamp": 1709294400, "value": -0}',
    b'{"series": "a", "timestamp": 1709294400, "value": 01}',
    b'{"series": "a", "timestamp": 1709294400, "value": .5}',
    b'{"series": "a", "timestamp": 1709294400, "value": +1}',
    b'{"series": "a", "timestamp": 1709294400, "value": 0x10}',
    b'{"series": "a", "timestamp": 1709294400.000001, "value": 1}',
    b'{"series": "a", "timestamp": 17092944001234567890, "value": 1}',
    b'{"series": "a", "timestamp": "1.7e9", "value": 1}',
    b'{"series": "a", "timestamp": "+25500000000", "value": 1}',
    # nested arrays and objects where scalars belong
    b'{"series": [["a"]], "timestamp": 1709294400, "value": 1}',
    b'{"series": "a", "timestamp": [1709294400], "value": 1}',
    b'{"series": "a", "timestamp": 1709294400, "value": [[1.0]]}',
    b'{"series": {"a": 1}, "timestamp": 1709294400, "value": 1}',
    b"[" + GOOD_A + b"]", b"[[" + GOOD_A + b"]]", b'[{"series": "a"}, {"timestamp": 1709294400, "value": 1}]',
    # duplicates, single quotes, case
    DUPLICATES["value_twice"][0], DUPLICATES["invalid_first_value"][0], DUPLICATES["escaped_key"][0],
    b"{'series': 'a', 'timestamp': 1709294400, 'value': 1}",
    b'{"Series": "a", "timestamp": 1709294400, "value": 1}',
    b'{"series": "a", "timestamp": 1709294400, "value": true}',
    b'{"series": "a", "timestamp": 1709294400, "value": null}',
    b'{"series": "a", "timestamp": true, "value": 1}',
    # empty and null
    b"", b" ", b"{}", b"null", None,
]


def test_the_schema_and_the_decoder_agree():
    """MetricRecord is the schema the decoder validates with; the decoder adds only what a schema
    cannot say: no duplicate key, and the value's limit (a setting)."""
    for payload in TRICKY + [GOOD_A, GOOD_B]:
        if payload is None or any(payload == d for d, _ in DUPLICATES.values()):
            continue
        try:
            record = MetricRecord.model_validate_json(payload)
        except ValidationError:
            record = None
        decoded = alone(payload)
        if record is None or abs(record.value) > 1e12:
            assert decoded.errors, payload
        else:
            assert good_values(decoded) == [(0, record.series, record.timestamp.timestamp(), record.value)]
            assert decode_metric(payload, MAX) == record


def test_batch_decoding_equals_decoding_each_message_alone():
    """Whatever is around it, a message decodes in a batch exactly as it does alone: same position,
    same reason, same series, timestamp and value."""
    singles = {}
    for p in TRICKY + [GOOD_A, GOOD_B]:
        singles[p] = alone(p)
        assert len(singles[p].index) + len(singles[p].errors) == 1
    assert sum(len(s.index) for s in singles.values()) >= 8  # some tricky ones are good on their own

    def check(batch):
        out = decode_metrics(batch, MAX)
        good, errors = [], []
        for i, p in enumerate(batch):
            one = singles[p]
            errors += [(i, reason) for _, reason in one.errors]
            good += [(i, s, t, v) for _, s, t, v in good_values(one)]
        assert out.errors == errors, batch
        assert good_values(out) == good, batch
        assert len(out.series) == len(out.timestamps) == len(out.values) == len(out.index)

    check(TRICKY)
    check(list(reversed(TRICKY)))
    rng = random.Random(13)
    pool = TRICKY + [GOOD_A, GOOD_B] * 10
    for _ in range(300):
        check([rng.choice(pool) for _ in range(rng.randint(1, 12))])
    for i in range(len(TRICKY) - 2):  # every tricky message between good ones, and next to its neighbours
        check([GOOD_A, *TRICKY[i:i + 3], GOOD_B])
