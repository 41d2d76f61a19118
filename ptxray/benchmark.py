"""`ptxray benchmark`: which architecture to train for pneumothorax, and at what cost.

Every architecture runs on the same cached data, the same fold and the same training budget
(epochs, or seconds of training), and gets the same measurements:

- `params_trainable` / `params_total`: `sum(p.numel())` of the built model (trainable: requires_grad).
- `gflops_per_image`: FLOPs (not MACs; FLOPs = 2 x multiply-accumulates) of one eval-mode forward
  of one real validation image at the cache's size, counted by `torch.utils.flop_counter
  .FlopCounterMode` (convolutions, matrix products, attention: the ops with a FLOP formula;
  elementwise ops, pooling, torchvision's roi_align and NMS count nothing). For maskrcnn the
  count depends on the number of detections (up to `MAX_DETECTIONS_PER_IMAGE`).
- `max_batch_size`: the largest training batch that fits (ptxray.batchsize: doubling, then
  bisection, recovering from OOM; on CPU bounded by a memory budget and a cap, so it often reads
  "cap"). `limit` says what stopped the search.
- `train_images_per_s` / `infer_images_per_s`: a training step (`engine.train_epoch`: forward,
  loss, backward, optimizer step) and an eval forward on a batch already resident on the device,
  so data loading, augmentation and host-to-device copies are excluded. `warmup_steps` steps are
  run and discarded first (they include torch.compile's compilation with `--compile`); then
  `repeats` timings of `timing_steps` steps each, CUDA synchronised before every clock read.
  Reported: the median over the repeats, with min and max.
- `peak_memory_bytes`: during the training timing (model, optimizer state, batch, activations),
  above what was in use before the model was built. CUDA: `torch.cuda.max_memory_allocated`
  after a reset. CPU: the process resident-set high-water mark (reset through
  /proc/self/clear_refs, after returning freed memory to the OS), minus the resident set before.
  In a Ray trial each architecture runs in its own process; with `--local` they share one, which
  the reset makes measurable but which still shares allocator state (see the report's notes).
- Quality after the budget, on the fold's validation split: `val_dice` (competition rule: an empty
  prediction on an empty mask scores 1), `val_dice_pos` (positives only), `val_iou`, `val_auc`
  (image-level), and `val_empty_dice`, what predicting "empty" everywhere scores on the same
  images. The training loop is the engine's (`train_epoch` / `evaluate`) with the config's
  optimizer, loss and augmentation; the lr schedule follows `optim.scheduler` over the epoch
  budget, and is constant under a seconds budget (no number of epochs to plan it over). The
  seconds budget counts training time only (validation after each epoch is not charged), so
  learning curves come for free.

The runs use channels_last (`compute.channels_last`; 1.15-1.4x faster on CPU too), on CUDA bf16
autocast (`compute.amp`) and, with `--compile`, torch.compile (not for maskrcnn, whose detection code is dynamic). Numbers
are comparable only within one device: every output records the device and software versions.

`run_local` runs the architectures one after another in this process; `ptxray.ray_benchmark`
runs each as a Ray Tune trial (on a cluster, in parallel on separate GPUs). Both return the same
result rows, which `write_report` turns into CSV, JSON, PNG plots and a Markdown report.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptxray.augment import DeviceAugment, augment_generator
from ptxray.batchsize import (
    DEFAULT_MAX_BATCH_SIZE,
    PeakMemory,
    find_max_batch_size,
    memory_baseline_bytes,
    release_memory,
)
from ptxray.cache import Cache
from ptxray.config import Config
from ptxray.metrics import benchmark_metrics
from ptxray.engine import (
    autocast,
    batch_from_numpy,
    build_optimizer,
    build_scheduler,
    evaluate,
    scheduler_steps_per_batch,
    step_epoch_scheduler,
    train_epoch,
)
from ptxray.losses import build_loss, weight_penalty
from ptxray.models import available_architectures, build_model, capabilities
from ptxray.runner import FoldData, PrefetchedEpochs, device_augment_for, make_batch_fns, steps_per_epoch

log = logging.getLogger("ptxray")

# name -> (model.arch, model.encoder or None for the config's encoder)
PRESETS: dict[str, tuple[str, str | None]] = {
    "unet_vanilla": ("unet_vanilla", None),
    "unet_densenet121": ("unet", "densenet121"),
    "unet_resnet34": ("unet", "resnet34"),
    "unet_efficientnet-b0": ("unet", "efficientnet-b0"),
    "fpn": ("fpn", None),
    "deeplabv3": ("deeplabv3", None),
    "deeplabv3plus": ("deeplabv3plus", None),
    "fcn": ("fcn", None),
    "maskrcnn": ("maskrcnn", None),
    "unetplusplus": ("unetplusplus", None),
    "manet": ("manet", None),
    "linknet": ("linknet", None),
    "pspnet": ("pspnet", None),
    "pan": ("pan", None),
    "upernet": ("upernet", None),
}
# The paper's set: its U-Nets, the two comparisons it names (DeepLabV3, Mask R-CNN), FPN, FCN.
PAPER_SET = (
    "unet_vanilla",
    "unet_densenet121",
    "unet_resnet34",
    "unet_efficientnet-b0",
    "fpn",
    "deeplabv3",
    "deeplabv3plus",
    "fcn",
    "maskrcnn",
)
OTHER_DECODERS = ("unetplusplus", "manet", "linknet", "pspnet", "pan", "upernet")


def result_columns() -> tuple[str, ...]:
    """Columns of results.csv, in order (the JSON has these plus history and search attempts)."""
    return (
        "name", "arch", "encoder", "encoder_weights", "status", "error",
        "params_trainable", "params_total", "gflops_per_image",
        "max_batch_size", "max_batch_limit", "max_batch_cap", "batch_size",
        "train_images_per_s", "train_images_per_s_min", "train_images_per_s_max",
        "infer_images_per_s", "infer_images_per_s_min", "infer_images_per_s_max",
        "peak_memory_bytes", "peak_memory_kind",
        "epochs_completed", "train_steps", "train_images_seen", "train_seconds",
        *benchmark_metrics(),  # the metrics registered with a benchmark position (ptxray.metrics)
        "device", "device_name", "torch_threads", "seconds_total",
    )  # fmt: skip


# ---- what to compare ------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    name: str  # as given on the command line: a preset or "arch:encoder"
    arch: str
    encoder: str | None = None  # None: the config's model.encoder

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_archs(text: str) -> list[ArchSpec]:
    """"paper" (the default set), "all" (paper + smp's other decoders), or a comma list of presets
    (`unet_resnet34`, `fpn`, ...) and `arch:encoder` pairs (`fpn:resnet18`, `unet:densenet121`)."""
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "paper":
            names.extend(PAPER_SET)
        elif item == "all":
            names.extend(PAPER_SET + OTHER_DECODERS)
        else:
            names.append(item)
    if not names:
        raise ValueError(f"--archs {text!r}: no architecture named")
    specs: list[ArchSpec] = []
    registered = available_architectures()
    for name in dict.fromkeys(names):  # de-duplicated, order kept
        if name in PRESETS:
            arch, encoder = PRESETS[name]
        elif ":" in name:
            arch, encoder = name.split(":", 1)
        else:
            arch, encoder = name, None
        if arch not in registered:
            raise ValueError(
                f"--archs: unknown architecture {name!r}; presets: {sorted(PRESETS)}, "
                f"or ARCH:ENCODER with ARCH in {registered}"
            )
        specs.append(ArchSpec(name, arch, encoder or None))
    return specs


def arch_config(cfg: Config, spec: ArchSpec, chexnet: str | None = None) -> Config:
    """The config for one architecture: random initial weights, CheXNet for densenet121 when given."""
    encoder = spec.encoder or cfg.model.encoder
    weights = f"chexnet:{chexnet}" if chexnet and encoder == "densenet121" and capabilities(spec.arch).has_encoder else "none"
    return cfg.with_overrides({"model.arch": spec.arch, "model.encoder": encoder, "model.encoder_weights": weights})


# ---- settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkSettings:
    fold: int = 0
    epochs: int = 0  # training budget: epochs ...
    seconds: float = 0.0  # ... or seconds of training (exactly one of the two)
    batch_size: int | str = "auto"  # "auto": each architecture trains at its largest batch
    batch_search: bool = True  # find the largest batch size (needed by "auto")
    max_batch_size: int = 0  # the search's cap; 0 = ptxray.batchsize's default for the device
    warmup_steps: int = 2
    timing_steps: int = 5
    repeats: int = 3
    compile: bool = False
    device: str = ""  # "" = cuda when available, else cpu
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    chexnet: str = ""  # CheXNet checkpoint for densenet121 encoders ("" = random init)

    def __post_init__(self) -> None:
        if (self.epochs > 0) == (self.seconds > 0):
            raise ValueError(
                f"benchmark budget: give exactly one of epochs ({self.epochs}) or seconds ({self.seconds}), > 0"
            )
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"benchmark batch size: a positive integer or 'auto', got {self.batch_size!r}")
        if self.batch_size == "auto" and not self.batch_search:
            raise ValueError("benchmark batch size 'auto' needs the batch-size search (drop --no-batch-search)")
        for name in ("timing_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"benchmark {name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.max_batch_size < 0 or self.threads < 0:
            raise ValueError("benchmark warmup_steps, max_batch_size and threads must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def budget_text(self) -> str:
        return f"{self.epochs} epoch(s)" if self.epochs else f"{self.seconds:g} s of training"


def resolve_device(settings: BenchmarkSettings) -> torch.device:
    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- the environment ------------------------------------------------------------------------
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()} ({os.cpu_count()} logical CPUs)"


def environment(device: torch.device) -> dict[str, Any]:
    """The device and software versions: recorded in every output."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cuda_version": torch.version.cuda if cuda else None,
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            **{p: _version(p) for p in ("ptxray", "torch", "torchvision", "segmentation-models-pytorch", "timm", "ray", "numpy")},
            "torch": torch.__version__,  # with its build tag (+cu130, +cpu): the package version omits it
        },
    }


