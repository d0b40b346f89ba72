import math
import time

import numpy as np
import pandas as pd
import pytest
from helpers import REPO_ROOT

from models.evaluation.nab import (
    PROFILES,
    load_windows,
    nab_score,
    nab_score_fixed,
    nab_scores_all_profiles,
    probation_length,
    score_series,
    window_indices,
    window_metrics,
)

NAB_DIR = REPO_ROOT.parent / "shared" / "data" / "nab_ec2"

# Synthetic series: 200 rows -> probation = floor(0.15 * 200) = 30 rows.
N = 200
WIN = [(100, 119)]  # W = 20


def hand_sigmoid(x):
    """S(x) from the spec, written out independently of the module."""
    return -1.0 if x > 3 else 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


MAX_TP = 2.0 / (1.0 + math.exp(-5.0)) - 1.0  # S(-1) = 0.98661...


def alarms_at(*rows, n=N):
    a = np.zeros(n, dtype=bool)
    a[list(rows)] = True
    return a


@pytest.fixture(scope="module")
def real_series():
    windows = load_windows(NAB_DIR / "labels" / "combined_windows.json")
    out = {}
    for name, wins in windows.items():
        ts = pd.read_csv(NAB_DIR / "data" / name)["timestamp"]
        out[name] = (len(ts), window_indices(ts, wins))
    return out


def test_probation_length():
    assert probation_length(4032) == 604  # floor(604.8)
    assert probation_length(200) == 30
    assert probation_length(10_000) == 750  # capped at floor(0.15 * 5000)


def test_window_indices_on_real_file(real_series):
    n, idx = real_series["realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv"]
    assert n == 4032
    assert len(idx) == 2
    assert sum(hi - lo + 1 for lo, hi in idx) == 402
    # Inclusive bounds: the rows at L and R carry exactly the labelled start/end stamps.
    ts = pd.to_datetime(pd.read_csv(NAB_DIR / "data/realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv")["timestamp"])
    assert ts[idx[0][0]] == pd.Timestamp("2014-02-26 13:45:00")
    assert ts[idx[0][1]] == pd.Timestamp("2014-02-27 06:25:00")


def test_window_indices_rejects_window_outside_data():
    ts = pd.date_range("2020-01-01", periods=10, freq="5min")
    with pytest.raises(ValueError):
        window_indices(ts, [(pd.Timestamp("2021-01-01"), pd.Timestamp("2021-01-02"))])


def test_profiles_constants():
    assert PROFILES["standard"] == {"tp": 1.0, "fp": 0.11, "fn": 1.0, "tn": 1.0}
    assert PROFILES["reward_low_fp"]["fp"] == 0.22
    assert PROFILES["reward_low_fn"]["fn"] == 2.0


@pytest.mark.parametrize("profile", list(PROFILES))
def test_perfect_and_null_detectors_on_real_windows(real_series, profile):
    perfect, null = {}, {}
    for name, (n, idx) in real_series.items():
        s = np.zeros(n)
        s[[lo for lo, _ in idx]] = 1.0  # alarm exactly at each window's first row
        perfect[name] = (s, idx)
        null[name] = (np.zeros(n), idx)
    res = nab_score(perfect, profile)
    # 12 windows across the 8 series; each first-row detection is worth exactly A_TP.
    assert res["score"] == pytest.approx(100.0)
    assert res["perfect"] == pytest.approx(12 * PROFILES[profile]["tp"])
    assert res["null"] == pytest.approx(-12 * PROFILES[profile]["fn"])
    assert (res["threshold"], res["tp"], res["fp"], res["fn"]) == (1.0, 12, 0, 0)

    res0 = nab_score(null, profile)
    assert res0["score"] == pytest.approx(0.0)
    assert (res0["tp"], res0["fp"], res0["fn"]) == (0, 0, 12)


def test_nab_scores_all_profiles_keys(real_series):
    series = {k: (np.zeros(n), idx) for k, (n, idx) in real_series.items()}
    out = nab_scores_all_profiles(series)
    assert set(out) == {"standard", "reward_low_fp", "reward_low_fn"}
    assert out["reward_low_fn"]["null"] == pytest.approx(-24.0)


def test_missed_window_costs_a_fn():
    assert score_series(np.zeros(N, bool), WIN, "standard")["score"] == pytest.approx(-1.0)
    assert score_series(np.zeros(N, bool), WIN, "reward_low_fn")["score"] == pytest.approx(-2.0)


def test_early_detection_beats_late_detection():
    early = score_series(alarms_at(102), WIN, "standard")["score"]
    late = score_series(alarms_at(117), WIN, "standard")["score"]
    assert early > late > 0


