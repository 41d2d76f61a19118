"""The Ray Train (V2) adapter: one fold trained by a `TorchTrainer` over the Parquet cache.

`make_trainer` wires the pieces; `train_loop_per_worker` is the code every worker runs. The
training itself is `engine.fit`: this module only turns Ray's dataset shards into batches,
DDP-wraps the model, and reports each epoch.

What a run does:
- Data: `ray_data.train_dataset(cache, train.fold)` is the fold's training rows as a Ray dataset,
  split across the workers with `streaming_split(equal=True)` (every rank the same number of
  rows, hence of DDP steps; up to world_size - 1 rows an epoch are left out). Each worker streams
  its shard with a local shuffle buffer, in a background thread that starts each stream one step
  early (`ShardStreams`): val while the epoch trains, the next epoch's train while it validates.
  The thread may run `compute.prefetch_mb` of batches ahead: a shard that fits is pulled in one
  go, which ends the epoch's Ray Data execution early (why, with the measurements: the README's
  design section, "Only training is streamed by Ray Data").
- Held shard (why: the README's design section, "A held shard instead of a new stream every
  epoch"): when the rank's rows fit `compute.hold_shard_mb` (and half the
  node's available memory per local worker), the first streamed epoch keeps them as uint8 and
  later epochs draw from memory: a fresh permutation per epoch (exact positive oversampling with
  `engine.epoch_indices`, as in-process), no Ray Data execution; its validation rows are kept
  too (read from the cache once, not every epoch). Each rank then keeps the rows of its first
  split for the whole run (like a DistributedSampler that does not reshuffle across ranks; each
  rank still reshuffles its own rows every epoch).
- Augmentation (`augment.where`, `runner.device_augment_for`): on the device (a GPU worker's
  default), the worker only reads, shuffles and hands over uint8 batches (`engine.uint8_batch`,
  pinned on CUDA) and `engine.fit` augments them on the GPU from a generator seeded by
  (train.seed, epoch, rank); on the host, the thread augments them (`runner.augmented_batch`,
  the same code as the in-process runner).
- Validation is not a Ray dataset: rank r reads every world_size-th image of the fold's
  validation ids straight from the cache (`Cache.iter_arrays`, a streamed pyarrow scan), so no
  image is dropped (ranks may hold different numbers of validation batches, which
  `engine.evaluate` supports since it runs the unwrapped model) and no second coordinator polls
  through the epoch. Validation sets are small next to training sets, and read once per epoch.
  Randomness: epoch e on rank r draws from `default_rng([train.seed, e, r])`, fit's epoch seed
  plus the rank, so ranks augment differently and a rank's stream is reproducible for a given
  block arrival order (which Ray Data's streaming does not fix: the streaming path is not
  bit-reproducible, unlike `ptxray.runner`).
- Metrics: `engine.train_epoch` / `engine.evaluate` all-reduce their sums over the process group,
  so every rank reports the same numbers. EVERY rank calls `ray.train.report` once per epoch
  (Ray's report is a barrier); rank 0 attaches the checkpoint.
- Checkpoints: rank 0 runs `fit` with a local temporary run folder; after each epoch its
  `checkpoints/last.pt` (full state), `checkpoints/best.pt` (best weights so far) and
  `config.yaml` / `metrics.jsonl` are reported as the directory checkpoint
  `checkpoint_epoch_<NNNN>`, NNNN the epoch as the log counts it ("epoch 3/6" -> 0003; the
  `epoch` field of the metrics is the 0-based index, 2). `CheckpointConfig(num_to_keep=2)`: Ray
  keeps the two most recent; the best weights survive inside each as best.pt.
- Failures: `FailureConfig(max_failures=compute.max_failures)`. When a worker dies, Ray restarts the
  whole worker group and `ray.train.get_checkpoint()` returns the latest reported checkpoint; every
  rank downloads it and passes its last.pt to `fit(resume_from=...)`, which continues at the next
  epoch with the optimizer, scheduler, early-stopping and RNG state of that checkpoint. A new
  `fit()` with the same `run_name` and storage finds the run's checkpoint snapshot and resumes too.
- Storage: `compute.storage_path` (or `storage_path=`) is a local folder or `s3://bucket/prefix`;
  S3 goes through `storage.s3_filesystem_from_env()` so custom endpoints (MinIO, moto) work.

Reported per epoch (plain python numbers; NaN allowed): every metric of `engine.fit` as float
(train_loss, train_dice, train_seconds, train_data_wait_seconds, val_dice, val_dice_pos, val_iou,
val_auc, val_empty_dice, val_loss, lr, seconds, ...), plus `epoch` (0-based int),
`epochs_completed` (int, = epoch + 1, monotone across restarts, a good Tune `time_attr`) and
`data_wait_fraction` (train_data_wait_seconds / train_seconds of this rank's train epoch),
`train_positive_fraction` and `train_held_rows` (this rank's rows held in memory; 0 = streaming).
`train_first_batch_seconds` is the wait for the epoch's first batch (the stream's start-up).

Positive oversampling (`train.pos_rate_start` / `pos_rate_end`): a streamed shard has no random
access, so instead of drawing indices (`engine.epoch_indices`) each worker swaps negatives for
earlier positives of its stream up to the epoch's rate (`engine.PositiveReservoir`); row counts,
and so DDP step counts, stay equal on every rank.

Test and benchmark hooks (never set in production) in `train_loop_config`:
- `debug_dir`: each rank writes `start-rank<R>-pid<PID>.json` when it starts and appends one JSON
  line per epoch (rank, pid, time, the process's CPU seconds so far, reported metrics) to
  `epochs-rank<R>.jsonl`.
- `debug_hold_after_epoch`: on an attempt that did not resume from a checkpoint, every rank waits
  after reporting that epoch until `<debug_dir>/release` exists (at most 300 s), so a test can kill
  a worker at a known point.
- `debug_null_model`: train `NullModel` instead of `cfg.model`, so a benchmark measures the data
  path (benchmarks/feed.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ptxray import ray_data
from ptxray.augment import build_augment
from ptxray.cache import Cache, table_to_arrays
from ptxray.config import Config, config_from_dict
from ptxray.engine import PositiveReservoir, epoch_indices, fit, positive_rate_for_epoch
from ptxray.models import build_model
from ptxray.runner import Prefetch, augmented_batch, batches_from_arrays, device_augment_for
from ptxray.storage import is_uri, s3_filesystem_from_env

log = logging.getLogger("ptxray")

CHECKPOINTS_TO_KEEP = 2
CHECKPOINT_FILES = ("checkpoints/last.pt", "checkpoints/best.pt", "config.yaml", "metrics.jsonl")
_INT_METRICS = ("epoch", "epochs_completed")


# ---- the trainer (driver side) ---------------------------------------------------------------
def storage_for_ray(storage_path: str) -> tuple[str, Any]:
    """(path, filesystem) for `RunConfig`: S3 through our endpoint-aware filesystem, locals absolute."""
    if not storage_path:
        raise ValueError("compute.storage_path: empty; give a local folder or s3://bucket/prefix")
    if is_uri(storage_path):
        scheme, rest = storage_path.split("://", 1)
        if scheme.lower() in ("s3", "s3a"):
            rest = rest.strip("/")
            if not rest:
                raise ValueError(f"compute.storage_path {storage_path!r}: an S3 URI needs a bucket")
            return rest, s3_filesystem_from_env()
        return storage_path, None  # gs://, file://, ...: pyarrow resolves them itself
    return str(Path(storage_path).expanduser().absolute()), None


# CPUs the Train workers leave for the Ray Data tasks that read the cache for them (a quarter CPU
# each: ray_data.train_dataset); the same one CPU ray_tune.default_max_concurrent_trials keeps free.
READ_CPUS_KEPT = 1.0


def worker_resources(cfg: Config, cluster_cpus: float | None = None) -> dict[str, float]:
    """`ScalingConfig.resources_per_worker`: {"CPU": compute.cpus_per_worker} (+ 1 GPU via use_gpu).

    `cpus_per_worker=0` reserves no whole CPU: right for GPU workers (Ray's own default), and for
    CPU workers on a small machine. Ray refuses an all-zero placement-group bundle, so a CPU worker
    then reserves a token 0.01 CPU.

    With `cluster_cpus` (the cluster's CPUs; `make_trainer` passes them): workers that fit the
    cluster but leave it less than `READ_CPUS_KEPT` free would starve Ray Data's read tasks, and
    the run would wait for its data forever without an error (`train --ray` with 2 workers on a
    2-CPU machine). Each worker then reserves an equal share of the CPUs less one, with a warning
    that says how to choose instead. Workers that do not fit at all are left as asked: an
    autoscaling cluster adds nodes for them.
    """
    cpus = float(cfg.compute.cpus_per_worker)
    if cpus < 0:
        raise ValueError(f"compute.cpus_per_worker: must be >= 0, got {cfg.compute.cpus_per_worker}")
    if cpus == 0 and not cfg.compute.use_gpu:
        cpus = 0.01
    n = cfg.compute.num_workers
    if cluster_cpus is not None and n >= 1 and cluster_cpus - READ_CPUS_KEPT < n * cpus <= cluster_cpus:
        share = max(0.01, math.floor(100 * (cluster_cpus - READ_CPUS_KEPT) / n) / 100)
        log.warning(
            "compute.num_workers=%d x compute.cpus_per_worker=%g would hold %g of the cluster's %g CPUs, leaving less "
            "than %g for the Ray Data tasks that read the cache for them: they would never start and training would "
            "wait forever. Each worker reserves %g CPU instead (Ray's booking; the workers still compute). To choose "
            "yourself: --set compute.cpus_per_worker=0 (no reservation), fewer workers, or more CPUs "
            "(ptxray cluster up --num-cpus N)",
            n, cfg.compute.cpus_per_worker, n * cpus, cluster_cpus, READ_CPUS_KEPT, share,
        )  # fmt: skip
        cpus = share
    return {"CPU": cpus}


def _check_cache_channels(cfg: Config, cache_uri: str) -> None:
    channels = (Cache.open(cache_uri).manifest.get("summary") or {}).get("preprocess", {}).get("channels")
    if channels is not None and len(channels) != cfg.model.in_channels:
        raise ValueError(
            f"{cache_uri}: the cache has {len(channels)} channels {list(channels)} but model.in_channels is "
            f"{cfg.model.in_channels}; prepare a cache with preprocess.channels={list(cfg.preprocess.channels)}"
        )


def make_trainer(
    cfg: Config,
    cache_uri: str,
    *,
    run_name: str,
    storage_path: str | None = None,
    callbacks: Sequence = (),
) -> TorchTrainer:
    """A TorchTrainer for fold `cfg.train.fold` of the cache; `run_name` names its storage folder.

    Give the same `run_name` (and storage) to a restarted run so it resumes from its checkpoints.
    `storage_path` overrides `cfg.compute.storage_path`. `callbacks` go to `RunConfig(callbacks=...)`
    (e.g. Tune's `TuneReportCallback`).
    """
    if not run_name or "/" in run_name:
        raise ValueError(f"make_trainer: run_name must be a non-empty folder name, got {run_name!r}")
    compute = cfg.compute
    if compute.num_workers < 1:
        raise ValueError(
            f"compute.num_workers: a TorchTrainer needs at least 1 worker, got {compute.num_workers} "
            "(0 trains inside each Tune trial's own process: ptxray kfold / jobs/kfold.py)"
        )
    _check_cache_channels(cfg, cache_uri)
    cluster_cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    train_ds = ray_data.train_dataset(cache_uri, cfg.train.fold)
    path, filesystem = storage_for_ray(storage_path or compute.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "cache": cache_uri},
        torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=compute.num_workers,
            use_gpu=compute.use_gpu,
            resources_per_worker=worker_resources(cfg, cluster_cpus),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=compute.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            callbacks=list(callbacks) or None,
        ),
        datasets={"train": train_ds},
        # streaming_split(equal=True): DDP needs the same number of steps on every rank
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run_fold(cfg: Config, cache_uri: str, *, run_name: str, storage_path: str | None = None) -> "ray.train.Result":
    """Train one fold on Ray Train and return its Result (`result.checkpoint` holds last.pt/best.pt)."""
    return make_trainer(cfg, cache_uri, run_name=run_name, storage_path=storage_path).fit()


def uri_of_ray_path(path: str, storage_path: str) -> str:
    """A path Ray reports for storage under `storage_path` as ptxray's URI: on S3 Ray gives
    `bucket/key` (its filesystem is ours), which becomes `s3://bucket/key`."""
    scheme = storage_path.split("://", 1)[0].lower() if is_uri(storage_path) else ""
    if scheme in ("s3", "s3a") and not is_uri(str(path)):
        return "s3://" + str(path).lstrip("/")
    return str(path)


def fold_outcome(result: "ray.train.Result", storage_path: str) -> tuple[str, dict[str, Any], str | None]:
    """(run folder, the best epoch's metrics, its best.pt) of a finished `run_fold` Result: what
    in-process `ptxray train` reports. The last reported checkpoint holds the best weights so far as
    best.pt with their epoch's metrics; without one (no finite monitored value) it is ({}, last.pt)."""
    from ptxray.checkpoint import CheckpointError, load_checkpoint
    from ptxray.storage import join

    run_dir = uri_of_ray_path(result.path, storage_path)
    if result.checkpoint is None:
        return run_dir, {}, None
    folder = uri_of_ray_path(result.checkpoint.path, storage_path)
    best = join(folder, "checkpoints", "best.pt")
    try:
        return run_dir, dict(load_checkpoint(best).get("metrics") or {}), best
    except CheckpointError:
        return run_dir, {}, join(folder, "checkpoints", "last.pt")


# ---- the worker loop -------------------------------------------------------------------------
def _shard_batches(
    shard: Any,
    batch_size: int,
    pipeline: Any,
    rng: np.random.Generator,
    oversample: tuple[PositiveReservoir, float] | None,
    counts: dict[str, int],
    pin: bool = False,
    keep: Callable[[list[tuple[np.ndarray, np.ndarray]]], None] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """uint8 training batches from a Ray Data shard of cache rows: shuffled, augmented on the host
    when `pipeline` is given, with negatives swapped for earlier positives up to the target rate
    when `oversample` = (reservoir, rate); `counts` accumulates the rows and positives streamed.
    `keep`, when given, receives the streamed (images, masks) chunks once the shard has been read
    to its end (not when the consumer stops early)."""
    # A few batches of rows: shuffles within and across the blocks streaming in, bounded memory.
    shuffle = dict(local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=int(rng.integers(2**31)))
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2, **shuffle):
        images, masks, _ = table_to_arrays(table)  # (B, C, S, S), (B, S, S)
        if keep is not None:
            kept.append((images, masks))  # fresh arrays: the reservoir and augmentation copy
        if oversample is not None:
            images, masks = oversample[0].apply(images, masks, oversample[1], rng)
        counts["rows"] += len(masks)
        counts["positive"] += int(masks.reshape(len(masks), -1).any(axis=1).sum())
        yield augmented_batch(images, masks, pipeline, rng, pin=pin)
    if keep is not None:
        keep(kept)


def hold_shard(cfg: Config, rows: int, local_world_size: int) -> bool:
    """Whether a worker keeps its `rows` training rows in memory after the first epoch: they must
    fit `compute.hold_shard_mb` and half the node's available memory shared by its local workers
    (the rows are joined once at the end of the epoch that reads them: twice their size then)."""
    if cfg.compute.hold_shard_mb <= 0 or rows <= 0:
        return False
    from ptxray.batchsize import available_memory_bytes

    s = cfg.preprocess.image_size_px
    shard_bytes = rows * (cfg.model.in_channels + 1) * s * s
    room = available_memory_bytes() // (4 * max(1, local_world_size))
    return shard_bytes <= min(cfg.compute.hold_shard_mb * 2**20, room)


class ShardStreams:
    """The train and val batch streams of one worker, each started one step before it is needed.

    `train(epoch)` returns the epoch's train stream (started during the previous validation when
    possible) and starts this epoch's val stream; `val()` returns that and starts the next epoch's
    train stream. Every rank does the same, so the streaming splits' per-epoch barriers line up.
    With `hold`, the first train stream read to its end is kept (`held_rows`) and later epochs
    draw from it instead of the Ray dataset shard (module doc); so are the validation rows, which
    are then read from the cache once instead of every epoch.

    Randomness of epoch e on rank r: `default_rng([train.seed, e, r])` (fit's epoch generator is
    `default_rng([train.seed, e])`; the rank is added so ranks differ, and the stream can be built
    before fit asks for it). It seeds the shuffle (buffer or permutation), then host augmentation.
    """

    def __init__(
        self,
        cfg: Config,
        train_shard: Any,
        val_rows: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, list[str]]]],
        rank: int,
        depth: int = 4,
        natural_positive_rate: float = 0.0,
        *,
        host_augment: bool = True,
        pin: bool = False,
        hold: bool = False,
    ):
        """`val_rows()` yields this rank's validation (images, masks, ids) chunks, once per call;
        `depth` is how many train batches the background thread may build ahead; `host_augment`:
        augment in the thread (else hand over uint8 for the device); `pin`: pinned batches."""
        self._cfg, self._train_shard, self._val_rows = cfg, train_shard, val_rows
        oversampling = cfg.train.pos_rate_start > 0 or cfg.train.pos_rate_end > 0
        self.reservoir = PositiveReservoir(natural_positive_rate) if oversampling else None
        self._train_counts: dict[int, dict[str, int]] = {}
        self._rank, self._depth = rank, depth
        self._host_augment, self._pin, self._hold = host_augment, pin, hold
        self._held: tuple[np.ndarray, np.ndarray] | None = None  # (images (N, C, S, S), masks (N, S, S))
        self._held_val: list[tuple[np.ndarray, np.ndarray]] | None = None  # validation chunks
        self._epoch = -1
        self._train: Prefetch | None = None
        self._next_train: tuple[int, Prefetch] | None = None
        self._val: Prefetch | None = None

    @property
    def held_rows(self) -> int:
        """Rows held in memory (0 while streaming)."""
        return 0 if self._held is None else len(self._held[1])

    def _keep(self, chunks: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if chunks and self._held is None:
            self._held = (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))
            log.info("rank %d: holding its %d training rows in memory from now on", self._rank, len(self._held[1]))

    def _start_train(self, epoch: int) -> Prefetch:
        rng = np.random.default_rng([self._cfg.train.seed, epoch, self._rank])
        t = self._cfg.train
        # One pipeline per stream: augment re-seeds its pipeline, so two threads must not share one.
        pipeline = build_augment(self._cfg.augment.recipe, self._cfg.preprocess.image_size_px) if self._host_augment else None
        counts = self._train_counts.setdefault(epoch, {"rows": 0, "positive": 0})
        if self._held is not None:
            images, masks = self._held

            def from_memory() -> Iterator[dict[str, torch.Tensor]]:
                labels = masks.reshape(len(masks), -1).any(axis=1)
                idx = epoch_indices(labels, epoch, t.epochs, t.pos_rate_start, t.pos_rate_end, rng)
                counts["rows"], counts["positive"] = len(idx), int(labels[idx].sum())
                return batches_from_arrays(images, masks, idx, t.batch_size, pipeline, rng, pin=self._pin)

            return Prefetch(from_memory, self._depth, f"train-{epoch}")
        oversample = None
        if self.reservoir is not None:
            oversample = (self.reservoir, positive_rate_for_epoch(epoch, t.epochs, t.pos_rate_start, t.pos_rate_end))
        keep = self._keep if self._hold else None
        return Prefetch(
            lambda: _shard_batches(self._train_shard, t.batch_size, pipeline, rng, oversample, counts, self._pin, keep),
            self._depth,
            f"train-{epoch}",
        )

    def positive_fraction(self, epoch: int) -> float:
        """Fraction of positive images among the train rows this rank streamed in `epoch`."""
        counts = self._train_counts.get(epoch) or {"rows": 0}
        return counts["positive"] / counts["rows"] if counts["rows"] else math.nan

    def _val_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._held_val is not None:
            yield from self._held_val
            return
        kept = []
        for images, masks, _ in self._val_rows():
            if self._hold:
                kept.append((images, masks))
            yield images, masks
        if self._hold:  # read to its end: later epochs validate from memory
            self._held_val = kept

    def _start_val(self) -> Prefetch:
        return Prefetch(lambda: (augmented_batch(i, m, pin=self._pin) for i, m in self._val_chunks()), 4, "val")

    def train(self, epoch: int) -> Prefetch:
        self._epoch = epoch
        if self._next_train is not None and self._next_train[0] == epoch:
            self._train = self._next_train[1]
        else:  # first epoch of this worker group (fresh or resumed)
            if self._next_train is not None:
                self._next_train[1].close()
            self._train = self._start_train(epoch)
        self._next_train = None
        if self._val is not None:
            self._val.close()
        self._val = self._start_val()
        return self._train

    def val(self) -> Prefetch:
        if self._train is not None:
            self._train.close()  # a no-op when consumed; stops it when max_steps_per_epoch cut it
        stream = self._val if self._val is not None else self._start_val()
        self._val = None
        if 0 <= self._epoch and self._epoch + 1 < self._cfg.train.epochs:
            self._next_train = (self._epoch + 1, self._start_train(self._epoch + 1))
        return stream

    def close(self) -> None:
        for stream in (self._train, self._val, self._next_train[1] if self._next_train else None):
            if stream is not None:
                stream.close()


def report_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """`engine.fit`'s epoch metrics as Ray reports them: plain floats (NaN for None), `epoch` and
    `epochs_completed` as ints, plus `data_wait_fraction`."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in _INT_METRICS:
            out[key] = int(value)
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            out[key] = float(value)
        elif value is None:
            out[key] = math.nan
    out["epochs_completed"] = int(metrics["epoch"]) + 1
    seconds = out.get("train_seconds", 0.0)
    out["data_wait_fraction"] = out.get("train_data_wait_seconds", math.nan) / seconds if seconds > 0 else math.nan
    return out


def _write_json_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def stage_checkpoint(run_dir: Path, into: Path) -> None:
    """Copy the run folder's `CHECKPOINT_FILES` (those that exist) into `into`: what an epoch reports."""
    for rel in CHECKPOINT_FILES:
        src = run_dir / rel
        if src.exists():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / rel)


