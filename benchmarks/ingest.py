"""Ingest benchmark: decode + preprocess cost against a bare libjpeg-turbo decode, pipeline
throughput, and driver memory against dataset size.

    .venv/bin/python benchmarks/ingest.py [--sizes 200 2000] [--repeats 10] [--pipeline-repeats 2] [--cpus N]
        [--out benchmarks/results/ingest.json]

1. Per image, on the same JPEG Baseline DICOM bytes (the real SIIM samples plus synthetic ones),
   timed back to back for each file and repeat:
   baseline = `cv2.imdecode(frame, IMREAD_UNCHANGED)`: the encapsulated JPEG frame decoded at its
              full size by libjpeg-turbo, nothing else (the frame is extracted beforehand, untimed);
   ptxray   = `read_dicom(bytes, min_size_px=512)` (DICOM parse, integrity checks, header fields,
              decode: at 1/2 scale for a 1024 px frame) + `make_channels(raw, clahe, beasf, 512)`;
   ptxray_full_scale_decode = the same without `min_size_px` (full-size decode, then INTER_AREA).
   Clock: CPU time of the process (`time.process_time`), because the machine is shared: waiting
   for a core is not cost, and CPU time also counts any OpenCV worker threads. Wall-clock numbers
   are reported too. Statistic: per file the fastest of the repeats, then the median over files.
   The ratio is what the issue targets (<= 1.5x).
   OpenCV runs single-threaded (cv2.setNumThreads(1)): per-image work is serial and Ray parallelises
   across images. Results with OpenCV's default thread pool are reported for reference.
   Allocator: glibc's dynamic mmap threshold decides, from the process's history, whether each
   1 MiB output of a full-size decode is a fresh mmap; in a fresh process every bare decode paid
   ~480 page faults (~0.9 ms, a third of its time). mallopt() first fixes the thresholds, so
   neither side pays page faults for its buffers (page faults per call are reported): the stricter
   baseline, and the same in every run.
   `stages_ms` splits the ptxray column (each stage timed on its own, same statistic), and
   `reduced_vs_full_decode` gives the pixel difference of the 1/2-scale path per channel.
2. `prepare` (Ray tasks) on all cores (`--cpus`), a fresh driver process and cache folder per run: images/s;
   `efficiency` = images/s / (CPUs / the per-image CPU seconds of 1., synthetic files), i.e. the
   share of what the cores could do if they only decoded and preprocessed; the CPU seconds of
   every process during the run (driver, Ray's daemons, workers) and `cpu_efficiency` = per-image
   CPU / all CPU per image, the bound that wall-clock efficiency reaches on an idle machine and the
   figure to read when other jobs share the cores; the driver's peak RSS, which must not grow with
   the number of images. `task_body_cpu_ms_per_image`: one prepare task's whole body (read,
   decode, preprocess, masks, Arrow table, Parquet write) in this process without Ray, and
   `parallel_efficiency` = images/s / (CPUs / that): the share that the Ray wiring, the driver and
   Ray's own processes leave of what the cores could do running the task body alone (its Parquet
   file is rewritten each time, so it does not count the next cost). `of_which_kernel_cpu_seconds`:
   the system part of `cpu_seconds`. `machine.page_cache_write_cpu_ms_per_mb`: the CPU per MB of
   a new file against a rewritten one, in this process (see `page_cache_cpu_ms_per_mb`); times
   `cache_mb_per_image`, what the cache's growth in the page cache costs each image here.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import generate_fragmented_frames

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "data" / "siim-sample"
SIZE_PX = 512
CHANNELS = ("raw", "clahe", "beasf")


def jpeg_frame(blob: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(blob))
    (frame,) = [b"".join(f) for f in generate_fragmented_frames(ds.PixelData)]
    return frame


def fix_malloc_thresholds() -> bool:
    """glibc only: stop mmap/munmap of each large buffer (M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 16 << 20)) and bool(libc.mallopt(-1, 256 << 20))
    except (OSError, AttributeError):
        return False


