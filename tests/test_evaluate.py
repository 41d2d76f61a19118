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


# ---- the hold-out split (data.holdout_fraction) -----------------------------------------------
@pytest.fixture(scope="module")
def holdout_run(ray_local, synth_dataset, tmp_path_factory):
    """A real 2-fold run trained on a cache with a hold-out split (a quarter of the patients), in the
    K-fold layout with summary.json naming its fold folders relative to the run."""
    from ptxray import ray_data
    from ptxray.config import load_config
    from ptxray.runner import train_fold

    root = tmp_path_factory.mktemp("holdout-run")
    images, labels = synth_dataset / "dicom-images-train", synth_dataset / "train-rle.csv"
    cfg = load_config("smoke", {"data.holdout_fraction": 0.25, "optim.lr": 3e-3, "data.images": str(images),
                                "data.labels": str(labels), "data.cache": str(root / "cache")})  # fmt: skip
    prepared = ray_data.prepare(cfg, images=str(images), labels=str(labels), cache=cfg.data.cache)
    run_dir = root / "exp"
    for fold in (0, 1):
        train_fold(cfg.with_overrides({"train.fold": fold}), prepared["cache"], run_dir / "trials" / f"fold{fold}", device="cpu")
    best = {"params": {}, "fold_checkpoints": {"0": "trials/fold0", "1": "trials/fold1"}}
    (run_dir / "summary.json").write_text(json.dumps({"best": best}))
    return run_dir, prepared


def test_prepare_summary_counts_patients_per_split(holdout_run, capsys):
    from ptxray.cli import print_prepare_summary

    _, prepared = holdout_run
    index = Cache.open(prepared["cache"]).index()
    folds = np.asarray(index.column("fold").to_pylist())
    patients = np.asarray(index.column("patient_id").to_pylist(), dtype=object)
    by_fold = {f["fold"]: f for f in prepared["folds"]}
    assert set(by_fold) == {-1, 0, 1}
    for k, f in by_fold.items():
        assert f["patients"] == len(set(patients[folds == k])) and f["images"] == int((folds == k).sum())
    # Patient-grouped: no patient in two splits, so the split counts add up to the total.
    assert sum(f["patients"] for f in by_fold.values()) == prepared["patients"] == len(set(patients))
    print_prepare_summary(prepared)
    out = capsys.readouterr().out
    assert re.search(rf"hold-out \(test split\)\s*│\s*{by_fold[-1]['images']} images of {by_fold[-1]['patients']} patients", out), out


def test_evaluate_holdout_scores_the_fold_ensemble_on_the_holdout_patients(holdout_run, capsys):
    from sklearn.metrics import roc_auc_score

    from ptxray.postprocess import Thresholds, competition_dice, quantize
    from ptxray.predict import Ensemble
    from ptxray.runs import open_run

    run_dir, prepared = holdout_run
    assert main(["evaluate", "--run", str(run_dir), "--split", "holdout", "--cases", "1"]) == 0
    out = capsys.readouterr().out
    assert "hold-out patients, fold ensemble" in out
    report = run_dir / "report-holdout"
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["split"] == "holdout" and (report / "report.md").read_text().startswith("# Hold-out report (fold ensemble)")
    (row,) = doc["metrics"]
    assert row["fold"] == "hold-out"

    # The same numbers, computed here another way: both fold models (flip TTA) on the hold-out images.
    cache = Cache.open(prepared["cache"])
    _, holdout_ids = cache.split_ids(-1)
    images, masks, _ = cache.load_arrays(holdout_ids)
    assert row["images"] == len(holdout_ids) == next(f["images"] for f in prepared["folds"] if f["fold"] == -1)
    prob, cls_prob = Ensemble.from_run(open_run(str(run_dir)), "cpu").predict(images)
    th = Thresholds.from_dict(doc["thresholds"])
    pred, true = th.masks(quantize(prob), cls_prob), masks != 0
    dice = competition_dice((pred & true).sum(axis=(1, 2)), pred.sum(axis=(1, 2)), true.sum(axis=(1, 2)))
    assert row["dice"] == pytest.approx(float(dice.mean()))
    positive = true.any(axis=(1, 2))
    assert row["positive"] == int(positive.sum())
    if 0 < positive.sum() < len(positive):
        assert row["auc"] == pytest.approx(roc_auc_score(positive, cls_prob), abs=1e-6)
    # The rule was chosen on the out-of-fold predictions, never on the hold-out.
    assert "out-of-fold" in doc["thresholds"]["source"] and (run_dir / "oof" / "oof.npz").exists()
    assert (run_dir / "holdout" / "holdout.npz").exists()
    for c in doc["cases"]["best"] + doc["cases"]["worst"]:
        assert c["fold"] == -1 and c["dice_recomputed"] == pytest.approx(c["dice"], abs=1e-9)


def test_evaluate_holdout_without_a_holdout_split_says_how_to_get_one(trained_run, capsys):
    assert main(["evaluate", "--run", str(trained_run), "--split", "holdout"]) == 2
    err = capsys.readouterr().err
    assert "no hold-out split (fold -1)" in err and "data.holdout_fraction=0.2" in err


def test_a_copied_run_evaluates_with_its_copy_and_reuses_its_stored_predictions(holdout_run, tmp_path):
    """Last user of `holdout_run`: the run folder is copied, the original deleted, and the copy's
    reports come from the copy's models and its stored out-of-fold / hold-out predictions."""
    import shutil

    from ptxray.runs import open_run

    run_dir, _ = holdout_run
    before = {split: json.loads((run_dir / d / "metrics.json").read_text())
              for split, d in (("oof", "report"), ("holdout", "report-holdout")) if (run_dir / d).exists()}  # fmt: skip
    assert set(before) == {"holdout"}  # written by the test above; the out-of-fold report is new here
    copy = tmp_path / "moved" / "exp"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(run_dir)
    assert all(str(r.checkpoint_dir).startswith(str(copy)) for r in open_run(str(copy)).folds)
    holdout = evaluate_run(str(copy), split="holdout", cases=1)
    assert holdout["oof"]["computed_now"] is False, "the copy's stored hold-out predictions were reused"
    assert holdout["metrics"] == before["holdout"]["metrics"] and holdout["run"] == str(copy)
    assert (copy / "report-holdout" / "report.md").exists()
    oof = evaluate_run(str(copy), cases=1)
    assert oof["oof"]["computed_now"] is False and [m["fold"] for m in oof["metrics"]] == [0, 1, "all"]
