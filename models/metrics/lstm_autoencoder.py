"""LSTM autoencoder over windows of the last SEQ_LEN scaled rows (the seed model).

The network reads a window ending at the current point and reconstructs the current point; the
reconstruction error (MSE over features) is the score, and the threshold is mean + 3 sigma of the
training errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models.base import ArtifactError, Detector, read_json, write_json
from models.metrics.features import FeatureBatch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner out of our logs
MAX_ERROR = 1e12  # a reconstruction error is reported as at most this (a non-finite one as this)


def configure_tensorflow(threads: int | None) -> None:
    """Pin TensorFlow's thread pools; with several worker processes on few cores, one thread each
    avoids oversubscription. Must run before the first TensorFlow op."""
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised in this process: keep what it has
            pass


def build_network(seq_len: int, n_features: int):
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((seq_len, n_features)),
        layers.LSTM(50, activation="relu", return_sequences=True),
        layers.Dropout(0.2),
        layers.LSTM(30, activation="relu"),
        layers.Dense(n_features),
        layers.Dropout(0.2),
    ])


class LSTMAutoencoderDetector(Detector):
    name = "lstm_autoencoder"

    def __init__(self, epochs: int = 50, batch_size: int = 32, validation_split: float = 0.2,
                 sigmas: float = 3.0, seed: int = 42, progress: bool = True):
        self.params = {"epochs": epochs, "batch_size": batch_size, "validation_split": validation_split,
                       "sigmas": sigmas, "seed": seed}
        self.progress = progress
        self.model = None
        self._infer = None

    def fit(self, history: FeatureBatch) -> "LSTMAutoencoderDetector":
        import keras

        keras.utils.set_random_seed(self.params["seed"])
        _, seq_len, n_features = history.windows.shape
        self.model = build_network(seq_len, n_features)
        self.model.compile(optimizer="adam", loss="mse")
        callbacks = []
        if self.progress:
            from tqdm.keras import TqdmCallback

            callbacks.append(TqdmCallback(verbose=0, desc="lstm_autoencoder epochs"))
        self.model.fit(history.windows, history.windows[:, -1, :], epochs=self.params["epochs"],
                       batch_size=self.params["batch_size"], validation_split=self.params["validation_split"],
                       shuffle=True, verbose=0, callbacks=callbacks)
        errors = self.score(history)
        self.threshold = float(errors.mean() + self.params["sigmas"] * errors.std())
        return self

    def score(self, batch: FeatureBatch) -> np.ndarray:
        if len(batch) == 0:
            return np.empty(0)
        if self._infer is None:
            import tensorflow as tf

            # One traced graph for every batch size: no per-call Keras overhead, no retracing.
            self._infer = tf.function(
                lambda x: self.model(x, training=False),
                input_signature=[tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32)],
            )
        windows = np.ascontiguousarray(batch.windows, dtype=np.float32)
        recon = self._infer(windows).numpy().astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            errors = np.mean((recon - windows[:, -1, :]) ** 2, axis=1)
        # The scaled inputs are bounded (features.FEATURE_LIMIT), so the network's output is finite
        # in practice; should it overflow all the same, the error is the largest one reported.
        return np.minimum(np.nan_to_num(errors, nan=MAX_ERROR, posinf=MAX_ERROR), MAX_ERROR)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save(folder / "lstm_autoencoder.keras")
        write_json(folder / "lstm_autoencoder.json", {"params": self.params, "threshold": self.threshold})

    @classmethod
    def load(cls, folder: Path) -> "LSTMAutoencoderDetector":
        import keras

        meta = read_json(folder / "lstm_autoencoder.json")
        path = folder / "lstm_autoencoder.keras"
        if not path.exists():
            raise ArtifactError(f"model artifact not found: {path}")
        det = cls(**meta["params"])
        try:
            det.model = keras.models.load_model(path)
        except Exception as exc:  # keras raises several types for a corrupt file
            raise ArtifactError(f"cannot load {path}: {exc}") from None
        det.threshold = meta["threshold"]
        return det