# ---- measurements ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: nn.Module, image: torch.Tensor) -> int:
    """FLOPs (2 x MACs) of one eval-mode forward of `image` (1, C, H, W) on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def measure_rate(
    run_steps: Callable[[int], Any],
    images_per_step: int,
    device: torch.device,
    *,
    warmup_steps: int,
    timing_steps: int,
    repeats: int,
) -> dict[str, Any]:
    """Images/s of `run_steps(k)` (k steps): warm-up discarded, then `repeats` synchronised timings."""
    if warmup_steps:
        run_steps(warmup_steps)
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run_steps(timing_steps)
        _sync(device)
        rates.append(timing_steps * images_per_step / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates}


def _resident_batch(images: np.ndarray, masks: np.ndarray, batch_size: int, device: torch.device, channels_last: bool):
    idx = np.arange(batch_size) % len(images)
    batch = batch_from_numpy(images[idx], masks[idx])
    batch = {k: v.to(device) for k, v in batch.items()}
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


def _place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    return model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _without_single_image_batches(batches: Iterable) -> Iterator:
    # A trailing batch of one image: BatchNorm cannot train on it (deeplabv3's ASPP pooling raises).
    for batch in batches:
        if batch["image"].shape[0] > 1:
            yield batch


def _within_seconds(batches: Iterable, seconds: float) -> Iterator:
    """The batches until `seconds` have passed since the first (which is always given)."""
    start = time.perf_counter()
    for batch in batches:
        yield batch
        if time.perf_counter() - start >= seconds:
            return


def train_for_budget(
    model: nn.Module,
    cfg: Config,
    data: FoldData,
    settings: BenchmarkSettings,
    device: torch.device,
    *,
    amp: bool,
    channels_last: bool,
) -> list[dict[str, Any]]:
    """Train for the budget with the engine; one history entry (train + val metrics) per epoch.

    The batches take the path training takes on `device` (`augment.where`): on CUDA uint8 batches
    are augmented on the device and the host builds them ahead in a thread, so the throughput
    measured is the model's, not the host augmentation's."""
    device_augment = device_augment_for(cfg, device)
    where = "host" if device_augment is None else "device"
    train_batches, val_batches = make_batch_fns(cfg, data, where=where, pin=device.type == "cuda")
    if device.type == "cuda":
        train_batches = PrefetchedEpochs(train_batches)
    try:
        history = _train_epochs(
            model, cfg, data, settings, device, train_batches, val_batches, device_augment, amp=amp, channels_last=channels_last
        )
    finally:
        if isinstance(train_batches, PrefetchedEpochs):
            train_batches.close()
    for entry in history:
        entry["augment_where"] = where
    return history


def _train_epochs(
    model: nn.Module,
    cfg: Config,
    data: FoldData,
    settings: BenchmarkSettings,
    device: torch.device,
    train_batches: Callable[[int, np.random.Generator], Iterable],
    val_batches: Callable[[], Iterable],
    device_augment: DeviceAugment | None,
    *,
    amp: bool,
    channels_last: bool,
) -> list[dict[str, Any]]:
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn = build_loss(cfg.loss).to(device)
    l1, l2 = cfg.loss.l1_penalty, cfg.loss.l2_penalty
    penalty = (lambda m: weight_penalty(m, l1, l2)) if (l1 or l2) else None
    n_steps = steps_per_epoch(cfg, len(data.train_images))
    scheduler = None
    if settings.epochs:
        scheduler = build_scheduler(optimizer, cfg.optim, settings.epochs, n_steps, mode=cfg.train.monitor_mode)
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    images_seen = steps_done = 0
    epoch = 0
    while (epoch < settings.epochs) if settings.epochs else (train_seconds < settings.seconds):
        batches: Iterable = _without_single_image_batches(train_batches(epoch, np.random.default_rng([cfg.train.seed, epoch])))
        if settings.seconds:
            batches = _within_seconds(batches, settings.seconds - train_seconds)
        stats = train_epoch(
            model, batches, optimizer, loss_fn, device=device,
            scheduler=scheduler if scheduler_steps_per_batch(scheduler) else None,
            amp=amp, grad_clip_norm=cfg.optim.grad_clip_norm, penalty=penalty, channels_last=channels_last,
            augment=device_augment,
            generator=augment_generator(device, [cfg.train.seed, epoch]) if device_augment is not None else None,
        )  # fmt: skip
        train_seconds += stats["seconds"]
        images_seen += stats["images"]
        steps_done += stats["steps"]
        val = evaluate(model, val_batches(), device=device, amp=amp, channels_last=channels_last, loss_fn=loss_fn)
        step_epoch_scheduler(scheduler, float(val.get(cfg.train.monitor, math.nan)))
        history.append(
            {
                "epoch": epoch,
                "epochs_completed": len(history) + stats["steps"] / max(n_steps, 1),
                "train_loss": stats["train_loss"],
                "train_dice": stats["train_dice"],
                "train_steps": steps_done,
                "train_images_seen": images_seen,
                "train_seconds": train_seconds,
                "lr": float(optimizer.param_groups[-1]["lr"]),
                **val,
            }
        )
        epoch += 1
    return history


def benchmark_architecture(
    cfg: Config, spec: ArchSpec, data: FoldData, settings: BenchmarkSettings
) -> dict[str, Any]:
    """Every measurement for one architecture; never raises (a failure is a row with its error)."""
    device = resolve_device(settings)
    t_start = time.perf_counter()
    row: dict[str, Any] = {
        "name": spec.name, "arch": spec.arch, "encoder": None, "encoder_weights": None,
        "status": "ok", "error": None, "device": str(device), "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(), "environment": environment(device),
    }  # fmt: skip
    try:
        acfg = arch_config(cfg, spec, settings.chexnet or None)
        row["encoder"] = acfg.model.encoder if capabilities(spec.arch).has_encoder else None
        row["encoder_weights"] = acfg.model.encoder_weights
        _measure(acfg, spec, data, settings, device, row)
    except Exception as e:  # noqa: BLE001 - one architecture's failure must not end the benchmark
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.error("benchmark %s failed: %s\n%s", spec.name, row["error"], traceback.format_exc())
    finally:
        release_memory()
    row["seconds_total"] = time.perf_counter() - t_start
    return row


def _time_model(
    cfg: Config, data: FoldData, settings: BenchmarkSettings, device: torch.device, batch_size: int,
    amp: bool, channels_last: bool, compile_model: bool,
) -> tuple[dict[str, Any], dict[str, Any], PeakMemory]:
    """(training rate, inference rate, peak memory of the training timing) at `batch_size`."""
    timing = dict(warmup_steps=settings.warmup_steps, timing_steps=settings.timing_steps, repeats=settings.repeats)
    with PeakMemory(device, baseline_bytes=memory_baseline_bytes(device)) as peak:
        _seed(cfg.train.seed)
        model = _place(build_model(cfg.model), device, channels_last)
        runnable = torch.compile(model) if compile_model else model
        optimizer = build_optimizer(model, cfg.optim)
        loss_fn = build_loss(cfg.loss).to(device)
        batch = _resident_batch(data.train_images, data.train_masks, batch_size, device, channels_last)

        def train_steps(k: int) -> None:
            train_epoch(
                runnable, [batch] * k, optimizer, loss_fn, device=device, amp=amp,
                grad_clip_norm=cfg.optim.grad_clip_norm, channels_last=channels_last,
            )  # fmt: skip

        train_rate = measure_rate(train_steps, batch_size, device, **timing)
    val_image = _resident_batch(data.val_images, data.val_masks, batch_size, device, channels_last)["image"]
    runnable.eval()

    def infer_steps(k: int) -> None:
        with torch.no_grad(), autocast(device, amp):
            for _ in range(k):
                runnable(val_image)

    infer_rate = measure_rate(infer_steps, batch_size, device, **timing)
    return train_rate, infer_rate, peak


def _measure(
    cfg: Config, spec: ArchSpec, data: FoldData, settings: BenchmarkSettings, device: torch.device, row: dict[str, Any]
) -> None:
    cuda = device.type == "cuda"
    amp = cfg.compute.amp and cuda
    channels_last = cfg.compute.channels_last
    compile_model = settings.compile and capabilities(spec.arch).compilable
    size = cfg.preprocess.image_size_px
    n_train = len(data.train_images)

    # Size and FLOPs, on a fresh model.
    _seed(cfg.train.seed)
    model = _place(build_model(cfg.model), device, channels_last)
    row["params_total"] = sum(p.numel() for p in model.parameters())
    row["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    image = _resident_batch(data.val_images, data.val_masks, 1, device, channels_last)["image"]
    row["gflops_per_image"] = count_flops(model, image) / 1e9
    del model, image
    log.info("%s: %.2fM trainable parameters, %.2f GFLOPs/image at %d px", spec.name, row["params_trainable"] / 1e6, row["gflops_per_image"], size)

    # The largest batch that fits.
    if settings.batch_search:
        cap = min(settings.max_batch_size or DEFAULT_MAX_BATCH_SIZE["cuda" if cuda else "cpu"], n_train)
        search = find_max_batch_size(
            cfg, device, sample=(data.train_images, data.train_masks), max_batch_size=cap, compile_model=compile_model
        )
        row.update(max_batch_size=search.batch_size, max_batch_limit=search.limit, max_batch_cap=cap)
        row["batch_search"] = search.to_dict()
    batch_size = row["max_batch_size"] if settings.batch_size == "auto" else int(settings.batch_size)
    row["batch_size"] = batch_size
    cfg = cfg.with_overrides({"train.batch_size": batch_size})

    # Throughput and peak memory, on a throwaway model (timing steps must not count as training).
    train_rate, infer_rate, peak = _time_model(cfg, data, settings, device, batch_size, amp, channels_last, compile_model)
    release_memory()
    row.update(peak_memory_bytes=peak.peak_bytes, peak_memory_kind=peak.kind if peak.exact else peak.kind + "_upper_bound")
    for key, rate in (("train_images_per_s", train_rate), ("infer_images_per_s", infer_rate)):
        row[key], row[key + "_min"], row[key + "_max"] = rate["median"], rate["min"], rate["max"]
        row[key + "_repeats"] = rate["repeats"]
    log.info(
        "%s: batch %d, train %.1f img/s, inference %.1f img/s, peak memory %.0f MiB",
        spec.name, batch_size, train_rate["median"], infer_rate["median"], peak.peak_bytes / 2**20,
    )

    # Quality after the budget, from a fresh model with the same seed as every architecture.
    _seed(cfg.train.seed)
    model = _place(build_model(cfg.model), device, channels_last)
    runnable = torch.compile(model) if compile_model else model
    history = train_for_budget(runnable, cfg, data, settings, device, amp=amp, channels_last=channels_last)
    del model, runnable
    last = history[-1]
    row["history"] = history
    row["epochs_completed"] = last["epochs_completed"]
    for key in ("train_steps", "train_images_seen", "train_seconds"):
        row[key] = last[key]
    for key in benchmark_metrics():
        row[key] = last.get(key)
    log.info(
        "%s: after %s: val_dice %.4f (empty baseline %.4f), dice_pos %.4f, auc %.3f",
        spec.name, settings.budget_text(), last["val_dice"], last["val_empty_dice"], last["val_dice_pos"], last["val_auc"],
    )


def check_cache(cfg: Config, cache_uri: str, image_size_px: int = 0) -> Config:
    """The config with the cache's preprocessing (its image size and channels are what the models see).

    `image_size_px` > 0: the size asked for; a cache prepared at another size is an error.
    """
    cache = Cache.open(cache_uri)
    pre = (cache.manifest.get("summary") or {}).get("preprocess") or {}
    if image_size_px and pre.get("image_size_px") and int(pre["image_size_px"]) != image_size_px:
        raise ValueError(
            f"{cache.uri}: the cache holds {pre['image_size_px']} px images, not {image_size_px} px; "
            "give --images/--labels to prepare one at that size, or drop --image-size"
        )
    overrides = {}
    if pre.get("image_size_px"):
        overrides["preprocess.image_size_px"] = int(pre["image_size_px"])
    if pre.get("channels"):
        overrides["preprocess.channels"] = list(pre["channels"])
    return cfg.with_overrides(overrides) if overrides else cfg


def run_local(
    cfg: Config,
    cache_uri: str,
    specs: Sequence[ArchSpec],
    settings: BenchmarkSettings,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark each architecture in this process, one after another, on fold `settings.fold`."""
    cfg = check_cache(cfg, cache_uri).with_overrides({"train.fold": settings.fold})
    data = FoldData.load(cache_uri, settings.fold)
    results = []
    saved_threads = torch.get_num_threads()
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        for spec in specs:
            log.info("benchmark %s (%d/%d)", spec.name, len(results) + 1, len(specs))
            row = benchmark_architecture(cfg, spec, data, settings)
            results.append(row)
            if on_result is not None:
                on_result(row)
    finally:
        torch.set_num_threads(saved_threads)
    return results


