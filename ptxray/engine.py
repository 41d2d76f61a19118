"""The training engine: plain torch over iterables of batches, with no Ray in it.

`train_epoch` and `evaluate` take any iterable of batch dicts (a list in a test, a Ray Data shard
in production). `fit` runs the epochs of one training run: optimizer and scheduler from the config,
early stopping, metrics.jsonl, atomic checkpoints, and resume from the last checkpoint.

A batch is `{"image": float32 (B, C, H, W) in [0, 1], "mask": float32 (B, 1, H, W) in {0, 1},
"label": float32 (B, 1)}`, or as the data paths hand it over (`uint8_batch`): uint8 image
(B, C, H, W) and uint8 mask (B, H, W), no label, scaled and binarised on the device (a GPU
host-to-device copy moves a quarter of the bytes, from pinned memory when asked). With
`device_augment` (`fit`, `train_epoch`), the training batches are augmented on the device first
(ptxray.augment.build_device_augment), from a torch.Generator per epoch seeded by
(train.seed, epoch, augment_rank), so a seed reproduces them, resumed runs included.

When each learning-rate scheduler steps (`build_scheduler`):
- `cosine`: once per epoch, after validation (CosineAnnealingLR over `train.epochs`).
- `onecycle`: once per optimizer step, inside `train_epoch` (OneCycleLR over epochs x steps).
- `plateau`: once per epoch, after validation, on the monitored metric (ReduceLROnPlateau).
- `none`: never.

Distributed data parallel: the runner wraps the model (and converts it to channels_last *before*
wrapping); the engine unwraps `model.module` where it needs the plain module. Loss and metrics are
all-reduced over ranks, so every rank sees the same numbers and takes the same early-stopping
decision. Only the rank given a `run_dir` writes files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn

from ptxray.augment import augment_generator
from ptxray.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    strip_module_prefix,
)
from ptxray.config import Config, OptimConfig, upgrade_config_dict
from ptxray.losses import build_loss, weight_penalty
from ptxray.metrics import SegMetrics, format_epoch_metrics
from ptxray.storage import is_uri, write_bytes_atomic

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]
# (uint8 images (B, C, H, W), uint8 masks (B, H, W), generator) -> (float images, float masks (B, H, W))
DeviceAugmentFn = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "onecycle", "plateau", "none")
CHECKPOINT_FORMAT = 1


# ---- batches --------------------------------------------------------------------------------
def batch_from_numpy(images: np.ndarray, masks: np.ndarray) -> Batch:
    """uint8 images (B, C, H, W) and uint8 masks (B, H, W) (any non-zero = foreground) -> a batch."""
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"batch_from_numpy: images must be uint8 (B, C, H, W), got {images.dtype} {images.shape}"
        )
    if masks.dtype not in (np.uint8, np.bool_) or masks.ndim != 3:
        raise ValueError(f"batch_from_numpy: masks must be uint8 (B, H, W), got {masks.dtype} {masks.shape}")
    b, _, h, w = images.shape
    if masks.shape != (b, h, w):
        raise ValueError(
            f"batch_from_numpy: masks shape {masks.shape} does not match images {images.shape} "
            f"(expected {(b, h, w)})"
        )
    image = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)  # (B, C, H, W)
    mask = torch.from_numpy(np.ascontiguousarray(masks) > 0).float().unsqueeze(1)  # (B, 1, H, W)
    label = mask.amax(dim=(2, 3))  # (B, 1)
    return {"image": image, "mask": mask, "label": label}


def uint8_batch(
    images: np.ndarray, masks: np.ndarray, indices: np.ndarray | None = None, *, pin: bool = False
) -> Batch:
    """The uint8 hand-over batch: images (N, C, H, W) and masks (N, H, W) as they are (rows
    `indices` of them when given, gathered in one copy), as tensors in pinned memory when `pin`
    (for an asynchronous copy to a GPU). The device scales, binarises and labels them."""
    images, masks = np.asarray(images), np.asarray(masks)
    if images.dtype != np.uint8 or images.ndim != 4 or masks.dtype != np.uint8 or masks.shape != (len(images), *images.shape[2:]):
        raise ValueError(
            f"uint8_batch: need uint8 images (B, C, H, W) and uint8 masks (B, H, W), got images "
            f"{images.dtype} {images.shape} and masks {masks.dtype} {masks.shape}"
        )
    out = []
    for array in (images, masks):
        shape = array.shape if indices is None else (len(indices), *array.shape[1:])
        tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        if indices is None:
            tensor.numpy()[...] = array
        else:
            np.take(array, indices, axis=0, out=tensor.numpy())
        out.append(tensor)
    return {"image": out[0], "mask": out[1]}


def batch_to_device(
    batch: Mapping[str, Tensor],
    device: torch.device,
    channels_last: bool,
    augment: DeviceAugmentFn | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch dict -> (image float (B, C, H, W) in [0, 1], mask float (B, 1, H, W), label (B, 1)) on
    `device`; uint8 images are scaled on the device, and `augment` (with `generator`) runs there."""
    try:
        image, mask = batch["image"], batch["mask"]
    except (KeyError, TypeError):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a batch must be a dict with 'image', 'mask' and 'label'; got {keys}") from None
    if image.ndim != 4:
        raise ValueError(f"batch['image'] must be (B, C, H, W), got shape {tuple(image.shape)}")
    image = image.to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    label = batch.get("label")
    if augment is not None:
        if image.dtype != torch.uint8:
            raise ValueError(f"device augmentation needs uint8 batches (engine.uint8_batch), got {image.dtype} images")
        if mask.ndim == 4:  # (B, 1, H, W) -> (B, H, W)
            mask = mask.squeeze(1)
        image, mask = augment(image, mask.to(torch.uint8), generator)
        label = None  # the augmentation may have moved the lesion out of the frame
    elif image.dtype == torch.uint8:
        image = image.float().div_(255.0)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    mask = (mask > 0).float() if mask.dtype == torch.uint8 else mask.float()
    if mask.ndim == 3:  # (B, H, W) -> (B, 1, H, W)
        mask = mask.unsqueeze(1)
    label = mask.amax(dim=(2, 3)) if label is None else label.to(device, non_blocking=True).float().reshape(-1, 1)
    return image, mask, label


