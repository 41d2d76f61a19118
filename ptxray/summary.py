"""Cross-validation summary of a K-fold x grid experiment: plain data in, table and files out.

`ray_tune.py` turns Tune's results into `TrialRecord`s; everything here runs and is tested
without Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from ptxray import storage
from ptxray.metrics import summary_metrics, summary_titles


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]  # the grid values of this configuration (without the fold)
    fold: int
    status: str  # TERMINATED, ERROR, RUNNING, PENDING ...
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per reported epoch
    checkpoint: str | None = None  # the Train checkpoint folder of its last report
    error: str | None = None


def config_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def best_epoch(history: Sequence[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [h for h in history if isinstance(h.get(metric), (int, float)) and not math.isnan(h[metric])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda h: h[metric])


def asha_rung(epochs: int, grace_period: int, reduction_factor: float) -> int:
    """Index of the highest ASHA rung a trial passed: rung k sits at grace * rf**k epochs."""
    rung, milestone = -1, grace_period
    while epochs >= milestone:
        rung += 1
        milestone = math.ceil(milestone * reduction_factor)
    return rung


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def summarize(
    trials: Sequence[TrialRecord],
    *,
    metric: str,
    mode: str,
    num_folds: int,
    max_epochs: int,
    grace_period: int = 1,
    reduction_factor: float = 2,
) -> dict[str, Any]:
    """Per configuration: folds completed, epochs and rung reached, mean ± std of every metric."""
    groups: dict[str, list[TrialRecord]] = {}
    for t in trials:
        groups.setdefault(config_key(t.params), []).append(t)
    # Reported per configuration as mean ± std over folds, each fold at its best epoch: the metrics
    # registered with a summary position (ptxray.metrics), in that order, and the one searched on.
    shown = summary_metrics()
    reported = shown + ((metric,) if metric not in shown else ())
    rows = []
    for key, members in groups.items():
        members = sorted(members, key=lambda t: t.fold)
        bests = {t.fold: best_epoch(t.history, metric, mode) for t in members}
        epochs = [len(t.history) for t in members]
        row: dict[str, Any] = {
            "params": json.loads(key),
            "folds": num_folds,
            "folds_completed": sum(1 for t in members if t.status == "TERMINATED"),
            "folds_full_length": sum(1 for t in members if t.status == "TERMINATED" and len(t.history) >= max_epochs),
            "errors": [f"fold {t.fold}: {t.error}" for t in members if t.status == "ERROR"],
            "epochs_min": min(epochs) if epochs else 0,
            "epochs_max": max(epochs) if epochs else 0,
            "rung_reached": max((asha_rung(e, grace_period, reduction_factor) for e in epochs), default=-1),
            "fold_checkpoints": {t.fold: t.checkpoint for t in members if t.checkpoint},
            "trial_ids": {t.fold: t.trial_id for t in members},
        }
        for m in reported:
            mean, std = _mean_std([b[m] if b and m in b and b[m] is not None else float("nan") for b in bests.values()])
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        rows.append(row)

    sign = 1 if mode == "max" else -1

    def rank(r: dict[str, Any]) -> tuple:
        value = r[f"{metric}_mean"]
        # Configurations with every fold completed rank first: a partial mean is not comparable.
        return (r["folds_completed"] == r["folds"], -math.inf if math.isnan(value) else sign * value)

    rows.sort(key=rank, reverse=True)
    best = rows[0] if rows else None
    return {"metric": metric, "mode": mode, "rows": rows, "best": best}


def _fmt(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def print_summary(summary: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Job logs and CI are not terminals: without a width, rich would squeeze the table into 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    table = Table(title=f"K-fold summary (mean ± std over folds, each at its best {summary['metric']})")
    table.add_column("#", justify="right")
    table.add_column("configuration")
    table.add_column("folds done", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("rung", justify="right")
    for title in summary_titles():
        table.add_column(title, justify="right")
    for i, r in enumerate(summary["rows"], 1):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "(base config)"
        epochs = str(r["epochs_max"]) if r["epochs_min"] == r["epochs_max"] else f"{r['epochs_min']}–{r['epochs_max']}"
        table.add_row(
            str(i),
            params,
            f"{r['folds_completed']}/{r['folds']}",
            epochs,
            str(r["rung_reached"]),
            *[_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in summary_metrics()],
        )
    console.print(table)
    best = summary.get("best")
    if best:
        console.print(f"best configuration: {best['params'] or '(base config)'}")
        for fold, path in sorted(best["fold_checkpoints"].items()):
            console.print(f"  fold {fold} checkpoint: {storage.resolve_in_run(path, summary.get('experiment', '.'))}")


def write_summary(summary: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """summary.json and summary.csv under out_dir (local or s3://); returns their paths."""
    json_path = out_dir.rstrip("/") + "/summary.json"
    csv_path = out_dir.rstrip("/") + "/summary.csv"
    storage.write_bytes_atomic(json_path, json.dumps(summary, indent=2, default=str).encode())
    buf = io.StringIO()
    rows = summary["rows"]
    fields = ["params", "folds", "folds_completed", "folds_full_length", "epochs_min", "epochs_max", "rung_reached"]
    fields += [f"{m}_{s}" for m in summary_metrics() for s in ("mean", "std")]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "params": json.dumps(r["params"], sort_keys=True)})
    storage.write_bytes_atomic(csv_path, buf.getvalue().encode())
    return json_path, csv_path


__all__ = ["TrialRecord", "asha_rung", "best_epoch", "print_summary", "summarize", "write_summary"]
