"""The Ray Data wiring of `ptxray prepare`: DICOMs (folder or S3) -> the decode-once Parquet cache.

Only the wiring is here. What a row holds and how the index, folds and summary are built is plain
code in `ptxray.cache`, tested without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any, Iterator, Sequence

import cv2
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ptxray import cache as cache_mod
from ptxray import storage
from ptxray.config import Config
from ptxray.masks import read_labels

log = logging.getLogger("ptxray")


def init_ray(address: str = "", **kwargs: Any) -> bool:
    """Connect to Ray; returns True when this call started it (so the caller shuts it down).

    "" means: inside a Ray job (the job supervisor sets RAY_ADDRESS) join that cluster, otherwise
    start an embedded local Ray. We never attach to a cluster nobody asked for: a bare
    `ray.init()` would join any cluster found on this machine.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        # With the dashboard (on 127.0.0.1 only): it serves the State API that Ray Train's
        # placement-group cleaner polls; without it a stopped trial's resources are never freed.
        kwargs.setdefault("include_dashboard", True)
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        # Ray Train's placement-group cleaner (like any State API call made without an address)
        # finds "the" cluster by scanning this machine's processes; with a second Ray instance
        # running here (another user's, a test's, `ptxray cluster up`) that scan fails with "Found
        # multiple active Ray instances", the cleaner's thread dies, and an ASHA-stopped trial's
        # placement group (its CPUs) is never released: the next trial waits forever. So every
        # process of this Ray inherits RAY_API_SERVER_ADDRESS = its own dashboard, which those
        # calls use first. Inherited, not set by a job-level runtime_env: workers of a runtime_env
        # are new processes, so Ray's prestarted workers would idle while the first tasks waited
        # ~1 s for workers of their own (a tenth of a 2,000-image prepare on 2 cores).
        port = kwargs.setdefault("dashboard_port", _free_port())
        with _environ(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}"):
            ray.init(address="local", **kwargs)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # all interfaces: a port someone holds on any address is not free for us
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """os.environ with `values` for the block (what the processes started in it inherit), then as before:
    this driver's own later clients (a `ray job submit` to another cluster) must not inherit it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_session(address: str = "", **kwargs: Any) -> Iterator[None]:
    """`init_ray` for the duration of a block; shuts Ray down only if this block started it."""
    started = init_ray(address, **kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _decode_batch(
    batch: pa.Table, fs, labels, pre, rle_scheme: str, unlabeled: str, display_prefix: str, colour: str = "reject"
) -> pa.Table:
    """One prepare task: read the batch's files (`path` column) from `fs` and turn each into a
    cache row; a file that cannot be read is quarantined with the reason, like a bad DICOM."""
    # One image at a time per task: Ray runs one task per CPU, and OpenCV's default pool (a thread
    # per core in every worker) would only make the workers' threads fight for the same cores.
    cv2.setNumThreads(1)
    paths = batch.column("path").to_pylist()
    buffers = cache_mod.PixelBuffers(len(paths), pre)
    rows = []
    for i, (shown, data, reason) in enumerate(cache_mod.read_listed_files(fs, paths, display_prefix)):
        if data is None:
            rows.append(cache_mod.quarantine_row(shown, reason))
        else:
            rows.append(cache_mod.build_row(data, shown, labels, pre, rle_scheme, unlabeled, colour, out=buffers.slots(i)))
    return cache_mod.rows_to_table(rows)


def prepare_tasks(n_files: int, images_per_task: int, cpus: float) -> int:
    """How many read -> decode -> write tasks `prepare` runs: about `images_per_task` images each,
    rounded up to a whole number of rounds over the CPUs so that no CPU idles in the last round."""
    if n_files <= 0:
        return 0
    cpus = max(1, int(cpus))
    tasks = -(-n_files // max(1, images_per_task))
    return min(n_files, -(-tasks // cpus) * cpus)


def prepare(cfg: Config, *, images: str, labels: str, cache: str, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the cache for these inputs; returns the summary (also saved as JSON).

    Bad files never stop the run: each becomes a quarantine entry with its path and reason. An
    object store that fails (unreachable, no credentials, no bucket) stops it with a one-line
    `storage.StorageError` naming the object and the cause; so does a folder without DICOMs
    (FileNotFoundError).
    """
    with storage.s3_errors(images):
        return _prepare(cfg, images=images, labels=labels, cache=cache, force=force)


