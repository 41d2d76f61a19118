"""`ptxray evaluate`: the out-of-fold report of a run (Markdown + HTML + PNG plots).

What it holds, all from the run's out-of-fold predictions (`<run>/oof/oof.npz`, computed once):
- per fold and overall: images, positives, the empty baseline (predicting empty everywhere), the
  competition Dice of the run's decision rule (stored thresholds, else a search done here and not
  stored) and of a plain 0.5 binarisation, Dice on positive images, ROC AUC of the classification
  head, and sensitivity / specificity of the rule's empty-vs-non-empty decision;
- the ROC curve of the classification head and the confusion matrix of the decision;
- a histogram of per-image Dice (positive and negative images apart);
- learning curves per fold from each fold's metrics.jsonl;
- the best (positive images) and worst cases as overlays (prediction red, ground truth green),
  re-predicted from the cache by the image's own fold model.

With `split="holdout"` the same report is written for the hold-out patients (fold -1, set aside
by `data.holdout_fraction`: the paper's test split) to `<run>/report-holdout`, scored by the
ensemble of every fold model, with the decision rule chosen on the out-of-fold predictions (never
on the hold-out itself).

Dice here is computed at the training size against the cached (resized) masks: close to, not
the same as, the competition's 1024 px score.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from typing import Any, Sequence

import numpy as np

from ptxray import storage
from ptxray.postprocess import (
    THRESHOLDS_FILE,
    OofStats,
    Thresholds,
    competition_dice,
    first_level_above,
    load_thresholds,
    per_image_dice,
    quantize,
    search_thresholds,
)
from ptxray.predict import Ensemble, encode_png, load_or_compute_oof, overlay, resolve_cache
from ptxray.runs import Run, load_fold_model, open_run

log = logging.getLogger("ptxray")

REPORT_DIR = "report"
REPORT_DIRS = {"oof": REPORT_DIR, "holdout": "report-holdout"}
SPLIT_TEXT = {"oof": "out-of-fold", "holdout": "hold-out, fold ensemble"}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def oof_metrics(stats: OofStats, th: Thresholds, plain: Thresholds) -> dict[str, float]:
    """The report's numbers for one set of OOF images under rule `th` (and the `plain` reference)."""
    from sklearn.metrics import roc_auc_score

    dice, kept = per_image_dice(stats, th)
    dice_plain, _ = per_image_dice(stats, plain)
    pos = stats.positive
    tp, fp = int((kept & pos).sum()), int((kept & ~pos).sum())
    fn, tn = int((~kept & pos).sum()), int((~kept & ~pos).sum())
    two_classes = 0 < pos.sum() < len(pos)
    return {
        "images": len(stats),
        "positive": int(pos.sum()),
        "empty_dice": float((~pos).mean()) if len(stats) else float("nan"),
        "dice": float(dice.mean()) if len(stats) else float("nan"),
        "dice_plain": float(dice_plain.mean()) if len(stats) else float("nan"),
        "dice_pos": float(dice[pos].mean()) if pos.any() else float("nan"),
        "auc": float(roc_auc_score(pos, stats.cls_prob)) if two_classes else float("nan"),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# ---------------------------------------------------------------------------------------------
# Plots: matplotlib's object API (Figure, no pyplot), so no global backend is touched.


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_roc(stats: OofStats, split_text: str = SPLIT_TEXT["oof"]) -> bytes | None:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    pos = stats.positive
    if not 0 < pos.sum() < len(pos):
        return None
    fpr, tpr, _ = roc_curve(pos, stats.cls_prob)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label=f"classification head (AUC {roc_auc_score(pos, stats.cls_prob):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {split_text}")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def plot_confusion(m: dict[str, float], rule: str, split_text: str = SPLIT_TEXT["oof"]) -> bytes:
    from matplotlib.figure import Figure

    cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig = Figure(figsize=(4, 3.6))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], ["empty", "non-empty"])
    ax.set_yticks([0, 1], ["empty", "non-empty"])
    ax.set(xlabel="predicted", ylabel="true", title=f"decision ({rule} rule), {split_text}")
    return _png(fig)


