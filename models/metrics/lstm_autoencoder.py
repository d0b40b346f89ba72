"""LSTM autoencoder over windows of the last SEQ_LEN scaled rows (the seed model).

The network reads a window ending at the current point and reconstructs the current point; the
reconstruction error (MSE over features) is the score, and the threshold is mean + 3 sigma of the
training errors.

Training needs TensorFlow (the `train` extra); the trained network is exported with it
(models/inference.py) and scoring runs the export in numpy, so the detector never imports
TensorFlow. A model saved before the export existed is loaded with Keras and exported then.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from models.base import Detector, read_json, write_json
from models.inference import SequentialNetwork, import_keras, load_keras_model
from models.metrics.features import FeatureBatch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner out of our logs
MAX_ERROR = 1e12  # a reconstruction error is reported as at most this (a non-finite one as this)


def build_network(seq_len: int, n_features: int):
    keras = import_keras()
    layers = keras.layers

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
    uses_features = True

    def __init__(self, epochs: int = 50, batch_size: int = 32, validation_split: float = 0.2,
                 sigmas: float = 3.0, seed: int = 42, progress: bool = True):
        self.params = {"epochs": epochs, "batch_size": batch_size, "validation_split": validation_split,
                       "sigmas": sigmas, "seed": seed}
        self.progress = progress
        self.model = None  # the Keras network, after fit (training only)
        self.network: SequentialNetwork | None = None  # what scores

    def fit(self, history: FeatureBatch) -> "LSTMAutoencoderDetector":
        keras = import_keras()

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
        self.network = SequentialNetwork.from_keras(self.model)
        errors = self.score(history)
        self.threshold = float(errors.mean() + self.params["sigmas"] * errors.std())
        return self

    def score(self, batch: FeatureBatch) -> np.ndarray:
        if len(batch) == 0:
            return np.empty(0)
        windows = np.ascontiguousarray(batch.windows, dtype=np.float32)
        recon = self.network(windows).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            errors = np.mean((recon - windows[:, -1, :]) ** 2, axis=1)
        # The scaled inputs are bounded (features.FEATURE_LIMIT), so the network's output is finite
        # in practice; should it overflow all the same, the error is the largest one reported.
        return np.minimum(np.nan_to_num(errors, nan=MAX_ERROR, posinf=MAX_ERROR), MAX_ERROR)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.model is not None:  # kept for retraining and inspection; the services read the export
            self.model.save(folder / "lstm_autoencoder.keras")
        self.network.save(folder, self.name)
        write_json(folder / "lstm_autoencoder.json", {"params": self.params, "threshold": self.threshold})

    @classmethod
    def load(cls, folder: Path) -> "LSTMAutoencoderDetector":
        meta = read_json(folder / "lstm_autoencoder.json")
        det = cls(**meta["params"])
        if SequentialNetwork.exists(folder, cls.name):
            det.network = SequentialNetwork.load(folder, cls.name)
        else:  # saved before the export: needs TensorFlow once
            det.network = SequentialNetwork.from_keras(load_keras_model(folder / "lstm_autoencoder.keras"))
        det.threshold = meta["threshold"]
        return det
