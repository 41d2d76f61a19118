"""`ptxray benchmark`'s outputs: the result rows of `ptxray.benchmark.measure` (or of its Ray Tune
trials) as a terminal table, CSV, JSON, three PNG plots and a Markdown report."""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptxray.benchmark.measure import BenchmarkSettings, check_cache, environment, resolve_device
from ptxray.cache import Cache
from ptxray.config import Config
from ptxray.metrics import benchmark_metrics


def result_columns() -> tuple[str, ...]:
    """Columns of results.csv, in order (the JSON has these plus history and search attempts)."""
    return (
        "name", "arch", "encoder", "encoder_weights", "status", "error",
        "params_trainable", "params_total", "gflops_per_image",
        "max_batch_size", "max_batch_limit", "max_batch_cap", "batch_size",
        "train_images_per_s", "train_images_per_s_min", "train_images_per_s_max",
        "infer_images_per_s", "infer_images_per_s_min", "infer_images_per_s_max",
        "peak_memory_bytes", "peak_memory_kind",
        "epochs_completed", "train_steps", "train_images_seen", "train_seconds",
        *benchmark_metrics(),  # the metrics registered with a benchmark position (ptxray.metrics)
        "device", "device_name", "torch_threads", "seconds_total",
    )  # fmt: skip


# ---- outputs --------------------------------------------------------------------------------
def _num(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return math.nan
    return f


def _fmt(value: Any, digits: int = 2) -> str:
    f = _num(value)
    return "-" if not math.isfinite(f) else f"{f:.{digits}f}"


def _fmt_int(value: Any) -> str:
    f = _num(value)
    return "-" if not math.isfinite(f) else f"{int(f)}"


def _fmt_batch(row: dict[str, Any]) -> str:
    if row.get("max_batch_size") is None:
        return "-"
    limit = row.get("max_batch_limit")
    return f"{row['max_batch_size']}" + (" (cap)" if limit == "cap" else " (OOM)" if limit == "out of memory" else " (budget)")


def _fmt_rate(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "-"
    return f"{_fmt(row[key], 1)} ({_fmt(row[key + '_min'], 1)}–{_fmt(row[key + '_max'], 1)})"


# (header, cell function): the terminal table and the Markdown table show the same cells.
TABLE: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("architecture", lambda r: r["name"] + (f" {CHEXNET_MARK} CheXNet" if is_chexnet(r) else "")),
    ("params (M)", lambda r: _fmt(_num(r.get("params_trainable")) / 1e6)),
    ("GFLOPs/img", lambda r: _fmt(r.get("gflops_per_image"))),
    ("max batch", _fmt_batch),
    ("batch", lambda r: _fmt_int(r.get("batch_size"))),
    ("train img/s (min–max)", lambda r: _fmt_rate(r, "train_images_per_s")),
    ("infer img/s (min–max)", lambda r: _fmt_rate(r, "infer_images_per_s")),
    ("peak mem (MiB)", lambda r: _fmt(_num(r.get("peak_memory_bytes")) / 2**20, 0)),
    ("epochs", lambda r: _fmt(r.get("epochs_completed"))),
    ("Dice", lambda r: _fmt(r.get("val_dice"), 4)),
    ("Dice pos", lambda r: _fmt(r.get("val_dice_pos"), 4)),
    ("IoU", lambda r: _fmt(r.get("val_iou"), 4)),
    ("AUC", lambda r: _fmt(r.get("val_auc"), 3)),
    ("empty Dice", lambda r: _fmt(r.get("val_empty_dice"), 4)),
]


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[cell(r) if r.get("status") == "ok" or i == 0 else "-" for i, (_, cell) in enumerate(TABLE)] for r in results]


def devices_of(results: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({f"{r['device']} ({r.get('device_name')})" for r in results if r.get("device")})


def _caption(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    versions = env["versions"]
    return (
        f"{', '.join(devices_of(report['results']))}; torch {versions['torch']}, torchvision {versions['torchvision']}, "
        f"smp {versions['segmentation-models-pytorch']}; {report['settings_text']}; {report['mode']}; "
        f"fold {s['fold']}, {report['image_size_px']} px"
    )


def print_table(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Job logs and CI are not terminals: without a width, rich would squeeze the table into 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title="ptxray benchmark", caption=_caption(report))
    for i, (header, _) in enumerate(TABLE):
        table.add_column(header, justify="left" if i == 0 else "right")
    for cells in table_rows(report["results"]):
        table.add_row(*cells)
    console.print(table)
    for r in report["results"]:
        if r.get("status") != "ok":
            console.print(f"[red]{r['name']}[/]: {r.get('error')}")
    for note in report["device_notes"]:
        console.print(f"[yellow]note[/]: {note}")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_clean(value.item())
    return value


def _footer(fig: Any, report: dict[str, Any]) -> None:
    import textwrap

    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(_caption(report), 160)), fontsize=6, va="bottom", color="0.35")


