"""`ptxray train` (one fold, in process, no Ray) and `ptxray config`, end to end on a real cache."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ptxray.checkpoint import load_checkpoint
from ptxray.cli import main
from ptxray.config import load_config


@pytest.fixture(scope="module")
def smoke_cache(ray_local, synth_dataset, tmp_path_factory):
    from ptxray import ray_data

    root = tmp_path_factory.mktemp("train-cache")
    summary = ray_data.prepare(
        load_config("smoke"), images=str(synth_dataset / "dicom-images-train"), labels=str(synth_dataset / "train-rle.csv"),
        cache=str(root),
    )  # fmt: skip
    return root, summary


def test_train_one_fold_writes_a_run_folder_and_resumes(smoke_cache, tmp_path, capsys):
    cache, summary = smoke_cache
    run = tmp_path / "run"
    args = ["train", "--cache", str(cache), "--fold", "1", "--run-dir", str(run), "--config", "smoke",
            "--set", "train.epochs=2", "--set", "optim.lr=1e-3", "--set", "augment.recipe=kaggle"]
    assert main(args) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["fold"] == 1 and resolved["optim"]["lr"] == 1e-3 and resolved["train"]["epochs"] == 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    for m in lines:
        assert 0.0 <= m["val_dice"] <= 1.0 and m["val_n_images"] == next(f["images"] for f in summary["folds"] if f["fold"] == 1)
        assert 0.0 <= m["val_empty_dice"] <= 1.0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epochs_completed"] == 2 and any(torch.is_tensor(v) for v in state["model"].values())
    out = capsys.readouterr().out
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    # The best epoch as the log counts it ("epoch 2/2"), not the 0-based index of metrics.jsonl.
    assert f"run folder: {run}\nbest epoch: {best['epoch'] + 1}/2 (by val_dice): val_dice {best['metrics']['val_dice']:.4f}" in out
    assert f"checkpoint: {run / 'checkpoints' / 'best.pt'}" in out

    # Same run folder, more epochs: continues at epoch 2 instead of starting over.
    assert main(args[:-6] + ["--set", "train.epochs=3", "--set", "optim.lr=1e-3", "--set", "augment.recipe=kaggle"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2]


def test_train_with_augmentation_on_the_device_on_cpu(smoke_cache, tmp_path, caplog):
    # augment.where=device on a CPU: the batches stay uint8 until the (CPU) device augments them;
    # it trains, and the seed reproduces it (the augmentation draws from a seeded generator).
    cache, _ = smoke_cache
    histories = []
    caplog.set_level("INFO", logger="ptxray")
    for name in ("a", "b"):
        args = ["train", "--cache", str(cache), "--fold", "0", "--run-dir", str(tmp_path / name), "--config", "smoke",
                "--set", "train.epochs=2", "--set", "augment.where=device", "--set", "augment.recipe=kaggle"]  # fmt: skip
        assert main(args) == 0
        histories.append([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert [m["epoch"] for m in histories[0]] == [0, 1]
    assert "augmentation 'kaggle' on the device" in caplog.text
    for a, b in zip(*histories):
        assert 0.0 <= a["val_dice"] <= 1.0 and a["train_loss"] > 0
        assert {k: a[k] for k in ("train_loss", "val_loss", "val_dice")} == {k: b[k] for k in ("train_loss", "val_loss", "val_dice")}


def test_train_cli_errors_are_named(tmp_path, capsys):
    assert main(["train", "--cache", str(tmp_path / "nope"), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not a complete ptxray cache" in err


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "smoke", "--set", "optim.lr=0.02", "--set", "preprocess.channels=[raw,ahe]"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["optim"]["lr"] == 0.02 and out["preprocess"]["channels"] == ["raw", "ahe"] and out["model"]["in_channels"] == 2
    assert main(["config", "--set", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err