def test_detection_at_window_end_uses_scaled_sigmoid():
    # Row R: p = -(R - R + 1) / W = -1/20; value = S(-0.05) / maxTP.
    expected = (2.0 / (1.0 + math.exp(5.0 * -0.05)) - 1.0) / MAX_TP
    res = score_series(alarms_at(119), WIN, "standard")
    assert res["score"] == pytest.approx(expected)
    assert res["score"] == pytest.approx(0.12604, abs=1e-5)
    assert (res["tp"], res["fn"], res["fp"]) == (1, 0, 0)


def test_only_best_detection_in_window_counts():
    # First row is worth exactly A_TP; a second, later detection adds nothing.
    assert score_series(alarms_at(100), WIN, "standard")["score"] == pytest.approx(1.0)
    res = score_series(alarms_at(100, 110), WIN, "standard")
    assert res["score"] == pytest.approx(1.0)
    assert (res["tp"], res["fp"]) == (1, 0)


@pytest.mark.parametrize("profile,cost", [("standard", 0.11), ("reward_low_fp", 0.22), ("reward_low_fn", 0.11)])
def test_false_positive_before_first_window_costs_a_fp(profile, cost):
    base = score_series(np.zeros(N, bool), WIN, profile)["score"]
    res = score_series(alarms_at(50), WIN, profile)
    assert base - res["score"] == pytest.approx(cost)
    assert res["fp"] == 1
    # A series without windows treats every detection the same way.
    assert score_series(alarms_at(50), [], profile)["score"] == pytest.approx(-cost)


def test_false_positive_after_window_decays():
    # Row 124 is 5 rows past R = 119 with W = 20: p = 5/19.
    near = 0.11 * (2.0 / (1.0 + math.exp(5.0 * 5 / 19)) - 1.0)
    assert score_series(alarms_at(124), WIN, "standard")["score"] == pytest.approx(-1.0 + near)
    # Row 179: p = 60/19 > 3 -> S = -1, the full A_FP.
    assert score_series(alarms_at(179), WIN, "standard")["score"] == pytest.approx(-1.0 - 0.11)
    # Just after the window the penalty is small, far away it is the full cost.
    assert -0.11 < near < 0 and abs(near) < 0.11 * 0.9


def test_false_positive_measured_from_most_recent_window():
    wins = [(100, 119), (150, 159)]  # second window W' = 10, R' = 159
    p = 6 / 9  # row 165 is 6 rows past R' = 159
    expected = -2.0 + 0.11 * (2.0 / (1.0 + math.exp(5.0 * p)) - 1.0)
    assert score_series(alarms_at(165), wins, "standard")["score"] == pytest.approx(expected)


def test_one_row_window_guard():
    # W' = 1 would divide by zero; any later FP is worth the full -A_FP.
    assert score_series(alarms_at(101), [(100, 100)], "standard")["score"] == pytest.approx(-1.0 - 0.11)


def test_probation_rows_never_count():
    base = score_series(np.zeros(N, bool), WIN, "standard")
    res = score_series(alarms_at(0, 10, 29), WIN, "standard")
    assert res == base
    assert score_series(alarms_at(30), WIN, "standard")["fp"] == 1  # first scored row

    # In the sweep too: were the 30 probation rows FPs, t=0.8 would total 1 - 30 * 0.11 < -1
    # and firing nowhere would win.
    s = np.zeros(N)
    s[:30], s[100] = 0.8, 0.8
    out = nab_score({"a": (s, WIN)}, "standard")
    assert (out["threshold"], out["fp"], out["tp"]) == (0.8, 0, 1)
    assert out["score"] == pytest.approx(100.0)


def test_sweep_picks_best_pooled_threshold():
    # Series A: its window is only found at t <= 0.4. Series B: no windows, an FP at 0.6.
    a = np.zeros(N)
    a[100] = 0.4
    b = np.zeros(N)
    b[50] = 0.6
    # t=1.1 -> -1; t=0.6 -> -1.11; t=0.4 -> +1 - 0.11 = 0.89; t=0 -> many FPs.
    out = nab_score({"a": (a, WIN), "b": (b, [])}, "standard")
    assert out["threshold"] == 0.4
    assert out["raw"] == pytest.approx(0.89)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 0)
    assert out["score"] == pytest.approx(100 * (0.89 + 1) / 2)  # 94.5


