"""The Structured Streaming query: Kafka input topics -> decode/validate -> per-series scoring with
state in Spark's state store -> `scores`, `anomalies` and `dead_letter` on Kafka.

    raw (topic, partition, offset, key, value)
      -> mapInPandas(decode): shared.records.metrics.decode_metrics, the detector service's decoder;
         a bad message becomes its dead letter (shared.records.dead_letter.dead_letter_record)
      -> groupBy(topic, series).applyInPandasWithState(score): the detector service's Scorer
         (models.metrics.scorer) on the group's points in offset order, the series' state loaded
         from and exported back to Spark's state (models.state.SeriesState export/load, the blobs
         the service's changelog holds), then encode_score_records; the bad messages (series
         NULL) pass through as their dead letters
      -> the Kafka sink (the `topic` column routes each row).

Spark commits a micro-batch's offsets and state versions to the checkpoint after its output is
written: a restart from the checkpoint goes on from the next batch with the state as it was after
the last committed one. The Kafka sink is at-least-once: a batch cut short by a crash is run again
in full, so its records can be written twice (they carry source_partition/source_offset to drop a
repeat by); `anomstream spark-detect` stops between batches on SIGTERM, so a stop writes nothing twice.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.config import Settings
from shared.records.dead_letter import dead_letter_record
from shared.records.metrics import MetricInput, decode_metrics, encode_score_records

SERVICE = "detector-spark"  # dlq.service of its dead letters
SOURCE_COLUMNS = ["topic", "partition", "offset", "kafka_ms", "key", "value"]
HEADERS = "array<struct<key:string,value:binary>>"
DECODED_SCHEMA = ("topic string, partition int, offset long, kafka_ms long, key binary, value binary, "
                  f"headers {HEADERS}, series string, epoch_s double, metric double, error string")
OUTPUT_SCHEMA = f"topic string, key binary, value binary, headers {HEADERS}"
STATE_SCHEMA = "state binary"  # one series' SeriesState export

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringConfig:
    """What the executors need of the settings: small, picklable, and hashable (the model sets are
    cached per Python worker under it)."""

    model_dir: str
    topic_models: tuple[tuple[str, str], ...]
    combine: str
    decision: tuple[str, ...] | None
    scoring: str
    outputs: tuple[str, ...] | None
    topic_scores: str
    topic_anomalies: str
    topic_dead_letter: str
    max_message_bytes: int
    max_abs_value: float
    max_produce_bytes: int
    label_fields: tuple[str, ...]
    timestamp_unit: str
    idle_ms: int

    @classmethod
    def of(cls, settings: Settings) -> ScoringConfig:
        return cls(str(settings.model_dir), tuple(settings.topic_models().items()), settings.combine,
                   tuple(settings.decision) if settings.decision else None, settings.scoring,
                   tuple(settings.outputs) if settings.outputs else None, settings.topic_scores,
                   settings.topic_anomalies, settings.topic_dead_letter, settings.max_message_bytes, settings.max_abs_value,
                   settings.max_produce_bytes, tuple(settings.label_fields), settings.timestamp_unit,
                   int(settings.state_idle_s * 1000))


@functools.cache
def scorers(config: ScoringConfig) -> dict:
    """Input topic -> Scorer, loaded once per Python worker (Spark reuses its workers across tasks)."""
    from models.inference import limit_threads
    from models.metrics.scorer import load_scorer

    limit_threads(1)
    return {topic: load_scorer(config.model_dir, name, config.combine, list(config.decision or ()) or None,
                               config.scoring, list(config.outputs or ()) or None)
            for topic, name in config.topic_models}


def decode(config: ScoringConfig):
    """mapInPandas function: each Kafka row decoded and validated on its own (decode_metrics); a bad
    one keeps its dead letter in key/value/headers and the reason in `error`."""
    fmt = MetricInput(config.label_fields, config.timestamp_unit)

    def run(frames):
        for frame in frames:
            frame = frame.reset_index(drop=True)
            n = len(frame)
            decoded = decode_metrics(frame["value"].tolist(), config.max_message_bytes, config.max_abs_value, fmt)
            series = np.full(n, None, dtype=object)
            epoch_s, metric = np.full(n, np.nan), np.full(n, np.nan)
            series[decoded.index] = decoded.series
            epoch_s[decoded.index] = decoded.timestamps
            metric[decoded.index] = decoded.values
            error = np.full(n, None, dtype=object)
            keys, values = frame["key"].to_numpy(object).copy(), frame["value"].to_numpy(object).copy()
            headers = np.full(n, None, dtype=object)
            for i, reason in decoded.errors:
                row = frame.iloc[i]
                values[i], keys[i], pairs, _ = dead_letter_record(
                    row["value"], row["key"], reason, row["topic"], int(row["partition"]), int(row["offset"]),
                    SERVICE, config.max_produce_bytes)
                headers[i] = [{"key": k, "value": v} for k, v in pairs]
                error[i] = reason
            yield frame[["topic", "partition", "offset", "kafka_ms"]].assign(
                key=keys, value=values, headers=headers, series=series, epoch_s=epoch_s, metric=metric, error=error)

    return run


def score(config: ScoringConfig):
    """applyInPandasWithState function for one (input topic, series): its points of this
    micro-batch scored in offset order, from and back to its state in Spark's state store."""

    def run(key, frames, state):
        if state.hasTimedOut:  # idle for state_idle_s (processing time): forget it, as the service does
            state.remove()
            return
        topic, series = key
        frames = list(frames)
        rows = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        order = np.lexsort((rows["offset"].to_numpy(), rows["partition"].to_numpy()))  # offset order
        if (order[1:] < order[:-1]).any():
            rows = rows.iloc[order]
        if pd.isna(series):  # the bad messages of this micro-batch: their dead letters, built by decode
            yield rows[["key", "value", "headers"]].assign(topic=config.topic_dead_letter)
            return
        scorer = scorers(config)[topic]
        store = scorer.store
        n = len(rows)
        keys = np.full(n, series, dtype=object)
        partition = rows["partition"].to_numpy(np.int32)
        epoch_s, values = rows["epoch_s"].to_numpy(np.float64), rows["metric"].to_numpy(np.float64)
        try:
            if state.exists and not store.load([series], [bytes(state.get[0])], int(partition[0])):
                log.warning("state of series %r refused (%s): it starts afresh", series,
                            store.check(bytes(state.get[0])))
            scored = scorer.score(keys, epoch_s, values, partition)
            records = encode_score_records(
                keys.tolist(), epoch_s, values, scored.is_anomaly, scored.scores, scored.flags, scorer.decision,
                scorer.model_set.version, topic,
                list(zip(partition.tolist(), rows["offset"].tolist(), rows["kafka_ms"].tolist())), scored.why)
            blob = store.export(store.find([series]))[0]
        finally:  # the store holds a series only while its group runs; Spark's state is the copy
            held = store.find([series])
            store.drop(held[held >= 0])
        state.update((blob,))
        state.setTimeoutDuration(config.idle_ms)
        anomalous = np.flatnonzero(scored.is_anomaly)
        key_bytes = series.encode()
        yield pd.DataFrame({
            "topic": [config.topic_scores] * n + [config.topic_anomalies] * len(anomalous),
            "key": [key_bytes] * (n + len(anomalous)),
            "value": records + [records[i] for i in anomalous],
            "headers": [None] * (n + len(anomalous)),
        })

    return run


