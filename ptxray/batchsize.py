"""The largest training batch that fits in memory: a bounded search that recovers from OOM.

The paper trains each architecture with "the highest batch size with no memory crashes".
`search_max_batch_size` finds it for any `try_batch(batch_size) -> peak bytes` function: double
from `start` until a try fails or the cap is reached, then bisect between the largest size that
fit and the smallest that failed. A try fails when it raises an out-of-memory error
(`torch.OutOfMemoryError` on CUDA, a CPU allocator failure, `MemoryError`) or, with a memory
budget, when its measured peak exceeds the budget. Memory is released between tries.

On CPU there is no out-of-memory exception in practice: the kernel swaps, or kills the process.
So on CPU the search is bounded by a budget (by default half of the memory available when it
starts) and by a cap; before each try it extrapolates the peak linearly from the last two
successful tries and skips sizes predicted to exceed the budget, so it never has to allocate
its way into swap to find the limit.

`train.batch_size: auto` in a config resolves through `resolve_batch_size` (the in-process runner
and every Ray Train worker call it before building the model they train; the workers then take
the minimum over ranks). The probe trains a separate, throwaway model for two optimizer steps per
try, as the engine takes them (the configured loss, optimizer, gradient clipping, AMP and
channels_last), so the model that is then trained starts untouched.

Peak memory (`PeakMemory`): on CUDA `torch.cuda.max_memory_allocated` after resetting the peak
statistics; on CPU the process's resident-set high-water mark (VmHWM in /proc/self/status,
reset by writing "5" to /proc/self/clear_refs, Linux >= 4.0) minus a baseline. Without that
file (other systems) `resource.getrusage().ru_maxrss` is used, which never goes down: then only
the first measurement of a process is exact and later ones are upper bounds.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ptxray.config import Config

log = logging.getLogger("ptxray")

DEFAULT_MAX_BATCH_SIZE = {"cuda": 1024, "cpu": 64}
DEFAULT_CPU_MEMORY_FRACTION = 0.5  # of the memory available when the search starts
PROBE_STEPS = 2  # the first step allocates the optimizer state; the second is steady state


class BatchSizeError(RuntimeError):
    pass


# ---- memory ---------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM, a failed CPU allocation, or MemoryError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_memory() -> None:
    """Give freed memory back: Python garbage, the CUDA caching allocator, glibc's free lists."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    # glibc keeps freed heap pages resident; trimming them makes the next RSS peak measurable.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    kb = _proc_status_kb("VmHWM")
    return kb * 1024 if kb is not None else _ru_maxrss_bytes()


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (physical memory on other systems)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PeakMemory:
    """Peak memory of a block, above `baseline_bytes` (default: what is in use when it starts).

    CUDA: `max_memory_allocated` (tensors only, not the allocator's cache). CPU: the process RSS
    high-water mark. `kind` says which; `exact` is False when the CPU peak could not be reset.
    """

    def __init__(self, device: torch.device | str, baseline_bytes: int | None = None) -> None:
        self.device = torch.device(device)
        self.baseline_bytes = baseline_bytes
        self.peak_bytes = 0  # above the baseline
        self.absolute_peak_bytes = 0
        self.exact = True
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_peak"

    def __enter__(self) -> "PeakMemory":
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.baseline_bytes is None:
                self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.exact = _reset_rss_peak()
            if self.baseline_bytes is None:
                self.baseline_bytes = current_rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.absolute_peak_bytes = _rss_peak_bytes()
        self.peak_bytes = max(0, self.absolute_peak_bytes - (self.baseline_bytes or 0))


def memory_baseline_bytes(device: torch.device | str) -> int:
    """What is in use now (after releasing garbage): the zero point for a later PeakMemory."""
    device = torch.device(device)
    release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes()


# ---- the search -----------------------------------------------------------------------------
@dataclass
class Attempt:
    batch_size: int
    fits: bool
    peak_bytes: int | None  # measured (None when skipped or failed before measuring)
    outcome: str  # "fits", "out of memory", "over budget", "predicted over budget"
    seconds: float = 0.0


@dataclass
class SearchResult:
    batch_size: int  # the largest size that fit
    limit: str  # what stopped it: "cap", "out of memory", "memory budget"
    max_batch_size: int  # the cap
    memory_budget_bytes: int | None
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _predicted_peak(attempts: list[Attempt], batch_size: int) -> float | None:
    """Linear extrapolation of peak bytes from the two largest successful tries."""
    good = sorted({a.batch_size: a for a in attempts if a.fits and a.peak_bytes is not None}.values(), key=lambda a: a.batch_size)
    if len(good) < 2:
        return None
    a, b = good[-2], good[-1]
    per_sample = max(0.0, (b.peak_bytes - a.peak_bytes) / (b.batch_size - a.batch_size))
    return b.peak_bytes + per_sample * (batch_size - b.batch_size)


