"""`ptxray benchmark`'s measurements: which architecture to train for pneumothorax, and at what cost.

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

The runs use channels_last (`compute.channels_last`), on CUDA bf16
autocast (`compute.amp`) and, with `--compile`, torch.compile (not for maskrcnn, whose detection code is dynamic). Numbers
are comparable only within one device: every output records the device and software versions.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import random
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
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
from ptxray.metrics import benchmark_metrics
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
    "resolve_device",
    "run_local",
    "train_for_budget",
]
