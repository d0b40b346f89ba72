"""Rule conditions and check windows on hand-made streams where the firing checks are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.rules.definitions import parse_definition
from models.rules.engine import NO_GROUP, RuleEngine

MINUTE = 60.0


def definition(conditions: str, every: str = "60s", lateness: str = "0s", extra: str = "", group_by: str = "host"):
    return parse_definition(f"""
name: test-rule
trigger_every: {every}
allowed_lateness: {lateness}
query:
  topic: metrics
  group_by: {group_by}
{extra}
conditions:
{conditions}
""")


def run(defn, windows: list[list[float] | None], field: str = "v", host: str = "a", closing: bool = True):
    """One list of values per one-minute window (None: no message in it); returns the checks."""
    engine = RuleEngine([defn])
    offset = 0
    for i, values in enumerate(windows):
        for j, v in enumerate(values or []):
            assert engine.add("metrics", 0, offset, {"timestamp": i * MINUTE + j, "host": host, field: v}, now=0) == []
            offset += 1
    if closing:  # one message in the window after the last, so the watermark passes the last one
        engine.add("metrics", 0, offset, {"timestamp": len(windows) * MINUTE, "host": "closer"}, now=0)
    return [c for c in engine.advance(0) if c.group == host]


def fired(checks) -> list[int]:
    return [int(c.window_start // MINUTE) for c in checks if c.fired]


METRIC_ABOVE_3 = """
  - {type: metric, aggregation: average, field: v, operator: above, value: 10, times: 3}
