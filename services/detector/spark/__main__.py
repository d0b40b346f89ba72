"""spark-detect: the detector as a Spark Structured Streaming query (services/detector/spark/query.py).

Locally (`anomstream spark-detect`, master spark_master, default local[2]) the Kafka connector's
jars come from spark/pom.xml. On a cluster, run this file with spark-submit and the connector as a
package (README, "Run on Spark"); spark-submit's master and jars are used then. SIGTERM or Ctrl-C
stops the query between two micro-batches.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import click

from shared.app_logging import setup_logging
from shared.cli import CONTEXT, run_command
from shared.config import Settings, load_settings
from shared.kafka import ensure_topics

# How long a stop waits for a running micro-batch to end before it interrupts it.
STOP_WAIT_S = 120.0


def under_spark_submit() -> bool:
    """spark-submit starts this driver with its gateway open and its own master and jars."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def spark_session(settings: Settings):
    from pyspark.sql import SparkSession

    from services.detector.spark.connector import connector_jars

    builder = SparkSession.builder.appName("anomstream-detector")
    if not under_spark_submit():
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need this venv's packages
        builder = (builder.master(settings.spark_master)
                   .config("spark.jars", ",".join(str(j) for j in connector_jars())))
        if settings.spark_master.startswith("local"):
            builder = builder.config("spark.driver.host", "127.0.0.1")
    builder = (builder.config("spark.sql.shuffle.partitions", str(settings.spark_state_partitions))
               .config("spark.ui.showConsoleProgress", "false")
               # No micro-batch without input (one would run every trigger to look for idle series'
               # timeouts, ~0.5 s of work each, and keep an available-now query from ending): an
               # idle series' state is dropped at the next batch with input.
               .config("spark.sql.streaming.noDataMicroBatches.enabled", "false"))
    for key, value in settings.spark_conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def progress_fields(progress: dict) -> dict:
    return {"batch": progress.get("batchId"), "rows": progress.get("numInputRows"),
            "rows_per_s": round(progress.get("processedRowsPerSecond") or 0.0, 1),
            "duration_ms": (progress.get("durationMs") or {}).get("triggerExecution")}


def run(settings: Settings, available_now: bool) -> int:
    from models.metrics.model_set import ModelSet
    from services.detector.spark.query import build_query

    log = setup_logging(settings, "detector-spark")
    for name in set(settings.topic_models().values()):
        ModelSet.read_manifest(settings.model_dir, name)  # fail here, clearly, not in the executors
    ensure_topics(settings)
    spark = spark_session(settings)
    stop = {"asked": False}

    def on_signal(_sig, _frame):
        stop["asked"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    query = build_query(spark, settings, available_now)
    log.info("query started", query=query.name, checkpoint=settings.spark_checkpoint,
             topics=settings.topic_models(), available_now=available_now, spark_submit=under_spark_submit(),
             master=spark.sparkContext.master)
    last_batch, scored = None, 0
    try:
        while not query.awaitTermination(1.0):
            progress = query.lastProgress
            if progress and progress.get("batchId") != last_batch:
                last_batch = progress.get("batchId")
                scored += progress.get("numInputRows") or 0
                log.info("micro-batch", **progress_fields(progress))
            if stop["asked"]:
                # Between two micro-batches: a batch interrupted half-way would be written again
                # in full on the next start (the Kafka sink is at-least-once).
                deadline = time.monotonic() + STOP_WAIT_S
                while query.status.get("isTriggerActive") and time.monotonic() < deadline:
                    time.sleep(0.05)
                query.stop()
                break
        error = query.exception()
        if error is not None:
            log.error("query failed", error=str(error)[:2000])
            return 1
        log.info("query stopped", input_rows=scored, last_batch=last_batch)
        return 0
    finally:
        spark.stop()


@click.command("spark-detect", help=__doc__, context_settings=CONTEXT)
@click.option("--available-now", is_flag=True,
              help="score what the input topics hold now, then stop (a backfill; the checkpoint is kept)")
@click.option("--checkpoint", default=None, help="checkpoint location (default: setting ANOMSTREAM_SPARK_CHECKPOINT)")
@click.option("--fetch-jars", is_flag=True, help="fetch the Kafka connector's jars (spark/pom.xml), print them, exit")
def command(available_now: bool, checkpoint: str | None, fetch_jars: bool) -> int:
    if fetch_jars:
        from services.detector.spark.connector import connector_jars

        for jar in connector_jars():
            click.echo(jar)
        return 0
    settings = load_settings(**({"spark_checkpoint": checkpoint} if checkpoint else {}))
    return run(settings, available_now)


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream spark-detect")


if __name__ == "__main__":
    sys.exit(main())
