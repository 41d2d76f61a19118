"""ptxray.batchsize: the largest-batch search (driven by step functions with a known limit), the
memory measurement it relies on, and `train.batch_size: auto` in the config.

The search is tested with step functions that really raise torch's OutOfMemoryError above a
known size (or report a known peak): they stand in for a GPU, the search itself is the real code.
The probe is tested for real on CPU with a small model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptxray.batchsize import (
    BatchSizeError,
    PeakMemory,
    find_max_batch_size,
    is_out_of_memory,
    resolve_batch_size,
    search_max_batch_size,
)
from ptxray.config import ConfigError, load_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OomAbove:
    """Raises torch.OutOfMemoryError for batch sizes above `limit`; records every call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[int] = []

    def __call__(self, batch_size: int) -> int:
        self.calls.append(batch_size)
        if batch_size > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")
        return batch_size * 1000


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 37, 63, 64, 100, 1000])
def test_search_finds_the_limit_and_recovers_from_oom(limit):
    cap = 64
    step = OomAbove(limit)
    result = search_max_batch_size(step, max_batch_size=cap, release=lambda: None)
    assert result.batch_size == min(limit, cap)
    assert result.limit == ("cap" if limit >= cap else "out of memory")
    # Every size that fit is <= the limit, every failure is above it, and it took O(log cap) tries.
    assert all((a.batch_size <= limit) == a.fits for a in result.attempts)
    assert [a.batch_size for a in result.attempts] == step.calls
    assert len(step.calls) <= 2 * math.ceil(math.log2(cap)) + 1
    assert len(set(step.calls)) == len(step.calls)  # never the same size twice


def test_search_starting_above_the_limit_bisects_down():
    step = OomAbove(5)
    result = search_max_batch_size(step, max_batch_size=256, start=32, release=lambda: None)
    assert result.batch_size == 5 and step.calls[0] == 32


def test_nothing_fits_and_other_errors_propagate():
    with pytest.raises(BatchSizeError, match="not even batch size 1 fits: 1: out of memory"):
        search_max_batch_size(OomAbove(0), max_batch_size=8, release=lambda: None)

    def broken(batch_size: int) -> int:
        raise ValueError("model.arch='x': unknown")

    with pytest.raises(ValueError, match="unknown"):  # only OOM is recovered from
        search_max_batch_size(broken, max_batch_size=8, release=lambda: None)
    with pytest.raises(ValueError, match="must be >= 1"):
        search_max_batch_size(OomAbove(3), max_batch_size=0)


def test_memory_budget_bounds_the_search_without_running_over_it():
    fixed, per_sample, budget = 100, 10, 455  # peak(b) = 100 + 10 b <= 455  <=>  b <= 35
    calls = []

    def step(batch_size: int) -> int:
        calls.append(batch_size)
        return fixed + per_sample * batch_size

    result = search_max_batch_size(step, max_batch_size=1024, memory_budget_bytes=budget, release=lambda: None)
    assert result.batch_size == 35 and result.limit == "memory budget"
    # The linear extrapolation skipped every size over the budget: none was run.
    assert max(calls) == 35
    assert any(a.outcome == "predicted over budget" for a in result.attempts)


def test_measured_peak_over_budget_is_a_failure_even_without_a_prediction():
    # Superlinear growth: the first two points predict too little, the measurement catches it.
    result = search_max_batch_size(lambda b: b * b, max_batch_size=64, memory_budget_bytes=50, release=lambda: None)
    assert result.batch_size == 7  # 49 <= 50 < 64
    assert any(a.batch_size == 8 and a.outcome == "over budget" and a.peak_bytes == 64 for a in result.attempts)


def test_out_of_memory_recognition():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_cpu_peak_memory_is_measured_per_block():
    with PeakMemory("cpu") as big:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del block
    assert big.exact and big.kind == "cpu_rss_peak"
    assert 190 * 2**20 <= big.peak_bytes <= 400 * 2**20
    with PeakMemory("cpu") as small:  # the high-water mark was reset: the 200 MiB are not counted again
        block = np.ones(10 * 2**20 // 8)
        del block
    assert small.peak_bytes < 100 * 2**20


def tiny_config(**extra):
    overrides = {"model.vanilla.base_filters": 4, "model.vanilla.depth": 2, **extra}
    return load_config("smoke", overrides)  # unet_vanilla, 64 px, 3 channels


def test_real_probe_on_cpu_reaches_the_cap_and_measures_memory():
    cfg = tiny_config()
    result = find_max_batch_size(cfg, "cpu", max_batch_size=4)
    assert result.batch_size == 4 and result.limit == "cap"
    assert [a.batch_size for a in result.attempts] == [2, 4]  # starts at 2: BatchNorm cannot train on 1
    assert all(a.fits and a.peak_bytes > 0 for a in result.attempts)
    assert result.memory_budget_bytes > 0  # CPU: half the available memory by default


def test_real_probe_with_a_budget_nothing_fits_in():
    with pytest.raises(BatchSizeError, match=r"2: over budget; 1: over budget"):
        find_max_batch_size(tiny_config(), "cpu", max_batch_size=4, memory_budget_bytes=1)


def test_real_probe_on_a_model_that_cannot_train_on_one_image():
    # deeplabv3's ASPP pools to 1x1 before a BatchNorm: batch size 1 raises in training.
    cfg = load_config("smoke", {"model.arch": "deeplabv3", "model.encoder": "resnet18"})
    assert find_max_batch_size(cfg, "cpu", max_batch_size=2).batch_size == 2


def test_config_accepts_auto_and_resolve_replaces_it():
    assert load_config("smoke", ["train.batch_size=auto"]).train.batch_size == "auto"
    assert load_config("smoke", ["train.batch_size=AUTO"]).train.batch_size == "auto"
    assert load_config("smoke", ["train.batch_size=16"]).train.batch_size == 16
    for bad in ("big", "0", "-2", "2.5"):
        with pytest.raises(ConfigError, match="train.batch_size: expected a positive integer or 'auto'"):
            load_config("smoke", [f"train.batch_size={bad}"])

    fixed = tiny_config()
    assert resolve_batch_size(fixed, "cpu") == (fixed, None)
    auto = tiny_config(**{"train.batch_size": "auto"})
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    masks = np.zeros((3, 64, 64), np.uint8)
    resolved, result = resolve_batch_size(auto, "cpu", sample=(images, masks), n_train=3)
    assert resolved.train.batch_size == 3 == result.batch_size and result.limit == "cap"  # capped at the 3 images
    assert resolved.model == auto.model


@pytest.mark.gpu
def test_cuda_search_recovers_from_a_real_out_of_memory():
    # 1024 px, a cap far beyond what fits: the search must hit torch.OutOfMemoryError and go on.
    cfg = load_config(None, {"model.arch": "unet", "model.encoder": "resnet34", "preprocess.image_size_px": 1024})
    result = find_max_batch_size(cfg, "cuda", max_batch_size=1 << 16)
    assert result.limit == "out of memory" and result.batch_size >= 1
    assert any(a.outcome == "out of memory" for a in result.attempts)
    free, total = torch.cuda.mem_get_info()
    assert free > 0.5 * total  # the failed tries' memory was given back
