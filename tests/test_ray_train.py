"""Ray Train (V2) on a real local Ray: DDP over 2 CPU workers with S3 storage, a killed worker.

Each rank writes what it reported to `debug_dir` (a test hook of `train_loop_per_worker`), so the
tests can compare ranks and see which process trained which epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from ptxray.checkpoint import load_checkpoint
from ptxray.config import load_config
from ptxray.runs import FoldModelRef, load_fold_model


@pytest.fixture(scope="module")
def cache_64px(ray_local, synth_dataset, tmp_path_factory):
    from ptxray import ray_data

    cfg = load_config("smoke")
    summary = ray_data.prepare(
        cfg,
        images=str(synth_dataset / "dicom-images-train"),
        labels=str(synth_dataset / "train-rle.csv"),
        cache=str(tmp_path_factory.mktemp("cache64")),
    )
    return summary


def _cfg(**overrides):
    # cpus_per_worker=0: the local Ray has 2 CPUs and Ray Data's read tasks need one (see
    # ray_train.worker_resources). base_filters=8 keeps the U-Net quick at 64 px.
    base = {"model.vanilla.base_filters": 8, "compute.cpus_per_worker": 0, "train.fold": 0, "optim.lr": 1e-3}
    return load_config("smoke", {**base, **overrides})


def _trainer(cfg, cache, run_name, storage, debug_dir, **debug):
    from ptxray import ray_train

    trainer = ray_train.make_trainer(cfg, cache, run_name=run_name, storage_path=str(storage))
    trainer.train_loop_config.update(debug_dir=str(debug_dir), **debug)
    return trainer


def _records(debug_dir: Path, rank: int) -> list[dict]:
    path = debug_dir / f"epochs-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _same(a, b) -> bool:
    return (a is None and b is None) or a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _fold_images(summary, fold: int) -> int:
    return next(f["images"] for f in summary["folds"] if f["fold"] == fold)


def test_two_workers_report_identical_metrics_and_checkpoint_to_s3(cache_64px, moto_s3, tmp_path):
    moto_s3.client().create_bucket(Bucket="ptxray-train")
    cfg = _cfg(**{"compute.num_workers": 2, "train.epochs": 2})
    debug = tmp_path / "debug"
    result = _trainer(cfg, cache_64px["cache"], "ddp2", "s3://ptxray-train/runs", debug).fit()

    ranks = [_records(debug, 0), _records(debug, 1)]
    assert [[r["metrics"]["epoch"] for r in recs] for recs in ranks] == [[0, 1], [0, 1]]
    assert ranks[0][0]["pid"] != ranks[1][0]["pid"]
    n_val = _fold_images(cache_64px, 0)
    n_train = cache_64px["images"] - n_val
    for m0, m1 in zip(*(([r["metrics"] for r in recs]) for recs in ranks)):
        shared = [k for k in m0 if k.startswith("val_")] + ["train_loss", "train_dice", "train_images", "lr"]
        assert len(shared) > 8
        assert all(_same(m0[k], m1[k]) for k in shared), {k: (m0[k], m1[k]) for k in shared if not _same(m0[k], m1[k])}
        # val is split without dropping rows; train equally (the odd row out is left out), and a
        # trailing one-image batch is skipped (BatchNorm cannot train on one sample).
        assert m0["val_n_images"] == n_val
        per_rank = n_train // 2
        # Each rank keeps the rows of its first streamed epoch; epoch 1 trains from memory.
        assert m0["train_held_rows"] == m1["train_held_rows"] == per_rank
        assert m0["train_images"] == 2 * (per_rank - (1 if per_rank % cfg.train.batch_size == 1 else 0))
        assert 0.0 <= m0["data_wait_fraction"] <= 1.0
        assert all(type(v) in (float, int) for v in m0.values())

    assert result.error is None and result.metrics["epoch"] == 1 and result.metrics["epochs_completed"] == 2
    assert result.metrics["val_dice"] == ranks[0][-1]["metrics"]["val_dice"]

    # Storage on the S3 endpoint: Ray wrote the checkpoints and its run snapshot there.
    listing = moto_s3.client().list_objects_v2(Bucket="ptxray-train", Prefix="runs/ddp2/")
    keys = {o["Key"] for o in listing.get("Contents", [])}
    # Folders named as the log counts epochs ("epoch 1/2", "epoch 2/2").
    for epoch in (1, 2):
        assert f"runs/ddp2/checkpoint_epoch_{epoch:04d}/checkpoints/last.pt" in keys
    assert "runs/ddp2/checkpoint_epoch_0002/checkpoints/best.pt" in keys
    assert "runs/ddp2/checkpoint_manager_snapshot.json" in keys
    assert result.checkpoint.filesystem.type_name == "s3"
    local = Path(result.checkpoint.to_directory(str(tmp_path / "restored")))
    state = load_checkpoint(local / "checkpoints" / "last.pt")
    assert state["epochs_completed"] == 2 and [h["epoch"] for h in state["history"]] == [0, 1]
    assert state["config"]["train"]["fold"] == 0
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped from DDP
    assert any(torch.is_tensor(v) for v in state["model"].values())

    # What `ptxray train --ray` prints: the best epoch (as the log counts it) and best.pt, as in-process.
    from ptxray import ray_train
    from ptxray.cli import train_outcome

    run_dir, best, best_pt = ray_train.fold_outcome(result, "s3://ptxray-train/runs")
    assert run_dir == "s3://ptxray-train/runs/ddp2"
    assert best_pt == "s3://ptxray-train/runs/ddp2/checkpoint_epoch_0002/checkpoints/best.pt"
    monitored = [h[cfg.train.monitor] for h in state["history"]]
    assert best["epoch"] == monitored.index(max(monitored)) and best == load_checkpoint(best_pt)["metrics"]
    text = train_outcome(cfg, run_dir, best, best_pt)
    assert f"best epoch: {best['epoch'] + 1}/2 (by val_dice): val_dice {best['val_dice']:.4f}" in text
    assert text.endswith(f"checkpoint: {best_pt}") and "Checkpoint(" not in text


def test_killed_worker_resumes_from_last_checkpoint(cache_64px, tmp_path):
    # min_delta 100: only epoch 0 improves, so the best epoch comes before the kill and the
    # resumed epochs never write a best.pt of their own.
    cfg = _cfg(**{"compute.num_workers": 2, "train.epochs": 3, "compute.max_failures": 1, "train.early_stop_min_delta": 100.0})
    debug, storage = tmp_path / "debug", tmp_path / "runs"
    trainer = _trainer(cfg, cache_64px["cache"], "killed", storage, debug, debug_hold_after_epoch=0)
    snapshot = storage / "killed" / "checkpoint_manager_snapshot.json"
    killed: list[int] = []

    def kill_rank1_after_first_checkpoint():
        deadline = time.time() + 400
        while time.time() < deadline:
            held = sorted(debug.glob("held-rank1-pid*")) if debug.exists() else []
            registered = snapshot.exists() and "checkpoint_epoch_0001" in snapshot.read_text()
            if held and registered:
                pid = int(held[0].name.rsplit("pid", 1)[1])
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    watcher.start()
    result = trainer.fit()
    watcher.join(timeout=5)

    assert killed, "the first checkpoint never showed up in storage"
    ranks = [_records(debug, 0), _records(debug, 1)]
    for recs in ranks:
        # Epoch 0 (checkpointed) once by the first worker group; then 1 and 2 by the second.
        assert [r["metrics"]["epoch"] for r in recs] == [0, 1, 2]
        assert recs[0]["pid"] != recs[1]["pid"] and recs[1]["pid"] == recs[2]["pid"]
    assert ranks[1][0]["pid"] == killed[0]
    starts = sorted(json.loads(p.read_text())["resumed"] for p in debug.glob("start-rank*-pid*.json"))
    assert starts == [False, False, True, True]

    assert result.error is None and result.metrics["epochs_completed"] == 3
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / "checkpoints" / "last.pt")
    assert state["epochs_completed"] == 3 and [h["epoch"] for h in state["history"]] == [0, 1, 2]
    # The resumed history continues the checkpoint's: epoch 0's numbers are the first group's.
    assert state["history"][0]["train_loss"] == ranks[0][0]["metrics"]["train_loss"]
    kept = sorted(p.name for p in (storage / "killed").glob("checkpoint_epoch_*"))
    assert kept == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]  # CheckpointConfig(num_to_keep=2)
    # Epoch 0's checkpoint is gone, but its best weights travel with every later checkpoint.
    for name in kept:
        ref = FoldModelRef(0, str(storage / "killed" / name))
        best = load_checkpoint(ref.best)
        assert best["epoch"] == 0 and best["metrics"]["train_loss"] == ranks[0][0]["metrics"]["train_loss"], name
        model, _ = load_fold_model(ref)
        assert not model.training


def test_storage_paths_and_worker_resources(tmp_path, moto_s3):
    from ptxray import ray_train

    path, fs = ray_train.storage_for_ray("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix" and fs.type_name == "s3"
    path, fs = ray_train.storage_for_ray("runs")
    assert fs is None and Path(path).is_absolute() and path.endswith("runs")
    with pytest.raises(ValueError, match="needs a bucket"):
        ray_train.storage_for_ray("s3://")
    assert ray_train.worker_resources(load_config(None, {"compute.cpus_per_worker": 3})) == {"CPU": 3.0}
    assert ray_train.worker_resources(load_config(None, {"compute.cpus_per_worker": 0})) == {"CPU": 0.01}
    gpu = load_config(None, {"compute.cpus_per_worker": 0, "compute.use_gpu": True})
    assert ray_train.worker_resources(gpu) == {"CPU": 0.0}


def test_workers_that_would_hold_every_cpu_leave_one_for_the_reads(caplog):
    """`train --ray --set compute.num_workers=2` on a 2-CPU machine used to wait forever: the two
    1-CPU workers held both CPUs and Ray Data's read tasks never started."""
    from ptxray import ray_train

    two = load_config("smoke", {"compute.num_workers": 2, "compute.cpus_per_worker": 1})
    with caplog.at_level(logging.WARNING, logger="ptxray"):
        assert ray_train.worker_resources(two, cluster_cpus=2) == {"CPU": 0.5}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "compute.num_workers=2 x compute.cpus_per_worker=1 would hold 2 of the cluster's 2 CPUs" in warning
    assert "Each worker reserves 0.5 CPU instead" in warning and "compute.cpus_per_worker=0" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptxray"):
        assert ray_train.worker_resources(two, cluster_cpus=3) == {"CPU": 1.0}  # one CPU is left: as asked
        assert ray_train.worker_resources(two, cluster_cpus=1) == {"CPU": 1.0}  # does not fit: an autoscaler's job
        assert ray_train.worker_resources(two.with_overrides({"compute.cpus_per_worker": 0}), cluster_cpus=2) == {"CPU": 0.01}
        gpu = two.with_overrides({"compute.num_workers": 1, "compute.cpus_per_worker": 6, "compute.use_gpu": True})
        assert ray_train.worker_resources(gpu, cluster_cpus=7) == {"CPU": 6.0}  # a 7-CPU GPU pod: one left
    assert caplog.records == []
    assert ray_train.worker_resources(two.with_overrides({"compute.num_workers": 1}), cluster_cpus=1) == {"CPU": 0.01}
    assert ray_train.worker_resources(two.with_overrides({"compute.num_workers": 3}), cluster_cpus=4) == {"CPU": 1.0}


