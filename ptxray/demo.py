"""`make demo`: the main job, end to end, on this machine.

Generates a synthetic SIIM-layout dataset, starts a local Ray head with its dashboard (token
authentication on, bound to 127.0.0.1), submits `jobs/kfold.py` with `ray job submit` (prepare
the decode-once cache, then 5 folds x a small grid with ASHA), follows its logs, prints the
summary table and where the results are, and stops the head it started.

Running it again resumes the same experiment: finished trials are not re-run. Ctrl-C, SIGTERM or
SIGHUP at any point stop the job and the head (nothing keeps running), and the next run resumes.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived during the demo. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it and every `finally` (the head's stop) runs."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread for the block's duration.
    By default SIGTERM and SIGHUP end the process on the spot, and the head and the job keep going."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    saved = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def run_demo(
    workdir: Path,
    n: int = 400,
    seed: int = 0,
    config: str = "demo",
    overrides: Sequence[str] = (),
    max_concurrent_trials: int = 2,
) -> int:
    """The demo in `workdir`; `config`, `overrides` and `max_concurrent_trials` exist for tests
    (a smaller experiment through the same path). Raises `Interrupted` on a stop signal, after the
    head it started is stopped."""
    with stop_signals_raise():
        return _run_demo(workdir.absolute(), n, seed, config, list(overrides), max_concurrent_trials)


def _run_demo(workdir: Path, n: int, seed: int, config: str, overrides: list[str], max_concurrent_trials: int) -> int:
    from ptxray import ray_cluster
    from ptxray.config import load_config
    from ptxray.summary import print_summary
    from ptxray.synth import generate

    data = workdir / "siim"
    stamp = data / "synth.json"
    # 512 px (SIIM ships 1024): the demo trains at 128 px, and half-size drawings and JPEGs make
    # generation and the cache's decode 3-4x cheaper; the lesion's drawing scales with the size.
    params = {"n": n, "size": 512, "positive_rate": 0.22, "seed": seed}
    if not stamp.exists() or json.loads(stamp.read_text()) != params:
        print(f"generating {n} synthetic chest radiographs (512 px JPEG DICOMs) in {data} ...", flush=True)
        generate(str(data), **params)
        stamp.write_text(json.dumps(params))

    runs = workdir / "runs"
    overrides = [f"compute.storage_path={runs}", *overrides]
    experiment = runs / load_config(config, overrides).search.name
    entrypoint = " ".join(
        shlex.quote(a)
        for a in [
            "python", "jobs/kfold.py", "--config", config,
            "--images", str(data / "dicom-images-train"),
            "--labels", str(data / "train-rle.csv"),
            "--cache", str(workdir / "cache"),
            *[x for o in overrides for x in ("--set", o)],
            "--max-concurrent-trials", str(max_concurrent_trials),
        ]
    )
    # More logical CPUs than a 2-core laptop has: two 1-CPU trials train at once (the two cores,
    # --max-concurrent-trials 2), and the job's light tasks (the cache's prepare tasks, and
    # the reads feeding Ray Train workers if the config asks for workers) always find a free CPU.
    # On a stop signal, start_local_cluster stops what it had started, and `finally` stops a
    # running head and with it the job (the driver and the trials are processes of the head).
    cluster = ray_cluster.start_local_cluster(workdir / "cluster", num_cpus=4)
    try:
        print(f"Ray dashboard: {cluster.dashboard_url}  (token in {cluster.token_path})", flush=True)
        job_id, status = ray_cluster.submit_job(cluster, entrypoint, working_dir=str(REPO))
    finally:
        ray_cluster.stop_local_cluster(cluster)
    if status != "SUCCEEDED":
        print(f"job {job_id} ended {status}")
        return 1
    summary_path = experiment / "summary.json"
    summary = json.loads(summary_path.read_text())
    print_summary(summary)
    best = summary["best"]
    print(
        f"\nbest configuration, cross-validated over {best['folds_completed']} folds: "
        f"Dice {best['val_dice_mean']:.3f}, with the classification head deciding empty masks "
        f"{best['val_dice_cls_mean']:.3f}, on positive images {best['val_dice_pos_mean']:.3f}; "
        f"predicting empty everywhere scores {best['val_empty_dice_mean']:.3f}"
    )
    # The out-of-fold report of the best configuration's fold models (thresholds searched on the
    # out-of-fold predictions, ROC, confusion matrix, Dice histogram, learning curves, cases).
    from ptxray.report import evaluate_run

    doc = evaluate_run(str(experiment))
    overall = next((m for m in doc["metrics"] if m["fold"] == "all"), None)
    if overall is not None:
        print(
            f"out-of-fold predictions of those fold models, {doc['thresholds']['rule']} rule (thresholds searched on "
            f"them): Dice {overall['dice']:.3f}, on positive images {overall['dice_pos']:.3f} "
            f"(empty baseline {overall['empty_dice']:.3f}; a plain 0.5 threshold gives {overall['dice_plain']:.3f})"
        )
    print(f"report: {doc['files']['report.md']} (and report.html)")
    print(f"summary: {summary_path} and {summary_path.with_suffix('.csv')}; Tune results and TensorBoard logs: {experiment}")
    return 0
