"""How fast the training data path feeds one worker: host cost per image, and images/s through
Ray Train and in-process with a model that costs nothing.

    .venv/bin/python benchmarks/feed.py [--sizes 256 512] [--images 240] [--epochs 5]
                                        [--out benchmarks/results/feed.json]

Per image size, on a synthetic cache (channels raw/CLAHE/BEASF, fold 0 of 5) in its own embedded
Ray (2 logical CPUs), all in one run:

Host stages, one thread, process CPU time (`time.process_time`), min over repeats:
- `host_ms_per_image`: the worker's data path with augmentation on the device, once its shard is
  held in memory (every epoch after the first): permutation + one gather into the uint8
  hand-over batch (`engine.uint8_batch`; pinned on CUDA, plain memory here).
- `streamed_read_ms_per_image`: the same from the cache as a streamed epoch reads it (pyarrow
  Parquet read + zstd + filter to the fold + `table_to_arrays` + hand-over; Ray Data's own
  scheduling and shuffle buffer not included).
- `baseline_host_ms_per_image`: today's worker path before this change: streamed read + the
  `paper` recipe on the host (albumentations) + float32 batch (`batch_from_numpy`); and
  `host_speedup_vs_baseline` = baseline / host_ms_per_image.
- `device_augment_cpu_ms_per_image`: the device augmentation run on this CPU, for reference only
  (on a GPU it is a few microseconds per image); kornia's flips + affine beside it when installed.

End to end, with `ray_train.NullModel` (one weight: the data path is all that is measured),
`augment.where: device` with the `none` recipe (the device's augmentation work is not the data
path's), batch 16, 1 torch thread:
- `inprocess_images_per_s`: `engine.fit` over the fold in memory (`runner.make_batch_fns`), mean
  of train images / train seconds over epochs 2+.
- `ray_train_images_per_s`: the same through Ray Train, 1 worker (1 CPU), its shard held after
  the first epoch (`compute.hold_shard_mb`); `ray_over_inprocess` = in-process / Ray (target <= 1.2).
- `first_batch_seconds`: the wait for each epoch's first batch, per epoch, for Ray with the shard
  held, streamed every epoch (`compute.hold_shard_mb: 0`), and the baseline (streamed, `paper`
  on the host); `first_batch_seconds_epochs_2plus` their means over epochs 2+.
- `ray_train_images_per_s_streamed` and `baseline_ray_train_images_per_s` for the same two.
- `ray_over_inprocess_cpu`: the worker's process CPU per image (train + validation, epochs 2+)
  over the in-process one: the ratio that load from other jobs on a shared machine does not skew.
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
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cpu_ms_per_image(fn: Callable[[], int], repeats: int) -> float:
    """min over `repeats` of process CPU ms per image of `fn()` (which returns the images it handled)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        n = fn()
        best = min(best, (time.process_time() - t0) * 1000.0 / max(1, n))
    return best


def host_stages(cfg, cache_uri: str, batch_size: int, repeats: int) -> dict[str, Any]:
    import torch

    from ptxray.augment import augment_generator, build_augment, build_device_augment
    from ptxray.cache import Cache, table_to_arrays
    from ptxray.engine import batch_from_numpy, uint8_batch
    from ptxray.runner import FoldData, augmented_batch

    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    data = FoldData.load(cache_uri, cfg.train.fold)
    images, masks = data.train_images, data.train_masks
    rng = np.random.default_rng(0)

    def held() -> int:
        idx = rng.permutation(len(images))
        for start in range(0, len(idx), batch_size):
            uint8_batch(images, masks, idx[start : start + batch_size])
        return len(idx)

    cache = Cache.open(cache_uri)
    train_ids = cache.split_ids(cfg.train.fold)[0]

    def streamed(per_batch: Callable[[np.ndarray, np.ndarray], Any]) -> Callable[[], int]:
        def run() -> int:
            dataset, args = cache._scan_args(train_ids)
            n = 0
            for record_batch in dataset.to_batches(batch_size=batch_size, **args):
                import pyarrow as pa

                if record_batch.num_rows:
                    imgs, msks, _ = table_to_arrays(pa.Table.from_batches([record_batch]))
                    per_batch(imgs, msks)
                    n += len(msks)
            return n

        return run

    pipeline = build_augment("paper", cfg.preprocess.image_size_px)
    aug_rng = np.random.default_rng(1)

    def baseline(imgs: np.ndarray, msks: np.ndarray) -> None:  # before: host augmentation, float batches
        pairs = augmented_batch(imgs, msks, pipeline, aug_rng)
        batch_from_numpy(pairs["image"].numpy(), pairs["mask"].numpy())

    out: dict[str, Any] = {
        "host_ms_per_image": cpu_ms_per_image(held, repeats),
        "streamed_read_ms_per_image": cpu_ms_per_image(streamed(lambda i, m: uint8_batch(i, m)), repeats),
        "baseline_host_ms_per_image": cpu_ms_per_image(streamed(baseline), max(1, repeats // 2)),
    }
    out["host_images_per_s_per_core"] = 1000.0 / out["host_ms_per_image"]
    out["host_speedup_vs_baseline"] = out["baseline_host_ms_per_image"] / out["host_ms_per_image"]

    size = cfg.preprocess.image_size_px
    x = torch.from_numpy(images[:8].copy())
    m = torch.from_numpy(masks[:8].copy())
    device_ms = {}
    for recipe in ("paper", "kaggle"):
        aug, gen = build_device_augment(recipe, size), augment_generator("cpu", [0])
        aug(x, m, gen)  # warm-up
        device_ms[recipe] = cpu_ms_per_image(lambda: (aug(x, m, gen), len(x))[1], 3)
    out["device_augment_cpu_ms_per_image"] = device_ms
    try:
        import kornia.augmentation as K

        kornia_aug = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5),
            K.RandomAffine(degrees=170.0, translate=(0.15, 0.15), scale=(1 / 1.5, 1 / 0.9, 1 / 1.5, 1 / 0.9),
                           shear=(-10.0, 10.0, 0.0, 0.0), p=1.0, padding_mode="zeros"),
            data_keys=["input", "mask"],
        )  # fmt: skip

        def kornia_run() -> int:
            kornia_aug(x.float() / 255, m.float()[:, None])
            return len(x)

        kornia_run()
        out["device_augment_kornia_cpu_ms_per_image"] = {"paper_flips_affine_only": cpu_ms_per_image(kornia_run, 3)}
    except ImportError:
        out["device_augment_kornia_cpu_ms_per_image"] = None
    return out


