"""anomstream: one command, one sub-command per service or task."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "kafka": ("shared.local_broker", "start/stop the local single-node Kafka broker"),
    "train": ("services.jobs.train", "train the model sets"),
    "produce": ("services.producer.service", "replay CSVs or generate synthetic transactions into Kafka"),
    "detect": ("services.detector.service", "run the detector workers"),
    "logdetect": ("services.logdetector.service", "run the log detector (raw lines of `logs` -> anomalous sessions)"),
    "alert": ("services.alerter.service", "post anomalies to Slack"),
    "scrape": ("services.scraper.service", "publish a broker's metrics (JMX exporter) as rates to kafka_metrics"),
    "scenario": ("services.jobs.scenario", "scenario NAME: kafka-load records a labelled broker-metrics CSV"),
    "run": ("services.jobs.run", "the whole pipeline end to end on the local broker"),
    "bench": ("services.jobs.bench", "throughput and latency benchmark"),
    "evaluate": ("services.jobs.evaluate", "detection quality on labelled NAB-layout data"),
    "logs": ("services.jobs.logs", "log anomaly detection: parse, evaluate"),
    "compare": ("services.jobs.compare", "warm-started Real-Time K-Means vs cold-start streaming K-Means"),
    "runs": ("services.jobs.rule_history:runs_main", "recent checks of a detector definition, from the run history"),
    "chart": ("services.jobs.rule_history:chart_main", "PNG chart of a detector definition's checks"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: anomstream COMMAND [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # "package.module" runs its main(); "package.module:function" runs that function.
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, function or "main")(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
