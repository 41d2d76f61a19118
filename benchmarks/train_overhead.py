"""Ray Train overhead: epoch time of one fold on Ray Train (1 worker) against the engine in process.

    .venv/bin/python benchmarks/train_overhead.py [--images 120] [--size 128] [--epochs 3]
                                                  [--out benchmarks/results/train_overhead.json]

Both paths train the same model on the same cache (a synthetic SIIM dataset prepared once) with the
same number of images, batch size, augmentation recipe and torch thread count:

- in process: `ptxray.runner` (the fold loaded into numpy, augmented in the loop) + `engine.fit`;
- Ray Train: `ptxray.ray_train.make_trainer` with one worker, its shard streamed by Ray Data.

Epoch time = the wall time between consecutive ends of epoch (so it includes training, validation,
checkpoint writing and, on Ray, reporting and uploading the checkpoint). Epoch 0 carries start-up
(the worker group, the first Ray Data execution, allocator warm-up) and is left out: epochs 1..N-1
are averaged. Reported: both means, their ratio (the issue targets <= 1.15 on CPU), and the Ray
path's `data_wait_fraction` (time its train loop spent waiting for batches, augmentation included,
over the train epoch), beside the in-process one.

Its own embedded Ray (2 logical CPUs: the worker takes 1, Ray Data's read tasks the other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def epoch_intervals(ends: list[float]) -> list[float]:
    """Seconds of epochs 1..N-1 from the times their epochs ended (epoch 0 is start-up)."""
    return [b - a for a, b in zip(ends, ends[1:])]


def run_in_process(cfg, cache_uri: str, work: Path, threads: int) -> dict:
    import torch

    from ptxray.engine import fit
    from ptxray.models import build_model
    from ptxray.runner import FoldData, make_batch_fns, steps_per_epoch

    torch.set_num_threads(threads)
    data = FoldData.load(cache_uri, cfg.train.fold)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    train_batches, val_batches = make_batch_fns(cfg, data)
    ends: list[float] = []
    history = []

    def on_epoch_end(epoch, metrics, last):
        ends.append(time.time())
        history.append(metrics)

    fit(
        model, cfg, train_batches, val_batches, run_dir=work / "in-process", device="cpu",
        on_epoch_end=on_epoch_end, steps_per_epoch=steps_per_epoch(cfg, len(data.train_images)),
    )
    return {
        "torch_threads": torch.get_num_threads(),
        "epoch_seconds": epoch_intervals(ends),
        "train_images_per_epoch": [m["train_images"] for m in history],
        "data_wait_fraction": [m["train_data_wait_seconds"] / m["train_seconds"] for m in history[1:]],
        "train_seconds": [m["train_seconds"] for m in history[1:]],
        "train_and_val_seconds": [m["seconds"] for m in history[1:]],
    }


def run_ray_train(cfg, cache_uri: str, work: Path) -> dict:
    from ptxray import ray_train

    debug = work / "ray-debug"
    trainer = ray_train.make_trainer(cfg, cache_uri, run_name=f"bench-{uuid.uuid4().hex[:8]}", storage_path=str(work / "runs"))
    trainer.train_loop_config["debug_dir"] = str(debug)
    t0 = time.time()
    result = trainer.fit()
    total = time.time() - t0
    records = [json.loads(line) for line in (debug / "epochs-rank0.jsonl").read_text().splitlines()]
    (start,) = [json.loads(p.read_text()) for p in debug.glob("start-rank0-*.json")]
    return {
        "torch_threads": start["threads"],
        "epoch_seconds": epoch_intervals([r["time"] for r in records]),
        "train_images_per_epoch": [r["metrics"]["train_images"] for r in records],
        "data_wait_fraction": [r["metrics"]["data_wait_fraction"] for r in records[1:]],
        "train_seconds": [r["metrics"]["train_seconds"] for r in records[1:]],
        "train_and_val_seconds": [r["metrics"]["seconds"] for r in records[1:]],
        "fit_seconds_with_startup": total,
        "final_val_dice": result.metrics["val_dice"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--size", type=int, default=128, help="training resolution in pixels")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--recipe", default="paper")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_overhead.json"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (epoch 0 is start-up and not measured)")

    from common import synthetic_cache, write_report

    from ptxray.config import load_config

    with tempfile.TemporaryDirectory(prefix="ptxr-bench-") as tmp:
        work = Path(tmp)
        cfg = load_config(None, {
            "preprocess.image_size_px": args.size,
            "augment.recipe": args.recipe,
            "train.epochs": args.epochs,
            "train.batch_size": args.batch_size,
            "train.early_stop_patience": 0,
            "compute.num_workers": 1,
            "compute.cpus_per_worker": 1,
        })
        with synthetic_cache(work, cfg, images=args.images, size=max(256, args.size), positive_rate=0.25, num_cpus=2) as cache_uri:
            ray_path = run_ray_train(cfg, cache_uri, work)
            # The same thread count as the worker, whose OMP_NUM_THREADS Ray sets from its CPUs.
            local = run_in_process(cfg, cache_uri, work, threads=ray_path["torch_threads"])

    local_mean = statistics.mean(local["epoch_seconds"])
    ray_mean = statistics.mean(ray_path["epoch_seconds"])
    report = {
        "setup": {
            "images": args.images, "train_images_per_epoch": local["train_images_per_epoch"][0],
            "image_size_px": args.size, "epochs": args.epochs, "measured_epochs": args.epochs - 1,
            "batch_size": args.batch_size, "augment": args.recipe, "model": cfg.model.arch,
            "channels": list(cfg.preprocess.channels), "ray_workers": 1, "ray_num_cpus": 2,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "load_average_at_end": list(os.getloadavg()),
        },
        "in_process": local,
        "ray_train": ray_path,
        "in_process_epoch_seconds_mean": local_mean,
        "ray_train_epoch_seconds_mean": ray_mean,
        "ratio": ray_mean / local_mean,
        "overhead_percent": 100.0 * (ray_mean / local_mean - 1.0),
        "target_overhead_percent": 15.0,
        "ray_data_wait_fraction_mean": statistics.mean(ray_path["data_wait_fraction"]),
        "in_process_data_wait_fraction_mean": statistics.mean(local["data_wait_fraction"]),
    }
    write_report(report, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