def test_make_trainer_checks_its_inputs(cache_64px, tmp_path):
    from ptxray import ray_train

    with pytest.raises(ValueError, match="3 channels .* model.in_channels is 1"):
        ray_train.make_trainer(_cfg(**{"preprocess.channels": ["raw"]}), cache_64px["cache"], run_name="x")
    with pytest.raises(ValueError, match="run_name"):
        ray_train.make_trainer(_cfg(), cache_64px["cache"], run_name="a/b")
    cfg = _cfg(**{"compute.num_workers": 2})
    trainer = ray_train.make_trainer(cfg, cache_64px["cache"], run_name="x", storage_path=str(tmp_path))
    assert trainer.scaling_config.num_workers == 2 and trainer.train_loop_config["cache"] == cache_64px["cache"]
    # Only train is a Ray dataset (streaming_split); each rank reads its validation rows itself.
    assert set(trainer.datasets) == {"train"}
    # The prefetch budget in batches: 512 MiB of uint8 (3 channels + mask) at 64 px, batch 8.
    assert ray_train.prefetch_depth(cfg, 8) == 512 * 2**20 // (8 * 4 * 64 * 64)
    assert ray_train.prefetch_depth(cfg.with_overrides({"compute.prefetch_mb": 0}), 8) == 4
    # Workers that would take every CPU of the cluster (4 here) leave one to the read tasks.
    full = _cfg(**{"compute.num_workers": 2, "compute.cpus_per_worker": 2})
    trainer = ray_train.make_trainer(full, cache_64px["cache"], run_name="x", storage_path=str(tmp_path))
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.5}


