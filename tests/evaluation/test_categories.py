"""Per-category NAB tables and the leave-one-category-out choice, on hand-made alarms."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation.categories import category_table, loco
from models.evaluation.nab import nab_score_fixed


def alarms_at(n, rows):
    a = np.zeros(n, bool)
    a[list(rows)] = True
    return a


N = 1000  # probation 150 rows
WIN = [(500, 549)]


def test_category_score_is_nab_normalised_over_that_category_alone():
    flags = {"A/x.csv": (alarms_at(N, [500]), WIN), "A/y.csv": (alarms_at(N, []), WIN),
             "B/z.csv": (alarms_at(N, [300, 510]), WIN), "C/quiet.csv": (alarms_at(N, [400]), [])}
    table = category_table(flags)
    for cat, keys in {"A": ["A/x.csv", "A/y.csv"], "B": ["B/z.csv"]}.items():
        expected = nab_score_fixed({k: flags[k] for k in keys}, "standard")["score"]
        assert table[cat]["standard"] == pytest.approx(expected)
    assert table["A"]["found"] == 1 and table["A"]["windows"] == 2
    assert table["B"]["false_alarms"] == 1
    assert table["C"]["standard"] is None and table["C"]["false_alarms"] == 1 and table["C"]["raw"]["standard"] < 0


def test_loco_chooses_on_the_other_categories():
    # "early" finds every window early; "spiky" also finds them but adds false alarms in B only.
    early = {"A/x.csv": (alarms_at(N, [500]), WIN), "B/z.csv": (alarms_at(N, [500]), WIN)}
    spiky = {"A/x.csv": (alarms_at(N, [500]), WIN), "B/z.csv": (alarms_at(N, [500, *range(200, 260)]), WIN)}
    late = {"A/x.csv": (alarms_at(N, [549]), WIN), "B/z.csv": (alarms_at(N, [549]), WIN)}
    result = loco({"early": early, "spiky": spiky, "late": late})
    assert result["folds"]["A"]["chosen"] == "early"  # spiky ties on A, loses on B
    assert result["folds"]["B"]["chosen"] in {"early", "spiky"}  # tie on A: first by name
    assert result["folds"]["B"]["chosen"] == "early"
    assert result["score"] == pytest.approx(nab_score_fixed(early, "standard")["score"])
    assert result["wins"] == {"early": 2}


def test_loco_job_reads_an_evaluate_metrics_file(tmp_path, capsys):
    import json

    from models.evaluation.categories import category_table
    from services.jobs.loco import main as loco_job

    early = {"A/x.csv": (alarms_at(N, [500]), WIN), "B/z.csv": (alarms_at(N, [500]), WIN)}
    late = {"A/x.csv": (alarms_at(N, [549]), WIN), "B/z.csv": (alarms_at(N, [549]), WIN)}
    metrics = {"detectors": {name: {"nab": {"standard": 0.0}, "categories": category_table(flags)}
                             for name, flags in {"early": early, "late": late, "default": early}.items()}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    assert loco_job([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] == ["early", "late"]
    assert out["loco"]["standard"]["wins"] == {"early": 2}
    assert loco_job([str(path), "--match", "la.*", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["candidates"] == ["late"]
