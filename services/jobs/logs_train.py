"""logs train: the next-event model the log detector service loads.

Fitted as `logs evaluate` fits it: on the normal sessions of a stratified 80% of the training
split, with its decision (k, min_prob, the session-end rule, whether seen transitions are
accepted) chosen by the F1 implied at --ratio normal sessions per anomalous one on the other 20%;
then scored once on the test split (reported, not used: its false-positive rate on normal
sessions and recall, and the precision/F1 they imply, beside the plain figures). Sessions without labels (parsed from your own raw logs with `logs parse
--sessions`): fitted on 80% of them, as DeepLog is, taking them as normal; k is the smallest (most
sensitive) that flags at most --alarm-rate of the other 20%. The model folder also holds the
reference templates of the sessions' event ids, so the service can align the templates it mines
from raw lines to them, and a manifest (version, choice, test figures).
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

import click
import numpy as np
import pandas as pd

from models.base import write_json
from models.logs.scorer import MANIFEST, REFERENCE_TEMPLATES
from models.logs.sessions import read_sessions_csv
from services.jobs.logs_evaluate import (
    K_VALUES,
    RATIO,
    apply_decision,
    choose_next_event,
    detection_metrics,
    given_split,
    stratified_split,
)
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, PATH, run_command
from shared.config import load_settings


def choose_by_alarm_rate(model, sessions: list, alarm_rate: float) -> tuple[int, float]:
    """Without labels (min_prob 0, top-k alone): (k, flagged share), the smallest k whose share of
    flagged held-out sessions is at most alarm_rate (the largest k when none is)."""
    scores = model.score_sessions(sessions, min_prob=0.0)
    for k in K_VALUES:
        share = float((scores > k).mean()) if len(scores) else 0.0
        if share <= alarm_rate:
            return k, share
    return K_VALUES[-1], share


def train_unlabelled(frame: pd.DataFrame, epochs: int, seed: int, alarm_rate: float) -> tuple[object, dict]:
    from models.logs.next_event import NextEventDetector

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frame))
    cut = max(1, int(len(frame) * 0.8))
    fit, held = frame.iloc[order[:cut]], frame.iloc[order[cut:]]
    model = NextEventDetector(epochs=epochs, seed=seed).fit(list(fit["events"]))
    k, share = choose_by_alarm_rate(model, list(held["events"]), alarm_rate)
    model.params["min_prob"], model.k = 0.0, k
    return model, {"k": k, "min_prob": 0.0, "split": "unlabelled: fitted on a random 80%, k by alarm rate on "
                   "the other 20%", "fit_sessions": len(fit), "labelled": False, "alarm_rate": alarm_rate,
                   "held_out_flagged_share": share, "test": None}


def train_log_model(sessions_csv: Path, templates_csv: Path | None, folder: Path, epochs: int, seed: int = 0,
                    alarm_rate: float = 0.01, ratio: float = RATIO) -> dict:
    from models.logs.next_event import NextEventDetector

    frame = read_sessions_csv(sessions_csv, unlabelled_ok=True)
    if not frame.attrs["labelled"]:
        model, fitted = train_unlabelled(frame, epochs, seed, alarm_rate)
        return _save(model, fitted, sessions_csv, templates_csv, folder, epochs, seed)
    train, test, split_note = given_split(frame)
    fit_pos, val_pos = stratified_split(train["y"].to_numpy(), seed)
    fit, val = train.iloc[fit_pos], train.iloc[val_pos]
    model = NextEventDetector(epochs=epochs, seed=seed).fit(list(fit["events"]), list(fit["y"]))
    decision, _ = choose_next_event(model, list(val["events"]), val["y"].to_numpy().astype(bool), ratio)
    apply_decision(model, decision)
    test_metrics = detection_metrics(model.predict(list(test["events"])), test["y"].to_numpy().astype(bool), ratio)
    fitted = {**decision, "split": split_note,
              "fit_sessions": int((fit["y"] == 0).sum()), "labelled": True, "ratio": ratio,
              "test": {m: test_metrics[m] for m in ("precision", "recall", "f1", "tp", "fp", "fn", "fpr", "normals",
                                                    "implied_precision", "implied_f1")}}
    return _save(model, fitted, sessions_csv, templates_csv, folder, epochs, seed)


def align_template_ids(ids: list[str], vocabulary: list[str]) -> list[str]:
    """The templates' ids written as the sessions write them: loghub's HDFS_templates.csv says E5
    where hdfs_deeplog's sessions say E05. An id the vocabulary lacks takes the vocabulary's id of
    the same prefix and number, when there is one."""
    spelled = {}
    for token in vocabulary:
        match = re.fullmatch(r"(\D*)0*(\d+)", token)
        if match:
            spelled[(match[1], int(match[2]))] = token
    out = []
    for template_id in ids:
        match = re.fullmatch(r"(\D*)0*(\d+)", template_id)
        known = template_id in vocabulary or not match
        out.append(template_id if known else spelled.get((match[1], int(match[2])), template_id))
    return out


def _save(model, fitted: dict, sessions_csv: Path, templates_csv: Path | None, folder: Path, epochs: int,
          seed: int) -> dict:
    digest = hashlib.sha256(sessions_csv.read_bytes()).hexdigest()[:8]
    manifest = {
        "version": f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest}",
        "model": model.name, "epochs": epochs, "seed": seed, "trained_on": str(sessions_csv), **fitted,
    }
    model.save(folder)
    if templates_csv is not None:
        templates = pd.read_csv(templates_csv, dtype=str)
        id_column = "TemplateId" if "TemplateId" in templates else "EventId"
        ids = align_template_ids(list(templates[id_column]), model.vocab.tokens)
        write_json(folder / REFERENCE_TEMPLATES, dict(zip(ids, templates["EventTemplate"])))
    write_json(folder / MANIFEST, manifest)
    return manifest


@click.command("train", help=__doc__, context_settings=CONTEXT)
@click.option("--sessions", type=PATH, default=None,
              help="sessions CSV (default: <data_dir>/hdfs/hdfs_100k_sessions.csv, setting ANOMSTREAM_DATA_DIR)")
@click.option("--templates", type=PATH, default=None,
              help="CSV of the sessions' event ids and templates (TemplateId or EventId, EventTemplate); "
                   "default: hdfs_100k_templates.csv for the default sessions, none otherwise (the "
                   "event ids are then the service's own drain3 ids)")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-dir", type=PATH, default=None, help="default: setting ANOMSTREAM_MODEL_DIR")
@click.option("--name", default=None, help="the model's folder in --model-dir (default: setting ANOMSTREAM_MODEL_LOGS)")
@click.option("--if-missing", is_flag=True, help="skip when the model exists")
@click.option("--alarm-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="unlabelled sessions only: the largest share of held-out sessions the chosen k may flag")
@click.option("--ratio", type=click.FloatRange(min=0, min_open=True), default=RATIO, show_default=True,
              help="labelled sessions: normal sessions per anomalous one where the detector runs (k and "
                   "min_prob maximise the F1 implied at it on the validation slice)")
def command(sessions: Path | None, templates: Path | None, epochs: int, seed: int, model_dir: Path | None,
            name: str | None, if_missing: bool, alarm_rate: float, ratio: float) -> int:
    settings = load_settings()
    hdfs = settings.data_dir / "hdfs"
    sessions = sessions or hdfs / "hdfs_100k_sessions.csv"
    log = setup_logging(settings, "logs-train")
    folder = (model_dir or settings.model_dir) / (name or settings.model_logs)
    if if_missing and (folder / MANIFEST).exists():
        log.info("log model exists; skipped", folder=str(folder))
        return 0
    if not sessions.exists():
        raise click.UsageError(f"no such file: {sessions}")
    if templates is None and sessions == hdfs / "hdfs_100k_sessions.csv":
        templates = hdfs / "hdfs_100k_templates.csv"
    try:
        manifest = train_log_model(sessions, templates, folder, epochs, seed, alarm_rate, ratio)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("trained", folder=str(folder), **{k: manifest[k] for k in ("version", "k", "min_prob", "test")})
    t = manifest["test"]
    if t is None:
        print(f"{manifest['model']} k={manifest['k']} (unlabelled sessions: flags "
              f"{manifest['held_out_flagged_share']:.2%} of the held-out ones) -> {folder}")
    else:
        print(f"{manifest['model']} k={manifest['k']} min_prob={manifest['min_prob']:g} -> {folder}; test split: "
              f"precision {t['precision']:.3f} recall {t['recall']:.3f} F1 {t['f1']:.3f}; false positives "
              f"{t['fp']}/{t['normals']} normal sessions ({t['fpr']:.2%}), at {manifest['ratio']:g}:1 precision "
              f"{t['implied_precision']:.3f} F1 {t['implied_f1']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream logs train")


if __name__ == "__main__":
    sys.exit(main())
