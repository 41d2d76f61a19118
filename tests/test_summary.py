"""The K-fold summary is plain code: checked here on hand-made trial histories, without Ray."""

from __future__ import annotations

import json
import math

import pytest

from ptxray.summary import TrialRecord, asha_rung, best_epoch, summarize, write_summary


def _hist(*dices, pos=None):
    return [
        {"val_dice": d, "val_dice_pos": (pos or d) / 2, "val_iou": d / 3, "val_auc": 0.5 + d / 4, "val_empty_dice": 0.75}
        for d in dices
    ]


def test_best_epoch_ignores_nan_and_follows_mode():
    h = [{"m": 0.2}, {"m": float("nan")}, {"m": 0.5}, {"m": 0.4}]
    assert best_epoch(h, "m", "max")["m"] == 0.5
    assert best_epoch(h, "m", "min")["m"] == 0.2
    assert best_epoch([{"m": float("nan")}], "m", "max") is None


@pytest.mark.parametrize("epochs, rung", [(0, -1), (1, 0), (2, 1), (3, 1), (4, 2), (8, 3)])
def test_asha_rung(epochs, rung):
    assert asha_rung(epochs, grace_period=1, reduction_factor=2) == rung


def test_summary_rows_mean_std_and_best(tmp_path):
    good = {"optim.lr": 0.01}
    bad = {"optim.lr": 0.0}
    trials = [
        TrialRecord("a0", good, 0, "TERMINATED", _hist(0.5, 0.8, 0.7), checkpoint="/ck/a0"),
        TrialRecord("a1", good, 1, "TERMINATED", _hist(0.6, 0.9, 0.85), checkpoint="/ck/a1"),
        TrialRecord("b0", bad, 0, "TERMINATED", _hist(0.3)),  # stopped at the first rung
        TrialRecord("b1", bad, 1, "ERROR", _hist(0.1), error="worker died"),
    ]
    s = summarize(trials, metric="val_dice", mode="max", num_folds=2, max_epochs=3, grace_period=1, reduction_factor=2)
    assert [r["params"] for r in s["rows"]] == [good, bad]
    g, b = s["rows"]
    assert g["folds_completed"] == 2 and g["folds_full_length"] == 2 and g["epochs_max"] == 3 and g["rung_reached"] == 1
    assert math.isclose(g["val_dice_mean"], 0.85) and math.isclose(g["val_dice_std"], math.sqrt(2 * 0.05**2))
    assert math.isclose(g["val_dice_pos_mean"], 0.425) and g["val_empty_dice_mean"] == 0.75
    assert b["folds_completed"] == 1 and b["errors"] == ["fold 1: worker died"] and b["epochs_min"] == 1
    assert s["best"]["params"] == good and s["best"]["fold_checkpoints"] == {0: "/ck/a0", 1: "/ck/a1"}

    json_path, csv_path = write_summary(s, str(tmp_path / "exp"))
    saved = json.loads(open(json_path).read())
    assert saved["best"]["params"] == good
    lines = open(csv_path).read().splitlines()
    assert len(lines) == 3 and lines[0].startswith("params,folds,folds_completed")


def test_a_config_with_missing_folds_does_not_win_on_a_partial_mean():
    trials = [
        TrialRecord("x0", {"k": 1}, 0, "TERMINATED", _hist(0.99)),
        TrialRecord("x1", {"k": 1}, 1, "ERROR", [], error="boom"),
        TrialRecord("y0", {"k": 2}, 0, "TERMINATED", _hist(0.6)),
        TrialRecord("y1", {"k": 2}, 1, "TERMINATED", _hist(0.6)),
    ]
    s = summarize(trials, metric="val_dice", mode="max", num_folds=2, max_epochs=1)
    assert s["best"]["params"] == {"k": 2}