def per_image(blobs: list[bytes], repeats: int, threads: int | None, stages: bool = True) -> dict:
    """Time the baseline and ptxray on each blob; threads=None leaves OpenCV's default pool."""
    from ptxray.dicom import read_dicom
    from ptxray.preprocess import beasf, clahe, make_channels

    default_threads = cv2.getNumThreads()
    if threads is not None:
        cv2.setNumThreads(threads)
    try:
        frames = [np.frombuffer(jpeg_frame(b), np.uint8) for b in blobs]
        cpu: dict[str, list[list[float]]] = {}
        wall: dict[str, list[list[float]]] = {}
        faults: dict[str, list[int]] = {}

        def timed(key: str, i: int, fn: Callable[[], object]) -> object:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            c1, w1 = time.process_time(), time.perf_counter()
            faults.setdefault(key, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            cpu.setdefault(key, [[] for _ in blobs])[i].append(c1 - c0)
            wall.setdefault(key, [[] for _ in blobs])[i].append(w1 - w0)
            return out

        for repeat in range(repeats):
            for i, (blob, frame) in enumerate(zip(blobs, frames)):
                main = [
                    ("bare_decode", lambda: cv2.imdecode(frame, cv2.IMREAD_UNCHANGED)),
                    ("ptxray", lambda: make_channels(read_dicom(blob, min_size_px=SIZE_PX).image, CHANNELS, SIZE_PX)),
                    ("ptxray_full_scale_decode", lambda: make_channels(read_dicom(blob).image, CHANNELS, SIZE_PX)),
                ]
                # Rotate the order each repeat: whatever runs first after another file's work pays
                # colder caches (~7 % here); the fastest-of-repeats then compares like with like.
                for key, fn in main[repeat % 3:] + main[: repeat % 3]:
                    timed(key, i, fn)
                if stages:
                    full = cv2.imdecode(frame, cv2.IMREAD_UNCHANGED)
                    # The decode read_dicom does inside, alone; read_dicom minus it = parse + checks + header.
                    timed("decode_half_scale", i, lambda: cv2.imdecode(frame, cv2.IMREAD_REDUCED_GRAYSCALE_2))
                    small = timed("read_dicom", i, lambda: read_dicom(blob, min_size_px=SIZE_PX).image)
                    timed("clahe", i, lambda: clahe(small))
                    timed("beasf", i, lambda: beasf(small))
                    timed("resize_full_to_512", i, lambda: cv2.resize(full, (SIZE_PX, SIZE_PX), interpolation=cv2.INTER_AREA))

        def best(times: dict[str, list[list[float]]], key: str) -> float:
            return statistics.median(min(runs) for runs in times[key]) * 1e3

        c = {k: best(cpu, k) for k in cpu}
        w = {k: best(wall, k) for k in wall}
        result = {
            "images": len(blobs),
            "repeats": repeats,
            "opencv_threads": cv2.getNumThreads(),
            "cpu_ms": {k: round(c[k], 3) for k in ("bare_decode", "ptxray", "ptxray_full_scale_decode")},
            "ratio": round(c["ptxray"] / c["bare_decode"], 3),
            "ratio_full_scale_decode": round(c["ptxray_full_scale_decode"] / c["bare_decode"], 3),
            "wall_ms": {k: round(w[k], 3) for k in ("bare_decode", "ptxray", "ptxray_full_scale_decode")},
            "ratio_wall": round(w["ptxray"] / w["bare_decode"], 3),
            "page_faults_per_call": {k: statistics.median(faults[k]) for k in ("bare_decode", "ptxray", "ptxray_full_scale_decode")},
        }
        if stages:
            result["stages_cpu_ms"] = {
                "decode_half_scale": round(c["decode_half_scale"], 3),
                "parse_checks_header": round(c["read_dicom"] - c["decode_half_scale"], 3),
                "clahe": round(c["clahe"], 3),
                "beasf": round(c["beasf"], 3),
                "rest_of_make_channels": round(c["ptxray"] - c["read_dicom"] - c["clahe"] - c["beasf"], 3),
                "resize_full_to_512_if_full_scale": round(c["resize_full_to_512"], 3),
            }
        return result
    finally:
        cv2.setNumThreads(default_threads)


def reduced_vs_full(blobs: list[bytes]) -> dict:
    """Pixel difference of the 1/2-scale decode path against full decode + INTER_AREA, per channel."""
    from ptxray.dicom import read_dicom
    from ptxray.preprocess import make_channels

    diffs = []  # (C, S, S) int16 each
    for blob in blobs:
        reduced = make_channels(read_dicom(blob, min_size_px=SIZE_PX).image, CHANNELS, SIZE_PX)
        full = make_channels(read_dicom(blob).image, CHANNELS, SIZE_PX)
        diffs.append(reduced.astype(np.int16) - full.astype(np.int16))
    d = np.stack(diffs)  # (N, C, S, S)
    return {
        name: {
            "mean_abs": round(float(np.abs(d[:, c]).mean()), 3),
            "mean_signed": round(float(d[:, c].mean()), 3),
            "max_abs": int(np.abs(d[:, c]).max()),
            "share_abs_over_2": round(float((np.abs(d[:, c]) > 2).mean()), 5),
        }
        for c, name in enumerate(CHANNELS)
    }


PREPARE_CHILD = r"""
import json, os, pathlib, resource, sys, time
import psutil
from ptxray import ray_data
from ptxray.config import load_config
data, cache, size, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(None, [f"preprocess.image_size_px={size}"])
ray_data.init_ray("", num_cpus=cpus)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
me = psutil.Process()

def cpu_by_process():
    # Every process of the embedded Ray is a descendant of this driver (GCS, raylet, dashboard,
    # workers): their user + system CPU seconds and system alone, keyed by pid, with what they are.
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = "driver" if p.pid == me.pid else " ".join(p.cmdline()[:1]).rsplit("/", 1)[-1]
            out[p.pid] = (name, t.user + t.system, t.system)
        except psutil.Error:
            pass
    return out

before = cpu_by_process()
t = time.perf_counter()
s = ray_data.prepare(cfg, images=data + "/dicom-images-train", labels=data + "/train-rle.csv", cache=cache)
dt = time.perf_counter() - t
after = cpu_by_process()
groups, kernel = {}, {}
for pid, (name, cpu, sys_cpu) in after.items():
    group = "driver" if name == "driver" else "ray_workers" if name.startswith("ray::") else "ray_system"
    _, cpu_before, sys_before = before.get(pid, (name, 0.0, 0.0))
    groups[group] = groups.get(group, 0.0) + cpu - cpu_before
    kernel[group] = kernel.get(group, 0.0) + sys_cpu - sys_before
cache_bytes = sum(f.stat().st_size for f in pathlib.Path(cache).rglob("*.parquet"))
print(json.dumps({"images": s["images"], "seconds": round(dt, 2), "images_per_s": round(s["images"] / dt, 1),
                  "cpu_seconds": {k: round(v, 2) for k, v in sorted(groups.items())},
                  "of_which_kernel_cpu_seconds": {k: round(v, 2) for k, v in sorted(kernel.items())},
                  "cache_mb_per_image": round(cache_bytes / 1e6 / s["images"], 3),
                  "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def task_body_cpu_ms(data: Path, size: int, chunks: int = 4, per_task: int = 64) -> float:
    """CPU ms per image of one prepare task's whole body in this process, without Ray: read the
    files, decode, preprocess, masks, the Arrow table, the Parquet file. Chunks of `per_task`
    distinct files of `data` (the first warms up); the median over chunks."""
    import pyarrow.fs as pafs

    from ptxray import ray_data
    from ptxray.config import load_config
    from ptxray.masks import read_labels

    cfg = load_config(None, [f"preprocess.image_size_px={size}"])
    paths = sorted(str(p) for p in (data / "dicom-images-train").rglob("*.dcm"))[: (chunks + 1) * per_task]
    labels = read_labels(str(data / "train-rle.csv"))
    fs = pafs.LocalFileSystem()
    out = tempfile.mkdtemp(prefix="task-body-")
    ms = []
    try:
        for i in range(0, len(paths), per_task):
            c = time.process_time()
            ray_data._prepare_part(paths[i:i + per_task], fs, labels, cfg.preprocess, cfg.data.rle_scheme, cfg.data.unlabeled, "",
                                   cfg.data.colour, fs, f"{out}/part.parquet")  # fmt: skip
            ms.append((time.process_time() - c) / len(paths[i:i + per_task]) * 1e3)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return statistics.median(ms[1:])


def page_cache_cpu_ms_per_mb(workdir: Path, files: int = 12, mb: int = 48) -> dict:
    """CPU ms (this process, user + kernel) per MB written to the page cache, as `files` new files
    of `mb` MB (one prepare task's Parquet file each at 512 px), then as the same files rewritten
    (truncated and written again: the kernel reuses the pages just freed); the median over files.
    A virtual machine that hands freed memory back to its host pays again on the first touch of
    memory it had not used lately: on this project's 2-core VMs (free page reporting to the host),
    memory freed 3 s earlier was still cheap and memory freed 10 s earlier was not; a new file
    cost ~2.8 ms per MB and a rewritten one ~0.3. Prepare's output is new page cache (the cache
    stays in memory for training to read), ~0.8 MB per image at 512 px. The wait first lets what
    earlier steps freed go back to the host, as it has on a machine that ran anything else before."""
    time.sleep(15)
    block = np.random.default_rng(0).integers(0, 256, mb * 1_000_000, dtype=np.uint8).tobytes()
    folder = Path(tempfile.mkdtemp(prefix="page-cache-", dir=workdir))
    out = {}
    try:
        for phase in ("new_files", "rewritten_files"):
            ms = []
            for i in range(files):
                c = time.process_time()
                with open(folder / f"{i}.bin", "wb", buffering=0) as f:
                    f.write(block)
                ms.append((time.process_time() - c) * 1e3 / mb)
            out[phase] = round(statistics.median(ms), 3)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def pipeline(n: int, workdir: Path, size: int, cpus: int, per_image_cpu_ms: float) -> dict:
    """One `prepare` of n synthetic 1024 px DICOMs in a fresh driver with an embedded Ray of `cpus`
    CPUs. efficiency = images/s over what `cpus` cores would do at `per_image_cpu_ms` each
    (read_dicom + make_channels alone, measured in this run); cpu_efficiency = that per-image CPU
    over the CPU all processes spent per image (driver, Ray's daemons, workers), which wall-clock
    efficiency approaches on an otherwise idle machine and which load on the machine disturbs less."""
    from ptxray.synth import generate

    data = workdir / f"synth-{n}"
    if not (data / "train-rle.csv").exists():
        generate(str(data), n=n, size=1024, positive_rate=0.22, seed=1)
    # A fresh cache folder: the first prepare of a data set (a forced rebuild would also delete
    # the last run's files, ~1.5 GB at 2,000 images, inside the timed window).
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{n}-", dir=workdir))
    try:
        out = subprocess.run(
            [sys.executable, "-c", PREPARE_CHILD, str(data), str(cache), str(size), str(cpus)],
            capture_output=True, text=True, check=True,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    cpu_ms_per_image = sum(run["cpu_seconds"].values()) / run["images"] * 1e3
    run["cpu_ms_per_image"] = round(cpu_ms_per_image, 2)
    run["efficiency"] = round(run["images_per_s"] / (cpus / (per_image_cpu_ms / 1e3)), 3)
    run["cpu_efficiency"] = round(per_image_cpu_ms / cpu_ms_per_image, 3)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[200, 2000], help="dataset sizes of the prepare runs (none: skip)")
    ap.add_argument("--cache-size", type=int, default=512, help="image_size_px of the cache in the pipeline runs")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--pipeline-repeats", type=int, default=2, help="prepare runs per dataset size (each in a fresh driver)")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="CPUs of the embedded Ray in the prepare runs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest.json"))
    args = ap.parse_args()

    from ptxray.synth import generate

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ptxray-bench-"))
    real = sorted(SAMPLES.rglob("*.dcm"))
    real = [p for p in real if "MONOHR1" not in p.name]
    synth_dir = workdir / "synth-20"
    if not (synth_dir / "train-rle.csv").exists():
        generate(str(synth_dir), n=20, size=1024, seed=2)
    synth = sorted(synth_dir.rglob("*.dcm"))
    sets = {"real_siim": [p.read_bytes() for p in real], "synthetic": [p.read_bytes() for p in synth]}
    result: dict = {
        "note": "CPU time (process_time), per file the fastest of the repeats, median over files; "
                "OpenCV single-threaded unless stated; glibc malloc thresholds fixed (see the docstring)",
        "command": " ".join([".venv/bin/python benchmarks/ingest.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "opencv": cv2.__version__, "pydicom": pydicom.__version__,
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "reduced_vs_full_decode": {name: reduced_vs_full(blobs) for name, blobs in sets.items()},
    }
    result["machine"]["malloc_thresholds_fixed"] = fix_malloc_thresholds()
    result["per_image"] = {name: per_image(blobs, args.repeats, threads=1) for name, blobs in sets.items()}
    result["per_image_opencv_default_threads"] = {
        name: per_image(blobs, args.repeats, threads=None, stages=False) for name, blobs in sets.items()}
    print(json.dumps(result, indent=2), flush=True)
    # The per-image CPU cost the pipeline's efficiency is measured against: the synthetic 1024 px
    # files, like the pipeline's, read at half scale and preprocessed to 512 px.
    per_image_ms = result["per_image"]["synthetic"]["cpu_ms"]["ptxray"]
    if args.sizes:
        result["machine"]["page_cache_write_cpu_ms_per_mb"] = page_cache_cpu_ms_per_mb(workdir)
    result["pipeline"] = [
        dict(n=n, repeat=r, cpus=args.cpus, per_image_cpu_ms=per_image_ms, **pipeline(n, workdir, args.cache_size, args.cpus, per_image_ms))
        for n in args.sizes for r in range(args.pipeline_repeats)
    ]
    # What the pipeline does per image besides the baseline's work (reading the file, the mask,
    # the Arrow table, the Parquet write), measured in this process without Ray: the per-image
    # cost that the Ray wiring, the driver and Ray's own processes add to is this, not the baseline.
    if args.sizes:
        body_ms = task_body_cpu_ms(workdir / f"synth-{max(args.sizes)}", args.cache_size)
        result["task_body_cpu_ms_per_image"] = round(body_ms, 3)
        for run in result["pipeline"]:
            run["parallel_efficiency"] = round(run["images_per_s"] / (args.cpus / (body_ms / 1e3)), 3)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["pipeline"], indent=2))


if __name__ == "__main__":
    main()