def plot_dice_hist(dice: np.ndarray, positive: np.ndarray, split_text: str = SPLIT_TEXT["oof"]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 21)
    ax.hist([dice[positive], dice[~positive]], bins=bins, stacked=True, label=["pneumothorax", "no pneumothorax"])
    ax.set(xlabel="per-image Dice (competition rule)", ylabel="images", title=f"Dice histogram, {split_text}")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_learning_curves(histories: dict[int, list[dict[str, Any]]]) -> bytes | None:
    from matplotlib.figure import Figure

    if not any(histories.values()):
        return None
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_dice = fig.subplots(1, 2)
    for n, (fold, hist) in enumerate(sorted(histories.items())):
        epochs = [h["epoch"] + 1 for h in hist]
        # One colour per fold, one line style per metric.
        for ax, key, style in ((ax_loss, "train_loss", "-"), (ax_loss, "val_loss", "--"), (ax_dice, "val_dice", "-"), (ax_dice, "val_dice_cls", ":")):
            vals = [h.get(key) for h in hist]
            if any(v is not None for v in vals):
                ax.plot(epochs, [np.nan if v is None else v for v in vals], style, color=f"C{n}", marker=".", label=f"fold {fold} {key}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss per fold")
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="validation Dice per fold (0.5 threshold)")
    for ax in (ax_loss, ax_dice):
        ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Cases