# ---- outputs --------------------------------------------------------------------------------
def _num(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f


def _fmt(value: Any, digits: int = 2) -> str:
    f = _num(value)
    return "-" if not math.isfinite(f) else f"{f:.{digits}f}"


def _fmt_int(value: Any) -> str:
    f = _num(value)
    return "-" if not math.isfinite(f) else f"{int(f)}"


def _fmt_batch(row: dict[str, Any]) -> str:
    if row.get("max_batch_size") is None:
        return "-"
    limit = row.get("max_batch_limit")
    return f"{row['max_batch_size']}" + (" (cap)" if limit == "cap" else " (OOM)" if limit == "out of memory" else " (budget)")


def _fmt_rate(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "-"
    return f"{_fmt(row[key], 1)} ({_fmt(row[key + '_min'], 1)}–{_fmt(row[key + '_max'], 1)})"


# (header, cell function): the terminal table and the Markdown table show the same cells.
TABLE: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("architecture", lambda r: r["name"] + (f" {CHEXNET_MARK} CheXNet" if is_chexnet(r) else "")),
    ("params (M)", lambda r: _fmt(_num(r.get("params_trainable")) / 1e6)),
    ("GFLOPs/img", lambda r: _fmt(r.get("gflops_per_image"))),
    ("max batch", _fmt_batch),
    ("batch", lambda r: _fmt_int(r.get("batch_size"))),
    ("train img/s (min–max)", lambda r: _fmt_rate(r, "train_images_per_s")),
    ("infer img/s (min–max)", lambda r: _fmt_rate(r, "infer_images_per_s")),
    ("peak mem (MiB)", lambda r: _fmt(_num(r.get("peak_memory_bytes")) / 2**20, 0)),
    ("epochs", lambda r: _fmt(r.get("epochs_completed"))),
    ("Dice", lambda r: _fmt(r.get("val_dice"), 4)),
    ("Dice pos", lambda r: _fmt(r.get("val_dice_pos"), 4)),
    ("IoU", lambda r: _fmt(r.get("val_iou"), 4)),
    ("AUC", lambda r: _fmt(r.get("val_auc"), 3)),
    ("empty Dice", lambda r: _fmt(r.get("val_empty_dice"), 4)),
]


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[cell(r) if r.get("status") == "ok" or i == 0 else "-" for i, (_, cell) in enumerate(TABLE)] for r in results]


