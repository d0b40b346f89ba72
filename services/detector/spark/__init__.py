"""The detector as a Spark Structured Streaming query (`anomstream spark-detect`), for teams that
run their streaming on Spark: the same decoding, scoring and records as the detector service, with
each series' state in Spark's state store and the read offsets in Spark's checkpoint."""