def report_epoch(
    report: dict[str, Any],
    run_dir: Path | None,
    work: Path,
    report_fn: Callable[..., None],
    checkpoint_cls: Any,
    **report_kwargs: Any,
) -> None:
    """Report one epoch to Ray, the one way both training paths do it: with the run folder's
    checkpoint files staged in a temporary folder under `work` (`report_fn(report,
    checkpoint=checkpoint_cls.from_directory(tmp), **report_kwargs)`), or, with `run_dir` None
    (DDP ranks other than 0), the metrics alone. `report_fn` / `checkpoint_cls`: ray.train.report /
    ray.train.Checkpoint in a Ray Train worker, tune.report / tune.Checkpoint in a Tune trial."""
    if run_dir is None:
        report_fn(report)
        return
    with tempfile.TemporaryDirectory(prefix="ptxray-ckpt-", dir=work) as tmp:
        stage_checkpoint(run_dir, Path(tmp))
        report_fn(report, checkpoint=checkpoint_cls.from_directory(tmp), **report_kwargs)


def restore_checkpoint(checkpoint: Any, run_dir: Path) -> Path:
    """Download a reported checkpoint into the run folder `fit` continues in; returns its
    `checkpoints/last.pt`.

    Into the run folder itself, not beside it: its `checkpoints/best.pt` (the best weights so far)
    must be there for `stage_checkpoint` to report again. A resumed run whose later epochs never
    beat the restored best would otherwise report checkpoints without best.pt, and once Ray drops
    the older ones (num_to_keep) the fold's best weights are gone. (`fit` keeps a best.pt it finds
    when it resumes; it deletes one only on a fresh start.)
    """
    local = Path(checkpoint.to_directory(str(run_dir)))
    last = local / "checkpoints" / "last.pt"
    if not last.exists():
        raise FileNotFoundError(f"{checkpoint.path}: the reported checkpoint has no checkpoints/last.pt to resume from")
    return last