def _prepare(cfg: Config, *, images: str, labels: str, cache: str, force: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    fs, paths, listing = cache_mod.list_dicoms(images)
    if not paths:
        raise FileNotFoundError(f"{images}: no DICOM files (*.dcm, *.dicom) in this folder or prefix")
    storage.check_bucket(cache)
    label_index = read_labels(labels, scheme=cfg.data.rle_scheme)
    key = cache_mod.cache_key(cfg, listing, cache_mod.labels_sha256(labels))
    cache_dir = storage.join(cache, key)
    manifest = None if force else cache_mod.read_manifest(cache_dir)
    if manifest is not None:
        summary = dict(manifest["summary"], reused=True, cache=cache_dir, seconds=round(time.perf_counter() - t0, 2))
        log.info("cache %s is complete: reusing it, nothing decoded", cache_dir)
        return summary

    _remove_unfinished_attempts(cache_dir)
    parts = cache_mod.new_parts_id()
    parts_uri = storage.join(cache_dir, parts)
    out_fs, out_path = storage.filesystem_and_path(storage.join(parts_uri, "data"))
    display_prefix = "s3://" if images.startswith(("s3://", "s3a://")) else ""

    tasks = prepare_tasks(len(paths), cfg.compute.prepare_batch_size, ray.cluster_resources().get("CPU", 1))
    light = _write_cache_rows(cfg, fs, paths, tasks, label_index, display_prefix, out_fs, out_path)
    prepared = cache_mod.build_index(light, label_index, cfg)

    idx_fs, idx_path = storage.filesystem_and_path(storage.join(parts_uri, "index.parquet"))
    with idx_fs.open_output_stream(idx_path) as f:
        pq.write_table(prepared.index, f)
    summary = dict(
        prepared.summary,
        images_uri=images,
        labels_uri=labels,
        key=key,
        preprocess=cfg.to_dict()["preprocess"],
        prepare_seconds=round(time.perf_counter() - t0, 2),
    )
    cache_mod.write_json(storage.join(parts_uri, "summary.json"), summary)
    # The manifest goes last: until it exists, no reader trusts anything under cache_dir.
    cache_mod.write_json(
        storage.join(cache_dir, "manifest.json"),
        {"format": cache_mod.CACHE_FORMAT_VERSION, "key": key, "parts": parts, "summary": summary, "created": time.time()},
    )
    return dict(summary, reused=False, cache=cache_dir, seconds=round(time.perf_counter() - t0, 2))


def _write_cache_rows(cfg: Config, fs, paths: list[str], tasks: int, labels, display_prefix: str, out_fs, out_path: str) -> pa.Table:
    """The parallel part of `prepare`: `tasks` Ray tasks, each reads a contiguous share of
    `paths` (the listing's order), turns the files into cache rows and writes them as one Parquet
    file, `part-NNNNN.parquet`; returns the light columns of all rows, in the listing's order.

    Plain Ray tasks, not a Ray Data pipeline: the files are listed already and each task is
    independent, so there is nothing for Ray Data's streaming executor to plan, and it cost more
    than it gave. Its CPU budget comes from a coordinator actor that it starts on first use: until
    that actor is up and answers, the budget is "0/0 CPU" and nothing runs (55 s before the first
    task on the demo's freshly started head, 1-3 s in a fresh embedded Ray); inside a placement
    group, which sidesteps the actor, it ran 31 of 32 tasks one after the other on one worker.
    Its coordinator and stats actors also cost ~2 s of CPU per run. Here every task is submitted
    at once, and Ray runs as many as there are CPUs; no file bytes or pixels go through the object
    store, only each task's light columns come back."""
    out_fs.create_dir(out_path, recursive=True)
    bounds = [round(i * len(paths) / tasks) for i in range(tasks + 1)] if tasks else [0]
    labels_ref = ray.put(labels)  # one copy in the object store, not one per task
    part = ray.remote(num_cpus=1)(_prepare_part)
    refs = [
        part.remote(
            paths[a:b], fs, labels_ref, cfg.preprocess, cfg.data.rle_scheme, cfg.data.unlabeled, display_prefix,
            cfg.data.colour, out_fs, f"{out_path}/part-{i:05d}.parquet",
        )
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
        if b > a
    ]  # fmt: skip
    # While the tasks run, import what the driver needs after them: scikit-learn's fold splitter
    # (build_index) costs ~1.2 s of CPU to import, which at the end would leave a core idle.
    import sklearn.model_selection  # noqa: F401

    try:
        light = ray.get(refs)
    except BaseException:
        for ref in refs:  # a failed or interrupted prepare leaves no task running
            ray.cancel(ref, force=True)
        raise
    return pa.concat_tables(light) if light else cache_mod.rows_to_table([]).select(cache_mod.LIGHT_COLUMNS)


def _prepare_part(paths: list[str], fs, labels, pre, rle_scheme: str, unlabeled: str, display_prefix: str, colour: str,
                  out_fs, out_file: str) -> pa.Table:  # fmt: skip
    """One prepare task: rows of `paths` -> `out_file` (Parquet); returns their light columns."""
    table = _decode_batch(pa.table({"path": pa.array(paths, pa.string())}), fs, labels, pre, rle_scheme, unlabeled, display_prefix, colour)
    with out_fs.open_output_stream(out_file) as f:
        pq.write_table(table, f, **cache_mod.PARQUET_WRITE_OPTIONS)
    return table.select(cache_mod.LIGHT_COLUMNS)


def _remove_unfinished_attempts(cache_dir: str) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_and_path(cache_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return
    for e in entries:
        if e.type == pafs.FileType.Directory and e.base_name.startswith("parts-"):
            log.info("removing unfinished cache attempt %s", e.path)
            fs.delete_dir(e.path)


def train_dataset(cache_uri: str, fold: int) -> "ray.data.Dataset":
    """Fold k's training rows as a Ray dataset, streamed from the cache (never from DICOMs).
    (Validation rows are read by each Train worker from the cache directly: see ptxray.ray_train.)"""
    c = cache_mod.Cache.open(cache_uri)
    train_ids, _ = c.split_ids(fold)
    fs, path = storage.filesystem_and_path(c.data_uri)
    from ray.data import DataContext
    from ray.data.expressions import col

    cols = ["image_id", "label", "channels", "size", "image", "mask"]
    # Ray 2.60's default Parquet reader (datasource V2) starts a pool of FooterReader actors on
    # every execution, i.e. every epoch of a streamed split: 1-3 s before the first rows and new
    # processes each time (measured: first batch 1.2-3.4 s vs 0.06-0.17 s on 2 cores). V1 lists
    # the files once, here on the driver, and each epoch then only runs read tasks. The flag is
    # read when the dataset is created. Projection and filter are pushed down into the Parquet
    # scan (one fused read task, no separate filter step).
    # No progress bars either: a streamed split runs once per epoch and its bars redraw every
    # second through the log monitor to the driver and `ray job submit` (7.7 MB of log for the
    # demo's 10 trials).
    ctx = DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False
    try:
        # A quarter CPU per read task: the reads are I/O and decompression, and with whole-CPU
        # reads the streams of this epoch and the next (plus the Train workers) can hold every
        # CPU of a small node while waiting on each other's backpressure, and nothing moves.
        ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=0.25)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved
    return ds.select_columns(cols).filter(expr=col("image_id").is_in(list(train_ids)))


def predict_files(
    predictor_cls: type,
    read_batch: Any,
    fs: Any,
    paths: Sequence[str],
    predictor_kwargs: dict[str, Any],
    batch_size: int,
    workers: int,
    device: str | None,
    address: str,
) -> list[pa.Table]:
    """`ptxray predict` on Ray Data: DICOM bytes read by tasks (`read_batch(batch of paths, fs,
    display_prefix)`: an unreadable file becomes an error row, where read_binary_files would fail the
    job), predicted by an actor pool of `predictor_cls(**predictor_kwargs)` (one actor per GPU, else
    up to 4 CPU actors); returns the prediction tables for the driver to gather."""
    if not paths:
        return []
    with ray_session(address):
        resources = ray.cluster_resources()
        use_gpu = resources.get("GPU", 0) >= 1 and device != "cpu"
        if use_gpu:
            pool = workers or int(resources["GPU"])
        else:
            # One CPU stays free for the read tasks that feed the actors.
            pool = workers or max(1, min(4, int(resources.get("CPU", 1)) - 1))
        ds = ray.data.from_items([{"path": p} for p in paths])
        ds = ds.map_batches(
            read_batch,
            fn_kwargs=dict(fs=fs, display_prefix=predictor_kwargs.get("display_prefix", "")),
            batch_size=batch_size,
            batch_format="pyarrow",
        )
        ds = ds.map_batches(
            predictor_cls,
            fn_constructor_kwargs=dict(predictor_kwargs, device="cuda" if use_gpu else "cpu"),
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=1 if use_gpu else 0,
        )
        return [ray.get(ref) for ref in ds.to_arrow_refs()]
