"""`ptxray` command line. Subcommands only parse arguments and delegate to the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ptxray.config import ConfigError, load_config


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


def _config(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


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
        ("quarantined", "quarantined"),
        ("dicoms_without_labels", "DICOMs without labels"),
        ("labels_without_dicoms", "labels without DICOMs"),
    ]:
        table.add_row(label, str(summary.get(key, "")))
    for f in summary.get("folds", []):
        name = "hold-out" if f["fold"] < 0 else f"fold {f['fold']}"
        table.add_row(f"  {name}", f"{f['images']} ({f['positive']} positive)")
    console.print(table)
    for q in summary.get("quarantine", [])[:20]:
        console.print(f"[yellow]quarantined[/]: {q['reason']}")
    if summary.get("quarantined", 0) > 20:
        console.print(f"... and {summary['quarantined'] - 20} more (see the summary JSON)")
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
    if args.ray:
        from ptxray import ray_data, ray_train

        with ray_data.ray_session(args.address or cfg.compute.address):
            result = ray_train.run_fold(cfg, cache, run_name=args.run_name or f"train-fold{cfg.train.fold}")
        print(f"metrics: {result.metrics}\ncheckpoint: {result.checkpoint}")
        return 0
    run_dir = Path(args.run_dir or Path(cfg.compute.storage_path) / f"train-fold{cfg.train.fold}")
    result = train_fold(cfg, cache, run_dir, resume=not args.no_resume, device=args.device, progress=sys.stderr.isatty())
    best = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.best.items()}
    print(f"run folder: {run_dir}\nbest epoch: {best}\ncheckpoint: {result.checkpoint}")
    return 0


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
    with ray_data.ray_session(args.address or cfg.compute.address):
        if images and labels:
            # Reuses a complete cache for these inputs without decoding anything.
            prepared = ray_data.prepare(cfg, images=images, labels=labels, cache=cache)
            print_prepare_summary(prepared)
            cache = prepared["cache"]
        ray_tune.run_experiment(cfg, cache, max_concurrent_trials=args.max_concurrent_trials)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.file, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ptxray.demo import run_demo

    return run_demo(Path(args.workdir), n=args.n)


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
            exports = " ".join(f"{k}={v}" for k, v in c.env().items())
            print(
                f"Ray cluster up: {c.nodes} node(s), GCS {c.gcs_address}, token authentication on\n"
                f"dashboard: {c.dashboard_url}  (it asks for the token in {c.token_path})\n"
                f"logs:      {c.state_dir / 'logs'}\n\n"
                f"submit a job:\n"
                f"  export {exports}\n"
                f"  ray job submit --working-dir . -- python jobs/kfold.py --config kfold\n\n"
                f"stop it:   ptxray cluster down --state-dir {c.state_dir}"
            )
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


def build_parser() -> argparse.ArgumentParser:
    from ptxray import __version__

    parser = argparse.ArgumentParser(prog="ptxray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ptxray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a synthetic SIIM-layout dataset (DICOMs + train-rle.csv)")
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--positive-rate", type=float, default=0.22)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="decode DICOMs once into the preprocessed Parquet cache (Ray Data)")
    p.add_argument("--images", help="folder or s3://bucket/prefix of DICOMs (searched recursively)")
    p.add_argument("--labels", help="label CSV (train-rle.csv), local or s3://")
    p.add_argument("--cache", help="cache root, local or s3://")
    p.add_argument("--address", default="", help="Ray address (default: an embedded local Ray)")
    p.add_argument("--force", action="store_true", help="rebuild even when a complete cache exists")
    p.add_argument("--summary-json", help="also write the summary to this file")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train one fold in this process (no Ray), from a prepared cache")
    p.add_argument("--cache", help="prepared cache (local or s3://)")
    p.add_argument("--fold", type=int, help="validation fold (train on the others)")
    p.add_argument("--run-dir", help="output folder (default: <compute.storage_path>/train-fold<K>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when compute.use_gpu and available)")
    p.add_argument("--ray", action="store_true", help="train on Ray Train (compute.num_workers DDP workers) instead of in-process")
    p.add_argument("--run-name", help="with --ray: the Train run's name under compute.storage_path (the same name resumes)")
    p.add_argument("--address", default="", help="with --ray: Ray address (default: the job's cluster, else embedded)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("kfold", help="K-fold x grid experiment on Ray Tune (prepares the cache first if needed)")
    p.add_argument("--images", help="DICOM folder or s3:// prefix (with --labels: prepare or reuse the cache)")
    p.add_argument("--labels", help="label CSV")
    p.add_argument("--cache", help="cache root (or a complete cache)")
    p.add_argument("--name", help="experiment name (search.name); the same name resumes")
    p.add_argument("--no-early-stop", action="store_true", help="run every trial to the end (no ASHA)")
    p.add_argument("--max-concurrent-trials", type=int, help="default: what the cluster's CPUs/GPUs fit")
    p.add_argument("--address", default="", help="Ray address (default: the job's cluster, else an embedded local Ray)")
    _add_config_args(p)
    p.set_defaults(func=cmd_kfold)

    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("file", nargs="?", help="YAML file or shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="what `make demo` runs: synthetic data -> local Ray head -> ray job submit jobs/kfold.py")
    p.add_argument("--workdir", default="demo-data")
    p.add_argument("--n", type=int, default=200, help="number of synthetic images")
    p.set_defaults(func=cmd_demo)

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
    for a in actions.choices.values():
        a.add_argument("--state-dir", default=".ptxray/cluster", help="where the token and cluster.json live")
    p.set_defaults(func=cmd_cluster)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ptxray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
