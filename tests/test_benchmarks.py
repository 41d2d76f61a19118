"""The GPU benchmark's CPU mode (`benchmarks/gpu.py --smoke`): the one command a session with a
GPU runs must not rot between such sessions. Every part runs: eager and compiled (the 'eager'
backend on CPU) training steps on a resident and a fed batch, and a 2-epoch Ray Train run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_smoke_mode_runs_every_part(ray_local, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["skipped"] == []
    runs = {(r["model"], r["compiled"]): r for r in report["runs"]}
    assert set(runs) == {(m, False) for m in gpu.MODELS} | {("unet_vanilla", True)}
    for run in runs.values():
        assert run["parameters"] > 0
        for part in ("resident", "fed"):
            assert run[part]["images_per_s"] > 0 and run[part]["images"] == 2
            assert 0.0 <= run[part]["data_wait_fraction"] <= 1.0
    ray = report["ray_train"]
    assert [e["epoch"] for e in ray["epochs"]] == [0, 1]
    assert all(0.0 <= e["data_wait_fraction"] <= 1.0 for e in ray["epochs"])
    assert ray["epochs"][1]["held_rows"] > 0  # the second epoch came from the held shard
    sys.modules.pop("gpu", None)