def search_max_batch_size(
    try_batch: Callable[[int], int | None],
    *,
    max_batch_size: int,
    start: int = 1,
    memory_budget_bytes: int | None = None,
    release: Callable[[], None] = release_memory,
) -> SearchResult:
    """The largest batch size in [1, max_batch_size] for which `try_batch` succeeds.

    `try_batch(b)` runs the workload at batch size b and returns its peak memory in bytes (or
    None); it fails by raising an out-of-memory error (any other exception propagates). With
    `memory_budget_bytes`, a peak above the budget counts as a failure too, and sizes whose
    extrapolated peak exceeds it are not tried. Assumes memory grows with the batch size.
    Raises BatchSizeError when not even batch size 1 fits.
    """
    if max_batch_size < 1 or start < 1:
        raise ValueError(f"search_max_batch_size: max_batch_size ({max_batch_size}) and start ({start}) must be >= 1")
    attempts: list[Attempt] = []
    budget_hit = False

    def fits(b: int) -> bool:
        nonlocal budget_hit
        if memory_budget_bytes is not None:
            predicted = _predicted_peak(attempts, b)
            if predicted is not None and predicted > memory_budget_bytes:
                attempts.append(Attempt(b, False, None, "predicted over budget"))
                budget_hit = True
                return False
        t0 = time.perf_counter()
        oom = False
        try:
            peak = try_batch(b)
        except Exception as e:  # noqa: BLE001 - only OOM is recovered from; the rest re-raises
            if not is_out_of_memory(e):
                raise
            oom = True
            peak = None
            log.info("batch size %d: out of memory (%s)", b, (str(e).splitlines() or [""])[0][:200])
        # Outside the except block: until it ends, the traceback keeps the failed step's tensors alive.
        release()
        seconds = time.perf_counter() - t0
        if oom:
            attempts.append(Attempt(b, False, None, "out of memory", seconds))
            return False
        if memory_budget_bytes is not None and peak is not None and peak > memory_budget_bytes:
            attempts.append(Attempt(b, False, peak, "over budget", seconds))
            budget_hit = True
            return False
        attempts.append(Attempt(b, True, peak, "fits", seconds))
        return True

    largest_fit, smallest_fail = 0, None
    b = min(start, max_batch_size)
    while smallest_fail is None:  # grow
        if fits(b):
            largest_fit = b
            if b >= max_batch_size:
                break
            b = min(2 * b, max_batch_size)
        else:
            smallest_fail = b
    while smallest_fail is not None and smallest_fail - largest_fit > 1:  # bisect
        mid = (largest_fit + smallest_fail) // 2
        if fits(mid):
            largest_fit = mid
        else:
            smallest_fail = mid
    if largest_fit == 0:
        raise BatchSizeError(
            "not even batch size 1 fits: "
            + "; ".join(f"{a.batch_size}: {a.outcome}" for a in attempts)
            + (f" (memory budget {memory_budget_bytes / 2**20:.0f} MiB)" if memory_budget_bytes else "")
        )
    if smallest_fail is None:
        limit = "cap"
    else:
        limit = "memory budget" if budget_hit and not any(a.outcome == "out of memory" for a in attempts) else "out of memory"
    return SearchResult(largest_fit, limit, max_batch_size, memory_budget_bytes, attempts)


