"""Train one fold in this process, no Ray: the cache -> augmented batches -> `engine.fit`.

The Ray Train worker loop (ray_train.py) builds its batches with the same `augmented_batch`, so
the data a model sees does not depend on where it trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ptxray.augment import augment, build_augment
from ptxray.cache import Cache
from ptxray.config import Config
from ptxray.engine import FitResult, batch_from_numpy, epoch_indices, fit
from ptxray.models import build_model

log = logging.getLogger("ptxray")


def batches_from_arrays(
    images: np.ndarray,  # uint8 (N, C, S, S)
    masks: np.ndarray,  # uint8 (N, S, S)
    indices: np.ndarray,
    batch_size: int,
    pipeline: Any = None,
    rng: np.random.Generator | None = None,
    max_batches: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in `indices` order; augmented (randomness from `rng` only) when a pipeline is given."""
    n_batches = (len(indices) + batch_size - 1) // batch_size
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        sel = indices[b * batch_size : (b + 1) * batch_size]
        yield augmented_batch(images[sel], masks[sel], pipeline, rng)


def augmented_batch(
    images: np.ndarray,  # uint8 (B, C, S, S)
    masks: np.ndarray,  # uint8 (B, S, S)
    pipeline: Any = None,
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One batch, each pair augmented in order with randomness from `rng` (pipeline None: as is)."""
    if pipeline is not None:
        pairs = [augment(i, m, pipeline, rng) for i, m in zip(images, masks)]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
    return batch_from_numpy(images, masks)


@dataclass
class FoldData:
    train_images: np.ndarray
    train_masks: np.ndarray
    val_images: np.ndarray
    val_masks: np.ndarray

    @classmethod
    def load(cls, cache_uri: str, fold: int) -> "FoldData":
        cache = Cache.open(cache_uri)
        train_ids, val_ids = cache.split_ids(fold)
        ti, tm, _ = cache.load_arrays(train_ids)
        vi, vm, _ = cache.load_arrays(val_ids)
        return cls(ti, tm, vi, vm)


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    steps = (n_train + cfg.train.batch_size - 1) // cfg.train.batch_size
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def make_batch_fns(
    cfg: Config, data: FoldData, progress: bool = False
) -> tuple[Callable[[int, np.random.Generator], Iterator], Callable[[], Iterator]]:
    pipeline = build_augment(cfg.augment.recipe, cfg.preprocess.image_size_px)
    labels = data.train_masks.reshape(len(data.train_masks), -1).any(axis=1)
    epochs = cfg.train.epochs

    def train_batches(epoch: int, rng: np.random.Generator) -> Iterator:
        idx = epoch_indices(labels, epoch, epochs, cfg.train.pos_rate_start, cfg.train.pos_rate_end, rng)
        batches = batches_from_arrays(
            data.train_images, data.train_masks, idx, cfg.train.batch_size, pipeline, rng, cfg.train.max_steps_per_epoch
        )
        if progress:
            from tqdm import tqdm

            total = steps_per_epoch(cfg, len(idx))
            batches = tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
        return batches

    def val_batches() -> Iterator:
        return batches_from_arrays(data.val_images, data.val_masks, np.arange(len(data.val_images)), cfg.train.batch_size)

    return train_batches, val_batches


def train_fold(
    cfg: Config,
    cache_uri: str,
    run_dir: str | Path,
    *,
    resume: bool = True,
    device: str | None = None,
    progress: bool = False,
    resume_from: str | Path | None = None,
    on_epoch_end: Callable[[int, dict[str, Any], str | None], None] | None = None,
) -> FitResult:
    """Train `cfg.train.fold` of the cache; writes config, metrics.jsonl and checkpoints to run_dir.

    `resume_from` and `on_epoch_end` go to `engine.fit` (a Tune trial that trains in its own
    process resumes from its restored checkpoint and reports each epoch through them)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.compute.use_gpu else "cpu"))
    data = FoldData.load(cache_uri, cfg.train.fold)
    if data.train_images.shape[1] != cfg.model.in_channels:
        raise ValueError(
            f"{cache_uri}: the cache has {data.train_images.shape[1]} channels but model.in_channels is "
            f"{cfg.model.in_channels}; prepare a cache with preprocess.channels={list(cfg.preprocess.channels)}"
        )
    if cfg.train.batch_size == "auto":
        from ptxray.batchsize import resolve_batch_size

        # Before the seed below: the search builds (and trains) its own throwaway model.
        cfg, _ = resolve_batch_size(cfg, dev, sample=(data.train_images, data.train_masks), n_train=len(data.train_images))
    log.info(
        "fold %d: %d train images (%d positive), %d val images",
        cfg.train.fold, len(data.train_images), int(data.train_masks.reshape(len(data.train_masks), -1).any(1).sum()), len(data.val_images),
    )
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dev)
    train_batches, val_batches = make_batch_fns(cfg, data, progress=progress)
    return fit(
        model, cfg, train_batches, val_batches, run_dir=run_dir, device=dev, resume=resume,
        steps_per_epoch=steps_per_epoch(cfg, len(data.train_images)), resume_from=resume_from, on_epoch_end=on_epoch_end,
    )