"""


def test_metric_for_n_times_fires_only_from_the_nth_consecutive_check():
    checks = run(definition(METRIC_ABOVE_3), [[5], [11, 13], [12], [20], [14], [3], [20], [30], [40]])
    assert [c.values["average(v)"] for c in checks] == [5, 12, 12, 20, 14, 3, 20, 30, 40]
    # windows 1, 2 satisfy but are the first N-1 of the streak; 3 and 4 fire; 5 breaks it.
    assert fired(checks) == [3, 4, 8]
    assert [c.conditions[0].detail["streak"] for c in checks] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert all(c.status == "ok" for c in checks if not c.fired)


@pytest.mark.parametrize("aggregation, expected", [
    ("average", 2.5), ("min", 1.0), ("max", 4.0), ("sum", 10.0), ("count", 4.0),
    ("p95", float(np.percentile([1, 2, 3, 4], 95))),
])
def test_aggregations(aggregation, expected):
    field = "" if aggregation == "count" else "field: v,"
    cond = f"  - {{type: metric, aggregation: {aggregation}, {field} operator: equal, value: {expected!r}}}\n"
    checks = run(definition(cond), [[1, 4, 2, 3]])
    key = "count" if aggregation == "count" else f"{aggregation}(v)"
    assert checks[0].values[key] == pytest.approx(expected)
    assert checks[0].fired


def test_below_and_equal_operators():
    below = run(definition("  - {type: metric, field: v, operator: below, value: 2}\n"), [[1], [2], [3]])
    assert fired(below) == [0]
    equal = run(definition("  - {type: metric, field: v, operator: equal, value: 2}\n"), [[1], [2], [3]])
    assert fired(equal) == [1]


def test_rate_against_the_average_of_the_previous_results():
    cond = "  - {type: rate, field: v, direction: increased, percent: 50, compare_with: average, previous: 3}\n"
    # previous-3 averages: w3: (10+20+30)/3 = 20 -> 31 is +55% (fires); w4: (20+30+31)/3 = 27 -> 40 is +48%.
    checks = run(definition(cond), [[10], [20], [30], [31], [40], [10], [100]])
    assert [c.conditions[0].holds for c in checks[:3]] == [False, False, False]
    assert "warming_up" in checks[0].conditions[0].detail
    assert checks[3].conditions[0].detail["reference"] == pytest.approx(20)
    assert checks[3].conditions[0].detail["change_pct"] == pytest.approx(55)
    assert checks[4].conditions[0].detail["change_pct"] == pytest.approx((40 - 27) / 27 * 100)
    # w6: reference (31+40+10)/3 = 27 -> 100 is +270%.
    assert fired(checks) == [3, 6]


def test_rate_decrease_against_min_and_max():
    dec = "  - {type: rate, field: v, direction: decreased, percent: 40, compare_with: max, previous: 2}\n"
    # w2: max(10, 20) = 20 -> 11 is -45% (fires); w3: max(20, 11) = 20 -> 13 is -35%.
    assert fired(run(definition(dec), [[10], [20], [11], [13]])) == [2]
    inc_min = "  - {type: rate, field: v, direction: increased, percent: 100, compare_with: min, previous: 2}\n"
    # w2: min(10, 30) = 10 -> 25 is +150% (fires); w3: min(30, 25) = 25 -> 45 is +80%.
    assert fired(run(definition(inc_min), [[10], [30], [25], [45]])) == [2]


def test_rate_from_zero_counts_as_an_increase():
    cond = "  - {type: rate, aggregation: count, direction: increased, percent: 50, previous: 2}\n"
    checks = run(definition(cond, extra="no_data: zero"), [[1], None, None, [1, 1]])
    # w2: count 0 vs avg(1, 0) = 0.5 -> -100%; w3: 2 vs avg(0, 0) = 0 -> a rise from zero.
    assert fired(checks) == [3]
    assert checks[3].conditions[0].detail["change"] == "rise from zero"


def test_bollinger_band_breach_in_both_directions():
    cond = "  - {type: bollinger, field: v, points: 5, k: 2, band: both}\n"
    base = [10, 11, 9, 10, 11, 9, 10, 11, 9, 10]
    windows = [[v] for v in base] + [[30]] + [[v] for v in base] + [[-10]] + [[10]]
    checks = run(definition(cond), windows)
    assert fired(checks) == [10, 21]
    up, down = checks[10].conditions[0], checks[21].conditions[0]
    assert up.detail["breach"] == "above" and up.value > up.detail["upper"]
    assert down.detail["breach"] == "below" and down.value < down.detail["lower"]
    # warm-up: no band before `points` checks
    assert all("warming_up" in c.conditions[0].detail for c in checks[:5])
    # the EMA follows the pandas ewm(span=points, adjust=False) recursion
    series = np.array([w[0] for w in windows[:10]], dtype=float)
    alpha = 2 / 6
    ema = series[0]
    for x in series[1:]:
        ema += alpha * (x - ema)
    assert checks[10].conditions[0].detail["ema"] == pytest.approx(ema)


def test_bollinger_upper_only_ignores_a_drop():
    cond = "  - {type: bollinger, field: v, points: 3, k: 2, band: upper}\n"
    checks = run(definition(cond), [[10], [11], [10], [11], [-50], [10]])
    assert fired(checks) == []
    assert checks[4].conditions[0].detail["breach"] == "below"


RATIO = """
  - type: ratio
    query: {field: status, gte: 500}
    operator: above
    percent: 20
    times: 2