def devices_of(results: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({f"{r['device']} ({r.get('device_name')})" for r in results if r.get("device")})


def _caption(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    versions = env["versions"]
    return (
        f"{', '.join(devices_of(report['results']))}; torch {versions['torch']}, torchvision {versions['torchvision']}, "
        f"smp {versions['segmentation-models-pytorch']}; {report['settings_text']}; {report['mode']}; "
        f"fold {s['fold']}, {report['image_size_px']} px"
    )


def print_table(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Job logs and CI are not terminals: without a width, rich would squeeze the table into 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title="ptxray benchmark", caption=_caption(report))
    for i, (header, _) in enumerate(TABLE):
        table.add_column(header, justify="left" if i == 0 else "right")
    for cells in table_rows(report["results"]):
        table.add_row(*cells)
    console.print(table)
    for r in report["results"]:
        if r.get("status") != "ok":
            console.print(f"[red]{r['name']}[/]: {r.get('error')}")
    for note in report["device_notes"]:
        console.print(f"[yellow]note[/]: {note}")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_clean(value.item())
    return value


def _footer(fig: Any, report: dict[str, Any]) -> None:
    import textwrap

    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(_caption(report), 160)), fontsize=6, va="bottom", color="0.35")


def is_chexnet(row: dict[str, Any]) -> bool:
    """Whether the row's encoder started from CheXNet weights (`--chexnet`)."""
    return str(row.get("encoder_weights") or "").startswith("chexnet:")


