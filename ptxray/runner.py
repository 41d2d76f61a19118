"""Train one fold in this process, no Ray: the cache -> augmented batches -> `engine.fit`.

The Ray Train worker loop (ray_train.py) builds its batches with the same `augmented_batch`, so
the data a model sees does not depend on where it trains. Batches are handed over as uint8
(`engine.uint8_batch`, pinned when training on a GPU); with `augment.where` resolving to
"device" the host only gathers them and `engine.fit` augments them on the device.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ptxray.augment import DeviceAugment, augment, build_augment, build_device_augment, resolve_where
from ptxray.cache import Cache
from ptxray.config import Config
from ptxray.engine import PROGRESS_INTERVAL_S, FitResult, epoch_indices, fit, uint8_batch
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
    pin: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """uint8 batches in `indices` order; augmented on the host (randomness from `rng` only) when a
    pipeline is given; in pinned memory when `pin`."""
    n_batches = (len(indices) + batch_size - 1) // batch_size
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        sel = indices[b * batch_size : (b + 1) * batch_size]
        if pipeline is None:
            yield uint8_batch(images, masks, sel, pin=pin)  # one gather, straight into the hand-over
        else:
            yield augmented_batch(images[sel], masks[sel], pipeline, rng, pin=pin)


def augmented_batch(
    images: np.ndarray,  # uint8 (B, C, S, S)
    masks: np.ndarray,  # uint8 (B, S, S)
    pipeline: Any = None,
    rng: np.random.Generator | None = None,
    pin: bool = False,
) -> dict[str, torch.Tensor]:
    """One uint8 batch, each pair augmented in order with randomness from `rng` (pipeline None: as is)."""
    if pipeline is not None:
        pairs = [augment(i, m, pipeline, rng) for i, m in zip(images, masks)]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
    return uint8_batch(images, masks, pin=pin)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetch:
    """Iterate `make()` in a daemon thread, at most `depth` items ahead of the consumer.

    Each epoch of a streamed shard starts a Ray Data execution whose first rows take a second or
    more to arrive (scheduling the listing and read tasks); a stream started early hides that
    behind the previous step of the epoch (ptxray.ray_train). Batches are built (read, gathered,
    augmented on the host) in the thread too: OpenCV, numpy copies and torch release the GIL,
    so this overlaps with the training step, and on a GPU the step does not wait for the host.
    Single use; `close()` stops the thread at its next item.
    """

    _END = object()

    def __init__(self, make: Callable[[], Iterable], depth: int = 4, name: str = "ptxray-prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(make,), daemon=True, name=name)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, make: Callable[[], Iterable]) -> None:
        try:
            for item in make():
                if not self._put(item):
                    return  # closed: leaving the loop closes the generator and its Ray iterator
        except BaseException as e:  # handed to the consumer, which re-raises it in its thread
            self._put(_Failure(e))
            return
        self._put(self._END)

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()


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
    cfg: Config, data: FoldData, progress: bool = False, *, where: str = "host", pin: bool = False
) -> tuple[Callable[[int, np.random.Generator], Iterator], Callable[[], Iterator]]:
    """(train_batches, val_batches) for `engine.fit`: train batches augmented on the host when
    `where` is "host", handed over as they are for device augmentation when "device"."""
    if where not in ("host", "device"):
        raise ValueError(f"make_batch_fns: where must be 'host' or 'device' (resolve augment.where first), got {where!r}")
    pipeline = build_augment(cfg.augment.recipe, cfg.preprocess.image_size_px) if where == "host" else None
    labels = data.train_masks.reshape(len(data.train_masks), -1).any(axis=1)
    epochs = cfg.train.epochs

    def train_batches(epoch: int, rng: np.random.Generator) -> Iterator:
        idx = epoch_indices(labels, epoch, epochs, cfg.train.pos_rate_start, cfg.train.pos_rate_end, rng)
        batches = batches_from_arrays(
            data.train_images, data.train_masks, idx, cfg.train.batch_size, pipeline, rng, cfg.train.max_steps_per_epoch, pin
        )
        if progress:
            from tqdm import tqdm

            total = steps_per_epoch(cfg, len(idx))
            batches = tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
        return batches

    def val_batches() -> Iterator:
        return batches_from_arrays(
            data.val_images, data.val_masks, np.arange(len(data.val_images)), cfg.train.batch_size, pin=pin
        )

    return train_batches, val_batches


def device_augment_for(cfg: Config, device: torch.device) -> DeviceAugment | None:
    """The device augmentation `augment.where` asks for when training on `device` (None: host)."""
    if resolve_where(cfg.augment.where, device) != "device":
        return None
    return build_device_augment(cfg.augment.recipe, cfg.preprocess.image_size_px)


class PrefetchedEpochs:
    """`train_batches(epoch, rng)` whose batches are built `depth` ahead in a `Prefetch` thread;
    starting an epoch (or `close()`) stops the previous epoch's thread."""

    def __init__(self, train_batches: Callable[[int, np.random.Generator], Iterable], depth: int = 4):
        self._train_batches, self._depth = train_batches, depth
        self._current: Prefetch | None = None

    def __call__(self, epoch: int, rng: np.random.Generator) -> Prefetch:
        self.close()
        self._current = Prefetch(lambda: self._train_batches(epoch, rng), self._depth, f"train-{epoch}")
        return self._current

    def close(self) -> None:
        if self._current is not None:
            self._current.close()


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
    device_augment = device_augment_for(cfg, dev)
    where = "host" if device_augment is None else "device"
    log.info("augmentation %r on the %s", cfg.augment.recipe, where)
    train_batches, val_batches = make_batch_fns(cfg, data, progress=progress, where=where, pin=dev.type == "cuda")
    if dev.type == "cuda":
        # The host gathers (and, with where=host, augments) the next batches while the GPU trains.
        train_batches = PrefetchedEpochs(train_batches)
    try:
        return fit(
            model, cfg, train_batches, val_batches, run_dir=run_dir, device=dev, resume=resume,
            steps_per_epoch=steps_per_epoch(cfg, len(data.train_images)), resume_from=resume_from,
            on_epoch_end=on_epoch_end, device_augment=device_augment,
            progress_interval_s=0.0 if progress else PROGRESS_INTERVAL_S,  # a progress bar shows it already
        )
    finally:
        if isinstance(train_batches, PrefetchedEpochs):
            train_batches.close()
