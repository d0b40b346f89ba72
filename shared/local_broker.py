"""A real single-node Apache Kafka broker (KRaft) on 127.0.0.1, without Docker.

The jars come from Maven Central through broker/pom.xml; storage is formatted once per data
folder; the broker runs as a child JVM whose pid is kept in the data folder so `down` can stop
it from another process.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from shared.cli import CONTEXT, PATH, run_command
from shared.config import anomstream_home
from shared.maven import copy_dependencies

# A developer tool that runs from a checkout: its Maven project and broker configuration are the
# repository's broker/ folder (beside this package), not package data.
BROKER_FILES = Path(__file__).resolve().parent.parent / "broker"
POM = BROKER_FILES / "pom.xml"
LOG4J = BROKER_FILES / "log4j2.yaml"
JMX_CONFIG = BROKER_FILES / "jmx-exporter.yaml"

AGENT_ARTIFACT = "jmx_prometheus_javaagent"


def cache_dir() -> Path:
    """The jars, the JMX agent and the default broker data: <ANOMSTREAM_HOME>/kafka."""
    return anomstream_home() / "kafka"


def default_data_dir() -> Path:
    return cache_dir() / "data"


def fetch_jars(libs: Path | None = None) -> Path:
    """The broker's classpath (every jar of broker/pom.xml but the java agent; default folder:
    <ANOMSTREAM_HOME>/kafka/libs)."""
    libs = libs or cache_dir() / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        copy_dependencies(POM, libs, f"-DexcludeArtifactIds={AGENT_ARTIFACT}")
    return libs


def fetch_jmx_agent(agent_dir: Path | None = None) -> Path:
    """The Prometheus JMX exporter java agent jar, kept off the broker's classpath (default folder:
    <ANOMSTREAM_HOME>/kafka/agent)."""
    agent_dir = agent_dir or cache_dir() / "agent"
    jars = sorted(agent_dir.glob(f"{AGENT_ARTIFACT}-*.jar"))
    if not jars:
        copy_dependencies(POM, agent_dir, f"-DincludeArtifactIds={AGENT_ARTIFACT}")
        jars = sorted(agent_dir.glob(f"{AGENT_ARTIFACT}-*.jar"))
    if len(jars) != 1:
        raise RuntimeError(f"expected one {AGENT_ARTIFACT} jar in {agent_dir}, found {[j.name for j in jars]}")
    return jars[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalBroker:
    def __init__(self, data_dir: Path | None = None, port: int = 9092, controller_port: int | None = None,
                 heap: str = "768m", java_agent: str | None = None, jmx_port: int | None = None):
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap
        self.java_agent = java_agent  # any "-javaagent:..." option; jmx_port builds the exporter's
        # The Prometheus JMX exporter agent serves broker/jmx-exporter.yaml's metrics on this port.
        self.jmx_port = jmx_port
        self.pid_file = self.data_dir / "broker.pid"
        self.metrics_url_file = self.data_dir / "metrics.url"  # the running broker's exporter, for status
        self.log_file = self.data_dir / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        """The JMX exporter's endpoint (None without jmx_port)."""
        return f"http://127.0.0.1:{self.jmx_port}/metrics" if self.jmx_port else None

    def _agents(self) -> list[str]:
        agents = [self.java_agent] if self.java_agent else []
        if self.jmx_port:  # 1.x agent argument: [host:]port:config
            agents.append(f"-javaagent:{fetch_jmx_agent()}=127.0.0.1:{self.jmx_port}:{JMX_CONFIG}")
        return agents

    def _write_properties(self) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            # Single node: internal topics cannot have more replicas than brokers.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            # Few transaction coordinator partitions (default 50): the first init_transactions on a
            # new broker waits for the __transaction_state topic to be created and loaded.
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": "2097152",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _java(self, libs: Path, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap}", f"-Dlog4j2.configurationFile={LOG4J}",
                "-cp", f"{libs}/*", *args]

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None

    def start(self, timeout: float = 90) -> None:
        if self.running_pid():
            self.wait_ready(timeout)
            return
        for taken in (self.port, self.jmx_port):
            if taken and port_open(taken):
                raise RuntimeError(f"port {taken} is already taken by another process")
        libs = fetch_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self._write_properties()
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")  # may begin with "-"
            subprocess.run(
                self._java(libs, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props)),
                check=True, stdout=subprocess.DEVNULL,
            )
        cmd = self._java(libs, *self._agents(), "kafka.Kafka", str(props))
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        if self.metrics_url:
            self.metrics_url_file.write_text(self.metrics_url)
        else:
            self.metrics_url_file.unlink(missing_ok=True)
        try:
            self.wait_ready(timeout, proc)
        except Exception:
            self.stop()
            raise

    def wait_ready(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"broker exited with {proc.returncode}; see {self.log_file}")
            if port_open(self.port):
                try:
                    md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=5)
                    if md.brokers:
                        return
                except Exception:  # not ready yet
                    pass
            time.sleep(0.3)
        raise TimeoutError(f"broker not ready after {timeout}s; see {self.log_file}")

    def stop(self, timeout: float = 30) -> None:
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGTERM)  # controlled shutdown: flushes logs, closes cleanly
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            try:  # reap it if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        self.metrics_url_file.unlink(missing_ok=True)

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL, as a crash or an OOM kill would (no controlled shutdown), and wait until it is gone."""
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:  # reap it if it is our child; else wait for it to disappear
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    pass
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        self.metrics_url_file.unlink(missing_ok=True)

    def running_metrics_url(self) -> str | None:
        """The exporter endpoint the running broker was started with, if any."""
        if self.running_pid() is None or not self.metrics_url_file.exists():
            return None
        return self.metrics_url_file.read_text().strip() or None


@click.command("kafka", help="local single-node Kafka broker", context_settings=CONTEXT)
@click.argument("action", type=click.Choice(["up", "down", "status", "fetch"]))
@click.option("--port", type=int, default=9092, show_default=True)
@click.option("--data-dir", type=PATH, default=None, help="default: <ANOMSTREAM_HOME>/kafka/data")
@click.option("--jmx-port", type=int, default=7071, show_default=True,
              help="up: serve the broker's metrics (Prometheus JMX exporter agent) on this port")
@click.option("--no-jmx", is_flag=True, help="up: start the broker without the exporter")
def command(action: str, port: int, data_dir: Path | None, jmx_port: int, no_jmx: bool) -> int:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and action in ("up", "down"):
        print(f"KAFKA_BOOTSTRAP_SERVERS={os.environ['KAFKA_BOOTSTRAP_SERVERS']}: using that cluster, "
              "no local broker started or stopped")
        return 0
    broker = LocalBroker(data_dir, port, jmx_port=None if no_jmx else jmx_port)
    if action == "fetch":
        print(fetch_jars())
        print(fetch_jmx_agent())
    elif action == "up":
        already = broker.running_pid() is not None
        broker.start()
        metrics = broker.running_metrics_url()
        print(f"kafka broker {'already running' if already else 'ready'} on {broker.bootstrap} "
              f"(pid {broker.running_pid()}, log {broker.log_file}); "
              + (f"metrics on {metrics}" if metrics else "no metrics exporter"))
    elif action == "down":
        broker.stop()
        print("kafka broker stopped")
    else:
        pid = broker.running_pid()
        metrics = broker.running_metrics_url()
        print((f"running on {broker.bootstrap} (pid {pid})" + (f", metrics on {metrics}" if metrics else ""))
              if pid else "not running")
        return 0 if pid else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream kafka")


if __name__ == "__main__":
    sys.exit(main())