def is_chexnet(row: dict[str, Any]) -> bool:
    """Whether the row's encoder started from CheXNet weights (`--chexnet`)."""
    return str(row.get("encoder_weights") or "").startswith("chexnet:")


CHEXNET_MARK = "★"
# One marker per architecture besides its colour, so points stay apart in print and for colour-blind
# readers; CheXNet-initialised encoders always get the star.
_MARKERS = "osD^vP<>Xhpd"


def _point_style(i: int, row: dict[str, Any]) -> dict[str, Any]:
    from matplotlib import colormaps

    color = colormaps["tab20" if i >= 10 else "tab10"](i % 20 if i >= 10 else i)
    if is_chexnet(row):
        return {"fmt": "*", "color": color, "markersize": 15, "markeredgecolor": "black", "markeredgewidth": 0.6}
    return {"fmt": _MARKERS[i % len(_MARKERS)], "color": color, "markersize": 7}


def _arch_label(row: dict[str, Any], short: bool = False) -> str:
    if not is_chexnet(row):
        return row["name"]
    return f"{row['name']} {CHEXNET_MARK} CheXNet" + ("" if short else "-initialised encoder")


def plot_quality_vs_throughput(report: dict[str, Any], path: Path):
    """Quality against training throughput, one point per architecture; returns the Figure.

    Points are named by a shared legend, not by labels beside them: architectures of similar
    throughput and quality (every model still predicting "empty" after a short budget) sit on one
    spot, where labels would cover each other."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [r for r in report["results"] if r.get("status") == "ok"]
    fig = Figure(figsize=(15, 5.4))
    axes = fig.subplots(1, 2)
    handles: dict[str, Any] = {}
    for ax, key, title in ((axes[0], "val_dice", "Dice (competition rule)"), (axes[1], "val_dice_pos", "Dice on positive images")):
        for i, r in enumerate(ok):
            x, y = _num(r["train_images_per_s"]), _num(r.get(key))
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            err = [[x - _num(r["train_images_per_s_min"])], [_num(r["train_images_per_s_max"]) - x]]
            handles[_arch_label(r)] = ax.errorbar([x], [y], xerr=err, capsize=3, alpha=0.85, label=_arch_label(r), **_point_style(i, r))
        baseline = _num(ok[0].get("val_empty_dice")) if ok else math.nan
        if key == "val_dice" and math.isfinite(baseline):
            line = ax.axhline(baseline, ls="--", color="0.5", label="all-empty baseline (same images)")
            ax.legend(handles=[line], fontsize=8, loc="lower right")
        xs = [_num(r["train_images_per_s"]) for r in ok if math.isfinite(_num(r["train_images_per_s"]))]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.2, y=0.1)
        ax.set_xlabel("training throughput (images/s, median; bars: min–max)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} after {report['settings_text']}")
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.785, 0.55), fontsize=8,
                   title="architecture", title_fontsize=9, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 0.775, 1))
    _footer(fig, report)
    fig.savefig(path, dpi=110)
    return fig


def plot_cost_bars(report: dict[str, Any], path: Path):
    """Throughput, memory and largest batch per architecture; returns the Figure. A largest batch
    that stopped at the search's cap is drawn as a cap (hatched, "≥ N (cap)"): the model fits at
    least that, and how much more is unknown."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [r for r in report["results"] if r.get("status") == "ok"]
    names = [r["name"] + (f" {CHEXNET_MARK}" if is_chexnet(r) else "") for r in ok]
    ypos = np.arange(len(ok))
    fig = Figure(figsize=(16, 0.45 * len(ok) + 2.2))
    axes = fig.subplots(1, 4, sharey=True)
    panels = [
        ("train_images_per_s", "training images/s", 1.0),
        ("infer_images_per_s", "inference images/s", 1.0),
        ("peak_memory_bytes", "peak memory while training (MiB)", 1 / 2**20),
        ("max_batch_size", "largest batch that fits", 1.0),
    ]
    for ax, (key, label, scale) in zip(axes, panels):
        values = np.array([_num(r.get(key)) * scale for r in ok])
        if key.endswith("_per_s"):
            lo = values - np.array([_num(r[key + "_min"]) for r in ok])
            hi = np.array([_num(r[key + "_max"]) for r in ok]) - values
            ax.barh(ypos, values, xerr=[lo, hi], capsize=3, color="tab:blue")
        elif key == "max_batch_size":
            _batch_bars(ax, ok, ypos, values)
            label += "\n(hatched, ≥ N: the search's cap)"
        else:
            ax.barh(ypos, values, color="tab:orange")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    memory = "CUDA max allocated" if report["memory_kind_text"].startswith("CUDA") else "process RSS growth"
    chexnet = f"; {CHEXNET_MARK} CheXNet-initialised encoder" if any(is_chexnet(r) for r in ok) else ""
    fig.suptitle(f"cost per architecture at {report['image_size_px']} px (peak memory: {memory}; see the report){chexnet}")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96), w_pad=2.5)
    _footer(fig, report)
    fig.savefig(path, dpi=110)
    return fig