def jaas_config(settings: Settings) -> str | None:
    """The Java client's login module line for settings.sasl_* (None: not SASL, or OAUTHBEARER,
    which needs a callback handler: set kafka.sasl.jaas.config in spark_kafka_options)."""
    modules = {"PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
               "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
               "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule"}
    if settings.sasl_mechanism not in modules or settings.sasl_username is None:
        return None
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return (f"{modules[settings.sasl_mechanism]} required username={quoted(settings.sasl_username)} "
            f"password={quoted(password)};")


def kafka_options(settings: Settings) -> dict[str, str]:
    """The Kafka source's and sink's options: the connection settings in the Java client's names
    (kafka.*), then settings.spark_kafka_options, which win."""
    options = {"kafka.bootstrap.servers": settings.bootstrap_servers,
               "kafka.security.protocol": settings.security_protocol}
    if settings.sasl_mechanism:
        options["kafka.sasl.mechanism"] = settings.sasl_mechanism
        jaas = jaas_config(settings)
        if jaas:
            options["kafka.sasl.jaas.config"] = jaas
    if settings.ssl_ca_location:  # a PEM file, as librdkafka's ssl.ca.location
        options["kafka.ssl.truststore.type"] = "PEM"
        options["kafka.ssl.truststore.location"] = settings.ssl_ca_location
    return options | dict(settings.spark_kafka_options)


def build_query(spark, settings: Settings, available_now: bool = False):
    """Start the query; `available_now`: score what the topics hold now, then stop (a backfill)."""
    from pyspark.sql import functions as F
    from pyspark.sql.streaming.state import GroupStateTimeout

    config = ScoringConfig.of(settings)
    options = kafka_options(settings)
    reader = (spark.readStream.format("kafka").options(**options)
              .option("subscribe", ",".join(t for t, _ in config.topic_models))
              .option("startingOffsets", settings.auto_offset_reset))
    if settings.spark_max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.spark_max_offsets_per_trigger))
    raw = reader.load().select("topic", "partition", "offset", F.expr("unix_millis(timestamp)").alias("kafka_ms"),
                               "key", "value")
    # One path for all: the bad messages form the group of series NULL (dead letters, no state), so
    # the source is read and decoded once per micro-batch.
    scored = (raw.mapInPandas(decode(config), DECODED_SCHEMA)
              .select("topic", "series", "partition", "offset", "kafka_ms", "epoch_s", "metric", "key", "value",
                      "headers")
              .groupBy("topic", "series")
              .applyInPandasWithState(score(config), OUTPUT_SCHEMA, STATE_SCHEMA, "append",
                                      GroupStateTimeout.ProcessingTimeTimeout))
    writer = (scored.writeStream.format("kafka").options(**options)
              .option("checkpointLocation", settings.spark_checkpoint).outputMode("append")
              .queryName("anomstream_detector"))
    writer = writer.trigger(availableNow=True) if available_now else writer.trigger(
        processingTime=f"{settings.spark_trigger_s} seconds")
    return writer.start()
