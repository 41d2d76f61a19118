"""The Ray Data wiring of `ptxray prepare`: DICOMs (folder or S3) -> the decode-once Parquet cache.

Only the wiring is here. What a row holds and how the index, folds and summary are built is plain
code in `ptxray.cache`, tested without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator, Sequence

import pyarrow as pa
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
        ray.init(address="local", **kwargs)
    return True


@contextlib.contextmanager
def ray_session(address: str = "", **kwargs: Any) -> Iterator[None]:
    """`init_ray` for the duration of a block; shuts Ray down only if this block started it."""
    started = init_ray(address, **kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _decode_batch(batch: pa.Table, labels, pre, rle_scheme: str, unlabeled: str, display_prefix: str, colour: str = "reject") -> pa.Table:
    paths = batch.column("path").to_pylist()
    blobs = batch.column("bytes").to_pylist()
    rows = [
        cache_mod.build_row(data, display_prefix + path, labels, pre, rle_scheme, unlabeled, colour)
        for data, path in zip(blobs, paths)
    ]
    return cache_mod.rows_to_table(rows)


@contextlib.contextmanager
def _io_errors_not_retried() -> Iterator[None]:
    """Ray Data retries S3 network errors in three nested layers (opening a file, entering it,
    re-reading the stream), each up to 10 times with backoff up to 32 s: with the endpoint gone, a
    read task retries for hours and prepare sits at "0/?" saying nothing. pyarrow's own bounded
    retries (`storage.S3_MAX_ATTEMPTS`) are enough, so datasets built and run in this block retry
    nothing more."""
    import warnings

    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.retried_io_errors
    with warnings.catch_warnings():  # "substring matching will be deprecated": moot for no patterns
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.retried_io_errors = []
    try:
        yield
    finally:
        ctx.retried_io_errors = saved


def prepare(cfg: Config, *, images: str, labels: str, cache: str, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the cache for these inputs; returns the summary (also saved as JSON).

    Bad files never stop the run: each becomes a quarantine entry with its path and reason. An
    object store that fails (unreachable, no credentials, no bucket) stops it with a one-line
    `storage.StorageError` naming the object and the cause; so does a folder without DICOMs
    (FileNotFoundError).
    """
    with storage.s3_errors(images), _io_errors_not_retried():
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

    if paths:
        ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)
        ds = ds.map_batches(
            _decode_batch,
            batch_format="pyarrow",
            batch_size=cfg.compute.prepare_batch_size,
            fn_kwargs=dict(
                labels=label_index,
                pre=cfg.preprocess,
                rle_scheme=cfg.data.rle_scheme,
                unlabeled=cfg.data.unlabeled,
                display_prefix=display_prefix,
                colour=cfg.data.colour,
            ),
        )
        ds.write_parquet(out_path, filesystem=out_fs, compression="zstd")

    light = _read_light_columns(out_fs, out_path) if paths else cache_mod.rows_to_table([]).select(cache_mod.LIGHT_COLUMNS)
    prepared = cache_mod.build_index(light, label_index, cfg)
    import pyarrow.parquet as pq

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


def _read_light_columns(fs, path: str) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=cache_mod.LIGHT_COLUMNS)


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
