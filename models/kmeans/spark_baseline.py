"""The cold-start baseline run by Spark itself: pyspark.mllib's StreamingKMeansModel.update does
every mini-batch update (the code StreamingKMeans.trainOn runs per RDD), on a local SparkContext.

Optional: needs `pip install anomstream[spark]` and Java 17. Preprocessing, the random Gaussian
start (as setRandomCenters) and the distance rule are RealTimeKMeans's, so the comparison differs
from ours only where Spark computes.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

from models.kmeans.streaming_kmeans import RealTimeKMeans, StreamingKMeansState

_context = None


def spark_available() -> bool:
    return importlib.util.find_spec("pyspark") is not None


def spark_context():
    """One local SparkContext per process (Spark allows no second one), stopped at exit."""
    global _context
    if _context is None:
        import atexit

        from pyspark import SparkConf, SparkContext

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv's numpy
        conf = (SparkConf().setMaster("local[1]").setAppName("anomstream-kmeans")
                .set("spark.ui.enabled", "false").set("spark.driver.host", "127.0.0.1"))
        _context = SparkContext.getOrCreate(conf)
        _context.setLogLevel("ERROR")
        atexit.register(stop_spark)
    return _context


def stop_spark() -> None:
    global _context
    if _context is not None:
        _context.stop()
        _context = None


class SparkStreamingKMeansState(StreamingKMeansState):
    def update(self, X: np.ndarray) -> None:
        from pyspark.mllib.clustering import StreamingKMeansModel

        X = np.asarray(X, dtype=np.float64)
        if len(X) == 0:
            # An empty RDD fails Spark's reduce; Spark Streaming would still age the weights.
            super().update(X)
            return
        model = StreamingKMeansModel(self.centers.tolist(), self.counts.tolist())
        model = model.update(spark_context().parallelize(X.tolist(), 1), self.decay, self.time_unit)
        self.centers = np.array([np.asarray(c) for c in model.centers], dtype=np.float64)
        self.counts = np.array(model.clusterWeights, dtype=np.float64)


class SparkStreamingKMeans(RealTimeKMeans):
    name = "spark_streaming_kmeans"
    state_class = SparkStreamingKMeansState

    def __init__(self, **params):
        params.setdefault("init", "random")
        params.setdefault("update_with", "all")
        super().__init__(**params)