def pick_cases(stats: OofStats, dice: np.ndarray, kept_area: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """(best k positive images with Dice > 0, worst k other images with Dice < 1) by per-image Dice;
    ties: larger lesion / larger error first."""
    n_true = stats.n_true
    pos = np.flatnonzero(stats.positive)
    best = [i for i in sorted(pos.tolist(), key=lambda i: (-dice[i], -n_true[i])) if dice[i] > 0][:k]
    worst = sorted(range(len(stats)), key=lambda i: (dice[i], -(n_true[i] + kept_area[i])))
    worst = [i for i in worst if dice[i] < 1.0 and i not in best][:k]
    return best, worst


def predict_cases(run: Run, cache_uri: str | None, stats: OofStats, indices: Sequence[int], th: Thresholds, device: str | None) -> dict[int, dict[str, Any]]:
    """Re-predict the chosen images with the model that scored them (an OOF image's own fold model;
    the ensemble of every fold for a hold-out image, fold -1): image, masks and recomputed Dice."""
    cache = resolve_cache(run, cache_uri or stats.meta.get("cache"))
    tta = bool(stats.meta.get("tta", True))
    out: dict[int, dict[str, Any]] = {}
    by_fold: dict[int, list[int]] = {}
    for i in indices:
        by_fold.setdefault(int(stats.folds[i]), []).append(i)
    refs = {r.fold: r for r in run.folds}
    for fold, idx in by_fold.items():
        models = [load_fold_model(r)[0] for r in run.folds] if fold < 0 else [load_fold_model(refs[fold])[0]]
        ensemble = Ensemble(models, device, tta=tta)
        where = {str(stats.image_ids[i]): i for i in idx}
        for images, masks, ids in cache.iter_arrays(list(where)):
            prob, cls_prob = ensemble.predict(images)
            pred = th.masks(quantize(prob), cls_prob)  # bool (B, S, S)
            true = masks != 0
            dice = competition_dice((pred & true).sum(axis=(1, 2)), pred.sum(axis=(1, 2)), true.sum(axis=(1, 2)))
            for j, image_id in enumerate(ids):
                out[where[image_id]] = {"image": images[j, 0], "pred": pred[j], "true": true[j], "dice": float(dice[j]), "cls_prob": float(cls_prob[j])}
    return out


def _case_png(case: dict[str, Any], min_side_px: int = 256) -> bytes:
    import cv2

    image, pred, true = case["image"], case["pred"], case["true"]
    scale = max(1, int(math.ceil(min_side_px / image.shape[0])))
    if scale > 1:  # small training sizes: enlarge (nearest) so the outlines stay visible
        size = (image.shape[1] * scale, image.shape[0] * scale)
        image = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
        pred = cv2.resize(pred.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        true = cv2.resize(true.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return encode_png(overlay(image, pred, true))


# ---------------------------------------------------------------------------------------------
# The report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4f}"
    return str(v)


METRIC_COLUMNS = [
    ("images", "images"),
    ("positive", "positive"),
    ("empty_dice", "empty baseline"),
    ("dice", "Dice (rule)"),
    ("dice_plain", "Dice (0.5)"),
    ("dice_pos", "Dice positives"),
    ("auc", "AUC (cls head)"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
]


def _tables(rows: list[dict[str, Any]]) -> tuple[str, str]:
    head = ["fold"] + [t for _, t in METRIC_COLUMNS]
    body = [[str(r["fold"])] + [_fmt(r[k]) for k, _ in METRIC_COLUMNS] for r in rows]
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(b) + " |\n" for b in body)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    tb = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>" for b in body)
    return md, f"<table><tr>{th}</tr>{tb}</table>"


def evaluate_run(
    run_dir: str,
    *,
    cache: str | None = None,
    out: str | None = None,
    device: str | None = None,
    cases: int = 4,
    recompute: bool = False,
    split: str = "oof",
) -> dict[str, Any]:
    """Write the report of `split` ("oof" or "holdout") under `out` (default `<run>/report`, or
    `<run>/report-holdout`); returns its numbers and file paths."""
    if split not in REPORT_DIRS:
        raise ValueError(f"--split {split!r}: choose from {sorted(REPORT_DIRS)}")
    run = open_run(run_dir)
    out = out or storage.join(run.run_dir, REPORT_DIRS[split])
    stats, computed = load_or_compute_oof(run, cache, recompute=recompute, device=device, split=split)
    th = load_thresholds(storage.join(run.run_dir, THRESHOLDS_FILE))
    if th is None:
        # Chosen on the out-of-fold predictions in either case: a rule tuned on the hold-out would flatter it.
        oof = stats if split == "oof" else load_or_compute_oof(run, cache or stats.meta.get("cache"), device=device)[0]
        th = search_thresholds(oof, source="out-of-fold search in `evaluate` (not stored; run `ptxray thresholds`)").thresholds
    size = stats.size_px
    plain = Thresholds(0.5, 0, 0.5, 0.0, size, rule="plain", source="fixed 0.5")
    split_text = SPLIT_TEXT[split]

    if split == "oof":
        rows = [{"fold": int(f), **oof_metrics(stats.subset(stats.folds == f), th, plain)} for f in sorted(set(stats.folds.tolist()))]
        overall = {"fold": "all", **oof_metrics(stats, th, plain)}
    else:
        rows, overall = [], {"fold": "hold-out", **oof_metrics(stats, th, plain)}
    rows.append(overall)
    dice, kept = per_image_dice(stats, th)
    ge_all, _ = stats.counts_above()
    kept_area = np.where(kept, ge_all[:, int(first_level_above(th.bin_threshold))], 0)

    files: dict[str, str] = {}

    def put(name: str, data: bytes | None) -> None:
        if data is not None:
            files[name] = storage.join(out, name)
            storage.write_bytes_atomic(files[name], data)

    put("roc.png", plot_roc(stats, split_text))
    put("confusion.png", plot_confusion(overall, th.rule, split_text))
    put("dice_hist.png", plot_dice_hist(dice, stats.positive, split_text))
    put("learning_curves.png", plot_learning_curves({r.fold: r.history() for r in run.folds}))

    best, worst = pick_cases(stats, dice, kept_area, cases)
    predicted = predict_cases(run, cache, stats, best + worst, th, device) if best or worst else {}
    case_rows: dict[str, list[dict[str, Any]]] = {"best": [], "worst": []}
    for kind, idx in (("best", best), ("worst", worst)):
        for rank, i in enumerate(idx, 1):
            c = predicted[i]
            name = f"cases/{kind}-{rank}.png"
            put(name, _case_png(c))
            case_rows[kind].append(
                {
                    "image": name,
                    "image_id": str(stats.image_ids[i]),
                    "fold": int(stats.folds[i]),
                    "dice": float(dice[i]),
                    "dice_recomputed": c["dice"],
                    "cls_prob": float(stats.cls_prob[i]),
                    "true_area_px": int(stats.n_true[i]),
                    "pred_area_px": int(c["pred"].sum()),
                }
            )

    doc = {
        "run": run.run_dir,
        "kind": run.kind,
        "split": split,
        "oof": {"computed_now": computed, **stats.meta},
        "thresholds": th.to_dict(),
        "size_px": size,
        "metrics": rows,
        "cases": case_rows,
    }
    put("metrics.json", json.dumps(doc, indent=2, default=str).encode())
    md, html_doc = render(doc, files)
    put("report.md", md.encode())
    put("report.html", html_doc.encode())
    doc["files"] = files
    return doc


def render(doc: dict[str, Any], files: dict[str, str]) -> tuple[str, str]:
    """(Markdown, HTML) of the report; images are linked by their path relative to the report."""
    th = doc["thresholds"]
    md_table, html_table = _tables(doc["metrics"])
    rule = (
        f"rule **{th['rule']}**: keep a mask when ≥ {th['min_area_px']} px (at {th['size_px']} px) exceed "
        f"{th['top_score']} and the classification probability ≥ {th['cls_threshold']}; binarise at "
        f"{th['bin_threshold']} (source: {th['source']})"
    )
    plots = [(n, t) for n, t in (
        ("roc.png", "ROC of the classification head"),
        ("confusion.png", "Confusion matrix of the decision"),
        ("dice_hist.png", "Per-image Dice"),
        ("learning_curves.png", "Learning curves"),
    ) if n in files]

    title = "Hold-out report (fold ensemble)" if doc.get("split") == "holdout" else "Out-of-fold report"
    md = [f"# {title}: {doc['run']}", "", f"Decision {rule}.", "",
          "Dice is the competition rule (both empty = 1), computed at the training size.", "", md_table]
    for name, title in plots:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    for kind, title in (("best", "Best cases (positive images)"), ("worst", "Worst cases")):
        md += [f"## {title}", "", "prediction red, ground truth green", "",
               "| overlay | image | fold | Dice | cls prob | true px | predicted px |", "|---|---|---|---|---|---|---|"]
        md += [f"| ![]({c['image']}) | {c['image_id']} | {c['fold']} | {c['dice']:.3f} | {c['cls_prob']:.3f} | "
               f"{c['true_area_px']} | {c['pred_area_px']} |" for c in doc["cases"][kind]]
        md.append("")

    esc = html.escape
    body = [f"<h1>{esc(title)}: {esc(doc['run'])}</h1>",
            f"<p>Decision rule <b>{esc(th['rule'])}</b>: keep a mask when ≥ {th['min_area_px']} px (at {th['size_px']} px) "
            f"exceed {th['top_score']} and the classification probability ≥ {th['cls_threshold']}; binarise at "
            f"{th['bin_threshold']} (source: {esc(str(th['source']))}).</p>",
            "<p>Dice is the competition rule (both empty = 1), computed at the training size.</p>", html_table]
    for name, title in plots:
        body.append(f"<h2>{esc(title)}</h2><a href='{esc(name)}'><img src='{esc(name)}' alt='{esc(title)}'></a>")
    for kind, title in (("best", "Best cases (positive images)"), ("worst", "Worst cases")):
        body.append(f"<h2>{esc(title)}</h2><p>prediction red, ground truth green</p><table>"
                    "<tr><th>overlay</th><th>image</th><th>fold</th><th>Dice</th><th>cls prob</th><th>true px</th><th>predicted px</th></tr>")
        for c in doc["cases"][kind]:
            body.append(f"<tr><td><a href='{esc(c['image'])}'><img src='{esc(c['image'])}' width='192'></a></td>"
                        f"<td>{esc(c['image_id'])}</td><td>{c['fold']}</td><td>{c['dice']:.3f}</td><td>{c['cls_prob']:.3f}</td>"
                        f"<td>{c['true_area_px']}</td><td>{c['pred_area_px']}</td></tr>")
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ptxray report</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>")
    return "\n".join(md), page


__all__ = ["evaluate_run", "oof_metrics", "pick_cases", "plot_confusion", "plot_dice_hist", "plot_learning_curves", "plot_roc", "predict_cases", "render"]
