"""K-fold x hyperparameter grid experiments on Ray Tune, with ASHA per fold, resumable.

One experiment = `search.grid` crossed with the folds. Every trial is a Tune function trainable.
With `compute.num_workers` >= 1 it builds and fits a Ray Train `TorchTrainer` (Ray Train V2:
Train-in-Tune, not `Tuner(trainer)`), named after the Tune trial id so a restarted trial finds its
checkpoints. With `compute.num_workers: 0` (Ray Train's own convention for "no worker group") the
trial trains in its own process, like `ptxray train` in-process, and reports each epoch with its
checkpoint to Tune; a trial that dies is restarted by Tune from that checkpoint
(`compute.max_failures` times). That saves the eight actors a TorchTrainer starts per trial and
the Ray Data worker processes that feed its worker (what that costs, measured: the README's design
section, "Or no worker group at all").
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ptxray import storage
from ptxray.config import Config, config_from_dict
from ptxray.summary import TrialRecord, print_summary, summarize, write_summary

log = logging.getLogger("ptxray")

FOLD_KEY = "fold"


class PerFoldASHA(FIFOScheduler):
    """ASHA with one bracket set per fold value.

    A single ASHA compares every trial at a rung with every other trial there; across folds that
    mixes fold difficulty into the decision (an easy fold's mediocre config would beat a hard
    fold's good one). Delegating to one AsyncHyperBandScheduler per fold compares each trial only
    with the other configurations on its own fold.
    """

    def __init__(self, fold_key: str = FOLD_KEY, **asha_kwargs: Any):
        super().__init__()
        self._fold_key = fold_key
        self._asha_kwargs = asha_kwargs
        self._children: dict[Any, AsyncHyperBandScheduler] = {}
        self._search_properties: tuple[str | None, str | None] = (None, None)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._search_properties = (metric, mode)
        self._metric, self._mode = metric, mode
        for child in self._children.values():
            child.set_search_properties(metric, mode, **spec)
        return True

    def _child(self, trial) -> AsyncHyperBandScheduler:
        fold = trial.config.get(self._fold_key)
        if fold not in self._children:
            metric, mode = self._search_properties
            kwargs = dict(self._asha_kwargs)
            kwargs.setdefault("metric", metric)
            kwargs.setdefault("mode", mode)
            self._children[fold] = AsyncHyperBandScheduler(**kwargs)
        return self._children[fold]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._child(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._child(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._child(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._child(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "PerFoldASHA: " + "; ".join(f"fold {k}: {c.debug_string()}" for k, c in sorted(self._children.items()))


def max_epochs(cfg: Config) -> int:
    return cfg.search.max_epochs or cfg.train.epochs


def folds_of(cfg: Config) -> list[int]:
    return list(cfg.search.folds) if cfg.search.folds else list(range(cfg.data.num_folds))


def param_space(cfg: Config) -> dict[str, Any]:
    """The grid crossed with the folds. Keys are dotted config keys; values must be lists."""
    space: dict[str, Any] = {FOLD_KEY: tune.grid_search(folds_of(cfg))}
    for key, values in cfg.search.grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"search.grid.{key}: expected a non-empty list of values, got {values!r}")
        cfg.with_overrides({key: values[0]})  # fails early, naming the key, if it is not a config key
        space[key] = tune.grid_search(list(values))
    return space


def trial_config(base: Config, trial_params: dict[str, Any]) -> Config:
    overrides = {k: v for k, v in trial_params.items() if k != FOLD_KEY}
    overrides["train.fold"] = int(trial_params[FOLD_KEY])
    overrides["train.epochs"] = max_epochs(base)
    return base.with_overrides(overrides)


TRAIN_RUNS_DIR = "train-runs"


def _train_storage(cfg: Config) -> str:
    """Where the TorchTrainer of each trial keeps its checkpoints: inside the experiment folder, so
    that the folder holds every checkpoint its summary names and can be copied or moved as one. An
    experiment started before that keeps its `<name>.train` folder beside it, so it still resumes."""
    from ptxray import storage

    legacy = cfg.compute.storage_path.rstrip("/") + f"/{cfg.search.name}.train"
    return legacy if storage.exists(legacy) else experiment_path(cfg) + "/" + TRAIN_RUNS_DIR


def _trainable(trial_params: dict[str, Any], base: dict[str, Any], cache_uri: str, debug: str | None = None) -> None:
    cfg = trial_config(config_from_dict(base), trial_params)
    trial_id = tune.get_context().get_trial_id()
    hooks = _debug_hooks(cfg, trial_id, debug)
    if cfg.compute.num_workers == 0:
        _train_in_trial(cfg, cache_uri, hooks)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from ptxray import ray_train

    trainer = ray_train.make_trainer(
        cfg, cache_uri, run_name=f"trial-{trial_id}", storage_path=_train_storage(cfg), callbacks=[TuneReportCallback()]
    )
    trainer.train_loop_config.update(hooks)
    trainer.fit()


def _train_in_trial(cfg: Config, cache_uri: str, debug_config: dict[str, Any]) -> None:
    """`compute.num_workers: 0`: fit the fold here (`runner.train_fold`: the fold's arrays in memory,
    exact positive oversampling), reporting every epoch to Tune with its checkpoint (last.pt,
    best.pt, config.yaml, metrics.jsonl); a restarted trial continues from Tune's latest one."""
    from ptxray import ray_train, runner

    work = Path(tempfile.mkdtemp(prefix="ptxray-trial-"))
    try:
        run_dir = work / "run"
        checkpoint = tune.get_checkpoint()
        resume_from = None
        if checkpoint is not None:
            # Into run_dir: the restored best.pt is reported again with every later epoch.
            resume_from = ray_train.restore_checkpoint(checkpoint, run_dir)
            log.info("trial resumes from %s", checkpoint.path)
        debug = ray_train.DebugHooks(debug_config, 0, resumed=checkpoint is not None)
        debug.started()

        def on_epoch_end(epoch: int, metrics: dict[str, Any], last_path: str | None) -> None:
            ended = time.time()
            report = ray_train.report_metrics(metrics)
            ray_train.report_epoch(report, run_dir, work, tune.report, tune.Checkpoint)
            debug.epoch_reported(epoch, report, ended)

        runner.train_fold(cfg, cache_uri, run_dir, resume=False, resume_from=resume_from, on_epoch_end=on_epoch_end)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _debug_hooks(cfg: Config, trial_id: str, spec: str | None) -> dict[str, Any]:
    """Test hook, never set in production: `spec` is the JSON of `run_experiment`'s `debug_hooks`,
    {"debug_dir": D, "fold": k, "hold_after_epoch": e}; it hands ray_train's debug hooks to the
    trials of fold k (debug files under D/<trial id>), so a test can kill a job driver or a trial at
    a known point. Library code reads no environment for it: `ptxray.cli` (what a `ray job submit`
    test reaches) reads its `DEBUG_ENV` once and passes it to `run_experiment`."""
    if not spec:
        return {}
    hooks = json.loads(spec)
    if "fold" in hooks and int(hooks["fold"]) != cfg.train.fold:
        return {}
    out: dict[str, Any] = {"debug_dir": str(Path(hooks["debug_dir"]) / trial_id)}
    if hooks.get("hold_after_epoch") is not None:
        out["debug_hold_after_epoch"] = int(hooks["hold_after_epoch"])
    return out


def default_max_concurrent_trials(cfg: Config) -> int:
    """How many trials fit the cluster at once, given what each trial asks for (`trial_resources`)."""
    resources = ray.cluster_resources()
    if cfg.compute.use_gpu:
        per_trial, available = max(cfg.compute.num_workers, 1), resources.get("GPU", 0)
    elif cfg.compute.num_workers == 0:
        # The trial trains in its own process and reads the cache itself: no Ray Data tasks.
        per_trial, available = max(cfg.compute.cpus_per_worker, 1), resources.get("CPU", 0)
    else:
        # One CPU stays free for the Ray Data tasks that stream the cache into the workers: with
        # every CPU held by Train workers, those reads never schedule and all trials stall.
        # Workers that reserve no CPU (cpus_per_worker=0) still compute on one: count one each.
        per_trial = cfg.compute.num_workers * max(cfg.compute.cpus_per_worker, 1)
        available = resources.get("CPU", 0) - 1
    return max(1, math.floor(available / per_trial))


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial's own process reserves. A TorchTrainer trial only drives its workers, which hold
    the CPUs/GPUs (Tune refuses an empty request, hence a token CPU); a trial that trains itself
    (num_workers 0) holds `cpus_per_worker` CPUs (so Ray sets its OMP/torch threads) and the GPU."""
    if cfg.compute.num_workers > 0:
        return {"CPU": 0.01}
    out = {"CPU": float(cfg.compute.cpus_per_worker) or 0.01}
    if cfg.compute.use_gpu:
        out["GPU"] = 1.0
    return out


def build_scheduler(cfg: Config) -> TrialScheduler:
    if not cfg.search.early_stop:
        return FIFOScheduler()
    return PerFoldASHA(
        time_attr="training_iteration",
        max_t=max_epochs(cfg),
        grace_period=cfg.search.grace_period,
        reduction_factor=cfg.search.reduction_factor,
    )


def _callbacks() -> list:
    callbacks = []
    if os.environ.get("MLFLOW_TRACKING_URI"):
        try:
            from ray.air.integrations.mlflow import MLflowLoggerCallback
        except ImportError as e:  # mlflow is optional
            raise RuntimeError(f"MLFLOW_TRACKING_URI is set but MLflow is not importable ({e}); pip install mlflow") from None
        callbacks.append(MLflowLoggerCallback(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], experiment_name="ptxray", save_artifact=False))
    return callbacks


def experiment_path(cfg: Config) -> str:
    return cfg.compute.storage_path.rstrip("/") + "/" + cfg.search.name


# ptxray's own record of what an experiment was started with, beside Tune's state in its folder.
SETTINGS_FILE = "ptxray-experiment.json"


def _check_resume_limit(path: str, requested: int | None) -> None:
    """Refuse a --max-concurrent-trials that a resumed experiment would silently ignore.

    Ray 2.60's Tuner.restore takes no TuneConfig: the search algorithm comes back pickled with the
    experiment, and Tune's resume then restores its saved state, max_concurrent included. Trials
    already created are requeued whatever any limit says (ray-project/ray#40652). Ray keeps restore
    for fault tolerance without changes to the experiment (ray-project/ray#33495), so rather than
    patch its internals, a different limit is refused here, naming the one in force.
    """
    if not requested:
        return
    try:
        with storage.open_input_stream(storage.join(path, SETTINGS_FILE)) as f:
            saved = json.loads(f.read()).get("max_concurrent_trials")
    except (FileNotFoundError, OSError, ValueError):
        saved = None
    if requested == saved:
        return
    now = f"runs {saved} trial(s) at a time, as it was started" if saved else "was started before ptxray recorded its limit"
    raise ValueError(
        f"{path}: this experiment {now}; --max-concurrent-trials {requested} cannot change that on resume "
        "(Ray Tune's Tuner.restore keeps the experiment's search settings and takes no TuneConfig). Resume "
        "without --max-concurrent-trials, or start a new experiment under another search.name."
    )


def run_experiment(
    cfg: Config,
    cache_uri: str,
    *,
    max_concurrent_trials: int | None = None,
    print_table: bool = True,
    debug_hooks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment named `search.name`; returns the summary (also saved and printed).
    `debug_hooks`: a test hook, see `_debug_hooks`."""
    from ptxray.ray_train import storage_for_ray, uri_of_ray_path
    from ptxray.storage import relative_to_run

    storage_path, fs = storage_for_ray(cfg.compute.storage_path)
    path = experiment_path(cfg)
    exp_dir = storage_path.rstrip("/") + "/" + cfg.search.name  # as Ray sees it (bucket/key on S3)
    debug = json.dumps(debug_hooks) if debug_hooks else None
    trainable = tune.with_parameters(_trainable, base=cfg.to_dict(), cache_uri=cache_uri, debug=debug)
    trainable = tune.with_resources(trainable, trial_resources(cfg))
    space = param_space(cfg)
    if tune.Tuner.can_restore(exp_dir, storage_filesystem=fs):
        _check_resume_limit(path, max_concurrent_trials)
        log.info("resuming experiment %s: finished trials are kept, unfinished ones continue from their checkpoints "
                 "(as many at a time as when it was started)", path)
        tuner = tune.Tuner.restore(
            exp_dir, trainable, resume_unfinished=True, resume_errored=True, param_space=space, storage_filesystem=fs
        )
    else:
        limit = max_concurrent_trials or default_max_concurrent_trials(cfg)
        storage.write_bytes_atomic(storage.join(path, SETTINGS_FILE), json.dumps({"max_concurrent_trials": limit}).encode())
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=cfg.search.metric,
                mode=cfg.search.mode,
                scheduler=build_scheduler(cfg),
                # Pair the folds: every fold of a configuration gets the same values. (The limit goes
                # here: Tune ignores TuneConfig.max_concurrent_trials for a SearchAlgorithm.)
                search_alg=BasicVariantGenerator(constant_grid_search=True, max_concurrent=limit),
            ),
            run_config=tune.RunConfig(
                name=cfg.search.name,
                storage_path=storage_path,
                storage_filesystem=fs,
                callbacks=_callbacks(),
                verbose=1,
                # Trials that train in their own process checkpoint through Tune: a dead trial
                # restarts from its latest checkpoint. (TorchTrainer trials retry inside Ray Train.)
                failure_config=tune.FailureConfig(max_failures=cfg.compute.max_failures if cfg.compute.num_workers == 0 else 0),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    results = tuner.fit()
    records = []
    for r in results:
        params = {k: v for k, v in r.config.items() if k != FOLD_KEY}
        history = []
        if r.metrics_dataframe is not None and len(r.metrics_dataframe):
            history = r.metrics_dataframe.to_dict("records")
        # TorchTrainer trials pass their Ray Train checkpoint's path as a metric; trials that
        # train themselves report their checkpoints to Tune.
        ckpt = (r.metrics or {}).get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None)
        if ckpt:
            # Relative to the experiment folder: a copied or moved run reads its own checkpoints.
            ckpt = relative_to_run(uri_of_ray_path(ckpt, cfg.compute.storage_path), path)
        records.append(
            TrialRecord(
                trial_id=str((r.metrics or {}).get("trial_id", r.path.rstrip("/").split("/")[-1])),
                params=params,
                fold=int(r.config[FOLD_KEY]),
                status="ERROR" if r.error else "TERMINATED",
                history=history,
                checkpoint=ckpt,
                error=str(r.error).splitlines()[0] if r.error else None,
            )
        )
    summary = summarize(
        records,
        metric=cfg.search.metric,
        mode=cfg.search.mode,
        num_folds=len(folds_of(cfg)),
        max_epochs=max_epochs(cfg),
        grace_period=cfg.search.grace_period,
        reduction_factor=cfg.search.reduction_factor,
    )
    summary["experiment"] = path
    summary["config"] = cfg.to_dict()
    json_path, csv_path = write_summary(summary, path)
    summary["files"] = {"json": json_path, "csv": csv_path}
    if print_table:
        print_summary(summary)
        print(f"summary: {json_path}\n         {csv_path}")
    return summary