def test_sweep_lower_threshold_finds_window_earlier():
    s = np.zeros(N)
    s[115], s[50], s[100] = 0.9, 0.6, 0.5
    late = (2.0 / (1.0 + math.exp(5.0 * -5 / 20)) - 1.0) / MAX_TP  # row 115: p = -5/20, ~0.5621
    # t=0.9 -> late; t=0.6 -> late - 0.11; t=0.5 -> row 100 is worth 1.0, so 1 - 0.11 = 0.89.
    assert late < 0.89
    out = nab_score({"a": (s, WIN)}, "standard")
    assert out["threshold"] == 0.5
    assert out["raw"] == pytest.approx(0.89)
    assert (out["tp"], out["fp"]) == (1, 1)


def test_sweep_ties_go_to_highest_threshold():
    s = np.zeros(N)
    s[100], s[105] = 0.9, 0.7  # t=0.9 and t=0.7 both give +1.0
    out = nab_score({"a": (s, WIN)}, "standard")
    assert out["threshold"] == 0.9
    assert out["raw"] == pytest.approx(1.0)


def test_sweep_keeps_no_alarm_when_every_threshold_hurts():
    s = np.zeros(N)
    s[50] = 0.7  # only an FP before the window ever fires
    out = nab_score({"a": (s, WIN)}, "standard")
    assert out["threshold"] > 1.0
    assert out["score"] == pytest.approx(0.0)
    assert out["fp"] == 0


def test_sweep_matches_brute_force():
    rng = np.random.default_rng(0)
    series = {}
    for k, wins in enumerate([[(80, 99), (140, 160)], [(60, 60), (120, 150)], []]):
        s = np.round(rng.random(N) ** 4, 2)  # coarse values -> many ties
        for lo, _ in wins:
            s[lo + 3] = 0.97
        series[f"s{k}"] = (s, wins)
    for profile in PROFILES:
        out = nab_score(series, profile)
        # Start from "never fire", which NAB's sweep also considers.
        best_t = None
        best = sum(score_series(np.zeros(N, bool), w, profile)["score"] for _, w in series.values())
        for t in np.unique(np.concatenate([s for s, _ in series.values()]))[::-1]:
            total = sum(score_series(s >= t, w, profile)["score"] for s, w in series.values())
            if total > best + 1e-9:
                best_t, best = t, total
        assert best_t is not None  # the planted early detections must beat firing nowhere
        assert out["raw"] == pytest.approx(best)
        assert out["threshold"] == best_t


def test_sweep_is_fast_on_real_sized_corpus(real_series):
    rng = np.random.default_rng(1)
    series = {k: (rng.random(n), idx) for k, (n, idx) in real_series.items()}  # ~32k distinct scores
    start = time.perf_counter()
    nab_scores_all_profiles(series)
    assert time.perf_counter() - start < 2.0


def test_nab_score_rejects_bad_input():
    with pytest.raises(ValueError):
        nab_score({"a": (np.zeros(N), [])}, "standard")  # no windows: normalisation undefined
    bad = np.zeros(N)
    bad[5] = np.nan
    with pytest.raises(ValueError):
        nab_score({"a": (bad, WIN)}, "standard")


def test_window_metrics_hand_case():
    wins = [(5, 7), (12, 14)]
    alarms = alarms_at(2, 6, 7, 16, n=20)  # FP, found window 1 (twice), FP; window 2 missed
    m = window_metrics(alarms, wins)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(0.4)  # 2 * (1/3)(1/2) / (5/6)

    m = window_metrics(alarms, wins, probation=3)  # drops the alarm at row 2
    assert (m["tp"], m["fp"], m["precision"], m["f1"]) == (1, 1, 0.5, 0.5)

    m = window_metrics(np.zeros(20, bool), [])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_fixed_alarms_are_scored_as_given_not_swept():
    # One window [100, 119] in 1000 rows, no probation issue (probation = 150 rows: use 2000 rows).
    widx = [(1000, 1019)]
    alarms = np.zeros(2000, bool)
    alarms[1000] = True  # perfect
    assert nab_score_fixed({"a": (alarms, widx)}, "standard")["score"] == pytest.approx(100.0)
    noisy = np.zeros(2000, bool)
    noisy[300:800] = True  # 500 false alarms before the window, window missed
    raw = -1.0 - 500 * 0.11  # A_FN plus 500 x A_FP (all before the first window)
    expected = 100 * (raw - (-1.0)) / (1.0 - (-1.0))
    fixed = nab_score_fixed({"a": (noisy, widx)}, "standard")
    assert fixed["score"] == pytest.approx(expected) and fixed["score"] < 0
    # The sweep, given the same 0/1 scores, would rather never fire.
    assert nab_score({"a": (noisy.astype(float), widx)}, "standard")["score"] == pytest.approx(0.0)
