"""Real-Time K-Means on a broker's own metrics: the streaming detector, its scorer and Spark's
StreamingKMeans as a cold-start baseline."""

from pathlib import Path

# The recorded `anomstream scenario kafka-load` run it is trained on by default (package data).
RECORDING = Path(__file__).parent / "data" / "kafka_load.csv"