def test_positive_oversampling_on_streamed_shards(cache_64px, tmp_path):
    """pos_rate 0.8 on Ray Train: the worker swaps negatives for earlier positives of its stream,
    so the positive fraction it trains on rises far above the split's natural rate. Streamed every
    epoch (hold_shard_mb 0), with the augmentation on the (CPU) device: the worker hands over uint8."""
    fold0 = next(f for f in cache_64px["folds"] if f["fold"] == 0)
    natural = (cache_64px["positive"] - fold0["positive"]) / (cache_64px["images"] - fold0["images"])
    cfg = _cfg(**{"train.epochs": 2, "train.pos_rate_start": 0.8, "train.pos_rate_end": 0.8,
                  "compute.hold_shard_mb": 0, "augment.where": "device"})  # fmt: skip
    debug = tmp_path / "debug"
    result = _trainer(cfg, cache_64px["cache"], "oversample", tmp_path / "runs", debug).fit()
    assert result.error is None
    records = [r["metrics"] for r in _records(debug, 0)]
    assert natural < 0.4 and len(records) == 2
    # Swap probability (0.8 - p) / (1 - p) once the reservoir holds a positive: about 0.8 expected.
    # Only ~10 rows an epoch here, so the check pools both epochs and keeps a wide margin.
    pooled = sum(r["train_positive_fraction"] for r in records) / 2
    assert pooled > natural + 0.3, (natural, [r["train_positive_fraction"] for r in records])
    assert [r["train_held_rows"] for r in records] == [0, 0]  # streamed both epochs
    assert all(math.isfinite(r["train_loss"]) for r in records)


def test_hold_shard_when_it_fits_the_budget_and_the_memory():
    from ptxray import ray_train
    from ptxray.batchsize import available_memory_bytes

    cfg = load_config(None, {"preprocess.image_size_px": 512, "compute.hold_shard_mb": 100})
    row_bytes = 4 * 512 * 512  # 3 channels + mask, uint8
    assert ray_train.hold_shard(cfg, 100 * 2**20 // row_bytes, 1)
    assert not ray_train.hold_shard(cfg, 100 * 2**20 // row_bytes + 1, 1)  # over the budget
    assert not ray_train.hold_shard(cfg.with_overrides({"compute.hold_shard_mb": 0}), 10, 1)  # streaming asked for
    huge = cfg.with_overrides({"compute.hold_shard_mb": 10**9})
    too_many = available_memory_bytes() // (4 * row_bytes) + 1  # over a quarter of the free memory
    assert not ray_train.hold_shard(huge, too_many, 1) and ray_train.hold_shard(huge, 10, 1)
    assert not ray_train.hold_shard(huge, too_many // 4 + 1, 4)  # four workers on the node share it
