"""Tune trial overhead: the same K-fold x grid experiment with TorchTrainer trials and with trials
that train in their own process (`compute.num_workers` 1 vs 0).

    .venv/bin/python benchmarks/trial_overhead.py [--images 200] [--folds 2] [--epochs 3]
                                                  [--out benchmarks/results/trial_overhead.json]

Both experiments run the `demo` recipe (128 px, half-width vanilla U-Net, batch 8, 1 CPU per
trial, two trials at a time) on the same cache, in the same embedded Ray (4 logical CPUs, as
`make demo` gives its head), one after the other (`--in-trial-first` swaps them), with ASHA off so both train the same epochs:
`--folds` folds x learning rates {2e-3, 5e-4}.

Reported per path: the experiment's wall time (`Tuner.fit`), the CPU-seconds the whole machine
spent meanwhile (/proc/stat, so Ray's own processes count: run it on a quiet machine), each
trial's first epoch (it carries the trial's start-up) and its later epochs (Tune's
time_this_iter_s); and the ratios TorchTrainer / in-trial.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def busy_cpu_seconds() -> float:
    """CPU-seconds this machine has spent outside idle and iowait since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run(cfg, cache_uri: str) -> dict:
    from ptxray import ray_tune

    cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
    summary = ray_tune.run_experiment(cfg, cache_uri, max_concurrent_trials=2, print_table=False)
    wall, cpu = time.perf_counter() - t0, busy_cpu_seconds() - cpu0
    first, later = [], []
    for path in sorted(Path(summary["experiment"]).glob("*/result.json")):
        steps = [json.loads(line)["time_this_iter_s"] for line in path.read_text().splitlines()]
        first.append(steps[0])
        later.extend(steps[1:])
    best = summary["best"]
    return {
        "wall_seconds": wall,
        "busy_cpu_seconds": cpu,
        "trials": len(first),
        "first_epoch_seconds": first,
        "later_epoch_seconds_mean": statistics.mean(later),
        "first_epoch_seconds_mean": statistics.mean(first),
        "best_params": best["params"],
        "best_val_dice_cls_mean": best["val_dice_cls_mean"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--in-trial-first", action="store_true", help="run the in-trial experiment first (order check)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trial_overhead.json"))
    args = p.parse_args(argv)

    from common import synthetic_cache, write_report

    from ptxray.config import load_config

    with tempfile.TemporaryDirectory(prefix="ptxr-bench-") as tmp:
        work = Path(tmp)
        base = load_config("demo", {
            "train.epochs": args.epochs,
            "search.folds": list(range(args.folds)),
            "search.early_stop": False,
            "compute.storage_path": str(work / "runs"),
        })  # fmt: skip
        with synthetic_cache(work, base, images=args.images, size=512, positive_rate=0.22, num_cpus=4) as cache_uri:
            paths = {}
            order = [("torch_trainer", 1), ("in_trial", 0)]
            for name, workers in order[::-1] if args.in_trial_first else order:
                cfg = base.with_overrides({"compute.num_workers": workers, "search.name": name})
                paths[name] = run(cfg, cache_uri)

    trainer, in_trial = paths["torch_trainer"], paths["in_trial"]
    report = {
        "setup": {
            "recipe": "demo", "images": args.images, "folds": args.folds, "grid": base.search.grid,
            "epochs": args.epochs, "image_size_px": base.preprocess.image_size_px, "max_concurrent_trials": 2,
            "ray_num_cpus": 4, "order": ["in_trial", "torch_trainer"] if args.in_trial_first else ["torch_trainer", "in_trial"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "load_average_at_end": list(os.getloadavg()),
        },  # fmt: skip
        **paths,
        "wall_ratio": trainer["wall_seconds"] / in_trial["wall_seconds"],
        "cpu_ratio": trainer["busy_cpu_seconds"] / in_trial["busy_cpu_seconds"],
        "first_epoch_ratio": trainer["first_epoch_seconds_mean"] / in_trial["first_epoch_seconds_mean"],
        "later_epoch_ratio": trainer["later_epoch_seconds_mean"] / in_trial["later_epoch_seconds_mean"],
    }
    write_report(report, args.out)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
