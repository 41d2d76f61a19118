"""K-fold x grid on Ray Tune with per-fold ASHA, on a real local Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
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


@pytest.mark.parametrize("num_workers", [1, 0], ids=["ray-train-worker", "in-trial"])
def test_kfold_grid_with_per_fold_asha_stops_a_bad_config(ray_local, smoke_cache, tmp_path, num_workers):
    from ptxray import ray_tune

    cfg = load_config(
        "smoke",
        {
            "compute.num_workers": num_workers,
            "model.vanilla.base_filters": 8,
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
    exp = tmp_path / "runs" / "asha-test"
    for fold, ckpt in summary["best"]["fold_checkpoints"].items():
        # Relative to the experiment folder, which holds them all: a TorchTrainer's checkpoints in
        # Ray Train's storage under train-runs/, a trial that trains itself in its Tune trial folder.
        assert not Path(ckpt).is_absolute() and ckpt.startswith("train-runs/" if num_workers else "_trainable_"), ckpt
        state = load_checkpoint(exp / ckpt / "checkpoints" / "last.pt")
        assert state["config"]["train"]["fold"] == fold
        assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
        assert (exp / ckpt / "checkpoints" / "best.pt").exists()
    if num_workers:  # named as the log counts epochs: the third of three
        assert all(c.endswith("/checkpoint_epoch_0003") for c in summary["best"]["fold_checkpoints"].values())

    saved = json.loads(Path(summary["files"]["json"]).read_text())
    assert saved["best"]["params"] == {"optim.lr": 3e-3}
    assert Path(summary["files"]["csv"]).read_text().count("\n") == 3

    # Tuner.restore keeps the experiment's own limit (it takes no TuneConfig): a new one is refused,
    # naming both, before anything is restored.
    with pytest.raises(ValueError, match=r"asha-test: this experiment runs 1 trial\(s\) at a time.*--max-concurrent-trials 2"):
        ray_tune.run_experiment(cfg, smoke_cache, max_concurrent_trials=2, print_table=False)

    # The run folder moves as one: a copy, with the original deleted, predicts with its own models.
    from ptxray.export import export_run
    from ptxray.runs import open_run

    copy = tmp_path / "moved" / "asha-copy"
    shutil.copytree(exp, copy)
    shutil.rmtree(tmp_path / "runs")
    run = open_run(str(copy))
    assert run.fold_ids == [0, 1] and all(r.checkpoint_dir.startswith(str(copy) + "/") for r in run.folds)
    assert run.checkpoint_record() == {str(f): f"{c}/checkpoints/best.pt" for f, c in saved["best"]["fold_checkpoints"].items()}
    result = export_run(str(copy), str(copy / "export" / "ensemble.torchscript.pt"), fmt="torchscript")
    assert result.folds == (0, 1) and all(c.startswith(str(copy)) for c in result.manifest["checkpoints"])


def test_killed_trial_that_trains_itself_resumes_from_its_tune_checkpoint(ray_local, smoke_cache, tmp_path):
    from ptxray import ray_tune
    from ptxray.report import evaluate_run

    cfg = load_config(
        "smoke",
        {
            "compute.num_workers": 0,
            "compute.max_failures": 1,
            "model.vanilla.base_filters": 8,
            "train.epochs": 3,
            # Only epoch 0 counts as an improvement: the best epoch comes before the kill, and the
            # resumed epochs never beat it, so no checkpoint written after the resume saves a best.pt.
            "train.early_stop_min_delta": 100.0,
            "augment.recipe": "none",
            "compute.storage_path": str(tmp_path / "runs"),
            "search.name": "killed-trial",
            "search.folds": [0],
            "search.early_stop": False,
        },
    )
    debug = tmp_path / "debug"
    killed: list[int] = []

    def kill_the_trial_after_its_first_checkpoint():
        # A function trainable's report returns only once Tune has processed the result and
        # registered its checkpoint: a held trial has checkpointed epoch 0.
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for held in debug.glob("*/held-rank0-pid*"):
                pid = int(held.name.rsplit("pid", 1)[1])
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_the_trial_after_its_first_checkpoint, daemon=True)
    watcher.start()
    summary = ray_tune.run_experiment(cfg, smoke_cache, print_table=False, debug_hooks={"debug_dir": str(debug), "hold_after_epoch": 0})
    watcher.join(timeout=5)

    assert killed, "the trial never reached its hold after epoch 0"
    (trial_debug,) = debug.iterdir()
    records = [json.loads(line) for line in (trial_debug / "epochs-rank0.jsonl").read_text().splitlines()]
    # Epoch 0 once, by the killed process; then 1 and 2 by its replacement, resumed from epoch 0.
    assert [r["metrics"]["epoch"] for r in records] == [0, 1, 2]
    assert records[0]["pid"] == killed[0] and records[1]["pid"] == records[2]["pid"] != killed[0]
    starts = sorted(json.loads(p.read_text())["resumed"] for p in trial_debug.glob("start-rank0-pid*.json"))
    assert starts == [False, True]
    # Ray sets a 1-CPU trial's threads to 1.
    assert {json.loads(p.read_text())["threads"] for p in trial_debug.glob("start-rank0-pid*.json")} == {1}

    (row,) = summary["rows"]
    assert row["folds_completed"] == 1 and row["epochs_max"] == 3, row
    state = load_checkpoint(tmp_path / "runs" / "killed-trial" / summary["best"]["fold_checkpoints"][0] / "checkpoints" / "last.pt")
    assert state["epochs_completed"] == 3 and [h["epoch"] for h in state["history"]] == [0, 1, 2]
    assert state["history"][0]["train_loss"] == records[0]["metrics"]["train_loss"], "epoch 0 was not trained again"
    # The fold's best weights (epoch 0, from before the kill) travel with every later checkpoint,
    # so the summary's checkpoint has them and the run can be evaluated.
    best = load_checkpoint(tmp_path / "runs" / "killed-trial" / summary["best"]["fold_checkpoints"][0] / "checkpoints" / "best.pt")
    assert best["epoch"] == 0 and best["metrics"]["train_loss"] == records[0]["metrics"]["train_loss"]
    doc = evaluate_run(summary["experiment"], cache=smoke_cache, cases=1)
    assert [m["fold"] for m in doc["metrics"]] == [0, "all"]


def test_grid_keys_are_checked_before_anything_runs(ray_local, smoke_cache, tmp_path):
    from ptxray import ray_tune

    cfg = load_config("smoke", {"search.grid": {"optim.lrr": [0.1]}, "compute.storage_path": str(tmp_path)})
    with pytest.raises(ValueError, match="optim.lrr"):
        ray_tune.run_experiment(cfg, smoke_cache)


@pytest.mark.parametrize("num_workers", [1, 0], ids=["ray-train-worker", "in-trial"])
def test_experiment_on_s3_then_rerun_reuses_finished_trials(ray_local, moto_s3, smoke_cache, num_workers):
    from ptxray import ray_tune

    s3 = moto_s3.client()
    bucket = f"ptx-runs-{num_workers}"
    s3.create_bucket(Bucket=bucket)
    cfg = load_config(
        "smoke",
        {
            "compute.num_workers": num_workers,
            "model.vanilla.base_filters": 8,
            "train.epochs": 1,
            "augment.recipe": "none",
            "compute.storage_path": f"s3://{bucket}/runs",
            "search.name": "s3-exp",
            "search.folds": [0],
            "search.early_stop": False,
        },
    )
    first = ray_tune.run_experiment(cfg, smoke_cache, print_table=False)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "runs/s3-exp/summary.json" in keys and "runs/s3-exp/summary.csv" in keys
    ckpt = first["best"]["fold_checkpoints"][0]
    # Relative to the experiment: a TorchTrainer's checkpoints in Ray Train's storage inside it, an
    # in-trial one's in its Tune trial folder.
    assert ckpt.startswith("train-runs/" if num_workers else "_trainable_"), ckpt
    prefix = f"runs/s3-exp/{ckpt}"
    in_checkpoint = [k for k in keys if k.startswith(prefix)]
    assert any(k.endswith("last.pt") for k in in_checkpoint), (prefix, keys)
    n_objects = len(keys)

    limit = ray_tune.default_max_concurrent_trials(cfg)  # what the first run used
    with pytest.raises(ValueError, match=rf"s3-exp: this experiment runs {limit} trial\(s\) at a time"):
        ray_tune.run_experiment(cfg, smoke_cache, max_concurrent_trials=limit + 1, print_table=False)
    moto_s3.start_recording()
    second = ray_tune.run_experiment(cfg, smoke_cache, max_concurrent_trials=limit, print_table=False)
    requests = moto_s3.stop_recording()
    assert second["rows"][0]["trial_ids"] == first["rows"][0]["trial_ids"], "the same trial, restored"
    new_checkpoints = [r for r in requests if r["method"] in ("PUT", "POST") and "/checkpoint_" in r["url"]]
    assert new_checkpoints == [], "a finished trial was not trained again"
    assert len(s3.list_objects_v2(Bucket=bucket)["Contents"]) >= n_objects

    # Copied to another prefix and the original deleted: the copy's summary finds the copy's models.
    from ptxray.predict import run_predict
    from ptxray.runs import open_run

    for key in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/s3-exp/")["Contents"]]:
        s3.copy_object(Bucket=bucket, Key="moved/" + key.removeprefix("runs/"), CopySource={"Bucket": bucket, "Key": key})
    for key in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]:
        s3.delete_object(Bucket=bucket, Key=key)
    run = open_run(f"s3://{bucket}/moved/s3-exp")
    assert [r.checkpoint_dir for r in run.folds] == [f"s3://{bucket}/moved/s3-exp/{ckpt}"]
    sample = Path(__file__).parent / "data" / "siim-sample" / "sample-images"
    done = run_predict(f"s3://{bucket}/moved/s3-exp", str(sample), f"s3://{bucket}/predictions", local=True, write_images=False)
    assert done["predicted"] == len(list(sample.glob("*.dcm")))


def test_default_max_concurrent_trials_follows_the_cluster(ray_local):
    import ray

    from ptxray.ray_tune import default_max_concurrent_trials, trial_resources

    cpus = int(ray.cluster_resources()["CPU"])
    one_cpu = load_config("smoke", {"compute.num_workers": 1, "compute.cpus_per_worker": 1})
    assert default_max_concurrent_trials(one_cpu) == cpus - 1  # one CPU stays free for Ray Data
    # workers that reserve no CPU still compute on one
    assert default_max_concurrent_trials(one_cpu.with_overrides({"compute.cpus_per_worker": 0})) == cpus - 1
    assert default_max_concurrent_trials(one_cpu.with_overrides({"compute.num_workers": cpus})) == 1
    # GPU trials are counted in GPUs; none here still runs one at a time rather than none
    assert default_max_concurrent_trials(one_cpu.with_overrides({"compute.use_gpu": True})) == 1
    # Trials that train in their own process hold their CPUs themselves and need no Ray Data tasks.
    in_trial = one_cpu.with_overrides({"compute.num_workers": 0})
    assert default_max_concurrent_trials(in_trial) == cpus
    assert default_max_concurrent_trials(in_trial.with_overrides({"compute.cpus_per_worker": 2})) == cpus // 2
    assert trial_resources(in_trial) == {"CPU": 1.0}
    assert trial_resources(in_trial.with_overrides({"compute.use_gpu": True})) == {"CPU": 1.0, "GPU": 1.0}
    assert trial_resources(one_cpu) == {"CPU": 0.01}, "a TorchTrainer trial only drives its workers"