_LIMIT_TEXT = {"out of memory": "OOM above", "memory budget": "memory budget"}


def _batch_bars(ax: Any, rows: list[dict[str, Any]], ypos: np.ndarray, values: np.ndarray) -> None:
    """The largest-batch panel: a bar that reached the search's cap is a lower bound (hatched, a
    dashed line at the cap, "≥ N (cap)"); one that hit out-of-memory or the memory budget is the limit."""
    capped = np.array([r.get("max_batch_limit") == "cap" for r in rows])
    ax.barh(ypos[~capped], values[~capped], color="tab:green")
    ax.barh(ypos[capped], values[capped], color="white", edgecolor="tab:green", hatch="//")
    for cap in sorted({int(_num(r.get("max_batch_cap"))) for r, c in zip(rows, capped) if c and math.isfinite(_num(r.get("max_batch_cap")))}):
        ax.axvline(cap, color="tab:red", ls="--", lw=1)
    finite = values[np.isfinite(values)]
    for y, v, r, c in zip(ypos, values, rows, capped):
        if math.isfinite(v):
            text = f" ≥ {int(v)} (cap)" if c else f" {int(v)} ({_LIMIT_TEXT.get(r.get('max_batch_limit'), r.get('max_batch_limit'))})"
            ax.text(v, y, text, va="center", fontsize=8)
    ax.set_xlim(0, (finite.max() if finite.size else 1) * 1.6)


