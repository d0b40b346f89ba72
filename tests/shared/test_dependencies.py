"""Dependencies: the heavy optional parts are extras (TensorFlow: train, Spark: spark, the PostgreSQL
driver: postgres), the test extra has what the tests import, and `make run` installs what it runs
while `make test` adds the test extra (each with its stamp, both from a fresh machine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_heavy_parts_are_extras():
    core, extras = names(PROJECT["dependencies"]), PROJECT["optional-dependencies"]
    assert not core & {"tensorflow", "tensorflow-cpu", "pyspark", "psycopg", "psycopg2", "psycopg-binary"}, core
    assert names(extras["train"]) == {"tensorflow", "tensorflow-cpu"}
    assert names(extras["spark"]) == {"pyspark", "pyarrow"}
    assert extras["postgres"] == ["psycopg[binary]>=3.2"]


def test_the_test_extra_has_what_the_tests_import():
    test = names(PROJECT["optional-dependencies"]["test"])
    assert {"pytest", "pytest-timeout", "pyspark", "pyarrow", "psycopg", "import-linter", "docker"} <= test, test
    assert not test & {"tensorflow", "tensorflow-cpu"}, "make test installs train beside test"


def dry_run(tmp_path: Path, target: str) -> list[str]:
    """The commands `make TARGET` would run, on a copy of the Makefile (make -n: nothing runs)."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed", pytrace=False)
    for rel in ("Makefile", "pyproject.toml", "broker/pom.xml", "spark/pom.xml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    done = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bpip install\b.* -e ", c)]


def test_make_run_installs_what_it_runs_not_the_test_extra(tmp_path):
    commands = dry_run(tmp_path, "run")
    assert pip_installs(commands) == [".venv/bin/pip install -q -e '.[train]'"], commands
    assert ".venv/bin/python -m shared.local_broker fetch" in commands  # the local broker's jars
    assert not [c for c in commands if "spark" in c], "make run does not wait for Spark's jars"
    assert commands[-1] == ".venv/bin/anomstream run"


def test_make_test_installs_the_test_extra_on_a_fresh_machine(tmp_path):
    commands = dry_run(tmp_path, "test")
    assert commands[0].startswith("test -x .venv/bin/python || "), "a fresh machine gets its venv"
    assert pip_installs(commands)[-1] == ".venv/bin/pip install -q -e '.[test,train]'", commands
    assert ".venv/bin/python -m shared.local_broker fetch" in commands  # the broker tests need it
    assert ".venv/bin/anomstream spark-detect --fetch-jars" in commands  # the Spark detector's tests
    assert commands[-1] == ".venv/bin/python -m pytest"
    # Installed once, the stamps keep both targets from installing again.
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    for stamp in (".installed-run", ".installed-test"):
        (tmp_path / ".venv" / stamp).touch()
    for target, last in (("test", ".venv/bin/python -m pytest"), ("run", ".venv/bin/anomstream run")):
        done = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.stdout.splitlines() == [last], done.stdout