class NullModel(torch.nn.Module):
    """A model that costs next to nothing (one weight times the first channel), for measuring the
    data path: it follows the model contract (seg_logits (B, 1, H, W), cls_logits (B, 1))."""

    input_multiple = 1
    min_input_px = 1

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg = x[:, :1] * self.weight  # (B, 1, H, W)
        return seg, seg.mean(dim=(2, 3))  # (B, 1, H, W), (B, 1)


class DebugHooks:
    """The test hooks of a train loop config (`debug_dir`, `debug_hold_after_epoch`; module doc),
    shared by Ray Train workers and trials that train in their own process (ptxray.ray_tune)."""

    def __init__(self, config: dict[str, Any], rank: int, resumed: bool):
        self.dir = Path(config["debug_dir"]) if config.get("debug_dir") else None
        self.hold_after = config.get("debug_hold_after_epoch")
        self.null_model = bool(config.get("debug_null_model"))
        self.rank, self.resumed = rank, resumed

    def started(self) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        start = {"rank": self.rank, "pid": os.getpid(), "resumed": self.resumed,
                 "threads": torch.get_num_threads(), "time": time.time()}  # fmt: skip
        (self.dir / f"start-rank{self.rank}-pid{os.getpid()}.json").write_text(json.dumps(start))

    def epoch_reported(self, epoch: int, report: dict[str, Any], ended: float) -> None:
        if self.dir is None:
            return
        record = {"rank": self.rank, "pid": os.getpid(), "time": ended, "process_cpu_seconds": time.process_time(), "metrics": report}
        _write_json_line(self.dir / f"epochs-rank{self.rank}.jsonl", record)
        if self.hold_after is not None and epoch == int(self.hold_after) and not self.resumed:
            (self.dir / f"held-rank{self.rank}-pid{os.getpid()}").touch()
            deadline = time.time() + 300
            while not (self.dir / "release").exists() and time.time() < deadline:
                time.sleep(0.2)