CHEXNET_MARK = "★"
# One marker per architecture besides its colour, so points stay apart in print and for colour-blind
# readers; CheXNet-initialised encoders always get the star.
_MARKERS = "osD^vP<>Xhpd"


def _point_style(i: int, row: dict[str, Any]) -> dict[str, Any]:
    from matplotlib import colormaps

    color = colormaps["tab20" if i >= 10 else "tab10"](i % 20 if i >= 10 else i)
    if is_chexnet(row):
        return {"fmt": "*", "color": color, "markersize": 15, "markeredgecolor": "black", "markeredgewidth": 0.6}
    return {"fmt": _MARKERS[i % len(_MARKERS)], "color": color, "markersize": 7}


def _arch_label(row: dict[str, Any], short: bool = False) -> str:
    if not is_chexnet(row):
        return row["name"]
    return f"{row['name']} {CHEXNET_MARK} CheXNet" + ("" if short else "-initialised encoder")


def plot_quality_vs_throughput(report: dict[str, Any], path: Path):
    """Quality against training throughput, one point per architecture; returns the Figure.

    Points are named by a shared legend, not by labels beside them: architectures of similar
    throughput and quality (every model still predicting "empty" after a short budget) sit on one
    spot, where labels would cover each other."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [r for r in report["results"] if r.get("status") == "ok"]
    fig = Figure(figsize=(15, 5.4))
    axes = fig.subplots(1, 2)
    handles: dict[str, Any] = {}
    for ax, key, title in ((axes[0], "val_dice", "Dice (competition rule)"), (axes[1], "val_dice_pos", "Dice on positive images")):
        for i, r in enumerate(ok):
            x, y = _num(r["train_images_per_s"]), _num(r.get(key))
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            err = [[x - _num(r["train_images_per_s_min"])], [_num(r["train_images_per_s_max"]) - x]]
            handles[_arch_label(r)] = ax.errorbar([x], [y], xerr=err, capsize=3, alpha=0.85, label=_arch_label(r), **_point_style(i, r))
        baseline = _num(ok[0].get("val_empty_dice")) if ok else math.nan
        if key == "val_dice" and math.isfinite(baseline):
            line = ax.axhline(baseline, ls="--", color="0.5", label="all-empty baseline (same images)")
            ax.legend(handles=[line], fontsize=8, loc="lower right")
        xs = [_num(r["train_images_per_s"]) for r in ok if math.isfinite(_num(r["train_images_per_s"]))]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.2, y=0.1)
        ax.set_xlabel("training throughput (images/s, median; bars: min–max)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} after {report['settings_text']}")
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.785, 0.55), fontsize=8,
                   title="architecture", title_fontsize=9, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 0.775, 1))
    _footer(fig, report)
    fig.savefig(path, dpi=110)
    return fig


def plot_cost_bars(report: dict[str, Any], path: Path):
    """Throughput, memory and largest batch per architecture; returns the Figure. A largest batch
    that stopped at the search's cap is drawn as a cap (hatched, "≥ N (cap)"): the model fits at
    least that, and how much more is unknown."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [r for r in report["results"] if r.get("status") == "ok"]
    names = [r["name"] + (f" {CHEXNET_MARK}" if is_chexnet(r) else "") for r in ok]
    ypos = np.arange(len(ok))
    fig = Figure(figsize=(16, 0.45 * len(ok) + 2.2))
    axes = fig.subplots(1, 4, sharey=True)
    panels = [
        ("train_images_per_s", "training images/s", 1.0),
        ("infer_images_per_s", "inference images/s", 1.0),
        ("peak_memory_bytes", "peak memory while training (MiB)", 1 / 2**20),
        ("max_batch_size", "largest batch that fits", 1.0),
    ]
    for ax, (key, label, scale) in zip(axes, panels):
        values = np.array([_num(r.get(key)) * scale for r in ok])
        if key.endswith("_per_s"):
            lo = values - np.array([_num(r[key + "_min"]) for r in ok])
            hi = np.array([_num(r[key + "_max"]) for r in ok]) - values
            ax.barh(ypos, values, xerr=[lo, hi], capsize=3, color="tab:blue")
        elif key == "max_batch_size":
            _batch_bars(ax, ok, ypos, values)
            label += "\n(hatched, ≥ N: the search's cap)"
        else:
            ax.barh(ypos, values, color="tab:orange")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    memory = "CUDA max allocated" if report["memory_kind_text"].startswith("CUDA") else "process RSS growth"
    chexnet = f"; {CHEXNET_MARK} CheXNet-initialised encoder" if any(is_chexnet(r) for r in ok) else ""
    fig.suptitle(f"cost per architecture at {report['image_size_px']} px (peak memory: {memory}; see the report){chexnet}")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96), w_pad=2.5)
    _footer(fig, report)
    fig.savefig(path, dpi=110)
    return fig