# ---- model helpers --------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel (the model itself otherwise)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def autocast(device: torch.device | str, amp: bool):
    """bf16 autocast on CUDA when `amp`, a no-op otherwise (CPU, MPS, amp off): the one mixed-
    precision policy of training, evaluation, the batch-size search, the benchmark and predict.
    bf16 has float32's exponent range, so no GradScaler is needed (unlike fp16)."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward(model: nn.Module, image: Tensor) -> tuple[Tensor, Tensor]:
    out = model(image)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            f"{type(unwrap_model(model)).__name__}.forward must return (seg_logits, cls_logits), "
            f"got {type(out).__name__}"
        )
    return out[0], out[1]


def _model_loss(model: nn.Module, image: Tensor, mask: Tensor) -> Tensor:
    """The summed loss terms of a `loss_from_targets` model: `forward(image, mask)` -> {name: loss}."""
    losses = model(image, mask)
    if not (isinstance(losses, Mapping) and losses):
        raise TypeError(
            f"{type(unwrap_model(model)).__name__} has loss_from_targets=True, so forward(image, mask) "
            f"must return a non-empty dict of losses in train mode; got {type(losses).__name__}"
        )
    return sum(losses.values())


def _all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a small float64 vector over ranks (no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    home = values.device
    if dist.get_backend() == "nccl" and values.device.type != "cuda":
        values = values.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.to(home)


# ---- optimizer and scheduler ----------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over the trainable parameters; weight decay on conv/linear weights only."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; choose from {list(OPTIMIZERS)}")
    if not cfg.lr > 0:
        raise ValueError(f"optim.lr: must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay: must be >= 0, got {cfg.weight_decay}")
    # Lazy: timm.optim pulls in much of timm. Decaying biases and norm scales only fights the
    # normalisation; timm's grouping (1-D params and biases without decay) is the usual fix.
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(unwrap_model(model), cfg.weight_decay)
    if not groups:
        raise ValueError(f"build_optimizer: {type(unwrap_model(model)).__name__} has no trainable parameters")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.nesterov and cfg.momentum <= 0:
        raise ValueError(f"optim.nesterov: needs optim.momentum > 0, got momentum={cfg.momentum}")
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    epochs: int,
    steps_per_epoch: int | None = None,
    *,
    mode: str = "max",
) -> Any:
    """The lr scheduler named by `cfg.scheduler` (None for "none"); see the module doc for when it steps.

    `steps_per_epoch` is needed by onecycle only; `mode` ("max"/"min") is the monitored metric's
    direction, used by plateau.
    """
    name = cfg.scheduler
    if name not in SCHEDULERS:
        raise ValueError(f"optim.scheduler: unknown scheduler {name!r}; choose from {list(SCHEDULERS)}")
    if epochs < 1:
        raise ValueError(f"build_scheduler: epochs must be >= 1, got {epochs}")
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
    if name == "onecycle":
        if not steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(
                "optim.scheduler=onecycle: needs the number of optimizer steps per epoch "
                f"(got steps_per_epoch={steps_per_epoch}); pass it, or set train.max_steps_per_epoch"
            )
        # Cycling momentum would turn a momentum-free SGD into a momentum SGD.
        cycle = not (cfg.name == "sgd" and cfg.momentum <= 0)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=cfg.onecycle_pct_start,
            cycle_momentum=cycle,
        )
    if mode not in ("max", "min"):
        raise ValueError(f"train.monitor_mode: must be 'max' or 'min', got {mode!r}")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
    )


def scheduler_steps_per_batch(scheduler: Any) -> bool:
    """True for schedulers that `train_epoch` steps after every optimizer step (onecycle)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


