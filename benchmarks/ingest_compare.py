"""Before/after of the per-image ingest cost: `ptxray/dicom.py` at a git revision against the working
tree, both timed in one process by benchmarks/ingest.py's `per_image` (same clock, statistic,
single-threaded OpenCV and fixed malloc thresholds).

    .venv/bin/python benchmarks/ingest_compare.py --rev c2e0425 [--repeats 10] [--out benchmarks/results/ingest_before_after.json]

The old reader has no `min_size_px` and always decodes at full size, so its "ptxray" column is a
full-size decode + INTER_AREA + CLAHE + BEASF. Its stage split: parse = old read_dicom - bare decode;
make_channels = old ptxray - old read_dicom (resize 1024 -> 512, CLAHE, BEASF).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # noqa: E402  (benchmarks/ingest.py, next to this file)


def old_reader(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:ptxray/dicom.py"], cwd=ingest.ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="ptxray-old-dicom-")) / "dicom_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dicom_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dicom_old"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return lambda data, path="", *, min_size_px=None: module.read_dicom(data, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision of the 'before' ptxray/dicom.py")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(ingest.ROOT / "benchmarks" / "results" / "ingest_before_after.json"))
    args = ap.parse_args()

    import ptxray.dicom
    from ptxray.synth import generate

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ptxray-bench-"))
    synth_dir = workdir / "synth-20"
    if not (synth_dir / "train-rle.csv").exists():
        generate(str(synth_dir), n=20, size=1024, seed=2)
    real = [p for p in sorted(ingest.SAMPLES.rglob("*.dcm")) if "MONOHR1" not in p.name]
    sets = {"real_siim": [p.read_bytes() for p in real], "synthetic": [p.read_bytes() for p in sorted(synth_dir.rglob("*.dcm"))]}
    new_read, old_read = ptxray.dicom.read_dicom, old_reader(args.rev)
    result: dict = {"command": " ".join([".venv/bin/python benchmarks/ingest_compare.py", *sys.argv[1:]]),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "malloc_thresholds_fixed": ingest.fix_malloc_thresholds(), "before": {}, "after": {}}
    try:
        for name, blobs in sets.items():
            ptxray.dicom.read_dicom = new_read
            result["after"][name] = ingest.per_image(blobs, args.repeats, threads=1)
            ptxray.dicom.read_dicom = old_read
            before = ingest.per_image(blobs, args.repeats, threads=1)
            stages = before.pop("stages_cpu_ms")  # its CLAHE/BEASF ran on the old 1024 px image: dropped
            read = stages["decode_half_scale"] + stages["parse_checks_header"]  # = old read_dicom
            before["old_stages_cpu_ms"] = {
                "decode_full_scale": before["cpu_ms"]["bare_decode"],
                "parse_checks_header": round(read - before["cpu_ms"]["bare_decode"], 3),
                "make_channels_incl_resize": round(before["cpu_ms"]["ptxray"] - read, 3),
            }
            result["before"][name] = before
    finally:
        ptxray.dicom.read_dicom = new_read
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
