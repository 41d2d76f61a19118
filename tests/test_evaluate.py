"""`ptxray evaluate` on a briefly trained real run (fixture `trained_run`): the report and its numbers."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest

from ptxray.cache import Cache
from ptxray.cli import main
from ptxray.report import evaluate_run


def test_evaluate_writes_the_report_and_its_numbers_hold(trained_run, tmp_path, capsys):
    assert main(["evaluate", "--run", str(trained_run), "--cases", "2"]) == 0
    assert "report.md" in capsys.readouterr().out
    report = trained_run / "report"
    for name in ("roc.png", "confusion.png", "dice_hist.png", "learning_curves.png"):
        img = cv2.imread(str(report / name))
        assert img is not None and img.shape[0] > 100, name
    md = (report / "report.md").read_text()
    page = (report / "report.html").read_text()
    linked = set(re.findall(r"src='([^']+\.png)'", page))
    assert {"roc.png", "confusion.png", "dice_hist.png", "learning_curves.png"} <= linked
    assert all((report / p).exists() for p in linked) and all(f"]({p})" in md for p in linked)

    doc = json.loads((report / "metrics.json").read_text())
    cache = Cache.open(doc["oof"]["cache"])
    index = cache.index()
    folds = np.asarray(index.column("fold").to_pylist())
    labels = np.asarray(index.column("label").to_pylist())
    rows = {str(r["fold"]): r for r in doc["metrics"]}
    assert set(rows) == {"0", "1", "all"}
    for f in (0, 1):
        assert rows[str(f)]["images"] == int((folds == f).sum()) and rows[str(f)]["positive"] == int(labels[folds == f].sum())
        assert rows[str(f)]["empty_dice"] == pytest.approx(float((labels[folds == f] == 0).mean()))
    overall = rows["all"]
    assert overall["empty_dice"] == pytest.approx(float((labels == 0).mean()))
    assert overall["tp"] + overall["fp"] + overall["tn"] + overall["fn"] == len(labels)
    # Per-fold and overall Dice agree: the overall mean is the image-weighted mean of the folds.
    weighted = sum(rows[str(f)]["dice"] * rows[str(f)]["images"] for f in (0, 1)) / len(labels)
    assert overall["dice"] == pytest.approx(weighted)

    # Cases re-predicted from the cache by their fold model score what the OOF statistics say.
    cases = doc["cases"]["best"] + doc["cases"]["worst"]
    assert doc["cases"]["worst"], "a briefly trained model has imperfect images"
    for c in cases:
        assert c["dice_recomputed"] == pytest.approx(c["dice"], abs=1e-9)
        assert cv2.imread(str(report / c["image"])).shape[:2] == (256, 256)


def test_evaluate_to_another_folder_reuses_the_oof(trained_run, tmp_path):
    doc = evaluate_run(str(trained_run), out=str(tmp_path / "r"), cases=1)
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "report.md").exists()
    again = evaluate_run(str(trained_run), out=str(tmp_path / "r2"), cases=1)
    assert again["oof"]["computed_now"] is False and again["metrics"] == doc["metrics"]
