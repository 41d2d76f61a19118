"""`ptxray` command line. Subcommands only parse arguments and delegate to the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ptxray.config import ConfigError, load_config
from ptxray.storage import StorageError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, or the name of a shipped recipe (smoke, demo, ...)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=1e-4 (repeatable)",
    )


# Test hook, never set in production: the JSON of ray_tune.run_experiment's `debug_hooks`. Read here,
# at the entry point a `ray job submit` test reaches (jobs/kfold.py, `ptxray demo`), and passed down.
DEBUG_ENV = "PTXRAY_DEBUG_TRAIN"


def _debug_hooks_from_env() -> dict[str, Any] | None:
    spec = os.environ.get(DEBUG_ENV)
    return json.loads(spec) if spec else None


def _config(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def job_working_dir_copy(cwd: Path | None = None) -> Path | None:
    """Ray's copy of an uploaded working dir when this process runs in one, else None.

    `ray job submit --working-dir .` runs the entrypoint in
    `<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/`: a temporary copy that holds
    only what was uploaded (files git does not ignore, at most 100 MiB), and a new folder whenever
    the uploaded files change."""
    cwd = (cwd or Path.cwd()).absolute()
    return cwd if "working_dir_files" in cwd.parts[:-1] and "runtime_resources" in cwd.parts else None


def absolute_local_paths(paths: dict[str, str], *, outputs: Sequence[str] = ()) -> dict[str, str]:
    """{flag: path} with every relative local path made absolute here, where the command was typed.

    URIs (s3://...) and empty values pass unchanged. Inside a Ray job's copy of its working dir
    (`job_working_dir_copy`) a relative path is an error instead, naming the fix: an input there
    exists only if it was uploaded (data folders ignored by git, such as demo-data/, are not), and
    an output (`outputs`: a cache, a storage path) would be written into a temporary folder.
    """
    from ptxray.storage import is_uri

    copy = job_working_dir_copy()
    out = {}
    for flag, path in paths.items():
        if not path or is_uri(path) or Path(path).expanduser().is_absolute():
            out[flag] = str(Path(path).expanduser()) if path and not is_uri(path) else path
            continue
        if copy is None:
            out[flag] = str(Path(path).expanduser().absolute())
            continue
        fix = (
            f"give an absolute path ({flag} $PWD/{path} in the `ray job submit` command: your shell expands $PWD, "
            "and a cluster on this machine reads it) or an s3:// URI"
        )
        if flag in outputs:
            raise ConfigError(
                f"{flag} {path!r} is a relative path, and this Ray job runs in a temporary copy of the uploaded working "
                f"dir ({copy}): what it writes there is lost with the copy, and a resubmitted job would not find it; {fix}"
            )
        if not (copy / path).exists():
            raise ConfigError(
                f"{flag} {path!r}: no such file or folder in this Ray job's copy of the uploaded working dir ({copy}). "
                "`ray job submit --working-dir` uploads only files git does not ignore (at most 100 MiB), so data "
                f"folders such as demo-data/ are not there; {fix}"
            )
        out[flag] = str(copy / path)
    return out


def _absolute_data_paths(cfg, images: str, labels: str, cache: str, *, storage: bool = True):
    """(cfg, images, labels, cache) with every local path absolute (`absolute_local_paths`), and
    recorded in the config (data.*; compute.storage_path when `storage`), so every trial's saved
    config, and thresholds / evaluate run from anywhere later, find them."""
    paths = {"--images": images, "--labels": labels, "--cache": cache}
    if storage:
        paths["compute.storage_path"] = cfg.compute.storage_path
    p = absolute_local_paths(paths, outputs=("--cache", "compute.storage_path"))
    images, labels, cache = p["--images"], p["--labels"], p["--cache"]
    overrides = {f"data.{k}": v for k, v in (("images", images), ("labels", labels), ("cache", cache)) if v}
    if storage:
        overrides["compute.storage_path"] = p["compute.storage_path"]
    return cfg.with_overrides(overrides), images, labels, cache


def print_prepare_summary(summary: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="ptxray prepare", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, label in [
        ("dicoms_listed", "DICOM files listed"),
        ("images", "images in the cache"),
        ("positive", "  positive (pneumothorax)"),
        ("negative", "  negative"),
        ("patients", "patients"),
        ("quarantined", "quarantined"),
        ("dicoms_without_labels", "DICOMs without labels"),
        ("labels_without_dicoms", "labels without DICOMs"),
        ("label_rows_quarantined", "label rows that are not RLE"),
        ("labels_empty_and_rle", "images labelled -1 and RLE (positive)"),
    ]:
        table.add_row(label, str(summary.get(key, "")))
    for f in summary.get("folds", []):
        name = "hold-out (test split)" if f["fold"] < 0 else f"fold {f['fold']}"
        patients = f" of {f['patients']} patients" if "patients" in f else ""  # caches from before the count
        table.add_row(f"  {name}", f"{f['images']} images{patients} ({f['positive']} positive)")
    console.print(table)
    for q in summary.get("quarantine", [])[:20]:
        console.print(f"[yellow]quarantined[/]: {q['reason']}", highlight=False)
    if summary.get("quarantined", 0) > 20:
        console.print(f"... and {summary['quarantined'] - 20} more (see the summary JSON)")
    for reason in summary.get("label_rows_quarantine", [])[:20]:
        console.print(f"[yellow]label row quarantined[/]: {reason}", highlight=False)
    mixed = summary.get("labels_empty_and_rle_ids", [])
    if mixed:
        shown = ", ".join(mixed[:5]) + (f" and {len(mixed) - 5} more" if len(mixed) > 5 else "")
        console.print(f"[yellow]labelled both -1 and RLE[/] (the RLE rows count, the image is positive): {shown}", highlight=False)
    state = "reused (nothing decoded)" if summary.get("reused") else "written"
    console.print(f"cache {state}: {summary.get('cache')}  ({summary.get('seconds')} s)")


def cmd_synth(args: argparse.Namespace) -> int:
    from ptxray.synth import generate

    s = generate(args.out, n=args.n, size=args.size, positive_rate=args.positive_rate, seed=args.seed)
    print(f"wrote {s.images} images ({s.positive} positive, {s.patients} patients, {s.rows} label rows) to {s.out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ptxray import ray_data

    cfg = _config(args)
    images = args.images or cfg.data.images
    labels = args.labels or cfg.data.labels
    cache = args.cache or cfg.data.cache
    missing = [n for n, v in (("--images", images), ("--labels", labels), ("--cache", cache)) if not v]
    if missing:
        raise ConfigError(f"prepare needs {', '.join(missing)} (or data.images/labels/cache in the config)")
    cfg, images, labels, cache = _absolute_data_paths(cfg, images, labels, cache, storage=False)
    with ray_data.ray_session(args.address or cfg.compute.address):
        summary = ray_data.prepare(cfg, images=images, labels=labels, cache=cache, force=args.force)
    print_prepare_summary(summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ptxray.runner import train_fold

    overrides = list(args.overrides)
    if args.fold is not None:
        overrides.append(f"train.fold={args.fold}")
    cfg = load_config(args.config, overrides)
    cache = args.cache or cfg.data.cache
    if not cache:
        raise ConfigError("train needs --cache (a prepared cache: <root>/<key> or a root holding one)")
    cfg, _, _, cache = _absolute_data_paths(cfg, "", "", cache, storage=args.ray or not args.run_dir)
    if args.ray:
        from ptxray import ray_data, ray_train

        with ray_data.ray_session(args.address or cfg.compute.address):
            result = ray_train.run_fold(cfg, cache, run_name=args.run_name or f"train-fold{cfg.train.fold}")
        print(train_outcome(cfg, *ray_train.fold_outcome(result, cfg.compute.storage_path)))
        return 0
    run_dir = Path(absolute_local_paths({"--run-dir": args.run_dir}, outputs=["--run-dir"])["--run-dir"]
                   or Path(cfg.compute.storage_path) / f"train-fold{cfg.train.fold}")
    result = train_fold(cfg, cache, run_dir, resume=not args.no_resume, device=args.device, progress=sys.stderr.isatty())
    print(train_outcome(cfg, str(run_dir), result.best, result.checkpoint))
    return 0


def train_outcome(cfg, run_dir: str, best: dict[str, Any], checkpoint: str | None) -> str:
    """What `ptxray train` prints at the end, in-process or on Ray Train: the run folder, the best
    epoch counted as the log counts it ("epoch 3/6"; metrics.jsonl holds its 0-based index, 2) with
    its validation metrics, and the checkpoint to predict with (best.pt)."""
    lines = [f"run folder: {run_dir}"]
    if best:
        keys = dict.fromkeys([cfg.train.monitor, "val_dice", "val_dice_cls", "val_dice_pos", "val_auc", "val_empty_dice"])
        shown = ", ".join(f"{k} {best[k]:.4f}" for k in keys if isinstance(best.get(k), (int, float)))
        lines.append(f"best epoch: {int(best['epoch']) + 1}/{cfg.train.epochs} (by {cfg.train.monitor}): {shown}")
    else:
        lines.append(f"best epoch: none ({cfg.train.monitor} was never finite)")
    lines.append(f"checkpoint: {checkpoint}")
    return "\n".join(lines)


def cmd_kfold(args: argparse.Namespace) -> int:
    from ptxray import ray_data, ray_tune

    overrides = list(args.overrides)
    if args.no_early_stop:
        overrides.append("search.early_stop=false")
    if args.name:
        overrides.append(f"search.name={args.name}")
    cfg = load_config(args.config, overrides)
    images, labels, cache = args.images or cfg.data.images, args.labels or cfg.data.labels, args.cache or cfg.data.cache
    if not cache:
        raise ConfigError("kfold needs --cache (or data.cache): where the decode-once cache lives or will be written")
    # Recorded in every trial's saved config, so thresholds / evaluate find the cache on their own.
    cfg, images, labels, cache = _absolute_data_paths(cfg, images, labels, cache)
    with ray_data.ray_session(args.address or cfg.compute.address):
        if images and labels:
            # Reuses a complete cache for these inputs without decoding anything.
            prepared = ray_data.prepare(cfg, images=images, labels=labels, cache=cache)
            print_prepare_summary(prepared)
            cache = prepared["cache"]
        ray_tune.run_experiment(
            cfg, cache, max_concurrent_trials=args.max_concurrent_trials, debug_hooks=_debug_hooks_from_env()
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ptxray.export import default_export_name, export_run

    out = args.out or f"{args.run.rstrip('/')}/export/{default_export_name(args.format, args.fold, args.tta_flip)}"
    r = export_run(
        args.run, out, fmt=args.format, fold=args.fold, tta_flip=args.tta_flip, opset=args.opset,
        which=args.which, check_dicom=args.check_dicom, atol=args.atol,
    )
    real = "no real image" if r.max_abs_diff_real is None else f"{r.max_abs_diff_real:.2e} on {r.real_image}"
    print(
        f"exported {r.format} (folds {list(r.folds)}{', flip TTA' if r.tta_flip else ''}) to {r.path}\n"
        f"manifest: {r.manifest_path}\n"
        f"max |diff| vs PyTorch: {r.max_abs_diff_random:.2e} on a random batch, {real} (tolerance {r.atol:g})"
    )
    return 0


def _wide_console():
    from rich.console import Console

    # Job logs and CI are not terminals: without a width, rich would squeeze tables into 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160)


def _outputs_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("where / value")
    for what, where in rows:
        table.add_row(what, str(where))
    return table


def cmd_predict(args: argparse.Namespace) -> int:
    from ptxray.predict import run_predict

    s = run_predict(
        args.run, args.images, args.out, local=args.local, rule=args.rule, batch_size=args.batch_size,
        workers=args.workers, device=args.device, tta=not args.no_tta, write_images=not args.no_images,
        dicom_seg=args.dicom_seg, address=args.address,
    )
    th = s["thresholds"]
    console = _wide_console()
    console.print(_outputs_table(f"ptxray predict ({s['mode']}, {s['seconds']} s)", [
        ("images listed", s["listed"]),
        ("predicted (rows)", s["predicted"]),
        ("  non-empty masks", s["non_empty"]),
        ("errors (no row)", s["errors"]),
        ("rule", f"{th['rule']}: top {th['top_score']}, min area {th['min_area_px']} px, bin {th['bin_threshold']}, cls {th['cls_threshold']}"),
        ("thresholds from", th["source"]),
        *[(name, path) for name, path in s["files"].items()],
        ("summary", f"{args.out.rstrip('/')}/predict.json"),
    ]))
    for e in s["error_list"][:20]:
        console.print(f"[yellow]not predicted[/]: {e['reason']}", markup=True, highlight=False)
    if s["errors"] > 20:
        console.print(f"... and {s['errors'] - 20} more (see errors.csv)")
    for e in s.get("seg_errors", [])[:20]:
        console.print(f"[yellow]no DICOM SEG[/]: {e['reason']}", highlight=False)
    return 0


def cmd_thresholds(args: argparse.Namespace) -> int:
    from ptxray.predict import find_thresholds

    result, uri, stats = find_thresholds(args.run, cache=args.cache, recompute=args.recompute, device=args.device)
    rows = [
        ("out-of-fold images", f"{result.n_images} ({result.n_positive} positive, folds {sorted(set(stats.folds.tolist()))})"),
        ("empty baseline Dice", f"{result.empty_dice:.4f}"),
    ]
    for rule, t in result.best.items():
        mark = " (chosen)" if rule == result.chosen else ""
        rows.append((f"{rule}{mark}", f"Dice {t.oof_dice:.4f}: top {t.top_score}, min area {t.min_area_px} px, bin {t.bin_threshold}, cls {t.cls_threshold}"))
    rows += [("thresholds", uri), ("out-of-fold store", f"{args.run.rstrip('/')}/oof/oof.npz")]
    _wide_console().print(_outputs_table(f"ptxray thresholds (at {stats.size_px} px)", rows))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ptxray.report import evaluate_run

    doc = evaluate_run(args.run, cache=args.cache, out=args.out, device=args.device, cases=args.cases, recompute=args.recompute,
                       split=args.split)  # fmt: skip
    rows = []
    for m in doc["metrics"]:
        name = f"fold {m['fold']}" if isinstance(m["fold"], int) else str(m["fold"])  # "all", "hold-out"
        rows.append((name, f"Dice {m['dice']:.4f} (empty baseline {m['empty_dice']:.4f}, 0.5: {m['dice_plain']:.4f}), "
                     f"{m['images']} images, {m['positive']} positive"))
    rows += [(name, path) for name, path in doc["files"].items() if not name.startswith("cases/")]
    rows.append(("case overlays", f"{len(doc['cases']['best'])} best, {len(doc['cases']['worst'])} worst"))
    split = "hold-out patients, fold ensemble" if args.split == "holdout" else "out-of-fold"
    _wide_console().print(_outputs_table(f"ptxray evaluate ({split}, {doc['thresholds']['rule']} rule)", rows))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    import contextlib
    import shlex

    from ptxray import benchmark

    cfg = load_config(args.config, args.overrides)
    images, labels, cache = args.images or cfg.data.images, args.labels or cfg.data.labels, args.cache or cfg.data.cache
    if not cache:
        raise ConfigError("benchmark needs --cache (a prepared cache, or where to write one with --images and --labels)")
    cfg, images, labels, cache = _absolute_data_paths(cfg, images, labels, cache)
    args.out = absolute_local_paths({"--out": args.out}, outputs=["--out"])["--out"]
    if args.image_size:
        cfg = cfg.with_overrides({"preprocess.image_size_px": args.image_size})
    batch_size = (args.batch_size or str(cfg.train.batch_size)).strip().lower()
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) >= 1):
        raise ConfigError(f"--batch-size {args.batch_size!r}: expected a positive integer or 'auto'")
    settings = benchmark.BenchmarkSettings(
        fold=cfg.train.fold if args.fold is None else args.fold, epochs=args.epochs or 0, seconds=args.seconds or 0.0,
        batch_size="auto" if batch_size == "auto" else int(batch_size), batch_search=not args.no_batch_search,
        max_batch_size=args.max_batch_size, warmup_steps=args.warmup_steps, timing_steps=args.timing_steps,
        repeats=args.repeats, compile=args.compile, device=args.device or "", threads=args.threads, chexnet=args.chexnet or "",
    )
    specs = benchmark.parse_archs(args.archs)
    prepare = bool(images and labels)
    if prepare or not args.local:
        from ptxray import ray_data

        session = ray_data.ray_session(args.address or cfg.compute.address)
    else:
        session = contextlib.nullcontext()
    with session:
        if prepare:
            prepared = ray_data.prepare(cfg, images=images, labels=labels, cache=cache)  # reuses a complete cache
            print_prepare_summary(prepared)
            cache = prepared["cache"]
        cfg = benchmark.check_cache(cfg, cache, image_size_px=args.image_size or 0)
        if args.local:
            results = benchmark.run_local(cfg, cache, specs, settings)
            mode = "in-process (--local), one architecture after another"
        else:
            from ptxray import ray_benchmark

            results, mode = ray_benchmark.run_trials(
                cfg, cache, specs, settings, storage_path=cfg.compute.storage_path, cpus_per_trial=args.cpus_per_trial,
                max_concurrent_trials=args.max_concurrent_trials or 0,
            )
    report = benchmark.write_report(
        results, cfg=cfg, cache_uri=cache, settings=settings, out_dir=args.out, mode=mode,
        command=" ".join(["ptxray", *(shlex.quote(a) for a in args.argv)]),
    )
    benchmark.print_table(report)
    print("\n".join(f"{name}: {path}" for name, path in report["files"].items()))
    return 0 if all(r.get("status") == "ok" for r in results) else 1


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.file, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from ptxray.demo import Interrupted, run_demo

    try:
        return run_demo(
            Path(args.workdir), n=args.n, config=args.config, overrides=args.overrides,
            max_concurrent_trials=args.max_concurrent_trials,
        )
    except (Interrupted, KeyboardInterrupt) as e:
        # KeyboardInterrupt: a Ctrl-C before or after run_demo's own handlers, nothing started yet or left.
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"\nptxray demo: stopped by {signal.Signals(signum).name}; the job and the local Ray head it started "
            "are stopped. Run it again (`make demo`) to resume the experiment.",
            file=sys.stderr,
        )
        return 128 + signum


def _export_line(cluster) -> str:
    """`export RAY_ADDRESS=<dashboard URL> RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...` for a shell."""
    import shlex

    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in cluster.env().items())


def cmd_cluster(args: argparse.Namespace) -> int:
    from ptxray import ray_cluster

    try:
        if args.action == "up":
            if args.port != "auto" and not args.port.isdigit():
                raise ValueError(f"--port {args.port!r}: expected a port number or 'auto'")
            gcs_port = 0 if args.port == "auto" else int(args.port)
            c = ray_cluster.start_local_cluster(
                args.state_dir,
                num_cpus=args.num_cpus,
                workers=args.workers,
                worker_cpus=args.worker_cpus,
                dashboard_port=args.dashboard_port,
                gcs_port=gcs_port,
            )
            print(
                f"Ray cluster up: {c.nodes} node(s), GCS {c.gcs_address}, token authentication on\n"
                f"dashboard: {c.dashboard_url}  (it asks for the token in {c.token_path})\n"
                f"logs:      {c.state_dir / 'logs'}\n\n"
                f"submit a job (local paths absolute: the job runs in a copy of the working dir without git-ignored data):\n"
                f"  {_export_line(c)}\n"
                f"  ray job submit --working-dir . -- python jobs/kfold.py --config kfold \\\n"
                f"      --images $PWD/DICOM_DIR --labels $PWD/train-rle.csv --cache $PWD/cache --set compute.storage_path=$PWD/runs\n\n"
                f"stop it:   ptxray cluster down --state-dir {c.state_dir}"
            )
            return 0
        if args.action == "env":
            print(_export_line(ray_cluster.load_cluster(args.state_dir)))
            return 0
        if args.action == "down":
            c = ray_cluster.load_cluster(args.state_dir)
            ray_cluster.stop_local_cluster(c)
            left = ray_cluster.alive_pids(c)
            print(f"stopped the cluster at {c.dashboard_url}" + (f"; still alive: {left}" if left else ""))
            return 1 if left else 0
        c = ray_cluster.load_cluster(args.state_dir)
        ok, detail = ray_cluster.dashboard_answers(c)
        alive = ray_cluster.alive_pids(c)
        print(json.dumps(c.to_json(), indent=2))
        print(f"processes alive: {len(alive)}")
        print(f"dashboard {c.dashboard_url}: {'answers, ' if ok else 'does not answer: '}{detail}")
        return 0 if ok else 1
    except ray_cluster.ClusterError as e:
        print(f"ptxray cluster {args.action}: error: {e}", file=sys.stderr)
        return 1


def _add_address(p: argparse.ArgumentParser, help: str = "Ray address (default: the job's cluster, else an embedded local Ray)") -> None:
    p.add_argument("--address", default="", help=help)


def _add_ray_config_command(p: argparse.ArgumentParser, func, address_help: str | None = None) -> None:
    """The common end of a command that runs a config on Ray: --address, --config/--set, the handler."""
    _add_address(p, *([address_help] if address_help else []))
    _add_config_args(p)
    p.set_defaults(func=func)


def _add_data_inputs(p: argparse.ArgumentParser) -> None:
    """--images/--labels/--cache of the commands that prepare (or reuse) the cache before they run."""
    p.add_argument("--images", help="DICOM folder or s3:// prefix (with --labels: prepare or reuse the cache)")
    p.add_argument("--labels", help="label CSV")
    p.add_argument("--cache", help="cache root or a complete cache (local or s3://)")


def build_parser() -> argparse.ArgumentParser:
    from ptxray import __version__

    parser = argparse.ArgumentParser(prog="ptxray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ptxray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_synth_parser,
        _add_prepare_parser,
        _add_train_parser,
        _add_kfold_parser,
        _add_export_parser,
        _add_predict_parser,
        _add_thresholds_parser,
        _add_evaluate_parser,
        _add_benchmark_parser,
        _add_config_parser,
        _add_demo_parser,
        _add_cluster_parser,
    ):
        add(sub)
    return parser


def _add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic SIIM-layout dataset (DICOMs + train-rle.csv)")
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--positive-rate", type=float, default=0.22)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)


def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode DICOMs once into the preprocessed Parquet cache (Ray Data)")
    p.add_argument("--images", help="folder or s3://bucket/prefix of DICOMs (searched recursively)")
    p.add_argument("--labels", help="label CSV (train-rle.csv), local or s3://")
    p.add_argument("--cache", help="cache root, local or s3://")
    _add_address(p, "Ray address (default: an embedded local Ray)")
    p.add_argument("--force", action="store_true", help="rebuild even when a complete cache exists")
    p.add_argument("--summary-json", help="also write the summary to this file")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one fold in this process (no Ray), from a prepared cache")
    p.add_argument("--cache", help="prepared cache (local or s3://)")
    p.add_argument("--fold", type=int, help="validation fold (train on the others)")
    p.add_argument("--run-dir", help="output folder (default: <compute.storage_path>/train-fold<K>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when compute.use_gpu and available)")
    p.add_argument("--ray", action="store_true", help="train on Ray Train (compute.num_workers DDP workers) instead of in-process")
    p.add_argument("--run-name", help="with --ray: the Train run's name under compute.storage_path (the same name resumes)")
    _add_ray_config_command(p, cmd_train, "with --ray: Ray address (default: the job's cluster, else embedded)")


def _add_kfold_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kfold", help="K-fold x grid experiment on Ray Tune (prepares the cache first if needed)")
    _add_data_inputs(p)
    p.add_argument("--name", help="experiment name (search.name); the same name resumes")
    p.add_argument("--no-early-stop", action="store_true", help="run every trial to the end (no ASHA)")
    p.add_argument("--max-concurrent-trials", type=int, help="default: what the cluster's CPUs/GPUs fit")
    _add_ray_config_command(p, cmd_kfold)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's fold model or fold ensemble to ONNX / TorchScript, checked against PyTorch")
    p.add_argument("--run", required=True, help="run folder or s3:// prefix (a K-fold experiment or a `ptxray train` run)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--fold", type=int, help="export this fold only (default: the ensemble of all folds)")
    p.add_argument("--tta-flip", action="store_true", help="average with the horizontally flipped image inside the graph")
    p.add_argument("--out", help="model file, local or s3:// (default: <run>/export/<ensemble|foldK>.<onnx|torchscript.pt>)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--which", choices=["best", "last"], default="best", help="which checkpoint of each fold")
    p.add_argument("--check-dicom", help="a real DICOM to compare outputs on (default: the first under data.images)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |exported - PyTorch| probability")
    p.set_defaults(func=cmd_export)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict DICOMs with a run's fold ensemble: submission CSV, PNG masks, overlays")
    p.add_argument("--run", required=True, help="run folder or s3:// prefix (a K-fold experiment or a `ptxray train` run)")
    p.add_argument("--images", required=True, help="DICOM folder, file or s3:// prefix (searched recursively)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--local", action="store_true", help="run in this process instead of a Ray Data actor pool")
    p.add_argument("--rule", default="chosen", choices=["chosen", "plain", "triplet", "cls", "both"],
                   help="which stored decision rule (default: the one `ptxray thresholds` chose)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model batch")
    p.add_argument("--workers", type=int, default=0, help="Ray actors (default: one per GPU, else up to 4 CPU actors)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--no-tta", action="store_true", help="no horizontal-flip test-time augmentation")
    p.add_argument("--no-images", action="store_true", help="CSV files only: no mask and overlay PNGs")
    p.add_argument("--dicom-seg", action="store_true", help="also write a DICOM SEG per non-empty prediction (seg/<ImageId>.dcm)")
    _add_address(p)
    p.set_defaults(func=cmd_predict)


def _add_thresholds_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("thresholds", help="search the decision thresholds on a run's out-of-fold predictions; store them in the run")
    p.add_argument("--run", required=True, help="run folder or s3:// prefix")
    p.add_argument("--cache", help="the cache the run trained from (default: from the run's config data.cache)")
    p.add_argument("--recompute", action="store_true", help="recompute the out-of-fold predictions even if stored")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.set_defaults(func=cmd_thresholds)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="out-of-fold (or --split holdout: test split) report of a run: metrics, ROC, confusion, Dice histogram, cases")
    p.add_argument("--run", required=True, help="run folder or s3:// prefix")
    p.add_argument("--cache", help="the cache the run trained from (default: from the run's config data.cache)")
    p.add_argument("--out", help="report folder or s3:// prefix (default: <run>/report, or <run>/report-holdout)")
    p.add_argument("--split", choices=["oof", "holdout"], default="oof",
                   help="oof: each fold model on its validation fold (default); holdout: the fold ensemble on the hold-out "
                   "patients (data.holdout_fraction, fold -1), the test split")
    p.add_argument("--cases", type=int, default=4, help="best and worst cases shown as overlays")
    p.add_argument("--recompute", action="store_true", help="recompute the out-of-fold predictions even if stored")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.set_defaults(func=cmd_evaluate)


def _add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="compare architectures on your data and hardware: parameters, GFLOPs, largest batch, throughput, "
        "memory and quality after the same budget (one Ray Tune trial each; --local: in-process)",
    )
    _add_data_inputs(p)
    p.add_argument("--archs", default="paper",
                   help="'paper' (default: unet_vanilla, unet_densenet121, unet_resnet34, unet_efficientnet-b0, fpn, "
                   "deeplabv3, deeplabv3plus, fcn, maskrcnn), 'all' (+ unetplusplus, manet, linknet, pspnet, pan, "
                   "upernet), or a comma list of those names and ARCH:ENCODER pairs (fpn:resnet18)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--epochs", type=int, help="training budget per architecture, in epochs")
    budget.add_argument("--seconds", type=float, help="training budget per architecture, in seconds of training")
    p.add_argument("--image-size", type=int, help="image side in px (the cache's size; prepares one at this size with --images/--labels)")
    p.add_argument("--fold", type=int, help="validation fold (default: train.fold)")
    p.add_argument("--out", default="benchmark-results", help="folder for benchmark.{md,csv,json} and the plots")
    p.add_argument("--local", action="store_true", help="run the architectures one after another in this process (no Ray)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (not maskrcnn)")
    p.add_argument("--batch-size", help="N, or 'auto' = each architecture's largest batch (default: train.batch_size)")
    p.add_argument("--max-batch-size", type=int, default=0, help="cap of the largest-batch search (default: 1024 on CUDA, 64 on CPU)")
    p.add_argument("--no-batch-search", action="store_true", help="skip the largest-batch search (needs a fixed --batch-size)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps run and discarded before timing")
    p.add_argument("--timing-steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported, with min and max)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's, or the trial's CPUs on Ray)")
    p.add_argument("--chexnet", help="CheXNet checkpoint (model.pth.tar) for the densenet121 encoders (default: random init)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray: CPUs each trial reserves")
    p.add_argument("--max-concurrent-trials", type=int, help="Ray: default one per GPU, or one at a time on CPUs")
    _add_ray_config_command(p, cmd_benchmark)


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("file", nargs="?", help="YAML file or shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="what `make demo` runs: synthetic data -> local Ray head -> ray job submit jobs/kfold.py")
    p.add_argument("--workdir", default="demo-data")
    p.add_argument("--n", type=int, default=400, help="number of synthetic images")
    p.add_argument("--config", default="demo", help="experiment recipe (tests run a smaller one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-concurrent-trials", type=int, default=2)
    p.set_defaults(func=cmd_demo)


def _add_cluster_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="a local Ray head (dashboard + Jobs API, token auth) for `ray job submit`")
    actions = p.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start a head (and optional extra worker nodes) on free ports")
    up.add_argument("--dashboard-port", type=int, default=8265, help="0 picks a free port")
    up.add_argument("--port", default="auto", help="GCS port, or 'auto' for a free one")
    up.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    up.add_argument("--workers", type=int, default=0, help="extra worker nodes on this machine")
    up.add_argument("--worker-cpus", type=int, default=1, help="CPUs each extra worker node offers")
    actions.add_parser("down", help="stop exactly the processes `up` started")
    actions.add_parser("status", help="print the recorded cluster and whether its dashboard answers")
    actions.add_parser("env", help="print the client's environment as one export line: eval \"$(ptxray cluster env)\"")
    for a in actions.choices.values():
        a.add_argument("--state-dir", default=".ptxray/cluster", help="where the token and cluster.json live")
    p.set_defaults(func=cmd_cluster)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that report how they ran
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, StorageError) as e:
        print(f"ptxray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