def step_epoch_scheduler(scheduler: Any, monitored_value: float) -> None:
    """The end-of-epoch step: plateau on the monitored value, cosine plainly, per-batch ones not at all."""
    if scheduler is None or scheduler_steps_per_batch(scheduler):
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored_value)
    else:
        scheduler.step()


# ---- one epoch ------------------------------------------------------------------------------
def train_step(
    model: nn.Module,
    image: Tensor,
    mask: Tensor,
    label: Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | None,
    *,
    amp: bool = False,
    grad_clip_norm: float = 0.0,
    penalty: Callable[[nn.Module], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """One optimizer step on a batch already on the device (`image` (B, C, H, W) float, `mask`
    (B, 1, H, W), `label` (B, 1)): forward under `autocast`, the loss in float32, plus `penalty`,
    backward, gradient clipping, step. The training step of `train_epoch`, the batch-size search
    and the benchmark.

    Returns (task loss, penalty or None, seg_logits, cls_logits); the logits (float32) are None
    for a `loss_from_targets` model (maskrcnn), whose loss comes from `forward(image, mask)`.
    It makes no collective of its own: a DDP model's backward all-reduces the gradients.
    """
    core = unwrap_model(model)
    seg_logits = cls_logits = None
    if getattr(core, "loss_from_targets", False):
        with autocast(image.device, amp):
            loss = _model_loss(model, image, mask).float()
    else:
        with autocast(image.device, amp):
            seg_logits, cls_logits = _forward(model, image)
        seg_logits, cls_logits = seg_logits.float(), cls_logits.float()
        loss = loss_fn(seg_logits, cls_logits, mask, label)
    objective = loss
    penalty_value = None
    if penalty is not None:
        penalty_value = penalty(core)
        objective = loss + penalty_value
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    return loss, penalty_value, seg_logits, cls_logits


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device | str,
    scheduler: Any = None,
    amp: bool = False,
    grad_clip_norm: float = 0.0,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    channels_last: bool = False,
    augment: DeviceAugmentFn | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One pass over `batches`: returns train_loss, train_dice, images, steps, seconds,
    data_wait_seconds and first_batch_seconds (the wait for the first batch, i.e. the data
    path's start-up).

    `scheduler` is stepped after every optimizer step, so pass per-step schedulers (onecycle)
    only. `train_loss` is the image-weighted mean of the task loss; the weight penalty, when given,
    is added to the optimised objective and reported separately as `train_penalty`. `augment`
    (with its `generator`) augments each uint8 batch on the device (module doc).
    """
    device = torch.device(device)
    model.train()
    # Detection-style models (maskrcnn) compute their own training loss from the masks and make no
    # predictions in train mode (train_step returns no logits): train_dice is NaN for them.
    metrics = SegMetrics()
    # [task loss * images, penalty * images, images]: summed on the device, so no per-step host sync.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    steps = skipped = 0
    data_wait = 0.0
    first_batch = math.nan
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        data_wait += time.perf_counter() - t0
        if math.isnan(first_batch):
            first_batch = time.perf_counter() - start
        image, mask, label = batch_to_device(batch, device, channels_last, augment, generator)
        if image.shape[0] < 2:
            # A trailing one-image batch: BatchNorm cannot normalise a single sample in train mode
            # (deeplabv3's pooled ASPP branch raises). Skipped on every rank alike, because DDP
            # shards hold equal row counts.
            skipped += 1
            continue
        loss, penalty_value, seg_logits, cls_logits = train_step(
            model, image, mask, label, optimizer, loss_fn, amp=amp, grad_clip_norm=grad_clip_norm, penalty=penalty
        )
        if penalty_value is not None:
            sums[1] += penalty_value.detach().double() * image.shape[0]
        # OneCycleLR defines total_steps lrs (last_epoch 0 .. total_steps - 1); past that it anneals
        # back up, then raises. Batches beyond the plan (a longer shard) keep the final lr.
        if scheduler is not None and not (
            scheduler_steps_per_batch(scheduler) and scheduler.last_epoch >= scheduler.total_steps - 1
        ):
            scheduler.step()
        sums[0] += loss.detach().double() * image.shape[0]
        sums[2] += image.shape[0]
        if seg_logits is not None:
            metrics.update(seg_logits.detach(), cls_logits.detach(), mask, label)
        steps += 1

    sums = _all_reduce_sum(sums)
    metrics.all_reduce_()
    loss_sum, penalty_sum, n_images = (float(v) for v in sums.cpu())
    if n_images == 0:
        raise ValueError("train_epoch: the training batches were empty (no images on any rank)")
    train_loss = loss_sum / n_images
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"train_epoch: the training loss is {train_loss} after {steps} steps; "
            "lower optim.lr or keep optim.grad_clip_norm > 0"
        )
    out = {
        "train_loss": train_loss,
        "train_dice": metrics.compute(prefix="train_")["train_dice"],
        "images": int(n_images),
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "data_wait_seconds": data_wait,
        "first_batch_seconds": first_batch,
    }
    if skipped:
        logger.debug("train_epoch: skipped %d one-image batch(es)", skipped)
    if penalty is not None:
        out["train_penalty"] = penalty_sum / n_images
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str,
    amp: bool = False,
    channels_last: bool = False,
    loss_fn: nn.Module | None = None,
) -> dict[str, float]:
    """SegMetrics over all batches, all-reduced over ranks, keys prefixed `val_` (+ `val_loss` with loss_fn)."""
    device = torch.device(device)
    # The plain module: DDP's forward would sync buffers, a collective that hangs when ranks hold
    # different numbers of validation batches.
    core = unwrap_model(model)
    was_training = core.training
    core.eval()
    metrics = SegMetrics()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss * images, images]
    try:
        for batch in batches:
            image, mask, label = batch_to_device(batch, device, channels_last)
            with autocast(device, amp):
                seg_logits, cls_logits = _forward(core, image)
            seg_logits, cls_logits = seg_logits.float(), cls_logits.float()
            if loss_fn is not None:
                sums[0] += loss_fn(seg_logits, cls_logits, mask, label).double() * image.shape[0]
            sums[1] += image.shape[0]
            metrics.update(seg_logits, cls_logits, mask, label)
    finally:
        core.train(was_training)
    sums = _all_reduce_sum(sums)
    metrics.all_reduce_()
    out = metrics.compute(prefix="val_")
    if not out["val_n_images"] > 0:
        raise ValueError("evaluate: the validation batches were empty (no images on any rank)")
    if loss_fn is not None:
        out["val_loss"] = float(sums[0]) / float(sums[1])
    return out


# ---- early stopping -------------------------------------------------------------------------
class EarlyStopping:
    """Stop after `patience` epochs without an improvement larger than `min_delta` (0 = never stop).

    `best` is the last value that beat the previous best by more than `min_delta` (Keras
    semantics); `improved` says whether the latest `step` set it. Non-finite values never improve.
    """

    def __init__(self, monitor: str = "val_dice", mode: str = "max", patience: int = 5, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping({monitor!r}): mode must be 'max' or 'min', got {mode!r}")
        if patience < 0:
            raise ValueError(f"EarlyStopping({monitor!r}): patience must be >= 0, got {patience}")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping({monitor!r}): min_delta must be >= 0, got {min_delta}")
        self.monitor = monitor
        self.mode = mode
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.epochs_since_best = 0
        self.improved = False

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float) -> bool:
        """Record one epoch's monitored value; True when training should stop."""
        value = float(value)
        self.improved = self.is_improvement(value)
        if self.improved:
            self.best = value
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1
        return self.patience > 0 and self.epochs_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best": self.best,
            "epochs_since_best": self.epochs_since_best,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # monitor/mode/patience come from the (possibly edited) config; the progress comes from here.
        self.best = None if state["best"] is None else float(state["best"])
        self.epochs_since_best = int(state["epochs_since_best"])
        self.improved = False


# ---- positive oversampling ------------------------------------------------------------------
def positive_rate_for_epoch(epoch: int, epochs: int, start: float, end: float) -> float:
    """Target fraction of positive draws at `epoch` (0-based): linear from `start` to `end` at the last epoch."""
    for name, rate in (("start", start), ("end", end)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"positive rate {name} must be in [0, 1], got {rate}")
    if epochs <= 1:
        return float(start)
    t = min(max(epoch / (epochs - 1), 0.0), 1.0)
    return float(start + (end - start) * t)


def _draw(indices: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    # With replacement, but as evenly as possible: whole permutations first, then a partial one,
    # so every image of the class appears floor(k/n) or ceil(k/n) times (plain i.i.d. draws would
    # leave some positives out of an epoch while showing others four times).
    whole, rest = divmod(k, len(indices))
    parts = [rng.permutation(indices) for _ in range(whole)]
    parts.append(rng.choice(indices, size=rest, replace=False))
    return np.concatenate(parts)


def epoch_indices(
    labels: np.ndarray,
    epoch: int,
    epochs: int,
    rate_start: float,
    rate_end: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One epoch of N = len(labels) indices, shuffled, where positives make up this epoch's rate.

    A rate of 0 means the natural rate: a plain permutation of all indices. With a rate r > 0,
    round(r * N) draws come from the positives and the rest from the negatives (repeating images
    of the minority as needed). A split without positives or negatives falls back to a permutation.
    """
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    n = labels.size
    rate = positive_rate_for_epoch(epoch, epochs, rate_start, rate_end)
    positives = np.flatnonzero(labels)
    negatives = np.flatnonzero(~labels)
    if rate == 0.0 or n == 0:
        return rng.permutation(n)
    n_pos = int(round(rate * n))
    if (n_pos > 0 and positives.size == 0) or (n_pos < n and negatives.size == 0):
        logger.warning(
            "epoch_indices: positive rate %.2f requested but the split has %d positives and %d "
            "negatives; using the natural order",
            rate,
            positives.size,
            negatives.size,
        )
        return rng.permutation(n)
    drawn = np.concatenate(
        [
            _draw(positives, n_pos, rng) if n_pos else positives[:0],
            _draw(negatives, n - n_pos, rng) if n - n_pos else negatives[:0],
        ]
    )
    return rng.permutation(drawn)


class PositiveReservoir:
    """Positive oversampling for a stream of rows, where `epoch_indices` cannot work (no random
    access to the split, as on a Ray Data shard).

    Rows keep their count (DDP ranks must take the same number of steps), so the rate is raised by
    swapping: each negative row is replaced, with probability q = (r - p) / (1 - p), by a copy of a
    positive seen earlier on this stream, where r is the epoch's target rate and p the split's
    natural rate. Seen positives live in a bounded reservoir (uniform over the stream, Algorithm R)
    that is kept across epochs, so only the first rows of the first epoch lack candidates. The
    copies are augmented afterwards like any row, so a repeated positive is not a repeated pixel
    array. A target at or below the natural rate changes nothing (no undersampling).
    Hand-written: Ray Data has no stratified or weighted streaming sampler.
    """

    def __init__(self, natural_rate: float, capacity: int = 64):
        if not 0.0 <= natural_rate <= 1.0:
            raise ValueError(f"natural positive rate must be in [0, 1], got {natural_rate}")
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.natural_rate = float(natural_rate)
        self.capacity = capacity
        self._images: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._seen = 0
        self._lock = threading.Lock()  # the next epoch's stream may start in another thread
        self.swapped = 0

    def swap_probability(self, target_rate: float) -> float:
        p = self.natural_rate
        if target_rate <= p or p >= 1.0:
            return 0.0
        return (target_rate - p) / (1.0 - p)

    def apply(
        self, images: np.ndarray, masks: np.ndarray, target_rate: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """images (B, C, S, S), masks (B, S, S) -> the same shapes with some negatives swapped."""
        q = self.swap_probability(target_rate)
        positive = masks.reshape(len(masks), -1).any(axis=1)
        images, masks = images.copy(), masks.copy()
        with self._lock:
            for i in range(len(masks)):
                if positive[i]:
                    self._seen += 1
                    if len(self._images) < self.capacity:
                        self._images.append(images[i].copy())
                        self._masks.append(masks[i].copy())
                    else:
                        j = int(rng.integers(self._seen))
                        if j < self.capacity:
                            self._images[j], self._masks[j] = images[i].copy(), masks[i].copy()
                elif q > 0.0 and self._images and rng.random() < q:
                    j = int(rng.integers(len(self._images)))
                    images[i], masks[i] = self._images[j], self._masks[j]
                    self.swapped += 1
        return images, masks


# ---- fit ------------------------------------------------------------------------------------
@dataclass
class FitResult:
    history: list[dict[str, Any]]  # one dict per completed epoch (the lines of metrics.jsonl)
    best: dict[str, Any]  # the history entry of the best epoch ({} if none was finite)
    epochs_run: int  # completed epochs in total, resumed ones included
    stopped_early: bool
    checkpoint: str | None  # best.pt (weights for prediction), else last.pt; None without run_dir
    last_checkpoint: str | None = field(default=None)  # last.pt (full state for resuming)


def _plain(value: Any) -> Any:
    """numpy scalars and containers -> python ones (for JSON and weights_only checkpoints)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def _json_line(metrics: Mapping[str, Any]) -> str:
    # NaN (e.g. val_dice_pos without positives) is not JSON; null is.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return json.dumps(clean, sort_keys=False)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Seconds between progress lines inside a training epoch (`fit(progress_interval_s=...)`).
PROGRESS_INTERVAL_S = 30.0


def _with_progress(batches: Iterable[Batch], epoch: int, epochs: int, total: int | None, interval_s: float) -> Iterable[Batch]:
    """`batches`, with a log line every `interval_s` seconds: a long epoch (minutes on a GPU at 512
    px, much more on a CPU) otherwise shows nothing between its start and its summary line. Only
    process-group rank 0 logs, so DDP workers do not repeat it."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        yield from batches
        return
    start = last = time.perf_counter()
    n = 0
    for n, batch in enumerate(batches, 1):
        yield batch  # the time until the next item includes the training step on this one
        now = time.perf_counter()
        if now - last >= interval_s:
            last = now
            rate = n / (now - start)
            left = f", about {(total - n) / rate:.0f} s left in the epoch" if total and total > n else ""
            logger.info("epoch %d/%d: batch %d%s after %.0f s (%.2f batches/s)%s",
                        epoch + 1, epochs, n, f"/{total}" if total else "", now - start, rate, left)  # fmt: skip


def _resolve_steps_per_epoch(cfg: Config, steps_per_epoch: int | None) -> int | None:
    if steps_per_epoch:
        limit = cfg.train.max_steps_per_epoch
        return min(steps_per_epoch, limit) if limit > 0 else steps_per_epoch
    return cfg.train.max_steps_per_epoch or None


def fit(
    model: nn.Module,
    cfg: Config,
    train_batches: Callable[[int, np.random.Generator], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]],
    *,
    run_dir: str | Path | None,
    device: torch.device | str,
    resume: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any], str | None], None] | None = None,
    max_epochs: int | None = None,
    steps_per_epoch: int | None = None,
    resume_from: str | Path | None = None,
    device_augment: DeviceAugmentFn | None = None,
    augment_rank: int = 0,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> FitResult:
    """Train `model` for `cfg.train.epochs` epochs (0-based `epoch` indices throughout).

    Every epoch: `train_batches(epoch, np.random.default_rng([cfg.train.seed, epoch]))` (so a
    resumed run sees the same order and augmentation), train, validate on `val_batches()`, step
    the epoch scheduler and early stopping, then (with `run_dir`) write `checkpoints/last.pt` (full
    state), `checkpoints/best.pt` (weights, when the monitored metric improved) and
    `metrics.jsonl`, and finally call `on_epoch_end(epoch, metrics, last_checkpoint_path)`.

    - `resume`: continue from `run_dir/checkpoints/last.pt` when it exists; `resume_from` names
      a checkpoint to continue from instead (e.g. one Ray restored on a worker without run_dir).
    - `max_epochs`: stop after this many completed epochs in total, leaving a resumable run.
    - `steps_per_epoch`: optimizer steps per epoch, needed by onecycle unless
      `train.max_steps_per_epoch` is set.
    - `progress_interval_s`: log the epoch's progress this often (0: never, e.g. under a progress bar).
    - A resumed run that had stopped early continues only when early stopping now allows another
      epoch (`train.early_stop_patience` 0, or above the epochs it went without improving); else
      fit says why and returns the run as it is, without rewriting config.yaml. A larger
      `train.epochs` alone does not restart it: early stopping made its decision, and the
      setting that decides it is the patience.
    - The model is moved to `device` (and to channels_last on CUDA) unless it is already wrapped
      in DDP, in which case the runner has done that.
    - `device_augment`: augment the (uint8) training batches on the device, drawing from
      `augment_generator(device, [train.seed, epoch, augment_rank])` (DDP ranks pass their rank).
    """
    device = torch.device(device)
    if run_dir is not None and is_uri(str(run_dir)):
        raise ValueError(
            f"fit: run_dir {run_dir!s} must be a local folder (the runner uploads checkpoints to storage)"
        )
    parts = _training_parts(model, cfg, device, steps_per_epoch)
    files = _RunFiles.at(run_dir, cfg)
    source = resume_from
    if source is None and resume and files.last is not None and files.last.exists():
        source = files.last
    if source is not None:
        progress = _resume(parts, source, files.config_dict, cfg.train.epochs)
        if progress.stopped_early:  # and early stopping still says so: nothing to train
            return _fit_result(progress.history, progress.best_metrics, True, files.last, files.best)
    else:
        progress = _fresh_start(cfg.train.seed, files.best)
    files.start(progress.history)

    end_epoch = cfg.train.epochs if max_epochs is None else min(cfg.train.epochs, max_epochs)
    steps = _resolve_steps_per_epoch(cfg, steps_per_epoch)
    for epoch in range(progress.epochs_completed, end_epoch):
        if progress.stopped_early:
            break
        epoch_start = time.perf_counter()
        batches = _epoch_batches(train_batches, cfg, epoch, steps, progress_interval_s)
        generator = augment_generator(device, [cfg.train.seed, epoch, augment_rank]) if device_augment is not None else None
        train_stats = train_epoch(
            model, batches, parts.optimizer, parts.loss_fn, device=device,
            scheduler=parts.scheduler if scheduler_steps_per_batch(parts.scheduler) else None,
            amp=cfg.compute.amp, grad_clip_norm=cfg.optim.grad_clip_norm, penalty=parts.penalty,
            channels_last=cfg.compute.channels_last, augment=device_augment, generator=generator,
        )  # fmt: skip
        lr = float(parts.optimizer.param_groups[-1]["lr"])  # the lr of this epoch's last step
        val_stats = evaluate(
            model, val_batches(), device=device, amp=cfg.compute.amp, channels_last=cfg.compute.channels_last, loss_fn=parts.loss_fn
        )
        metrics, monitored = _epoch_metrics(epoch, train_stats, val_stats, cfg.train.monitor)
        step_epoch_scheduler(parts.scheduler, monitored)
        stop = parts.stopper.step(monitored)
        metrics["lr"] = lr
        metrics["seconds"] = time.perf_counter() - epoch_start
        metrics = _plain(metrics)
        progress.history.append(metrics)
        if parts.stopper.improved:
            progress.best_metrics = metrics
        progress.stopped_early = stop
        progress.epochs_completed = epoch + 1
        files.save_epoch(parts, progress, metrics)
        _log_epoch(metrics, train_stats, monitored, cfg.train.monitor, cfg.train.epochs, parts.stopper.improved)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, str(files.last) if files.last is not None else None)
        if stop:
            logger.info(
                "early stop after epoch %d: %s did not improve for %d epochs (best %.4f)",
                epoch + 1, cfg.train.monitor, parts.stopper.epochs_since_best,
                parts.stopper.best if parts.stopper.best is not None else float("nan"),
            )  # fmt: skip

    return _fit_result(progress.history, progress.best_metrics, progress.stopped_early, files.last, files.best)


@dataclass
class _TrainingParts:
    """What `fit` builds from the config before its first epoch."""

    core: nn.Module  # the plain module (inside DDP when the model is wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    penalty: Callable[[nn.Module], Tensor] | None
    stopper: EarlyStopping


def _training_parts(model: nn.Module, cfg: Config, device: torch.device, steps_per_epoch: int | None) -> _TrainingParts:
    """Move the model to `device` (unless DDP wraps it: the runner did) and build the optimizer,
    scheduler, loss, weight penalty and early stopping of `cfg`."""
    core = unwrap_model(model)
    if core is model:
        if cfg.compute.channels_last:
            model.to(device, memory_format=torch.channels_last)
        else:
            model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(
        optimizer, cfg.optim, cfg.train.epochs, _resolve_steps_per_epoch(cfg, steps_per_epoch), mode=cfg.train.monitor_mode
    )
    l1, l2 = cfg.loss.l1_penalty, cfg.loss.l2_penalty
    t = cfg.train
    return _TrainingParts(
        core=core,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=build_loss(cfg.loss).to(device),
        penalty=(lambda m: weight_penalty(m, l1, l2)) if (l1 or l2) else None,
        stopper=EarlyStopping(t.monitor, t.monitor_mode, t.early_stop_patience, t.early_stop_min_delta),
    )


@dataclass
class _Progress:
    """Where a run stands: its epochs so far (the lines of metrics.jsonl) and the best of them."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    epochs_completed: int = 0
    stopped_early: bool = False


def _resume(parts: _TrainingParts, source: str | Path, config_dict: dict[str, Any], epochs: int) -> _Progress:
    """Load `source` (a last.pt) into the parts; `stopped_early` stays True only when early
    stopping, as configured now, still allows no further epoch (fit then trains nothing)."""
    state = load_checkpoint(source, map_location="cpu")
    # A checkpoint of an earlier version may hold moved keys (model.depth): compare at their new place.
    saved_config = _flatten(upgrade_config_dict(state.get("config") or {}, str(source)))
    changed = {k: v for k, v in _flatten(config_dict).items() if saved_config.get(k, v) != v}
    if changed:
        logger.warning(
            "resuming %s with a changed config %s; the optimizer and scheduler continue from their saved state",
            source, changed,
        )  # fmt: skip
    parts.core.load_state_dict(strip_module_prefix(state["model"]))
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scheduler is not None and state.get("scheduler") is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    stopper = parts.stopper
    stopper.load_state_dict(state["early_stopping"])
    progress = _Progress(
        history=list(state["history"]),
        best_metrics=dict(state.get("best_metrics") or {}),
        epochs_completed=int(state["epochs_completed"]),
        stopped_early=bool(state.get("stopped_early", False)),
    )
    # Last, so nothing above (model building by the caller included) shifts the streams.
    restore_rng_state(state["rng"])
    start_epoch = progress.epochs_completed
    logger.info("resumed %s after epoch %d/%d", source, start_epoch, epochs)
    if progress.stopped_early:
        if stopper.patience > 0 and stopper.epochs_since_best >= stopper.patience:
            logger.warning(
                "%s stopped early after epoch %d: %s did not improve for %d epochs (train.early_stop_patience %d, "
                "best %.4f), so resuming trains nothing, whatever train.epochs says (now %d); the run folder is "
                "left as it is. To train on: --set train.early_stop_patience=0 (off) or a patience above %d; "
                "--no-resume starts over",
                source, start_epoch, stopper.monitor, stopper.epochs_since_best, stopper.patience,
                stopper.best if stopper.best is not None else float("nan"), epochs, stopper.epochs_since_best,
            )  # fmt: skip
            return progress
        logger.info("%s had stopped early after epoch %d; train.early_stop_patience now allows more epochs: continuing",
                    source, start_epoch)  # fmt: skip
        progress.stopped_early = False
    return progress


def _fresh_start(seed: int, best_path: Path | None) -> _Progress:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if best_path is not None and best_path.exists():
        best_path.unlink()  # a stale best.pt from an earlier run must not outlive it
    return _Progress()


@dataclass
class _RunFiles:
    """A run folder's files (all None without one): config.yaml, metrics.jsonl, checkpoints/."""

    path: Path | None
    last: Path | None
    best: Path | None
    config_dict: dict[str, Any]

    @classmethod
    def at(cls, run_dir: str | Path | None, cfg: Config) -> "_RunFiles":
        path = Path(run_dir) if run_dir is not None else None
        checkpoints = path / "checkpoints" if path is not None else None
        return cls(
            path,
            checkpoints / "last.pt" if checkpoints else None,
            checkpoints / "best.pt" if checkpoints else None,
            cfg.to_dict(),
        )

    def start(self, history: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        _write_text_atomic(self.path / "config.yaml", yaml.safe_dump(self.config_dict, sort_keys=False))
        # Rewritten from the checkpoint's history: epochs logged after the last checkpoint of a
        # crashed run are dropped, and a fresh run starts an empty file.
        self._write_metrics(history)

    def save_epoch(self, parts: _TrainingParts, progress: _Progress, metrics: dict[str, Any]) -> None:
        """last.pt (full state), best.pt (weights, when the monitored metric improved), metrics.jsonl."""
        if self.path is None:
            return
        save_checkpoint(
            self.last,
            {
                "format": CHECKPOINT_FORMAT,
                "kind": "last",
                "model": parts.core.state_dict(),
                "optimizer": parts.optimizer.state_dict(),
                "scheduler": None if parts.scheduler is None else parts.scheduler.state_dict(),
                "epochs_completed": progress.epochs_completed,
                "early_stopping": parts.stopper.state_dict(),
                "stopped_early": progress.stopped_early,
                "best_metrics": progress.best_metrics or None,
                "history": progress.history,
                "rng": capture_rng_state(),
                "config": self.config_dict,
            },
        )
        if parts.stopper.improved:
            # Weights only: prediction needs no optimizer state (which would triple the size).
            save_checkpoint(
                self.best,
                {
                    "format": CHECKPOINT_FORMAT,
                    "kind": "best",
                    "model": parts.core.state_dict(),
                    "epoch": metrics["epoch"],
                    "metrics": metrics,
                    "config": self.config_dict,
                },
            )
        self._write_metrics(progress.history)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        _write_text_atomic(self.path / "metrics.jsonl", "".join(_json_line(m) + "\n" for m in history))


def _epoch_batches(
    train_batches: Callable[[int, np.random.Generator], Iterable[Batch]],
    cfg: Config,
    epoch: int,
    steps: int | None,
    progress_interval_s: float,
) -> Iterable[Batch]:
    """`train_batches` for `epoch` from its own rng (default_rng([seed, epoch])), cut at
    `train.max_steps_per_epoch` and with a progress line every `progress_interval_s`."""
    batches: Iterable[Batch] = train_batches(epoch, np.random.default_rng([cfg.train.seed, epoch]))
    if cfg.train.max_steps_per_epoch > 0:
        batches = itertools.islice(batches, cfg.train.max_steps_per_epoch)
    if progress_interval_s > 0:
        batches = _with_progress(batches, epoch, cfg.train.epochs, steps, progress_interval_s)
    return batches


def _epoch_metrics(epoch: int, train_stats: dict[str, float], val_stats: dict[str, float], monitor: str) -> tuple[dict[str, Any], float]:
    """One epoch's metrics (train_* and val_*) and the monitored value (KeyError naming the choices)."""
    metrics: dict[str, Any] = {"epoch": epoch}
    for key, value in train_stats.items():
        metrics[key if key.startswith("train_") else f"train_{key}"] = value
    metrics.update(val_stats)
    if monitor not in metrics:
        raise KeyError(
            f"train.monitor: {monitor!r} is not a reported metric; choose from {sorted(k for k in metrics if k != 'epoch')}"
        )
    return metrics, float(metrics[monitor])


def _log_epoch(
    metrics: dict[str, Any], train_stats: dict[str, float], monitored: float, monitor: str, epochs: int, improved: bool
) -> None:
    train_seconds = max(train_stats["seconds"], 1e-9)
    monitor_text = "" if monitor == "val_dice" else f"  {monitor} {monitored:.4f}"
    logger.info(
        "epoch %d/%d  train_loss %.4f  train_dice %.4f  %s%s%s  lr %.2e  %.1fs, data wait %.0f%%",
        metrics["epoch"] + 1, epochs, metrics["train_loss"], metrics["train_dice"], format_epoch_metrics(metrics),
        monitor_text, " *best" if improved else "", metrics["lr"], metrics["seconds"],
        100.0 * train_stats["data_wait_seconds"] / train_seconds,
    )  # fmt: skip


def _fit_result(history: list, best: dict, stopped_early: bool, last_path: Path | None, best_path: Path | None) -> FitResult:
    checkpoint = None
    if best_path is not None and best_path.exists():
        checkpoint = str(best_path)
    elif last_path is not None and last_path.exists():
        checkpoint = str(last_path)
    return FitResult(
        history=history,
        best=best,
        epochs_run=len(history),
        stopped_early=stopped_early,
        checkpoint=checkpoint,
        last_checkpoint=str(last_path) if last_path is not None and last_path.exists() else None,
    )


__all__ = [
    "EarlyStopping",
    "FitResult",
    "OPTIMIZERS",
    "PROGRESS_INTERVAL_S",
    "PositiveReservoir",
    "SCHEDULERS",
    "autocast",
    "batch_from_numpy",
    "batch_to_device",
    "build_optimizer",
    "build_scheduler",
    "epoch_indices",
    "evaluate",
    "fit",
    "positive_rate_for_epoch",
    "scheduler_steps_per_batch",
    "step_epoch_scheduler",
    "train_epoch",
    "train_step",
    "uint8_batch",
    "unwrap_model",
]
