"""Run history (models/rules/run_history.py) on SQLite and on a throwaway PostgreSQL server, and the
`anomstream runs` / `chart` commands. The checks come from the real rule engine on a small stream."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import uuid
from datetime import timedelta, timezone
from pathlib import Path

import pytest

from models.rules.definitions import parse_definition
from models.rules.engine import RuleEngine
from models.rules.run_history import RunHistory, utc
from services.jobs.rule_history import build_figure, chart_main, runs_main
from shared.local_broker import free_port

TOPIC = "metrics"
CONSUMER_GROUP = "rules-test"
DEFINITION = parse_definition("""
name: cpu-high
trigger_every: 1m
allowed_lateness: 0s
query: {topic: metrics, group_by: series}
conditions:
  - {type: bollinger, field: value, points: 5, k: 2}
  - {type: metric, field: value, aggregation: average, operator: above, value: 50}
actions: [{type: log}]
""")
T0 = 1_700_000_040  # a minute boundary


def stream() -> list[dict]:
    """Two series, a message every 10 s for 20 minutes: series a spikes to 90 in minute 15,
    series b is silent in minutes 10-11 (two no-data checks)."""
    rng = random.Random(7)
    records = []
    for s in range(0, 20 * 60, 10):
        for series in ("a", "b"):
            if series == "b" and 600 <= s < 720:
                continue
            value = 90.0 if series == "a" and 900 <= s < 960 else 10 + rng.random()
            records.append({"series": series, "timestamp": T0 + s, "value": value})
    return records


def run_engine(engine: RuleEngine, records: list[dict], first_offset: int = 0) -> list:
    """Drive the engine as the rules service does: one partition, processing time = event time."""
    checks = []
    for offset, record in enumerate(records, start=first_offset):
        assert engine.add(TOPIC, 0, offset, record, record["timestamp"]) == []
        checks += engine.advance(record["timestamp"])
    return checks


@pytest.fixture(scope="module")
def checks() -> list:
    out = run_engine(RuleEngine([DEFINITION]), stream())
    for c in out:
        if c.fired:
            c.actions = [{"type": "log", "target": None, "outcome": "logged"}]
    return out


# ---------------------------------------------------------------- a throwaway PostgreSQL server

def _postgres_bindir() -> Path | None:
    """The newest Debian-layout PostgreSQL server, else initdb on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    found = found or [p for p in [shutil.which("initdb")] if p]
    if found and (Path(found[-1]).parent / "pg_ctl").exists():
        return Path(found[-1]).parent
    return None


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this session on 127.0.0.1 (trust auth, fsync off), stopped and
    deleted at the end. Yields its URL without a database name."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: the run history's PostgreSQL tests "
                    "need them; on Debian/Ubuntu: apt-get install postgresql", pytrace=False)
    if importlib.util.find_spec("psycopg") is None:
        pytest.fail("psycopg is not installed: .venv/bin/pip install -e '.[test]'", pytrace=False)
    # Not under pytest's tmp folder: that one is private to us, and the server may run as nobody.
    folder = Path(tempfile.mkdtemp(prefix="anomstream-pg-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data, log, port = folder / "data", folder / "server.log", free_port()

    def pg(*args: str, check: bool = True) -> None:
        done = subprocess.run(as_user + [str(a) for a in args], cwd=folder, capture_output=True, text=True,
                              timeout=120)
        if check and done.returncode:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{server_log}")

    try:
        pg(bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        pg(bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
           f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
           "start")
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        pg(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty run history URL: a SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sub' / 'history.db'}"
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"history_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.fixture
def history(db_url):
    h = RunHistory(db_url)
    yield h
    h.close()


# ---------------------------------------------------------------- the store, on both backends

def test_record_is_idempotent_and_keeps_progress(history, checks):
    assert len(checks) == 38 and sum(c.fired for c in checks) == 1
    assert sum(c.status == "no_data" for c in checks) == 2
    assert history.record(checks, {(TOPIC, 0): 500, (TOPIC, 1): 20}, CONSUMER_GROUP) == len(checks)
    # Re-delivered after a restart: nothing new, and the progress does not move back.
    assert history.record(checks, {(TOPIC, 0): 300}, CONSUMER_GROUP) == 0
    assert history.record(checks[-3:] + checks[-3:], {}, CONSUMER_GROUP) == 0
    assert history.progress(CONSUMER_GROUP) == {(TOPIC, 0): 500, (TOPIC, 1): 20}
    history.record([], {(TOPIC, 0): 501}, CONSUMER_GROUP)
    assert history.progress(CONSUMER_GROUP) == {(TOPIC, 0): 501, (TOPIC, 1): 20}
    assert history.progress("another-group") == {}
    assert history.definitions() == ["cpu-high"]
    assert history.groups("cpu-high") == {"a": 19, "b": 19}


def test_recent_round_trips_utc_datetimes_and_check_contents(history, checks):
    history.record(checks, {}, CONSUMER_GROUP)
    recent = history.recent("cpu-high", limit=5, group="a")
    assert len(recent) == 5
    assert [r["window_start"] for r in recent] == sorted((r["window_start"] for r in recent), reverse=True)
    last = [c for c in checks if c.group == "a"][-1]
    newest = recent[0]
    for key in ("window_start", "window_end", "recorded_at"):
        assert newest[key].tzinfo is not None and newest[key].utcoffset() == timedelta(0)
    assert newest["window_start"] == utc(last.window_start) and newest["window_end"] == utc(last.window_end)
    assert newest["window_start"].tzinfo == timezone.utc
    assert newest["values"] == last.values and newest["state"] == last.state
    assert newest["conditions"] == [dataclasses.asdict(o) for o in last.conditions]
    fired = [r for r in history.recent("cpu-high", limit=100) if r["fired"]]
    assert len(fired) == 1 and fired[0]["status"] == "fired" and fired[0]["actions"][0]["outcome"] == "logged"
    assert history.recent("no-such-definition") == []


def test_non_finite_numbers_are_stored_as_null(history, checks):
    c = checks[10]
    odd = dataclasses.replace(c, values={**c.values, "average(value)": math.nan},
                              conditions=[dataclasses.replace(c.conditions[0], value=math.inf,
                                                              detail={"upper": -math.inf, "ema": 1.5})],
                              state={**c.state, "x": [math.nan, 2.0]})
    assert history.record([odd], {}, CONSUMER_GROUP) == 1
    row = history.recent("cpu-high")[0]
    assert row["values"]["average(value)"] is None
    assert row["conditions"][0]["value"] is None
    assert row["conditions"][0]["detail"] == {"upper": None, "ema": 1.5}
    assert row["state"]["x"] == [None, 2.0]


@pytest.mark.parametrize("crash_after", [55, 124, 131, 190])
def test_restart_from_latest_states_gives_the_same_checks(history, crash_after):
    """Record what an engine checked up to a crash; a new engine restored from latest_states and
    the recorded progress, re-reading from the lowest offset still held in an open window (where
    the service commits), goes on exactly as an engine that never stopped."""
    records = stream()
    uninterrupted = run_engine(RuleEngine([DEFINITION]), records)

    first = RuleEngine([DEFINITION])
    before = run_engine(first, records[:crash_after])
    history.record(before, {(TOPIC, 0): crash_after}, CONSUMER_GROUP)
    committed = first.held_offsets().get((TOPIC, 0), crash_after)
    assert committed < crash_after  # some messages are re-read

    second = RuleEngine([DEFINITION])
    states = history.latest_states(DEFINITION.name, DEFINITION.version)
    assert set(states) == {c.group for c in before}
    for key, state in states.items():
        assert state == [c for c in before if c.group == key][-1].state
    assert second.restore(DEFINITION.name, DEFINITION.version, states) == len(states)
    second.replayed_below = history.progress(CONSUMER_GROUP)
    after = run_engine(second, records[committed:], first_offset=committed)

    assert [dataclasses.asdict(c) for c in before + after] == [dataclasses.asdict(c) for c in uninterrupted]
    assert history.latest_states(DEFINITION.name, "other-version") == {}


def test_frame_flattens_values_and_conditions(history, checks):
    history.record(checks, {}, CONSUMER_GROUP)
    frame = history.frame("cpu-high")
    assert len(frame) == len(checks)
    assert frame["window_start"].is_monotonic_increasing
    assert str(frame["window_start"].dt.tz) == "UTC" and str(frame["window_end"].dt.tz) == "UTC"
    for col in ("group", "status", "fired", "messages", "count", "average(value)", "cond0.value", "cond0.holds",
                "cond0.ema", "cond0.upper", "cond0.lower", "cond1.value", "cond1.holds", "cond1.threshold"):
        assert col in frame.columns, col
    a = history.frame("cpu-high", group="a")
    assert set(a["group"]) == {"a"} and len(a) == 19
    spike = a[a["fired"]]
    assert len(spike) == 1 and spike["average(value)"].iloc[0] == 90.0
    assert spike["cond0.value"].iloc[0] > spike["cond0.upper"].iloc[0] and spike["cond1.threshold"].iloc[0] == 50
    assert a["cond0.ema"].isna().sum() == 5  # the band's warm-up: 5 points
    b = history.frame("cpu-high", group="b")
    assert list(b["status"]).count("no_data") == 2 and b.loc[b["status"] == "no_data", "cond0.value"].isna().all()
    assert history.frame("no-such-definition").empty


def test_sqlite_uses_wal_and_creates_the_folder(tmp_path):
    url = f"sqlite:///{tmp_path / 'deep' / 'er' / 'history.db'}"
    h = RunHistory(url)
    try:
        with h.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert (tmp_path / "deep" / "er" / "history.db").exists()
    finally:
        h.close()


def test_postgresql_without_its_driver_names_the_extra(monkeypatch):
    """psycopg is the `postgres` extra, not a core dependency: a PostgreSQL URL without it is refused
    at once, saying what to install (and without the password)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'anomstream\[postgres\]'.*EXTRAS=postgres") as caught:
        RunHistory("postgresql+psycopg://svc:s3cret-pw@db.example/history")
    assert "s3cret-pw" not in str(caught.value)


def test_postgresql_with_another_driver_is_refused():
    with pytest.raises(ValueError, match=r"postgresql\+psycopg://.*not psycopg2"):
        RunHistory("postgresql+psycopg2://svc@db.example/history")


# ---------------------------------------------------------------- anomstream runs / chart

@pytest.fixture
def sqlite_history(tmp_path, checks) -> str:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    h = RunHistory(url)
    h.record(checks, {}, CONSUMER_GROUP)
    h.close()
    return url


def test_runs_prints_the_fired_check(sqlite_history, capsys):
    assert runs_main(["cpu-high", "--db", sqlite_history, "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "[0] average(value) above the upper Bollinger band" in out and "[1] average(value) above 50" in out
    fired = [line for line in out.splitlines() if "FIRED" in line]
    assert len(fired) == 1
    assert fired[0].startswith("2023-11-14T22:29:00Z – 2023-11-14T22:30:00Z")
    assert "90 ✓" in fired[0] and "log: logged" in fired[0] and " a " in fired[0]
    table = out.splitlines()[4:]
    assert len(table) == 21  # header + 20 checks
    column = table[0].index("status")  # aligned: every status starts under its header
    assert all(line[column:].split()[0] in ("ok", "FIRED", "no") for line in table[1:])

    assert runs_main(["cpu-high", "--db", sqlite_history, "--group", "b", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("no data") == 2 and "FIRED" not in out


def test_runs_without_checks_names_the_definitions_that_have_some(sqlite_history, tmp_path, capsys):
    assert runs_main(["cpu-low", "--db", sqlite_history]) == 1
    err = capsys.readouterr().err
    assert "'cpu-low'" in err and "cpu-high" in err
    assert runs_main(["cpu-high", "--group", "zz", "--db", sqlite_history]) == 1
    assert "its groups: a, b" in capsys.readouterr().err
    missing = tmp_path / "nothing.db"
    assert runs_main(["cpu-high", "--db", f"sqlite:///{missing}"]) == 1
    assert not missing.exists()  # a read command leaves no empty database behind


def test_chart_writes_a_png(sqlite_history, tmp_path, capsys):
    out = tmp_path / "charts" / "cpu.png"
    assert chart_main(["cpu-high", "--out", str(out), "--db", sqlite_history]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert chart_main(["cpu-high", "--out", str(out), "--group", "a", "--last", "8", "--db", sqlite_history]) == 0
    assert chart_main(["nope", "--out", str(tmp_path / "x.png"), "--db", sqlite_history]) == 1


def test_chart_figure_has_band_threshold_firing_and_no_data(sqlite_history):
    from matplotlib.collections import PolyCollection

    h = RunHistory(sqlite_history)
    frame = h.frame("cpu-high")
    h.close()
    fig = build_figure(frame, "cpu-high")
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in axes] == ["cpu-high — group a", "cpu-high — group b"]
    assert "cpu-high" in fig._suptitle.get_text()
    for ax in axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 1 and bands[0].get_label() == "[0] band"
        thresholds = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(thresholds) == 1 and list(thresholds[0].get_ydata()) == [50.0, 50.0]
        assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"average(value)", "[0] EMA", "[0] band",
                                                                        "[1] threshold"}
    red = [line for line in axes[0].lines if line.get_color() == "red" and line.get_marker() == "o"]
    assert len(red) == 1 and list(red[0].get_ydata()) == [90.0]
    ticks = [line for line in axes[1].lines if line.get_marker() == "|"]
    assert len(ticks) == 1 and len(ticks[0].get_xdata()) == 2

    one = build_figure(frame, "cpu-high", group="b", last=5)
    (ax,) = [ax for ax in one.axes if ax.get_title(loc="left")]
    assert len(ax.lines[0].get_xdata()) == 5
