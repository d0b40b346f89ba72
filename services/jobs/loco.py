"""loco: the leave-one-category-out choice between candidates, from an `anomstream evaluate`
metrics.json (its per-output category tables), for any set of candidates.

For each category the candidate with the best pooled score on the other categories is chosen and
scored on the held-out one; the held-out raw scores of all folds, normalised over every window,
give the figure of the choice procedure itself. The more candidates, the more a fold's choice can
fit its six categories by chance: compare candidate sets (e.g. the named ensembles against the
whole grid) with it, and choose the default from the set that holds up.

Candidates: --match REGEX (full match against output names; repeatable, any of them), or all the
outputs of the file (without "default" and outputs scoring below -100, the seed's flood of alarms).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from models.evaluation.categories import format_loco, loco_from_tables
from models.evaluation.nab import PROFILES
from shared.cli import CONTEXT, PATH, run_command


def choose(metrics: dict, patterns: list[str]) -> list[str]:
    outputs = metrics["detectors"]
    names = [n for n, m in outputs.items() if n != "default" and m["nab"]["standard"] > -100]
    if patterns:
        names = [n for n in names if any(re.fullmatch(p, n) for p in patterns)]
    return names


@click.command("loco", help=__doc__, context_settings=CONTEXT)
@click.argument("metrics_path", type=PATH, default=Path("evaluation_results/metrics.json"))
@click.option("--match", "patterns", multiple=True, metavar="REGEX", help="candidate outputs (full match)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def command(metrics_path: Path, patterns: tuple[str, ...], as_json: bool) -> int:
    metrics = json.loads(metrics_path.read_text())
    names = choose(metrics, list(patterns))
    if not names:
        raise click.UsageError("no output of the file matches")
    tables = {n: metrics["detectors"][n]["categories"] for n in names}
    result = {p: loco_from_tables(tables, p) for p in PROFILES}
    if as_json:
        print(json.dumps({"candidates": names, "loco": result}, indent=2))
        return 0
    print(f"{len(names)} candidates; pooled held-out score: "
          + ", ".join(f"{p} {r['score']:.1f}" for p, r in result.items()))
    print("\n".join(format_loco(result["standard"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream loco")


if __name__ == "__main__":
    sys.exit(main())
