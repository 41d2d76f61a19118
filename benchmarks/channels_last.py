"""channels_last (NHWC) against the default NCHW layout: training step time on this machine.

    .venv/bin/python benchmarks/channels_last.py [--size 128] [--batch 8] [--threads 1]
        [--archs unet_vanilla:8,unet_vanilla:16,unet:resnet34] [--out benchmarks/results/channels_last.json]

`compute.channels_last` converts the model and each batch to NHWC before training (CUDA and CPU).
This measures why that is the default on CPU too: for each architecture, the same model (same
seed, same input) takes forward + backward + AdamW steps in both layouts, in this one run.
Two warm-up steps are dropped; the median of `--repeats` timed blocks of `--steps` steps is the
step time, and the ratio is NCHW / NHWC (> 1: channels_last is faster).

An architecture is `unet_vanilla:<base_filters>` or `<smp arch>:<encoder>`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(arch: str, size: int, batch: int, nhwc: bool, steps: int, repeats: int) -> float:
    import torch

    from ptxray.config import Config
    from ptxray.models import build_model

    name, _, option = arch.partition(":")
    overrides = {"model.arch": name, "preprocess.image_size_px": size}
    if name == "unet_vanilla":
        overrides["model.vanilla.base_filters"] = int(option or 16)
    else:
        overrides["model.encoder"] = option or "resnet34"
    cfg = Config().with_overrides(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.rand(batch, cfg.model.in_channels, size, size)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        seg = out[0] if isinstance(out, (tuple, list)) else out
        seg.float().square().mean().backward()
        optimizer.step()

    for _ in range(2):
        step()
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - t0) / steps)
    return statistics.median(blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--archs", default="unet_vanilla:8,unet_vanilla:16,unet:resnet34")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "channels_last.json"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for arch in args.archs.split(","):
        nchw = step_seconds(arch, args.size, args.batch, False, args.steps, args.repeats)
        nhwc = step_seconds(arch, args.size, args.batch, True, args.steps, args.repeats)
        row = {
            "arch": arch,
            "nchw_ms_per_image": 1000 * nchw / args.batch,
            "nhwc_ms_per_image": 1000 * nhwc / args.batch,
            "ratio_nchw_over_nhwc": nchw / nhwc,
        }
        rows.append(row)
        print(
            f"{arch:22s} NCHW {row['nchw_ms_per_image']:7.1f} ms/img   NHWC {row['nhwc_ms_per_image']:7.1f} ms/img"
            f"   ratio {row['ratio_nchw_over_nhwc']:.2f}",
            flush=True,
        )
    result = {
        "settings": vars(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "results": rows,
    }
    from common import write_report

    print(f"wrote {write_report(result, args.out)}")


if __name__ == "__main__":
    main()
