"""`make demo`: a synthetic SIIM-layout dataset, decoded once into the cache, and its summary.

Later issues grow this into the full K-fold job submitted to a local Ray head.
"""

from __future__ import annotations

import json
from pathlib import Path

from ptxray.config import load_config


def run_demo(workdir: Path, n: int = 120, seed: int = 0) -> int:
    from ptxray import ray_data
    from ptxray.cli import print_prepare_summary
    from ptxray.synth import generate

    workdir = workdir.absolute()
    data = workdir / "siim"
    stamp = data / "synth.json"
    params = {"n": n, "size": 1024, "positive_rate": 0.22, "seed": seed}
    if not stamp.exists() or json.loads(stamp.read_text()) != params:
        print(f"generating {n} synthetic chest radiographs (1024 px JPEG DICOMs) in {data} ...")
        generate(str(data), **params)
        stamp.write_text(json.dumps(params))
    cfg = load_config("demo")
    started = ray_data.init_ray(cfg.compute.address)
    try:
        summary = ray_data.prepare(
            cfg, images=str(data / "dicom-images-train"), labels=str(data / "train-rle.csv"), cache=str(workdir / "cache")
        )
    finally:
        if started:
            import ray

            ray.shutdown()
    print_prepare_summary(summary)
    print(f"summary JSON: {summary['cache']}/{json.loads(Path(summary['cache'], 'manifest.json').read_text())['parts']}/summary.json")
    return 0
