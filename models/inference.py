"""Inference without TensorFlow: a trained Keras Sequential network (Embedding, LSTM, Dense,
Dropout) exported at training time as its layers' settings and weights, and run in numpy.

Training needs TensorFlow (`pip install anomstream[train]`); the services load the exported
network only, so a detector worker neither imports TensorFlow (6-9 s, ~690 MB) nor pays its
per-call overhead. The forward pass is Keras's own arithmetic in float32 (gates i, f, c, o;
recurrent activation sigmoid): each step one BLAS matrix product over the whole batch and one
compiled pass over the gates; the tests check it against TensorFlow within 1e-5.

Files: <name>.network.json (the layers) and <name>.network.npz (their weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from numba import njit

from models.base import ArtifactError

NETWORK_FORMAT = 1
CHUNK = 512
LAYERS = ("InputLayer", "Embedding", "LSTM", "Dense", "Dropout")


def _sigmoid(x):
    # Keras's sigmoid, without overflow warnings for large negative inputs.
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ACTIVATIONS = {"linear": lambda x: x, "relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh,
               "sigmoid": _sigmoid, "softmax": _softmax}


def limit_threads(threads: int | None) -> None:
    """One BLAS thread (and one TensorFlow thread, should a training path load it) per worker
    process: several workers on few cores must not oversubscribe them."""
    if not threads:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(threads))


def import_keras():
    """Keras, for training; a clear error where the `train` extra (TensorFlow) is not installed."""
    try:
        import keras
    except ImportError as exc:
        raise RuntimeError("training needs TensorFlow: pip install 'anomstream[train]' "
                           f"(the services score without it) [{exc}]") from None
    return keras


def load_keras_model(path: Path):
    """A saved Keras model; ArtifactError naming the file when it is missing or unreadable."""
    keras = import_keras()

    if not path.exists():
        raise ArtifactError(f"model artifact not found: {path}")
    try:
        return keras.models.load_model(path)
    except Exception as exc:  # keras raises several types for a corrupt file
        raise ArtifactError(f"cannot load {path}: {exc}") from None


class SequentialNetwork:
    """layers: [{"type": ..., settings}], weights: one list of arrays per layer."""

    def __init__(self, layers: list[dict], weights: list[list[np.ndarray]]):
        unknown = {layer["type"] for layer in layers} - set(LAYERS)
        if unknown:
            raise ArtifactError(f"network layers {sorted(unknown)} cannot be run without TensorFlow")
        for layer in layers:
            if layer["type"] == "Dense" and layer["activation"] not in ACTIVATIONS:
                raise ArtifactError(f"Dense activation {layer['activation']!r} is not supported")
            if layer["type"] == "LSTM" and (layer["activation"] not in ("relu", "tanh")
                                           or layer["recurrent_activation"] != "sigmoid"):
                raise ArtifactError(f"LSTM activations {layer['activation']!r}/{layer['recurrent_activation']!r}"
                                    " are not supported (relu or tanh / sigmoid)")
        self.layers = layers
        self.weights = [[np.ascontiguousarray(w, dtype=np.float32) for w in ws] for ws in weights]

    @classmethod
    def from_keras(cls, model) -> "SequentialNetwork":
        """Export a trained keras.Sequential (TensorFlow is imported by the caller, who trained it)."""
        layers, weights = [], []
        for layer in model.layers:
            kind = type(layer).__name__
            config = layer.get_config()
            spec = {"type": kind}
            if kind == "LSTM":
                spec |= {"units": config["units"], "activation": config["activation"],
                         "recurrent_activation": config["recurrent_activation"],
                         "return_sequences": config["return_sequences"], "use_bias": config["use_bias"]}
                if config.get("go_backwards") or config.get("return_state") or config.get("stateful"):
                    raise ArtifactError("LSTM options go_backwards/return_state/stateful are not supported")
            elif kind == "Dense":
                spec |= {"activation": config["activation"], "use_bias": config["use_bias"]}
            elif kind == "Embedding" and config.get("mask_zero"):
                raise ArtifactError("Embedding(mask_zero=True) is not supported")
            layers.append(spec)
            weights.append([np.asarray(w) for w in layer.get_weights()])
        return cls(layers, weights)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # In blocks of CHUNK rows: a block's gate arrays stay in the CPU cache between the steps
        # (measured: 5,000 rows at once 20 us/window, blocks of 512 12 us).
        if len(x) > CHUNK:
            return np.concatenate([self(x[s:s + CHUNK]) for s in range(0, len(x), CHUNK)])
        for spec, ws in zip(self.layers, self.weights):
            kind = spec["type"]
            if kind == "Embedding":
                x = ws[0][np.asarray(x, dtype=np.int64)]
            elif kind == "LSTM":
                x = _lstm(np.asarray(x, dtype=np.float32), ws, spec)
            elif kind == "Dense":
                x = np.asarray(x, dtype=np.float32) @ ws[0]
                if spec["use_bias"]:
                    x += ws[1]
                x = ACTIVATIONS[spec["activation"]](x)
            # InputLayer, Dropout: identity at inference
        return np.asarray(x, dtype=np.float32)

    def save(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"{i}_{j}": w for i, ws in enumerate(self.weights) for j, w in enumerate(ws)}
        np.savez(folder / f"{name}.network.npz", **arrays)
        (folder / f"{name}.network.json").write_text(json.dumps(
            {"format": NETWORK_FORMAT, "layers": self.layers, "weights": [len(ws) for ws in self.weights]}, indent=2))

    @staticmethod
    def exists(folder: Path, name: str) -> bool:
        return (folder / f"{name}.network.json").exists() and (folder / f"{name}.network.npz").exists()

    @classmethod
    def load(cls, folder: Path, name: str) -> "SequentialNetwork":
        path = folder / f"{name}.network.json"
        try:
            meta = json.loads(path.read_text())
            with np.load(folder / f"{name}.network.npz") as arrays:
                weights = [[arrays[f"{i}_{j}"] for j in range(n)] for i, n in enumerate(meta["weights"])]
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"cannot load the network {path}: {exc}") from None
        if meta.get("format") != NETWORK_FORMAT:
            raise ArtifactError(f"{path}: network format {meta.get('format')} != {NETWORK_FORMAT}; retrain")
        return cls(meta["layers"], weights)


def _lstm(x: np.ndarray, ws: list[np.ndarray], spec: dict) -> np.ndarray:
    """Keras's LSTM over x [batch, time, features]: z = x_t W + h U + b, gates i, f, c, o. Each
    step: one BLAS product h U for the whole batch, then one compiled pass over the gates."""
    kernel, recurrent = ws[0], ws[1]
    u = recurrent.shape[0]
    batch, steps, _ = x.shape
    xw = np.ascontiguousarray(x.transpose(1, 0, 2)) @ kernel  # [time, batch, 4u]: every step's input product
    if spec["use_bias"]:
        xw += ws[2]
    h = np.zeros((batch, u), np.float32)
    c = np.zeros((batch, u), np.float32)
    z = np.empty((batch, 4 * u), np.float32)
    relu = spec["activation"] == "relu"
    outputs = np.empty((batch, steps, u), np.float32) if spec["return_sequences"] else None
    for t in range(steps):
        np.matmul(h, recurrent, out=z)
        _lstm_gates(z, xw[t], c, h, relu)
        if outputs is not None:
            outputs[:, t] = h
    return outputs if outputs is not None else h


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _tanh(x):
    """tanh in float32 as a rational function (the form Eigen, under TensorFlow, uses): within
    3e-7 of the exact value, and it vectorises, unlike a call of the C library's tanhf."""
    lim = np.float32(7.90531110763549805)
    x = x if x < lim else lim
    x = x if x > -lim else -lim
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = x2 * p + np.float32(-8.60467152213735e-11)
    p = x2 * p + np.float32(5.12229709037114e-08)
    p = x2 * p + np.float32(1.48572235717979e-05)
    p = x2 * p + np.float32(6.37261928875436e-04)
    p = x2 * p + np.float32(4.89352455891786e-03)
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = x2 * q + np.float32(2.26843463243900e-03)
    q = x2 * q + np.float32(4.89352518554385e-03)
    return x * p / q


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _sigmoid32(x):
    return np.float32(0.5) * _tanh(np.float32(0.5) * x) + np.float32(0.5)


@njit(cache=True, fastmath=True, error_model="numpy")
def _lstm_gates(z, xw, c, h, relu):
    """One step's gates for every row: z (h U) + xw (x W + b) -> c, h in place."""
    u = c.shape[1]
    zero = np.float32(0.0)
    for r in range(z.shape[0]):
        for k in range(u):
            i = _sigmoid32(z[r, k] + xw[r, k])
            f = _sigmoid32(z[r, u + k] + xw[r, u + k])
            g = z[r, 2 * u + k] + xw[r, 2 * u + k]
            o = _sigmoid32(z[r, 3 * u + k] + xw[r, 3 * u + k])
            g = (g if g > zero else zero) if relu else _tanh(g)
            cc = f * c[r, k] + i * g
            c[r, k] = cc
            h[r, k] = o * ((cc if cc > zero else zero) if relu else _tanh(cc))
