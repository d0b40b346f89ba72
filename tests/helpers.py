"""Helpers for tests that run the services against the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from models.metrics.features import read_series_csv
from shared.config import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout the tests run from

NAB_DIR = REPO_ROOT.parent / "shared" / "data" / "nab_ec2" / "data" / "realAWSCloudwatch"
SERIES_24AE8D = NAB_DIR / "ec2_cpu_utilization_24ae8d.csv"
HDFS_DIR = REPO_ROOT.parent / "shared" / "data" / "hdfs"


def as_settings(overrides: dict) -> Settings:
    return load_settings(**overrides)


class Service:
    """A service started as its own process (`python -m services.NAME`), as in production."""

    def __init__(self, name: str, overrides: dict, log_dir: Path, *args: str, env: dict | None = None,
                 command: list[str] | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ANOMSTREAM_")}
        environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        # Tests feed topics of their own, often before a service has joined its group: it reads
        # them from the start (the product's default is "latest", tests/shared/test_kafka_config.py).
        environ["ANOMSTREAM_AUTO_OFFSET_RESET"] = "earliest"
        # No HTTP server unless a test asks for one on a port of its own (tests/shared/test_telemetry_kafka.py).
        environ["ANOMSTREAM_HTTP_PORT"] = "0"
        # Lists and dicts reach pydantic-settings as JSON, as an operator would write them.
        environ |= {f"ANOMSTREAM_{k.upper()}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                    for k, v in overrides.items()}
        environ |= env or {}  # other variables, e.g. PYTHONPATH
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log_file = open(self.log_path, "wb")
        # `command`: another way to start it (e.g. spark-submit of the service's file).
        self.proc = subprocess.Popen([*(command or [sys.executable, "-m", f"services.{name}"]), *args], cwd=REPO_ROOT,
                                     env=environ, stdout=self.log_file, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


def worker_pids(parent: int) -> list[int]:
    """The detector's worker processes (not multiprocessing's resource tracker, also a child)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(proc.name))
    return pids


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie that no one reaped yet has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float, what: str, services_to_watch=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for svc in services_to_watch:
            assert svc.alive(), f"{svc.name} died while waiting for {what}:\n{svc.log[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def series_frame(path: Path = SERIES_24AE8D) -> pd.DataFrame:
    return read_series_csv(path)


class FakeMsg:
    """The parts of a confluent_kafka.Message the services read, for unit tests without a broker."""

    def __init__(self, value: bytes | None, key: bytes | None = b"k", topic: str = "input_data",
                 partition: int = 0, offset: int = 0, timestamp_ms: int = 1_700_000_000_000):
        self._value, self._key, self._topic = value, key, topic
        self._partition, self._offset, self._ts = partition, offset, timestamp_ms

    def value(self):
        return self._value

    def key(self):
        return self._key

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def timestamp(self):
        return (1, self._ts)  # (TIMESTAMP_CREATE_TIME, ms)

    def headers(self):
        return None

    def error(self):
        return None



BROKER_RATES = {"messages_in": 250.0, "bytes_in": 22_000.0, "bytes_out": 22_000.0, "fetch_requests": 12.0,
                "produce_requests": 50.0}


def broker_metrics_frame(rows: int, seed: int = 0, bursts=(), large=()) -> pd.DataFrame:
    """Rows in the layout of `anomstream scenario kafka-load`: normal per-second rates with noise, a
    burst (x1000 messages and bytes) at the rows in `bursts`, a ~960 KB message at those in `large`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"timestamp": 1_700_000_000.0 + np.arange(rows), "interval_s": 1.0})
    for name, rate in BROKER_RATES.items():
        frame[name] = rate * np.exp(rng.normal(0, 0.05, rows))
    frame["is_anomaly"], frame["anomaly"] = 0, ""
    for i in bursts:
        frame.loc[i, ["messages_in", "bytes_in", "produce_requests"]] *= 1000
        frame.loc[i, ["is_anomaly", "anomaly"]] = [1, f"burst-{i}"]
    for i in large:
        frame.loc[i, "bytes_in"] += 960_000
        frame.loc[i, ["is_anomaly", "anomaly"]] = [1, f"large-message-{i}"]
    return frame