def _resolve_auto_batch_size(cfg: Config, device: torch.device, n_train: int, ctx: Any) -> Config:
    """`train.batch_size: auto` -> the largest size that fits on every rank (their minimum: DDP ranks
    must take the same steps). CPU workers on one node share its memory budget."""
    if cfg.train.batch_size != "auto":
        return cfg
    from ptxray.batchsize import DEFAULT_CPU_MEMORY_FRACTION, available_memory_bytes, resolve_batch_size

    budget = None
    if device.type != "cuda":
        budget = int(DEFAULT_CPU_MEMORY_FRACTION * available_memory_bytes() / max(1, ctx.get_local_world_size()))
    resolved, _ = resolve_batch_size(cfg, device, n_train=n_train, memory_budget_bytes=budget)
    size = torch.tensor([resolved.train.batch_size], device=device if device.type == "cuda" else "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
    return resolved.with_overrides({"train.batch_size": int(size.item())})


def prefetch_depth(cfg: Config, batch_size: int) -> int:
    """Train batches the background thread may hold: `compute.prefetch_mb` of uint8 images and
    masks, at least 4."""
    s = cfg.preprocess.image_size_px
    batch_bytes = batch_size * (cfg.model.in_channels + 1) * s * s
    return max(4, int(cfg.compute.prefetch_mb * 2**20 // max(1, batch_bytes)))


def train_loop_per_worker(config: dict) -> None:
    """Run by every Ray Train worker: config = {"cfg": cfg.to_dict(), "cache": cache_uri} (+ debug keys)."""
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    work = Path(tempfile.mkdtemp(prefix=f"ptxray-rank{rank}-"))
    streams: ShardStreams | None = None
    try:
        resume_from = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            resume_from = restore_checkpoint(checkpoint, work / "run")  # rank 0's run_dir below
            log.info("rank %d: resuming from %s", rank, checkpoint.path)
        debug = DebugHooks(config, rank, resumed=checkpoint is not None)
        debug.started()

        cache = Cache.open(config["cache"])
        train_labels = cache.train_labels(cfg.train.fold)
        n_train = len(train_labels) // world_size  # rows per rank after the equal split
        cfg = _resolve_auto_batch_size(cfg, device, n_train, ctx)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = NullModel() if debug.null_model else build_model(cfg.model)
        if cfg.compute.channels_last:
            # Before DDP wraps it: DDP's buckets follow the parameters' layout at construction.
            model = model.to(device, memory_format=torch.channels_last)
        model = ray.train.torch.prepare_model(model)

        batch_size = cfg.train.batch_size
        my_val_ids = cache.split_ids(cfg.train.fold)[1][rank::world_size]
        device_augment = device_augment_for(cfg, device)
        streams = ShardStreams(
            cfg,
            ray.train.get_dataset_shard("train"),
            lambda: cache.iter_arrays(my_val_ids, batch_size),
            rank,
            depth=prefetch_depth(cfg, batch_size),
            natural_positive_rate=float(train_labels.mean()) if len(train_labels) else 0.0,
            host_augment=device_augment is None,
            pin=device.type == "cuda",
            hold=hold_shard(cfg, n_train + len(my_val_ids), ctx.get_local_world_size()),
        )

        def train_batches(epoch: int, rng: np.random.Generator) -> Iterator:
            # rng (fit's default_rng([seed, epoch])) is not drawn from: the stream may have been
            # started before this call, from the same seed material plus the rank.
            return iter(streams.train(epoch))

        def val_batches() -> Iterator:
            return iter(streams.val())

        steps = max(1, math.ceil(n_train / batch_size))  # for onecycle's plan
        run_dir = work / "run" if rank == 0 else None

        def on_epoch_end(epoch: int, metrics: dict[str, Any], last_path: str | None) -> None:
            ended = time.time()
            report = report_metrics(metrics)
            report["train_positive_fraction"] = streams.positive_fraction(epoch)
            report["train_held_rows"] = streams.held_rows
            report_epoch(
                report, run_dir, work, ray.train.report, ray.train.Checkpoint,
                checkpoint_dir_name=f"checkpoint_epoch_{epoch + 1:04d}",  # as the log counts
            )  # fmt: skip
            debug.epoch_reported(epoch, report, ended)

        fit(
            model,
            cfg,
            train_batches,
            val_batches,
            run_dir=run_dir,
            device=device,
            resume=False,
            resume_from=resume_from,
            on_epoch_end=on_epoch_end,
            steps_per_epoch=steps,
            device_augment=device_augment,
            augment_rank=rank,
        )
    finally:
        if streams is not None:
            streams.close()
        shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "CHECKPOINTS_TO_KEEP", "DebugHooks", "NullModel", "Prefetch", "ShardStreams", "fold_outcome", "hold_shard",
    "make_trainer", "prefetch_depth", "report_epoch", "report_metrics", "restore_checkpoint", "run_fold", "stage_checkpoint",
    "storage_for_ray", "train_loop_per_worker", "uri_of_ray_path", "worker_resources", "READ_CPUS_KEPT",
]  # fmt: skip
