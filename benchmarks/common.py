"""What the benchmark scripts share: a synthetic dataset prepared into a cache inside an embedded
Ray of their own, and the JSON report file. (Imported by the scripts as `common`: running
`python benchmarks/X.py` puts this folder on sys.path.)"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def synthetic_cache(work: Path, cfg: Any, *, images: int, size: int, positive_rate: float, num_cpus: int) -> Iterator[str]:
    """Generate `images` synthetic DICOMs under `work/synth`, start an embedded Ray with `num_cpus`
    logical CPUs (never someone else's cluster), prepare the cache under `work/cache` with `cfg`,
    and yield its URI; Ray is shut down when the block ends."""
    import ray

    from ptxray import ray_data
    from ptxray.synth import generate

    generate(str(work / "synth"), n=images, size=size, positive_rate=positive_rate, seed=0)
    ray_temp = tempfile.mkdtemp(prefix="ptxr-", dir="/tmp")  # short: Ray's socket paths are length-limited
    try:
        with ray_data.ray_session("", num_cpus=num_cpus, _temp_dir=ray_temp, log_to_driver=False):
            ray.data.DataContext.get_current().enable_progress_bars = False
            summary = ray_data.prepare(
                cfg, images=str(work / "synth" / "dicom-images-train"), labels=str(work / "synth" / "train-rle.csv"),
                cache=str(work / "cache"),
            )
            yield summary["cache"]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write the report as indented JSON to `out` (parents created); returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