_LIMIT_TEXT = {"out of memory": "OOM above", "memory budget": "memory budget"}


def _batch_bars(ax: Any, rows: list[dict[str, Any]], ypos: np.ndarray, values: np.ndarray) -> None:
    """The largest-batch panel: a bar that reached the search's cap is a lower bound (hatched, a
    dashed line at the cap, "≥ N (cap)"); one that hit out-of-memory or the memory budget is the limit."""
    capped = np.array([r.get("max_batch_limit") == "cap" for r in rows])
    ax.barh(ypos[~capped], values[~capped], color="tab:green")
    ax.barh(ypos[capped], values[capped], color="white", edgecolor="tab:green", hatch="//")
    for cap in sorted({int(_num(r.get("max_batch_cap"))) for r, c in zip(rows, capped) if c and math.isfinite(_num(r.get("max_batch_cap")))}):
        ax.axvline(cap, color="tab:red", ls="--", lw=1)
    finite = values[np.isfinite(values)]
    for y, v, r, c in zip(ypos, values, rows, capped):
        if math.isfinite(v):
            text = f" ≥ {int(v)} (cap)" if c else f" {int(v)} ({_LIMIT_TEXT.get(r.get('max_batch_limit'), r.get('max_batch_limit'))})"
            ax.text(v, y, text, va="center", fontsize=8)
    ax.set_xlim(0, (finite.max() if finite.size else 1) * 1.6)