def run_in_process(cfg, cache_uri: str) -> dict[str, Any]:
    import torch

    from ptxray.engine import fit
    from ptxray.ray_train import NullModel
    from ptxray.runner import FoldData, device_augment_for, make_batch_fns, steps_per_epoch

    torch.set_num_threads(1)
    data = FoldData.load(cache_uri, cfg.train.fold)
    train_batches, val_batches = make_batch_fns(cfg, data, where="device")
    cpu_at_epoch_end: list[float] = []
    history = fit(
        NullModel(), cfg, train_batches, val_batches, run_dir=None, device="cpu",
        steps_per_epoch=steps_per_epoch(cfg, len(data.train_images)), device_augment=device_augment_for(cfg, torch.device("cpu")),
        on_epoch_end=lambda epoch, metrics, last: cpu_at_epoch_end.append(time.process_time()),
    ).history  # fmt: skip
    return _epoch_figures(history, cpu_at_epoch_end)


def _epoch_figures(history: list[dict[str, Any]], cpu_at_epoch_end: list[float]) -> dict[str, Any]:
    """Rates per epoch, and the process CPU seconds per trained image of epochs 2+ (train and
    validation: what the process spent per epoch, which load on the machine does not inflate)."""
    rates = [h["train_images"] / h["train_seconds"] for h in history]
    first = [h["train_first_batch_seconds"] for h in history]
    cpu = [b - a for a, b in zip(cpu_at_epoch_end, cpu_at_epoch_end[1:])]
    return {
        "cpu_ms_per_train_image_epochs_2plus": 1000.0 * sum(cpu) / sum(h["train_images"] for h in history[1:]),
        "images_per_s_per_epoch": rates,
        "images_per_s_after_first_epoch": statistics.mean(rates[1:]),
        "first_batch_seconds": first,
        "first_batch_seconds_epochs_2plus": statistics.mean(first[1:]),
        "data_wait_fraction_per_epoch": [h["train_data_wait_seconds"] / h["train_seconds"] for h in history],
    }


def run_ray_train(cfg, cache_uri: str, work: Path) -> dict[str, Any]:
    from ptxray import ray_train

    debug = work / f"debug-{uuid.uuid4().hex[:8]}"
    trainer = ray_train.make_trainer(cfg, cache_uri, run_name=f"feed-{uuid.uuid4().hex[:8]}", storage_path=str(work / "runs"))
    trainer.train_loop_config.update(debug_dir=str(debug), debug_null_model=True)
    t0 = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"the Ray Train run failed: {result.error}")
    lines = [json.loads(line) for line in (debug / "epochs-rank0.jsonl").read_text().splitlines()]
    records = [line["metrics"] for line in lines]
    out = _epoch_figures(records, [line["process_cpu_seconds"] for line in lines])
    out["held_rows"] = [r["train_held_rows"] for r in records]
    out["fit_seconds_with_startup"] = time.time() - t0
    return out


