"""logs train: the next-event model the log detector service loads.

Fitted as `logs evaluate` fits it: on the normal sessions of a stratified 80% of the training split,
with k and min_prob chosen by F1 on the other 20%; then scored once on the test split (reported,
not used). The model folder also holds the reference templates of the sessions' event ids, so the
service can align the templates it mines from raw lines to them, and a manifest (version, choice,
test figures).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import click
import pandas as pd

from models.base import write_json
from models.evaluation.metrics import point_metrics
from models.logs.scorer import MANIFEST, REFERENCE_TEMPLATES
from models.logs.sessions import read_sessions_csv
from services.jobs.logs_evaluate import choose_next_event, given_split, stratified_split
from shared.app_logging import setup_logging
from shared.cli import CONTEXT, PATH, run_command
from shared.config import load_settings


def train_log_model(sessions_csv: Path, templates_csv: Path | None, folder: Path, epochs: int, seed: int = 0) -> dict:
    from models.logs.next_event import NextEventDetector

    frame = read_sessions_csv(sessions_csv)
    train, test, split_note = given_split(frame)
    fit_pos, val_pos = stratified_split(train["y"].to_numpy(), seed)
    fit, val = train.iloc[fit_pos], train.iloc[val_pos]
    model = NextEventDetector(epochs=epochs, seed=seed).fit(list(fit["events"]), list(fit["y"]))
    (min_prob, k), _ = choose_next_event(model, list(val["events"]), val["y"].to_numpy().astype(bool))
    model.params["min_prob"], model.k = min_prob, k
    test_metrics = point_metrics(model.predict(list(test["events"])), test["y"].to_numpy().astype(bool))
    digest = hashlib.sha256(sessions_csv.read_bytes()).hexdigest()[:8]
    manifest = {
        "version": f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest}",
        "model": model.name, "k": k, "min_prob": min_prob, "epochs": epochs, "seed": seed,
        "trained_on": str(sessions_csv), "split": split_note, "fit_sessions": int((fit["y"] == 0).sum()),
        "test": {m: test_metrics[m] for m in ("precision", "recall", "f1", "tp", "fp", "fn")},
    }
    model.save(folder)
    if templates_csv is not None:
        templates = pd.read_csv(templates_csv)
        id_column = "TemplateId" if "TemplateId" in templates else "EventId"
        write_json(folder / REFERENCE_TEMPLATES, dict(zip(templates[id_column], templates["EventTemplate"])))
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
def command(sessions: Path | None, templates: Path | None, epochs: int, seed: int, model_dir: Path | None,
            name: str | None, if_missing: bool) -> int:
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
    manifest = train_log_model(sessions, templates, folder, epochs, seed)
    log.info("trained", folder=str(folder), **{k: manifest[k] for k in ("version", "k", "min_prob", "test")})
    t = manifest["test"]
    print(f"{manifest['model']} k={manifest['k']} min_prob={manifest['min_prob']:g} -> {folder}; test split: "
          f"precision {t['precision']:.3f} recall {t['recall']:.3f} F1 {t['f1']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream logs train")


if __name__ == "__main__":
    sys.exit(main())
