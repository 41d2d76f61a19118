"""K-fold x grid on Ray Tune with per-fold ASHA, on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptxray.checkpoint import load_checkpoint
from ptxray.config import load_config


@pytest.fixture(scope="module")
def smoke_cache(ray_local, synth_dataset, tmp_path_factory):
    from ptxray import ray_data

    summary = ray_data.prepare(
        load_config("smoke"),
        images=str(synth_dataset / "dicom-images-train"),
        labels=str(synth_dataset / "train-rle.csv"),
        cache=str(tmp_path_factory.mktemp("tune-cache")),
    )
    return summary["cache"]


def test_kfold_grid_with_per_fold_asha_stops_a_bad_config(ray_local, smoke_cache, tmp_path):
    from ptxray import ray_tune

    cfg = load_config(
        "smoke",
        {
            "model.base_filters": 8,
            "train.epochs": 3,
            "train.batch_size": 4,
            "train.early_stop_patience": 0,
            "augment.recipe": "none",
            "optim.scheduler": "none",
            "compute.storage_path": str(tmp_path / "runs"),
            "search.name": "asha-test",
            # lr 1e-9 never moves off its initial loss: ASHA must stop it at the first rung.
            "search.grid": {"optim.lr": [3e-3, 1e-9]},
            "search.metric": "val_loss",
            "search.mode": "min",
            "search.grace_period": 2,
            "search.reduction_factor": 2,
        },
    )
    # One trial at a time: the good configuration reaches each fold's rung first.
    summary = ray_tune.run_experiment(cfg, smoke_cache, max_concurrent_trials=1, print_table=False)

    rows = {r["params"]["optim.lr"]: r for r in summary["rows"]}
    assert set(rows) == {3e-3, 1e-9}
    good, bad = rows[3e-3], rows[1e-9]
    for row in (good, bad):
        assert row["folds"] == 2 and row["folds_completed"] == 2, row
        assert sorted(row["trial_ids"]) == [0, 1], "every configuration ran on both folds (paired)"
    assert good["epochs_min"] == good["epochs_max"] == 3
    assert bad["epochs_max"] == 2, "ASHA stopped the bad configuration at the rung (epoch 2)"
    assert summary["best"]["params"] == {"optim.lr": 3e-3}
    for fold, ckpt in summary["best"]["fold_checkpoints"].items():
        state = load_checkpoint(Path(ckpt) / "checkpoints" / "last.pt")
        assert state["config"]["train"]["fold"] == fold

    saved = json.loads(Path(summary["files"]["json"]).read_text())
    assert saved["best"]["params"] == {"optim.lr": 3e-3}
    assert Path(summary["files"]["csv"]).read_text().count("\n") == 3


def test_grid_keys_are_checked_before_anything_runs(ray_local, smoke_cache, tmp_path):
    from ptxray import ray_tune

    cfg = load_config("smoke", {"search.grid": {"optim.lrr": [0.1]}, "compute.storage_path": str(tmp_path)})
    with pytest.raises(ValueError, match="optim.lrr"):
        ray_tune.run_experiment(cfg, smoke_cache)


def test_experiment_on_s3_then_rerun_reuses_finished_trials(ray_local, moto_s3, smoke_cache):
    from ptxray import ray_tune

    s3 = moto_s3.client()
    s3.create_bucket(Bucket="ptx-runs")
    cfg = load_config(
        "smoke",
        {
            "model.base_filters": 8,
            "train.epochs": 1,
            "augment.recipe": "none",
            "compute.storage_path": "s3://ptx-runs/runs",
            "search.name": "s3-exp",
            "search.folds": [0],
            "search.early_stop": False,
        },
    )
    first = ray_tune.run_experiment(cfg, smoke_cache, print_table=False)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ptx-runs")["Contents"]]
    assert "runs/s3-exp/summary.json" in keys and "runs/s3-exp/summary.csv" in keys
    ckpt = first["best"]["fold_checkpoints"][0]
    assert ckpt.startswith("s3://ptx-runs/runs/s3-exp.train/")
    prefix = ckpt.removeprefix("s3://ptx-runs/")
    in_checkpoint = [k for k in keys if k.startswith(prefix)]
    assert any(k.endswith("last.pt") for k in in_checkpoint), (prefix, keys)
    n_objects = len(keys)

    moto_s3.start_recording()
    second = ray_tune.run_experiment(cfg, smoke_cache, print_table=False)
    requests = moto_s3.stop_recording()
    assert second["rows"][0]["trial_ids"] == first["rows"][0]["trial_ids"], "the same trial, restored"
    new_checkpoints = [r for r in requests if r["method"] in ("PUT", "POST") and "/checkpoint_" in r["url"]]
    assert new_checkpoints == [], "a finished trial was not trained again"
    assert len(s3.list_objects_v2(Bucket="ptx-runs")["Contents"]) >= n_objects


def test_default_max_concurrent_trials_follows_the_cluster(ray_local):
    import ray

    from ptxray.ray_tune import default_max_concurrent_trials

    cpus = int(ray.cluster_resources()["CPU"])
    one_cpu = load_config("smoke", {"compute.num_workers": 1, "compute.cpus_per_worker": 1})
    assert default_max_concurrent_trials(one_cpu) == cpus - 1  # one CPU stays free for Ray Data
    # workers that reserve no CPU still compute on one
    assert default_max_concurrent_trials(one_cpu.with_overrides({"compute.cpus_per_worker": 0})) == cpus - 1
    assert default_max_concurrent_trials(one_cpu.with_overrides({"compute.num_workers": cpus})) == 1
    # GPU trials are counted in GPUs; none here still runs one at a time rather than none
    assert default_max_concurrent_trials(one_cpu.with_overrides({"compute.use_gpu": True})) == 1
