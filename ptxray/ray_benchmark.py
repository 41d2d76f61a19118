"""`ptxray benchmark` on Ray Tune: one trial per architecture.

Each trial runs `ptxray.benchmark.benchmark_architecture` in its own process (actors are not
reused, so each architecture's CPU memory peak is its own) with the resources it asks for:
one GPU (plus `cpus_per_trial` CPUs) when `use_gpu`, else `cpus_per_trial` CPUs. On a cluster
with several GPUs the architectures run in parallel, one per GPU. On CPUs, trials that share a
machine would compete for its cores and distort each other's throughput, so CPU trials run one
at a time unless `max_concurrent_trials` says otherwise.

Every trial reads the fold from the cache itself (a local folder the workers can see, or S3) and
reports one result: its row, as JSON under `result_json` (Tune's loggers flatten and stringify
nested values), plus a few scalars for Tune's own progress table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray import tune

from ptxray.benchmark import ArchSpec, BenchmarkSettings, benchmark_architecture, check_cache
from ptxray.config import Config, config_from_dict
from ptxray.runner import FoldData

log = logging.getLogger("ptxray")

_PROGRESS_KEYS = ("params_trainable", "gflops_per_image", "max_batch_size", "train_images_per_s", "infer_images_per_s", "val_dice")


def _trial(params: dict[str, Any], cfg: dict[str, Any], cache_uri: str, settings: dict[str, Any], specs: dict[str, dict]) -> None:
    if not logging.getLogger().handlers:  # a fresh worker process: show the benchmark's progress lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings_obj = BenchmarkSettings(**settings)
    if settings_obj.threads:
        torch.set_num_threads(settings_obj.threads)
    else:
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this trial was given instead.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
    spec = ArchSpec(**specs[params["arch"]])
    data = FoldData.load(cache_uri, settings_obj.fold)
    row = benchmark_architecture(config_from_dict(cfg), spec, data, settings_obj)
    progress = {k: float(row[k]) for k in _PROGRESS_KEYS if isinstance(row.get(k), (int, float))}
    tune.report({"result_json": json.dumps(row, default=str), "ok": row["status"] == "ok", **progress})


def run_trials(
    cfg: Config,
    cache_uri: str,
    specs: Sequence[ArchSpec],
    settings: BenchmarkSettings,
    *,
    storage_path: str,
    use_gpu: bool | None = None,
    cpus_per_trial: float = 1.0,
    max_concurrent_trials: int = 0,
    name: str = "",
) -> tuple[list[dict[str, Any]], str]:
    """One Tune trial per architecture: (result rows in the order of `specs`, errors included; a
    sentence saying how the trials ran, for the report).

    `use_gpu` None: one GPU per trial when the cluster has GPUs. `max_concurrent_trials` 0: as many
    as the GPUs allow, or one at a time on CPUs.
    """
    from ptxray.ray_train import storage_for_ray

    cfg = check_cache(cfg, cache_uri).with_overrides({"train.fold": settings.fold})
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and not settings.device.startswith("cpu")
    if use_gpu and settings.device.startswith("cpu"):
        raise ValueError("benchmark: --device cpu with GPU trials; drop one of them")
    by_name = {s.name: s.to_dict() for s in specs}
    trainable = tune.with_parameters(_trial, cfg=cfg.to_dict(), cache_uri=cache_uri, settings=settings.to_dict(), specs=by_name)
    resources = {"CPU": cpus_per_trial, "GPU": 1} if use_gpu else {"CPU": cpus_per_trial}
    concurrent = max_concurrent_trials or (0 if use_gpu else 1)  # 0: as many as the resources allow
    path, fs = storage_for_ray(storage_path)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"arch": tune.grid_search([s.name for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent or None, reuse_actors=False),
        run_config=tune.RunConfig(
            name=name or time.strftime("benchmark-%Y%m%d-%H%M%S"),
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
        ),
    )
    results = tuner.fit()
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        arch = r.config["arch"]
        if r.error is None and r.metrics and "result_json" in r.metrics:
            rows[arch] = json.loads(r.metrics["result_json"])
        else:
            error = str(r.error).strip().splitlines()[-1] if r.error else "the trial reported no result"
            rows[arch] = {"name": arch, "arch": by_name[arch]["arch"], "status": "error", "error": f"Ray trial failed: {error}"}
    mode = (
        f"Ray Tune, one trial (process) per architecture, {resources} each, "
        + (f"up to {concurrent} at a time" if concurrent else "as many at a time as the GPUs allow")
    )
    return [rows[s.name] for s in specs], mode


__all__ = ["run_trials"]
