"""anomstream: one command, one sub-command per service or task."""

from __future__ import annotations

import sys

import click

from shared.cli import LazyGroup, run_command

# name -> ("module:click command", one-line help). A command's module is imported only when that
# command runs or shows its help, so `anomstream --help` stays fast and loads no model library.
COMMANDS = {
    "kafka": ("shared.local_broker:command", "start/stop the local single-node Kafka broker"),
    "train": ("services.jobs.train:command", "train the model sets"),
    "produce": ("services.producer.service:command", "replay CSVs or generate synthetic transactions into Kafka"),
    "detect": ("services.detector.service:command", "run the detector workers"),
    "spark-detect": ("services.detector.spark.__main__:command",
                     "run the detector as a Spark Structured Streaming query (needs anomstream[spark])"),
    "logdetect": ("services.logdetector.service:command",
                  "run the log detector (raw lines of `logs` -> anomalous sessions)"),
    "alert": ("services.alerter.service:command", "post anomalies to Slack"),
    "silence": ("services.alerter.silences:command", "silence add|list|expire: keep matching anomalies off Slack"),
    "rules": ("services.rules.service:command", "run the detector definitions (rules/*.yaml)"),
    "scrape": ("services.scraper.service:command",
               "publish a broker's metrics (JMX exporter) as rates to kafka_metrics"),
    "scenario": ("services.jobs.scenario:command", "scenario NAME: kafka-load records a labelled broker-metrics CSV"),
    "run": ("services.jobs.run:command", "the whole pipeline end to end on the local broker"),
    "bench": ("services.jobs.bench:command", "throughput and latency benchmark"),
    "detector-cost": ("services.jobs.detector_cost:command",
                      "CPU per message and state per series of each streaming detector, at 100,000 series"),
    "evaluate": ("services.jobs.evaluate:command", "detection quality on labelled NAB-layout data"),
    "loco": ("services.jobs.loco:command", "leave-one-category-out choice between evaluate's outputs"),
    "logs": ("services.jobs.logs:command", "log anomaly detection: parse, evaluate, train, render"),
    "compare": ("services.jobs.compare:command", "warm-started Real-Time K-Means vs cold-start streaming K-Means"),
    "runs": ("services.jobs.rule_history:runs_command", "recent checks of a detector definition, from the run history"),
    "chart": ("services.jobs.rule_history:chart_command", "PNG chart of a detector definition's checks"),
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anomstream", prog_name="anomstream", message="%(prog)s %(version)s")
def cli() -> None:
    """anomstream: real-time anomaly detection on Kafka, one sub-command per service or task.

    Settings come from ANOMSTREAM_* environment variables (and .env); `anomstream COMMAND --help`
    shows a command's options."""


def main(argv: list[str] | None = None) -> int:
    return run_command(cli, argv, "anomstream")


if __name__ == "__main__":
    sys.exit(main())