def plot_learning_curves(report: dict[str, Any], path: Path):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [r for r in report["results"] if r.get("status") == "ok" and r.get("history")]
    cols = min(3, max(1, len(ok)))
    rows = max(1, math.ceil(len(ok) / cols))
    fig = Figure(figsize=(5 * cols, 3.4 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(ok):]:
        ax.axis("off")
    legend: tuple[list, list] = ([], [])
    for ax, r in zip(axes.flat, ok):
        h = r["history"]
        x = [_num(e["train_seconds"]) for e in h]
        ax.plot(x, [_num(e["train_loss"]) for e in h], "o-", color="tab:red", label="train loss")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("train loss", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(x, [_num(e.get("val_dice")) for e in h], "s-", color="tab:blue", label="val Dice")
        ax2.plot(x, [_num(e.get("val_dice_pos")) for e in h], "^-", color="tab:cyan", label="val Dice pos")
        ax2.plot(x, [_num(e.get("val_empty_dice")) for e in h], "--", color="0.5", label="empty baseline")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation")
        ax.set_title(f"{_arch_label(r, short=True)} (batch {r['batch_size']})", fontsize=10)
        ax.grid(alpha=0.3)
        if not legend[0]:
            for a in (ax, ax2):
                handles, labels = a.get_legend_handles_labels()
                legend[0].extend(handles)
                legend[1].extend(labels)
    fig.suptitle(
        f"learning curves after {report['settings_text']} (one point per epoch; under a seconds budget the last may be partial)",
        fontsize=10, y=0.995,
    )  # fmt: skip
    if legend[0]:
        fig.legend(*legend, loc="upper center", bbox_to_anchor=(0.5, 0.965), fontsize=8, ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.92))
    _footer(fig, report)
    fig.savefig(path, dpi=100)
    return fig


def _markdown_table(results: Sequence[dict[str, Any]]) -> str:
    headers = [h for h, _ in TABLE]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for cells in table_rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    env, s, files = report["environment"], report["settings"], report["files"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    errors = [r for r in report["results"] if r.get("status") != "ok"]
    parts = [
        "# ptxray benchmark",
        "",
        f"Command: `{report['command']}`" if report.get("command") else "",
        "",
        f"- **Device**: {', '.join(devices_of(report['results']))}. "
        + " ".join(report["device_notes"]),
        f"- **Software**: Python {env['python']}, {versions}; {env['platform']}; torch threads {env['torch_threads']}.",
        f"- **Data**: cache `{report['cache']}`, fold {s['fold']} ({report['n_train']} training / "
        f"{report['n_val']} validation images, {report['n_val_positive']} positive), {report['image_size_px']} px, "
        f"channels {report['channels']}.",
        f"- **Budget**: {report['settings_text']} per architecture; batch size "
        f"{'the largest that fits (per architecture)' if s['batch_size'] == 'auto' else s['batch_size']}; "
        f"timing: {s['warmup_steps']} warm-up steps discarded, then {s['repeats']} repeats of {s['timing_steps']} steps "
        f"(median, min–max); {'torch.compile on' if s['compile'] else 'no torch.compile'}.",
        f"- **Run as**: {report['mode']}.",
        "",
        _markdown_table(report["results"]),
        "",
    ]
    if errors:
        parts += ["Failed architectures:", ""] + [f"- `{r['name']}`: {r.get('error')}" for r in errors] + [""]
    parts += [
        "![quality against training throughput](" + Path(files["quality_vs_throughput"]).name + ")",
        "",
        "![throughput, memory and batch size](" + Path(files["cost_bars"]).name + ")",
        "",
        "![learning curves](" + Path(files["learning_curves"]).name + ")",
        "",
        "Files: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for k, p in files.items() if k != "markdown"),
        "",
        "## How to read it",
        "",
        "- **params (M)**: trainable parameters, millions. **GFLOPs/img**: FLOPs (2 × MACs) of one "
        "eval-mode forward of one image at this size (torch FlopCounterMode: convolutions and matrix "
        "products; maskrcnn's count depends on its detections and leaves out roi_align/NMS).",
        "- **max batch**: the largest training batch that fit (doubling, then bisection); `(cap)`: the search's "
        "cap was reached (on CPU the cap or half the available memory bounds it; there is no OOM exception), "
        "`(OOM)`: a larger one ran out of memory, `(budget)`: a larger one exceeded the memory budget. In the plot a "
        "capped bar is hatched and labelled ≥ N: the true limit is higher.",
        f"- **{CHEXNET_MARK} CheXNet**: the DenseNet-121 encoder started from the CheXNet checkpoint (`--chexnet`), "
        "drawn as a star in the quality plot; every other encoder starts from random weights.",
        "- **train / infer img/s**: a training step (forward, loss, backward, optimizer step) and an eval forward "
        "on a batch resident on the device: data loading and augmentation excluded. Median over repeats (min–max).",
        f"- **peak mem**: {report['memory_kind_text']}.",
        "- **epochs**: optimizer steps taken / steps in one epoch (a trailing one-image batch is skipped: BatchNorm "
        "cannot train on it). A seconds budget counts training time only and is checked between steps.",
        "- **Dice** (competition rule: empty prediction on an empty mask = 1), **Dice pos** (positive images only), "
        "**IoU**, **AUC** (image-level score), and **empty Dice**: what predicting empty everywhere scores on the "
        "same images. Quality is measured after the budget (last epoch, not the best).",
        "- maskrcnn: torchvision's Mask R-CNN (ResNet-50 FPN, random init); instance masks merged into one "
        "map (max of score × mask), best box score as the image-level score. It trains on its own loss.",
    ]
    if any(str(r.get("device", "")).startswith("cpu") for r in report["results"]):
        parts.append(
            "- **CPU run**: float32 (no autocast), no GPU. Throughput and memory rank the "
            "architectures on this CPU only; on a GPU (bf16) the ranking and the ratios differ."
        )
    return "\n".join(parts) + "\n"


def _comparability_notes(results: Sequence[dict[str, Any]], mode: str) -> tuple[list[str], str]:
    """What the report says about comparing rows: one note per device situation, and what the
    peak-memory column measures."""
    devices = devices_of(results)
    device_notes = []
    if len(devices) > 1:
        device_notes.append(
            f"The architectures ran on {len(devices)} different devices: their throughput and memory are NOT comparable."
        )
    else:
        device_notes.append("Throughput and memory are comparable between these rows only (one device).")
    kinds = {r.get("peak_memory_kind") for r in results if r.get("peak_memory_kind")}
    memory_kind_text = (
        "CUDA max allocated during the training timing, above what was allocated before the model was built"
        if kinds and all(str(k).startswith("cuda") for k in kinds)
        else "process resident-set peak during the training timing, above the resident set before the model "
        "was built (" + ("each architecture in its own Ray trial process" if mode.lower().startswith("ray") else
                         "all architectures in one process: the peak is reset per architecture and freed memory "
                         "returned to the OS first, but allocator caches are shared") + ")"
    )  # fmt: skip
    return device_notes, memory_kind_text


def write_report(
    results: Sequence[dict[str, Any]],
    *,
    cfg: Config,
    cache_uri: str,
    settings: BenchmarkSettings,
    out_dir: str | Path,
    mode: str,
    command: str = "",
    _published_at: str = "",
) -> dict[str, Any]:
    """Write benchmark.json, benchmark.csv, three PNG plots and benchmark.md under `out_dir` (a
    folder or an s3:// prefix: written locally first, then uploaded); return the report.
    (`_published_at`: the prefix the files are uploaded to, named in the report instead of `out_dir`.)"""
    from ptxray import storage

    if storage.is_uri(str(out_dir)) and not str(out_dir).startswith("file://"):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ptxray-benchmark-") as tmp:
            report = write_report(
                results, cfg=cfg, cache_uri=cache_uri, settings=settings, out_dir=tmp, mode=mode, command=command,
                _published_at=str(out_dir),
            )
            for uri in report["files"].values():
                storage.write_bytes_atomic(uri, (Path(tmp) / Path(uri).name).read_bytes())
        return report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = check_cache(cfg, cache_uri)
    cache = Cache.open(cache_uri)
    train_ids, val_ids = cache.split_ids(settings.fold)
    idx = cache.index()
    labels = dict(zip(idx.column("image_id").to_pylist(), idx.column("label").to_pylist()))
    # Each row carries the environment of the process that measured it (a Ray trial's, maybe remote).
    env = next((r["environment"] for r in results if r.get("environment")), None) or environment(resolve_device(settings))
    device_notes, memory_kind_text = _comparability_notes(results, mode)
    report: dict[str, Any] = {
        "command": command,
        "mode": mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "settings": settings.to_dict(),
        "settings_text": settings.budget_text(),
        "device_notes": device_notes,
        "memory_kind_text": memory_kind_text,
        "cache": cache.uri,
        "image_size_px": cfg.preprocess.image_size_px,
        "channels": list(cfg.preprocess.channels),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "n_val_positive": int(sum(1 for i in val_ids if labels.get(i))),
        "config": cfg.to_dict(),
        "results": [dict(r) for r in results],
    }
    files = {
        "json": str(out / "benchmark.json"),
        "csv": str(out / "benchmark.csv"),
        "markdown": str(out / "benchmark.md"),
        "quality_vs_throughput": str(out / "quality_vs_throughput.png"),
        "cost_bars": str(out / "throughput_memory.png"),
        "learning_curves": str(out / "learning_curves.png"),
    }
    report["files"] = {k: storage.join(_published_at, Path(v).name) for k, v in files.items()} if _published_at else files
    plot_quality_vs_throughput(report, Path(files["quality_vs_throughput"]))
    plot_cost_bars(report, Path(files["cost_bars"]))
    plot_learning_curves(report, Path(files["learning_curves"]))
    context = {
        "image_size_px": report["image_size_px"],
        "fold": settings.fold,
        "budget": report["settings_text"],
        "mode": mode,
        "torch": env["versions"]["torch"],
        "torchvision": env["versions"]["torchvision"],
        "smp": env["versions"]["segmentation-models-pytorch"],
        "command": command,
    }
    columns = result_columns()
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns) + list(context))
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: _csv_value(r.get(k)) for k in columns}, **context})
    Path(files["json"]).write_text(json.dumps(_json_clean(report), indent=2, default=str) + "\n")
    Path(files["markdown"]).write_text(_markdown(report))
    return report


__all__ = [
    "ArchSpec",
    "BenchmarkSettings",
    "OTHER_DECODERS",
    "PAPER_SET",
    "PRESETS",
    "arch_config",
    "benchmark_architecture",
    "check_cache",
    "count_flops",
    "environment",
    "measure_rate",
    "parse_archs",
    "print_table",
    "result_columns",
    "run_local",
    "table_rows",
    "train_for_budget",
    "write_report",
]