"""


def test_ratio_of_query_within_filter_and_an_empty_denominator():
    defn = definition(RATIO, extra="filter: {field: path, regex: '^/api/'}")
    engine = RuleEngine([defn])
    msgs = [  # (minute, path, status)
        (0, "/api/pay", 200), (0, "/api/pay", 500), (0, "/health", 500), (0, "/api/x", 200), (0, "/api/x", 200),
        (0, "/api/x", 200), (0, "/api/x", 200),
        (1, "/api/pay", 503), (1, "/api/pay", 200), (1, "/health", 500),
        (2, "/health", 500),  # nothing passes the filter: empty denominator
        (3, "/api/pay", 502), (3, "/api/pay", 500), (3, "/api/pay", 200),
        (4, "/api/pay", 500),
    ]
    for offset, (minute, path, status) in enumerate(msgs):
        engine.add("metrics", 0, offset, {"timestamp": minute * MINUTE, "host": "gw", "path": path,
                                          "status": status}, now=0)
    engine.add("metrics", 0, 99, {"timestamp": 5 * MINUTE, "host": "closer", "path": "/health"}, now=0)
    checks = [c for c in engine.advance(0) if c.group == "gw"]
    ratios = [c.values.get("ratio[0]") for c in checks]
    assert ratios == [pytest.approx(100 / 6), pytest.approx(50.0), None, pytest.approx(200 / 3), 100.0]
    assert checks[0].values["count"] == 6 and checks[0].values["ratio[0].numerator"] == 1
    assert checks[2].status == "no_data" and not checks[2].fired
    assert checks[2].conditions[0].value is None and checks[2].conditions[0].detail["no_data"]
    # w1 is the first check of the streak; w2 has no data (ignored: no pass, no break); w3 is the second.
    assert [c.fired for c in checks] == [False, False, False, True, True]


def test_no_data_policies():
    windows = [[20], [20], None, [20]]
    cond = "  - {type: metric, field: v, operator: above, value: 10, times: 3}\n"
    ignore = run(definition(cond, extra="no_data: ignore"), windows)
    assert [c.status for c in ignore] == ["ok", "ok", "no_data", "fired"]
    previous = run(definition(cond, extra="no_data: previous"), windows)
    assert previous[2].values["average(v)"] == 20 and previous[2].fired  # the previous value counts
    assert previous[2].status == "fired" and previous[2].messages == 0
    zero = run(definition(cond, extra="no_data: zero"), windows)
    assert zero[2].values["average(v)"] == 0 and [c.fired for c in zero] == [False, False, False, False]


def test_late_message_within_allowed_lateness_counts_and_beyond_it_is_reported():
    defn = definition("  - {type: metric, aggregation: count, operator: above, value: 1}\n", lateness="30s")
    engine = RuleEngine([defn])
    engine.add("metrics", 0, 0, {"timestamp": 10, "host": "a"}, now=0)
    engine.add("metrics", 0, 1, {"timestamp": 70, "host": "a"}, now=0)  # watermark 70 < 60 + 30
    assert engine.advance(0) == []
    assert engine.add("metrics", 0, 2, {"timestamp": 50, "host": "a"}, now=0) == []  # 20 s late: counts
    engine.add("metrics", 0, 3, {"timestamp": 95, "host": "a"}, now=0)  # watermark 95 >= 90
    checks = engine.advance(0)
    assert [(c.window_start, c.values["count"], c.fired) for c in checks] == [(0, 2.0, True)]
    problems = engine.add("metrics", 0, 4, {"timestamp": 55, "host": "a"}, now=0)
    assert len(problems) == 1 and "late" in problems[0] and "allowed lateness 30s" in problems[0]
    # a message seen before a restart (below the recorded read position) is not reported again
    engine.replayed_below = {("metrics", 0): 10}
    assert engine.add("metrics", 0, 5, {"timestamp": 55, "host": "a"}, now=0) == []


def test_watermark_is_the_slowest_active_partition_and_an_idle_one_stops_holding_it():
    defn = definition("  - {type: metric, aggregation: count, operator: above, value: 0}\n")
    engine = RuleEngine([defn], idle_partition_s=5)
    engine.add("metrics", 0, 0, {"timestamp": 10, "host": "a"}, now=0)
    engine.add("metrics", 1, 0, {"timestamp": 500, "host": "b"}, now=0)
    assert engine.watermark("metrics", now=1) == 10 and engine.advance(1) == []
    assert engine.held_offsets() == {("metrics", 0): 0, ("metrics", 1): 0}
    # partition 0 goes quiet: after idle_partition_s partition 1 alone sets the watermark
    engine.add("metrics", 1, 1, {"timestamp": 510, "host": "b"}, now=6)
    assert engine.watermark("metrics", now=6) == 510
    checks = engine.advance(6)
    assert {(c.group, c.window_start) for c in checks if c.status != "no_data"} == {("a", 0.0)}
    assert engine.held_offsets() == {("metrics", 1): 0}  # a's window is checked; b's still open


def test_groups_are_separate_and_a_definition_without_group_by_has_one():
    cond = "  - {type: metric, aggregation: sum, field: v, operator: above, value: 5}\n"
    engine = RuleEngine([definition(cond)])
    for i, (host, v) in enumerate([("a", 4), ("b", 3), ("a", 2), ("b", 1)]):
        engine.add("metrics", 0, i, {"timestamp": i, "host": host, "v": v}, now=0)
    engine.add("metrics", 0, 9, {"timestamp": 60, "host": "a", "v": 0}, now=0)
    by_group = {c.group: c for c in engine.advance(0)}
    assert by_group["a"].fired and by_group["a"].values["sum(v)"] == 6
    assert not by_group["b"].fired and by_group["b"].values["sum(v)"] == 4
    single = RuleEngine([definition(cond, group_by="[]")])
    for i, v in enumerate([4, 3]):
        single.add("metrics", 0, i, {"timestamp": i, "host": "x", "v": v}, now=0)
    single.add("metrics", 0, 9, {"timestamp": 60}, now=0)
    (check,) = single.advance(0)
    assert check.group == NO_GROUP and check.fired


def test_bad_field_values_and_timestamps_are_reported_not_counted():
    engine = RuleEngine([definition("  - {type: metric, field: v, operator: above, value: 1}\n")])
    assert "must be finite numbers" in engine.add("metrics", 0, 0, {"timestamp": 1, "host": "a", "v": "9"}, now=0)[0]
    assert "not a timestamp" in engine.add("metrics", 0, 1, {"timestamp": "yesterday", "host": "a", "v": 9}, now=0)[0]
    assert engine.add("metrics", 0, 2, {"timestamp": "1970-01-01T00:00:05Z", "host": "a", "v": 9}, now=0) == []
    assert engine.add("other-topic", 0, 0, {"whatever": True}, now=0) == []  # not this definition's topic
    engine.add("metrics", 0, 3, {"timestamp": 61, "host": "a"}, now=0)
    (check, *_rest) = engine.advance(0)
    assert check.messages == 1 and check.values["average(v)"] == 9


def test_a_quiet_group_is_dropped_after_expire_after_no_data_checks():
    defn = definition("  - {type: metric, aggregation: count, operator: above, value: 0}\n", extra="expire_after: 3")
    engine = RuleEngine([defn])
    engine.add("metrics", 0, 0, {"timestamp": 0, "host": "gone"}, now=0)
    engine.add("metrics", 0, 1, {"timestamp": 10 * MINUTE, "host": "other"}, now=0)
    gone = [c for c in engine.advance(0) if c.group == "gone"]
    assert [c.status for c in gone] == ["fired", "no_data", "no_data", "no_data"]
    assert "gone" not in engine.runners["test-rule"].groups


def test_state_round_trip_resumes_exactly():
    cond = ("  - {type: bollinger, field: v, points: 4, k: 2}\n"
            "  - {type: rate, field: v, direction: increased, percent: 10, previous: 2}\n")
    defn = definition(cond)
    values = [10, 12, 11, 13, 12, 30, 12, 11, 40, 12]
    whole = run(defn, [[v] for v in values])
    first = RuleEngine([defn])
    for i, v in enumerate(values[:5]):
        first.add("metrics", 0, i, {"timestamp": i * MINUTE, "host": "a", "v": v}, now=0)
    first.add("metrics", 0, 5, {"timestamp": 5 * MINUTE, "host": "a", "v": values[5]}, now=0)
    head = first.advance(0)
    resumed = RuleEngine([defn])
    assert resumed.restore("test-rule", defn.version, {"a": head[-1].state}) == 1
    assert resumed.restore("test-rule", "another-version", {"a": head[-1].state}) == 0
    for i, v in enumerate(values[5:], start=5):
        resumed.add("metrics", 0, i, {"timestamp": i * MINUTE, "host": "a", "v": v}, now=0)
    resumed.add("metrics", 0, 99, {"timestamp": len(values) * MINUTE, "host": "closer"}, now=0)
    tail = [c for c in resumed.advance(0) if c.group == "a"]
    assert [(c.window_start, c.status, c.values) for c in head + tail] == \
        [(c.window_start, c.status, c.values) for c in whole]
    for a, b in zip(head + tail, whole):
        for x, y in zip(a.conditions, b.conditions):
            assert x.holds == y.holds and (x.detail.get("ema") is None or math.isclose(x.detail["ema"], y.detail["ema"]))


def test_a_run_of_firing_checks_notifies_once_then_every_repeat_every():
    cond = "  - {type: metric, field: v, operator: above, value: 10}\n"
    windows = [[20]] * 5 + [[1]] + [[20]] * 2
    checks = run(definition(cond, extra="repeat_every: 3m"), windows)
    assert [c.fired for c in checks] == [True] * 5 + [False] + [True] * 2
    # notified at w0, again 3 minutes later at w3; w5 ends the run, so w6 is a new one.
    assert [c.notify for c in checks] == [True, False, False, True, False, False, True, False]
    every = run(definition(cond, extra="repeat_every: 0s"), windows)
    assert [c.notify for c in every] == [c.fired for c in every]


def test_an_assigned_partition_holds_the_watermark_until_it_delivers_or_idles():
    defn = definition("  - {type: metric, aggregation: count, operator: above, value: 0}\n")
    engine = RuleEngine([defn], idle_partition_s=5)
    engine.assign("metrics", 0, now=0)
    engine.assign("metrics", 1, now=0)
    engine.add("metrics", 0, 0, {"timestamp": 10, "host": "a"}, now=0)
    engine.add("metrics", 0, 1, {"timestamp": 500, "host": "a"}, now=0)
    assert engine.watermark("metrics", now=1) is None and engine.advance(1) == []
    # partition 1's first message is old, and is not late: nothing was checked yet
    assert engine.add("metrics", 1, 0, {"timestamp": 20, "host": "b"}, now=2) == []
    assert engine.watermark("metrics", now=2) == 20
    engine.revoke("metrics", 1)
    assert engine.watermark("metrics", now=3) == 500


def test_an_event_time_in_epoch_milliseconds_is_refused_not_taken_as_the_far_future():
    engine = RuleEngine([definition("  - {type: metric, field: v, operator: above, value: 1}\n")])
    (problem,) = engine.add("metrics", 0, 0, {"timestamp": 1_700_000_000_000, "host": "a", "v": 2}, now=0)
    assert "(epoch milliseconds? set ANOMSTREAM_TIMESTAMP_UNIT=milliseconds)" in problem
    assert engine.watermark("metrics", now=0) is None  # the watermark did not move
    assert engine.add("metrics", 0, 1, {"timestamp": 1_700_000_000, "host": "a", "v": 2}, now=0) == []


def test_zero_policy_still_gives_an_empty_ratio_no_value():
    cond = "  - {type: ratio, query: {field: status, equals: error}, operator: below, percent: 5}\n"
    checks = run(definition(cond, extra="no_data: zero"), [[1], None, [1]], field="status")
    assert checks[1].values["ratio[0]"] is None and not checks[1].fired
    assert checks[0].fired and checks[2].fired  # 0 errors of 1 message: 0% is below 5%


def test_a_group_with_a_pending_window_is_not_expired_over_it():
    defn = definition("  - {type: metric, field: v, operator: above, value: 10}\n", extra="expire_after: 3",
                      group_by="[]")
    engine = RuleEngine([defn], idle_partition_s=1000)
    engine.add("metrics", 0, 0, {"timestamp": 0, "v": 1}, now=0)
    engine.add("metrics", 0, 1, {"timestamp": 20 * MINUTE, "v": 50}, now=0)
    engine.add("metrics", 0, 2, {"timestamp": 40 * MINUTE, "v": 1}, now=0)
    checks = engine.advance(0)
    assert [c.window_start // MINUTE for c in checks if c.fired] == [20]
    assert engine.held_offsets() == {("metrics", 0): 2}
