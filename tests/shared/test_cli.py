"""The `anomstream` command line (click), run as a user runs it: the console script in a subprocess.

--version and --help work; unknown commands and bad options fail on stderr; a command's --help
works whatever the ANOMSTREAM_* variables hold and loads no model library; a command that runs
validates the settings and names the bad variable."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from services.cli import COMMANDS

LOGS_COMMANDS = ["logs parse", "logs evaluate", "logs train", "logs render"]
BAD_SETTINGS = {"ANOMSTREAM_BATCH_SIZE": "notanumber", "ANOMSTREAM_KAFKA_EXTRA": "notjson"}


def run(args: list[str], tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """The console script (or `python -m services.cli` where it is not installed), with no
    ANOMSTREAM_* or Kafka variable of the caller's and its data directory under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMSTREAM_")}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env |= {"ANOMSTREAM_HOME": str(tmp_path / "home"), **env_extra}
    script = Path(sys.executable).parent / "anomstream"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]
    return subprocess.run(command + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_version(tmp_path):
    result = run(["--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"anomstream {version('anomstream')}"


def test_version_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "--version"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert version("anomstream") in result.stdout


def test_help_lists_every_command_with_its_one_line_help(tmp_path):
    result = run(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in result.stdout.splitlines()
              if line.startswith("  ") and line.split() and not line.split()[0].startswith("-")}
    for name, (_, help_text) in COMMANDS.items():
        assert name in listed, f"{name} not listed:\n{result.stdout}"
        assert help_text.startswith(listed[name]), (name, listed[name])  # the first line of the one-liner
    assert "rules" in listed and "--version" in result.stdout


def test_rules_is_a_command(tmp_path):
    result = run(["rules", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage: anomstream rules" in result.stdout
    assert "--rules-dir" in result.stdout and "--environment" in result.stdout


def test_unknown_command_fails_on_stderr(tmp_path):
    result = run(["nosuchcommand"], tmp_path)
    assert result.returncode == 2
    assert "No such command 'nosuchcommand'" in result.stderr
    assert result.stdout == ""


def test_bad_option_fails_on_stderr(tmp_path):
    result = run(["detect", "--workers", "x"], tmp_path)
    assert result.returncode == 2
    assert "Invalid value for '--workers'" in result.stderr
    assert "Usage: anomstream detect" in result.stderr
    result = run(["detect", "--no-such-option"], tmp_path)
    assert result.returncode == 2 and "No such option" in result.stderr


def test_a_module_main_reports_a_bad_option_as_the_console_script_does(capsys):
    from services.detector.service import main

    assert main(["--workers", "x"]) == 2
    err = capsys.readouterr().err
    assert "Usage: anomstream detect" in err and "Invalid value for '--workers'" in err
    assert main(["--help"]) == 0
    assert "--workers" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["scrape", "detect"])
def test_help_ignores_an_invalid_setting(tmp_path, command):
    result = run([command, "--help"], tmp_path, **BAD_SETTINGS)
    assert result.returncode == 0, result.stderr
    assert f"Usage: anomstream {command}" in result.stdout


def test_a_command_that_runs_names_the_invalid_setting(tmp_path):
    result = run(["detect"], tmp_path, ANOMSTREAM_BATCH_SIZE="notanumber")
    assert result.returncode != 0
    assert "ANOMSTREAM_BATCH_SIZE" in result.stderr


# What one `anomstream ... --help` leaves in sys.modules: the click app's main in-process.
HELP_PROBE = """
import sys
from services.cli import cli
rc = cli.main(sys.argv[1:] + ["--help"], prog_name="anomstream", standalone_mode=False)
print("exit", rc)
print("tensorflow loaded", "tensorflow" in sys.modules)
"""


@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS] + [c.split() for c in LOGS_COMMANDS],
                         ids=lambda c: " ".join(c) or "anomstream")
def test_every_help_works_with_invalid_settings_and_loads_no_tensorflow(tmp_path, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANOMSTREAM_")}
    env |= {"ANOMSTREAM_HOME": str(tmp_path / "home"), **BAD_SETTINGS}
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, *command], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert f"Usage: {' '.join(['anomstream', *command])}" in result.stdout
    assert "exit 0" in result.stdout
    assert "tensorflow loaded False" in result.stdout


def test_train_with_csvs_needs_a_name(tmp_path):
    """`anomstream train my.csv` used to replace both metric model sets with one trained on my.csv."""
    csv = tmp_path / "my.csv"
    csv.write_text("timestamp,value\n2024-01-01 00:00:00,1\n")
    result = run(["train", str(csv)], tmp_path)
    assert result.returncode == 2 and "without --name" in result.stderr, result.stderr
    assert not (tmp_path / "home" / "models").exists()


def test_run_refuses_to_write_its_demo_into_a_remote_cluster(tmp_path):
    result = run(["run"], tmp_path, KAFKA_BOOTSTRAP_SERVERS="kafka-1.prod.example:9092,127.0.0.1:9092")
    assert result.returncode == 2, result.stderr
    assert "kafka-1.prod.example" in result.stderr and "--into-cluster" in result.stderr