def plot_learning_curves(report: dict[str, Any], path: Path):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    ok = [r for r in report["results"] if r.get("status") == "ok" and r.get("history")]
    cols = min(3, max(1, len(ok)))
    rows = max(1, math.ceil(len(ok) / cols))
    fig = Figure(figsize=(5 * cols, 3.4 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(ok):]:
        ax.axis("off")
    legend: tuple[list, list] = ([], [])
    for ax, r in zip(axes.flat, ok):
        h = r["history"]
        x = [_num(e["train_seconds"]) for e in h]
        ax.plot(x, [_num(e["train_loss"]) for e in h], "o-", color="tab:red", label="train loss")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("train loss", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(x, [_num(e.get("val_dice")) for e in h], "s-", color="tab:blue", label="val Dice")
        ax2.plot(x, [_num(e.get("val_dice_pos")) for e in h], "^-", color="tab:cyan", label="val Dice pos")
        ax2.plot(x, [_num(e.get("val_empty_dice")) for e in h], "--", color="0.5", label="empty baseline")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation")
        ax.set_title(f"{_arch_label(r, short=True)} (batch {r['batch_size']})", fontsize=10)
        ax.grid(alpha=0.3)
        if not legend[0]:
            for a in (ax, ax2):
                handles, labels = a.get_legend_handles_labels()
                legend[0].extend(handles)
                legend[1].extend(labels)
    fig.suptitle(
        f"learning curves after {report['settings_text']} (one point per epoch; under a seconds budget the last may be partial)",
        fontsize=10, y=0.995,
    )  # fmt: skip
    if legend[0]:
        fig.legend(*legend, loc="upper center", bbox_to_anchor=(0.5, 0.965), fontsize=8, ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.92))
    _footer(fig, report)
    fig.savefig(path, dpi=100)
    return fig


def _markdown_table(results: Sequence[dict[str, Any]]) -> str:
    headers = [h for h, _ in TABLE]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for cells in table_rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    env, s, files = report["environment"], report["settings"], report["files"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    errors = [r for r in report["results"] if r.get("status") != "ok"]
    parts = [
        "# ptxray benchmark",
        "",
        f"Command: `{report['command']}`" if report.get("command") else "",
        "",
        f"- **Device**: {', '.join(devices_of(report['results']))}. "
        + " ".join(report["device_notes"]),
        f"- **Software**: Python {env['python']}, {versions}; {env['platform']}; torch threads {env['torch_threads']}.",
        f"- **Data**: cache `{report['cache']}`, fold {s['fold']} ({report['n_train']} training / "
        f"{report['n_val']} validation images, {report['n_val_positive']} positive), {report['image_size_px']} px, "
        f"channels {report['channels']}.",
        f"- **Budget**: {report['settings_text']} per architecture; batch size "
        f"{'the largest that fits (per architecture)' if s['batch_size'] == 'auto' else s['batch_size']}; "
        f"timing: {s['warmup_steps']} warm-up steps discarded, then {s['repeats']} repeats of {s['timing_steps']} steps "
        f"(median, min–max); {'torch.compile on' if s['compile'] else 'no torch.compile'}.",
        f"- **Run as**: {report['mode']}.",
        "",
        _markdown_table(report["results"]),
        "",
    ]
    if errors:
        parts += ["Failed architectures:", ""] + [f"- `{r['name']}`: {r.get('error')}" for r in errors] + [""]
    parts += [
        "![quality against training throughput](" + Path(files["quality_vs_throughput"]).name + ")",
        "",
        "![throughput, memory and batch size](" + Path(files["cost_bars"]).name + ")",
        "",
        "![learning curves](" + Path(files["learning_curves"]).name + ")",
        "",
        "Files: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for k, p in files.items() if k != "markdown"),
        "",
        "## How to read it",
        "",
        "- **params (M)**: trainable parameters, millions. **GFLOPs/img**: FLOPs (2 × MACs) of one "
        "eval-mode forward of one image at this size (torch FlopCounterMode: convolutions and matrix "
        "products; maskrcnn's count depends on its detections and leaves out roi_align/NMS).",
        "- **max batch**: the largest training batch that fit (doubling, then bisection); `(cap)`: the search's "
        "cap was reached (on CPU the cap or half the available memory bounds it; there is no OOM exception), "
        "`(OOM)`: a larger one ran out of memory, `(budget)`: a larger one exceeded the memory budget. In the plot a "
        "capped bar is hatched and labelled ≥ N: the true limit is higher.",
        f"- **{CHEXNET_MARK} CheXNet**: the DenseNet-121 encoder started from the CheXNet checkpoint (`--chexnet`), "
        "drawn as a star in the quality plot; every other encoder starts from random weights.",
        "- **train / infer img/s**: a training step (forward, loss, backward, optimizer step) and an eval forward "
        "on a batch resident on the device: data loading and augmentation excluded. Median over repeats (min–max).",
        f"- **peak mem**: {report['memory_kind_text']}.",
        "- **epochs**: optimizer steps taken / steps in one epoch (a trailing one-image batch is skipped: BatchNorm "
        "cannot train on it). A seconds budget counts training time only and is checked between steps.",
        "- **Dice** (competition rule: empty prediction on an empty mask = 1), **Dice pos** (positive images only), "
        "**IoU**, **AUC** (image-level score), and **empty Dice**: what predicting empty everywhere scores on the "
        "same images. Quality is measured after the budget (last epoch, not the best).",
        "- maskrcnn: torchvision's Mask R-CNN (ResNet-50 FPN, random init); instance masks merged into one "
        "map (max of score × mask), best box score as the image-level score. It trains on its own loss.",
    ]
    if any(str(r.get("device", "")).startswith("cpu") for r in report["results"]):
        parts.append(
            "- **CPU run**: float32 (no autocast), no GPU. Throughput and memory rank the "
            "architectures on this CPU only; on a GPU (bf16) the ranking and the ratios differ."
        )
    return "\n".join(parts) + "\n"


def _comparability_notes(results: Sequence[dict[str, Any]], mode: str) -> tuple[list[str], str]:
    """What the report says about comparing rows: one note per device situation, and what the
    peak-memory column measures."""
    devices = devices_of(results)
    device_notes = []
    if len(devices) > 1:
        device_notes.append(
            f"The architectures ran on {len(devices)} different devices: their throughput and memory are NOT comparable."
        )
    else:
        device_notes.append("Throughput and memory are comparable between these rows only (one device).")
    kinds = {r.get("peak_memory_kind") for r in results if r.get("peak_memory_kind")}
    memory_kind_text = (
        "CUDA max allocated during the training timing, above what was allocated before the model was built"
        if kinds and all(str(k).startswith("cuda") for k in kinds)
        else "process resident-set peak during the training timing, above the resident set before the model "
        "was built (" + ("each architecture in its own Ray trial process" if mode.lower().startswith("ray") else
                         "all architectures in one process: the peak is reset per architecture and freed memory "
                         "returned to the OS first, but allocator caches are shared") + ")"
    )  # fmt: skip
    return device_notes, memory_kind_text


def write_report(
    results: Sequence[dict[str, Any]],
    *,
    cfg: Config,
    cache_uri: str,
    settings: BenchmarkSettings,
    out_dir: str | Path,
    mode: str,
    command: str = "",
    _published_at: str = "",
) -> dict[str, Any]:
    """Write benchmark.json, benchmark.csv, three PNG plots and benchmark.md under `out_dir` (a
    folder or an s3:// prefix: written locally first, then uploaded); return the report.
    (`_published_at`: the prefix the files are uploaded to, named in the report instead of `out_dir`.)"""
    from ptxray import storage

    if storage.is_uri(str(out_dir)) and not str(out_dir).startswith("file://"):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ptxray-benchmark-") as tmp:
            report = write_report(
                results, cfg=cfg, cache_uri=cache_uri, settings=settings, out_dir=tmp, mode=mode, command=command,
                _published_at=str(out_dir),
            )
            for uri in report["files"].values():
                storage.write_bytes_atomic(uri, (Path(tmp) / Path(uri).name).read_bytes())
        return report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = check_cache(cfg, cache_uri)
    cache = Cache.open(cache_uri)
    train_ids, val_ids = cache.split_ids(settings.fold)
    idx = cache.index()
    labels = dict(zip(idx.column("image_id").to_pylist(), idx.column("label").to_pylist()))
    # Each row carries the environment of the process that measured it (a Ray trial's, maybe remote).
    env = next((r["environment"] for r in results if r.get("environment")), None) or environment(resolve_device(settings))
    device_notes, memory_kind_text = _comparability_notes(results, mode)
    report: dict[str, Any] = {
        "command": command,
        "mode": mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "settings": settings.to_dict(),
        "settings_text": settings.budget_text(),
        "device_notes": device_notes,
        "memory_kind_text": memory_kind_text,
        "cache": cache.uri,
        "image_size_px": cfg.preprocess.image_size_px,
        "channels": list(cfg.preprocess.channels),
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "n_val_positive": int(sum(1 for i in val_ids if labels.get(i))),
        "config": cfg.to_dict(),
        "results": [dict(r) for r in results],
    }
    files = {
        "json": str(out / "benchmark.json"),
        "csv": str(out / "benchmark.csv"),
        "markdown": str(out / "benchmark.md"),
        "quality_vs_throughput": str(out / "quality_vs_throughput.png"),
        "cost_bars": str(out / "throughput_memory.png"),
        "learning_curves": str(out / "learning_curves.png"),
    }
    report["files"] = {k: storage.join(_published_at, Path(v).name) for k, v in files.items()} if _published_at else files
    plot_quality_vs_throughput(report, Path(files["quality_vs_throughput"]))
    plot_cost_bars(report, Path(files["cost_bars"]))
    plot_learning_curves(report, Path(files["learning_curves"]))
    context = {
        "image_size_px": report["image_size_px"],
        "fold": settings.fold,
        "budget": report["settings_text"],
        "mode": mode,
        "torch": env["versions"]["torch"],
        "torchvision": env["versions"]["torchvision"],
        "smp": env["versions"]["segmentation-models-pytorch"],
        "command": command,
    }
    columns = result_columns()
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns) + list(context))
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: _csv_value(r.get(k)) for k in columns}, **context})
    Path(files["json"]).write_text(json.dumps(_json_clean(report), indent=2, default=str) + "\n")
    Path(files["markdown"]).write_text(_markdown(report))
    return report


__all__ = [
    "plot_cost_bars",
    "plot_learning_curves",
    "plot_quality_vs_throughput",
    "print_table",
    "result_columns",
    "table_rows",
    "write_report",
]
