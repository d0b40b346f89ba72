"""logs train: the next-event model the log detector service loads.

Fitted as `logs evaluate` fits it: on the normal sessions of a stratified 80% of the training split,
with k and min_prob chosen by F1 on the other 20%; then scored once on the test split (reported,
not used). The model folder also holds the reference templates of the sessions' event ids, so the
service can align the templates it mines from raw lines to them, and a manifest (version, choice,
test figures).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import pandas as pd

from models.base import write_json
from models.evaluation.metrics import point_metrics
from models.logs.scorer import MANIFEST, REFERENCE_TEMPLATES
from models.logs.sessions import read_sessions_csv
from services.jobs.logs_evaluate import choose_next_event, given_split, stratified_split
from shared.app_logging import setup_logging
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


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    hdfs = settings.data_dir / "hdfs"
    parser = argparse.ArgumentParser(prog="anomstream logs train", description=__doc__)
    parser.add_argument("--sessions", type=Path, default=hdfs / "hdfs_100k_sessions.csv")
    parser.add_argument("--templates", type=Path, default=None,
                        help="CSV of the sessions' event ids and templates (TemplateId or EventId, EventTemplate); "
                             "default: hdfs_100k_templates.csv for the default sessions, none otherwise (the "
                             "event ids are then the service's own drain3 ids)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=settings.model_dir)
    parser.add_argument("--name", default=settings.model_logs)
    parser.add_argument("--if-missing", action="store_true", help="skip when the model exists")
    args = parser.parse_args(argv)
    log = setup_logging(settings, "logs-train")
    folder = args.model_dir / args.name
    if args.if_missing and (folder / MANIFEST).exists():
        log.info("log model exists; skipped", folder=str(folder))
        return 0
    if not args.sessions.exists():
        parser.error(f"no such file: {args.sessions}")
    templates = args.templates
    if templates is None and args.sessions == hdfs / "hdfs_100k_sessions.csv":
        templates = hdfs / "hdfs_100k_templates.csv"
    manifest = train_log_model(args.sessions, templates, folder, args.epochs, args.seed)
    log.info("trained", folder=str(folder), **{k: manifest[k] for k in ("version", "k", "min_prob", "test")})
    t = manifest["test"]
    print(f"{manifest['model']} k={manifest['k']} min_prob={manifest['min_prob']:g} -> {folder}; test split: "
          f"precision {t['precision']:.3f} recall {t['recall']:.3f} F1 {t['f1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
