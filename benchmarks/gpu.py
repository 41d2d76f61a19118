"""Training throughput on one GPU: resident batch, the real data path, and Ray Train.

    .venv/bin/python benchmarks/gpu.py            # one GPU, <= ~8 min: results/gpu.json
    .venv/bin/python benchmarks/gpu.py --smoke    # the same code on the CPU, tiny (the test suite)

Everything it needs it makes: a synthetic SIIM dataset (`ptxray.synth`) prepared into a cache in
its own embedded Ray, and models with random weights (nothing is downloaded). At 512 px, bf16
autocast and channels_last (the training defaults), batch 32, for the vanilla U-Net, U-Net /
ResNet34 and U-Net / DenseNet121 (smp), each in eager mode and with `torch.compile`:

- `resident`: train images/s with one batch already on the GPU (the model's ceiling);
- `fed`: the same fed by the real data path: the fold read from the cache into memory, shuffled,
  gathered into pinned uint8 batches a few steps ahead in a thread (`runner.Prefetch`), and
  augmented on the GPU (`paper` recipe); with its data_wait_fraction (the step waiting for
  the host) and `fed_over_resident`;
- `ray_train`: a 2-epoch Ray Train run of U-Net / ResNet34 on one GPU worker
  (`ray_train.make_trainer`, augmentation on the device, shard held after epoch 1), with each
  epoch's data_wait_fraction, time to first batch and images/s.

The training step is `engine.train_epoch` (its autocast, loss and metrics), so the numbers are
the training loop's own. Eager runs come first, then Ray Train, then the compiled runs (compiling
takes the longest); a run that would not fit in `--budget-s` is recorded as skipped, and the JSON
is rewritten after every measurement, so a cut-off run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> model config overrides
    "unet_vanilla": {"model.arch": "unet_vanilla"},
    "unet_resnet34": {"model.arch": "unet", "model.encoder": "resnet34"},
    "unet_densenet121": {"model.arch": "unet", "model.encoder": "densenet121"},
}
RAY_MODEL = "unet_resnet34"


def settings(smoke: bool) -> dict[str, Any]:
    if smoke:  # every code path, as cheaply as the CPU allows; compiling only the smallest model
        return dict(device="cpu", size=64, images=24, batch_size=2, warmup_steps=1, steps=1, compile_backend="eager",
                    compile_models=["unet_vanilla"], ray_epochs=2, budget_s=1e9, compile_estimate_s=0)  # fmt: skip
    return dict(device="cuda", size=512, images=1024, batch_size=32, warmup_steps=5, steps=30, compile_backend="inductor",
                compile_models=list(MODELS), ray_epochs=2, budget_s=420, compile_estimate_s=120)  # fmt: skip


def config_for(name: str, s: dict[str, Any]):
    from ptxray.config import load_config

    return load_config(None, {
        **MODELS[name],
        "preprocess.image_size_px": s["size"],
        "augment.recipe": "paper",
        "augment.where": "device",
        "train.batch_size": s["batch_size"],
        "train.epochs": s["ray_epochs"],
        "train.early_stop_patience": 0,
        "compute.amp": True,
        "compute.channels_last": True,
        "compute.use_gpu": s["device"] == "cuda",
        "compute.num_workers": 1,
        "compute.cpus_per_worker": 1 if s["device"] == "cuda" else 0,
    })  # fmt: skip


def train_rate(cfg, model, optimizer, loss_fn, batches, device, *, augment=None, generator=None) -> dict[str, float]:
    """One `engine.train_epoch` over `batches`: images/s and the data wait fraction."""
    from ptxray.engine import train_epoch

    stats = train_epoch(
        model, batches, optimizer, loss_fn, device=device, amp=cfg.compute.amp, grad_clip_norm=cfg.optim.grad_clip_norm,
        channels_last=cfg.compute.channels_last, augment=augment, generator=generator,
    )  # fmt: skip
    return {
        "images_per_s": stats["images"] / stats["seconds"],
        "data_wait_fraction": stats["data_wait_seconds"] / stats["seconds"],
        "seconds": stats["seconds"],
        "images": stats["images"],
    }


def measure_model(name: str, compiled: bool, data, s: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ptxray.augment import augment_generator, build_device_augment
    from ptxray.engine import build_optimizer, uint8_batch
    from ptxray.losses import build_loss
    from ptxray.models import build_model, count_parameters
    from ptxray.runner import Prefetch, batches_from_arrays

    cfg = config_for(name, s)
    device = torch.device(s["device"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model, backend=s["compile_backend"]) if compiled else model
    train = dict(optimizer=build_optimizer(model, cfg.optim), loss_fn=build_loss(cfg.loss).to(device))
    b = s["batch_size"]
    out: dict[str, Any] = {"model": name, "compiled": compiled, "parameters": count_parameters(model)}

    # Resident: one float batch on the device, the same every step.
    resident = uint8_batch(data.train_images, data.train_masks, np.arange(b) % len(data.train_images))
    resident = {"image": resident["image"].to(device).float().div_(255), "mask": resident["mask"].to(device).float()}
    t0 = time.perf_counter()
    train_rate(cfg, step_model, batches=[resident] * s["warmup_steps"], device=device, **train)
    out["warmup_seconds"] = time.perf_counter() - t0  # includes compiling
    out["resident"] = train_rate(cfg, step_model, batches=[resident] * s["steps"], device=device, **train)

    # Fed: the real data path, with device augmentation.
    rng = np.random.default_rng(0)
    n = s["steps"] * b
    idx = np.concatenate([rng.permutation(len(data.train_images)) for _ in range(n // len(data.train_images) + 1)])[:n]
    pin = device.type == "cuda"

    def feed(indices: np.ndarray):
        return Prefetch(lambda: batches_from_arrays(data.train_images, data.train_masks, indices, b, pin=pin), 4, "bench-feed")

    augment = build_device_augment(cfg.augment.recipe, cfg.preprocess.image_size_px)
    warm = feed(idx[: s["warmup_steps"] * b])
    train_rate(cfg, step_model, batches=warm, device=device, augment=augment, generator=augment_generator(device, [0]), **train)
    fed = feed(idx)
    out["fed"] = train_rate(cfg, step_model, batches=fed, device=device, augment=augment, generator=augment_generator(device, [1]), **train)
    out["fed_over_resident"] = out["fed"]["images_per_s"] / out["resident"]["images_per_s"]
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def ray_train_run(cache_uri: str, s: dict[str, Any], work: Path) -> dict[str, Any]:
    from ptxray import ray_train

    cfg = config_for(RAY_MODEL, s)
    debug = work / "ray-debug"
    trainer = ray_train.make_trainer(cfg, cache_uri, run_name=f"gpu-{uuid.uuid4().hex[:8]}", storage_path=str(work / "runs"))
    trainer.train_loop_config["debug_dir"] = str(debug)
    t0 = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    records = [json.loads(line)["metrics"] for line in (debug / "epochs-rank0.jsonl").read_text().splitlines()]
    return {
        "model": RAY_MODEL,
        "epochs": [
            {
                "epoch": r["epoch"], "data_wait_fraction": r["data_wait_fraction"], "images_per_s": r["train_images"] / r["train_seconds"],
                "first_batch_seconds": r["train_first_batch_seconds"], "train_images": r["train_images"], "held_rows": r["train_held_rows"],
            }
            for r in records
        ],  # fmt: skip
        "data_wait_fraction_last_epoch": records[-1]["data_wait_fraction"],
        "fit_seconds_with_startup": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny, on the CPU (compile with the 'eager' backend)")
    p.add_argument("--budget-s", type=float, default=None, help="skip what would not finish within this (default 420 s)")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args(argv)
    s = settings(args.smoke)
    if args.budget_s is not None:
        s["budget_s"] = args.budget_s

    import torch

    from common import synthetic_cache, write_report

    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU version", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report: dict[str, Any] = {
        "setup": {
            **{k: v for k, v in s.items() if k != "budget_s"}, "budget_s": s["budget_s"], "amp": "bf16 autocast",
            "channels_last": True, "augment": "paper on the device", "models": MODELS, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(0) if s["device"] == "cuda" else platform.processor() or platform.machine(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        },
        "runs": [],
        "skipped": [],
        "errors": [],
    }  # fmt: skip

    def save() -> None:
        report["seconds"] = time.perf_counter() - start
        write_report(report, args.out)

    def attempt(what: str, fn) -> Any:
        try:
            return fn()
        except Exception as e:  # one failed measurement must not lose the others
            report["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
            print(f"{what}: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        finally:
            save()

    torch.set_float32_matmul_precision("high")
    from ptxray.runner import FoldData

    with tempfile.TemporaryDirectory(prefix="ptxr-gpu-") as tmp:
        work = Path(tmp)
        cfg = config_for(RAY_MODEL, s)
        synth_px = max(256, s["size"])
        with synthetic_cache(work, cfg, images=s["images"], size=synth_px, positive_rate=0.3, num_cpus=os.cpu_count() or 2) as cache_uri:
            report["setup"]["cache_seconds"] = time.perf_counter() - start
            t0 = time.perf_counter()
            data = FoldData.load(cache_uri, 0)
            report["setup"]["fold_read_seconds"] = time.perf_counter() - t0
            report["setup"]["train_images"] = len(data.train_images)
            for name in MODELS:
                run = attempt(f"{name} eager", lambda: measure_model(name, False, data, s))
                if run is not None:
                    report["runs"].append(run)
            if not args.no_ray:
                report["ray_train"] = attempt("ray_train", lambda: ray_train_run(cache_uri, s, work))
            for name in s["compile_models"]:
                left = s["budget_s"] - (time.perf_counter() - start)
                if left < s["compile_estimate_s"]:
                    report["skipped"].append({"model": name, "compiled": True, "reason": f"{left:.0f} s left of the budget"})
                    save()
                    continue
                run = attempt(f"{name} compiled", lambda: measure_model(name, True, data, s))
                if run is not None:
                    report["runs"].append(run)
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "setup"}, indent=2, default=str))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