def measure_size(size: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from common import synthetic_cache

    from ptxray.config import load_config

    cfg = load_config(None, {
        "preprocess.image_size_px": size,
        "augment.recipe": "none",
        "augment.where": "device",
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.early_stop_patience": 0,
        "compute.num_workers": 1,
        "compute.cpus_per_worker": 1,
        "compute.channels_last": False,
    })  # fmt: skip
    row: dict[str, Any] = {"image_size_px": size}
    with synthetic_cache(work / f"s{size}", cfg, images=args.images, size=size, positive_rate=0.25, num_cpus=2) as cache_uri:
        row.update(host_stages(cfg, cache_uri, args.batch_size, args.repeats))
        local = run_in_process(cfg, cache_uri)
        row["inprocess_images_per_s"] = local["images_per_s_after_first_epoch"]
        if args.skip_ray:
            row["in_process"] = local
            return row
        held = run_ray_train(cfg, cache_uri, work)
        streamed = run_ray_train(cfg.with_overrides({"compute.hold_shard_mb": 0}), cache_uri, work)
        before = cfg.with_overrides({"compute.hold_shard_mb": 0, "augment.where": "host", "augment.recipe": "paper"})
        baseline = run_ray_train(before, cache_uri, work)
    row["ray_train_images_per_s"] = held["images_per_s_after_first_epoch"]
    row["ray_over_inprocess"] = row["inprocess_images_per_s"] / row["ray_train_images_per_s"]
    # The same comparison in process CPU time per image (train + validation), which load on a
    # shared machine does not inflate the way it inflates wall time.
    row["ray_over_inprocess_cpu"] = held["cpu_ms_per_train_image_epochs_2plus"] / local["cpu_ms_per_train_image_epochs_2plus"]
    row["ray_train_images_per_s_streamed"] = streamed["images_per_s_after_first_epoch"]
    row["baseline_ray_train_images_per_s"] = baseline["images_per_s_after_first_epoch"]
    row["ray_speedup_vs_baseline"] = row["ray_train_images_per_s"] / row["baseline_ray_train_images_per_s"]
    row["first_batch_seconds"] = {
        "in_process": local["first_batch_seconds"], "ray_held": held["first_batch_seconds"],
        "ray_streamed": streamed["first_batch_seconds"], "ray_baseline": baseline["first_batch_seconds"],
    }  # fmt: skip
    row["first_batch_seconds_epochs_2plus"] = {
        "in_process": local["first_batch_seconds_epochs_2plus"], "ray_held": held["first_batch_seconds_epochs_2plus"],
        "ray_streamed": streamed["first_batch_seconds_epochs_2plus"], "ray_baseline": baseline["first_batch_seconds_epochs_2plus"],
    }  # fmt: skip
    row["details"] = {"in_process": local, "ray_held": held, "ray_streamed": streamed, "ray_baseline": baseline}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--images", type=int, default=240, help="synthetic images (fold 0 trains on 4/5 of them)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-ray", action="store_true", help="host stages and in-process only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feed.json"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is start-up and not measured)")

    from common import write_report

    # Ray starts its worker processes at nice 15. On a machine shared with other jobs that alone
    # gives the Ray Train worker a fraction of the CPU the in-process run (nice 0) gets, which
    # measures the scheduler, not the data path: start them at the driver's priority instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    sizes: list[dict[str, Any]] = []
    report = {
        "setup": {
            "images": args.images, "epochs": args.epochs, "batch_size": args.batch_size, "fold": 0, "num_folds": 5,
            "channels": ["raw", "clahe", "beasf"], "model": "ray_train.NullModel", "augment_for_rates": "none on the device",
            "baseline": "streamed every epoch, paper recipe on the host, float32 batches", "ray_num_cpus": 2, "ray_workers": 1,
            "torch_threads": 1, "pinned_memory": False, "ray_worker_niceness": os.environ["RAY_worker_niceness"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "load_average_at_end": list(os.getloadavg()),
        },
        "targets": {"host_ms_per_image_at_512": 0.5, "ray_over_inprocess_max": 1.2},
        "sizes": sizes,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ptxr-feed-") as tmp:
        for size in args.sizes:
            for attempt in range(3):  # a busy machine can time out Ray's start-up; try again
                try:
                    sizes.append(measure_size(size, args, Path(tmp) / f"try{attempt}"))
                    break
                except Exception as e:
                    if "timed out during startup" not in str(e) or attempt == 2:
                        raise
                    print(f"size {size}: Ray did not start ({e}); retrying", file=sys.stderr, flush=True)
                    time.sleep(10)
            print(json.dumps({k: v for k, v in sizes[-1].items() if k != "details"}, indent=2), flush=True)
            report["setup"]["load_average_at_end"] = list(os.getloadavg())
            write_report(report, args.out)  # after every size: a later failure keeps the earlier ones
    return 0


if __name__ == "__main__":
    sys.exit(main())