# ---- the training probe ---------------------------------------------------------------------
def _sample_batch(sample: tuple[np.ndarray, np.ndarray] | None, batch_size: int, channels: int, size_px: int, seed: int):
    """uint8 images (B, C, S, S) and masks (B, S, S): the sample's images repeated, or synthetic ones."""
    if sample is not None and len(sample[0]):
        images, masks = sample
        idx = np.arange(batch_size) % len(images)
        return images[idx], masks[idx]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, channels, size_px, size_px), dtype=np.uint8)
    masks = np.zeros((batch_size, size_px, size_px), np.uint8)
    # Half the images positive (a square lesion), so detection models see instances to learn.
    masks[::2, size_px // 4 : size_px // 2, size_px // 4 : size_px // 2] = 1
    return images, masks


def _train_step(model, batch, optimizer, loss_fn, device, amp: bool, channels_last: bool, grad_clip_norm: float) -> None:
    """One optimizer step as `engine.train_epoch` takes it (`engine.train_step`), without the
    epoch's all-reduces: a Ray Train worker runs the search inside a process group, and ranks whose
    tries fail at different sizes would wait for each other in a collective forever."""
    from ptxray.engine import batch_to_device, train_step

    image, mask, label = batch_to_device(batch, torch.device(device), channels_last)
    train_step(model, image, mask, label, optimizer, loss_fn, amp=amp, grad_clip_norm=grad_clip_norm)


def training_probe(
    cfg: Config,
    device: torch.device | str,
    *,
    sample: tuple[np.ndarray, np.ndarray] | None = None,
    compile_model: bool = False,
) -> Callable[[int], int]:
    """`try_batch(b)`: two training steps of a throwaway `cfg.model` at batch b -> peak bytes.

    The peak counts everything since the probe was made (model, optimizer state, batch,
    activations). `sample` = (images uint8 (N, C, S, S), masks uint8 (N, S, S)) is repeated to
    the batch size; without it, synthetic images of `cfg.preprocess.image_size_px`.
    """
    from ptxray.engine import batch_from_numpy, build_optimizer
    from ptxray.losses import build_loss
    from ptxray.models import build_model

    device = torch.device(device)
    baseline = memory_baseline_bytes(device)
    amp = cfg.compute.amp and device.type == "cuda"
    channels_last = cfg.compute.channels_last
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    if compile_model:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn = build_loss(cfg.loss).to(device)

    def try_batch(batch_size: int) -> int:
        images, masks = _sample_batch(
            sample, batch_size, cfg.model.in_channels, cfg.preprocess.image_size_px, cfg.train.seed
        )
        batch = batch_from_numpy(images, masks)
        try:
            with PeakMemory(device, baseline_bytes=baseline) as peak:
                for _ in range(PROBE_STEPS):
                    _train_step(model, batch, optimizer, loss_fn, device, amp, channels_last, cfg.optim.grad_clip_norm)
        finally:
            optimizer.zero_grad(set_to_none=True)
            del batch
        return peak.peak_bytes

    return try_batch


def _default_cap(device: torch.device | str) -> int:
    return DEFAULT_MAX_BATCH_SIZE["cuda" if torch.device(device).type == "cuda" else "cpu"]


def find_max_batch_size(
    cfg: Config,
    device: torch.device | str,
    *,
    sample: tuple[np.ndarray, np.ndarray] | None = None,
    max_batch_size: int = 0,
    memory_budget_bytes: int | None = None,
    compile_model: bool = False,
    start: int = 2,
) -> SearchResult:
    """The largest batch size that trains `cfg.model` at `cfg.preprocess.image_size_px` on `device`.

    The search starts at 2 (going down to 1 only if 2 runs out of memory): BatchNorm cannot train
    on a single image, and models with image-level pooling before a BatchNorm (deeplabv3's ASPP)
    raise at batch size 1.

    `max_batch_size` 0 = DEFAULT_MAX_BATCH_SIZE for the device type. `memory_budget_bytes` None =
    no budget on CUDA (OOM decides), DEFAULT_CPU_MEMORY_FRACTION of the available memory on CPU.
    """
    device = torch.device(device)
    cap = max_batch_size or _default_cap(device)
    if memory_budget_bytes is None and device.type != "cuda":
        memory_budget_bytes = int(DEFAULT_CPU_MEMORY_FRACTION * available_memory_bytes())
    try_batch = training_probe(cfg, device, sample=sample, compile_model=compile_model)
    try:
        result = search_max_batch_size(
            try_batch, max_batch_size=cap, start=min(start, cap), memory_budget_bytes=memory_budget_bytes
        )
    finally:
        del try_batch  # drops the probe's model and optimizer
        release_memory()
    log.info(
        "%s at %d px on %s: largest batch size %d (limit: %s; tried %s)",
        cfg.model.arch, cfg.preprocess.image_size_px, device, result.batch_size, result.limit,
        ", ".join(f"{a.batch_size} {a.outcome}" for a in result.attempts),
    )
    return result


def resolve_batch_size(
    cfg: Config, device: torch.device | str, *, n_train: int = 0, **search: Any
) -> tuple[Config, SearchResult | None]:
    """`cfg` with `train.batch_size: auto` replaced by `find_max_batch_size`'s result (unchanged
    otherwise); `search` are its keywords (`sample`, `memory_budget_bytes`).

    `n_train` (training images, when known) caps the search: a larger batch only repeats images.
    """
    if cfg.train.batch_size != "auto":
        return cfg, None
    if n_train > 0:
        search["max_batch_size"] = min(_default_cap(device), n_train)
    result = find_max_batch_size(cfg, device, **search)
    return replace(cfg, train=replace(cfg.train, batch_size=result.batch_size)), result


def format_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    return f"{n / 2**20:.0f} MiB"


__all__ = [
    "Attempt",
    "BatchSizeError",
    "DEFAULT_CPU_MEMORY_FRACTION",
    "DEFAULT_MAX_BATCH_SIZE",
    "PeakMemory",
    "SearchResult",
    "available_memory_bytes",
    "current_rss_bytes",
    "find_max_batch_size",
    "format_bytes",
    "is_out_of_memory",
    "memory_baseline_bytes",
    "release_memory",
    "resolve_batch_size",
    "search_max_batch_size",
    "training_probe",
]
