"""What a finished run is, and how to load its models: the one place predict, evaluate and export
read a run directory.

Two kinds of run directory (local folder or s3:// prefix):
- a K-fold experiment (`jobs/kfold.py`, `ptxray kfold`): `<compute.storage_path>/<search.name>`
  holding `summary.json`; its best configuration names one Train checkpoint folder per fold
  (`.../checkpoint_epoch_NNNN/` with `checkpoints/best.pt`, `checkpoints/last.pt`,
  `config.yaml`, `metrics.jsonl`), by its path relative to the run folder, so a copied or moved
  run (locally or on S3) reads its own copy (`storage.relative_to_run` / `resolve_in_run`; summaries
  written before that hold absolute paths, which still work where they point);
- a single-fold run (`ptxray train`): the folder itself holds `checkpoints/best.pt`,
  `config.yaml` and `metrics.jsonl`.

Fold models are rebuilt from the config saved beside their weights with `encoder_weights`
switched off (the trained weights replace them; nothing downloads) and loaded with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ptxray import storage
from ptxray.checkpoint import CheckpointError, load_checkpoint, strip_module_prefix
from ptxray.config import Config, config_from_dict


class RunError(ValueError):
    """A run directory that is missing, incomplete or not a ptxray run; the message names it."""


def _read_text(path_or_uri: str) -> str:
    with storage.open_input_stream(path_or_uri) as f:
        return f.read().decode()


@dataclass(frozen=True)
class FoldModelRef:
    fold: int
    checkpoint_dir: str  # holds checkpoints/best.pt, checkpoints/last.pt, config.yaml, metrics.jsonl

    @property
    def best(self) -> str:
        return storage.join(self.checkpoint_dir, "checkpoints", "best.pt")

    @property
    def last(self) -> str:
        return storage.join(self.checkpoint_dir, "checkpoints", "last.pt")

    @property
    def metrics_path(self) -> str:
        return storage.join(self.checkpoint_dir, "metrics.jsonl")

    def history(self) -> list[dict[str, Any]]:
        """The fold's per-epoch metrics (metrics.jsonl); empty when the file is missing."""
        if not storage.exists(self.metrics_path):
            return []
        history = []
        for line_no, line in enumerate(_read_text(self.metrics_path).splitlines(), start=1):
            if line.strip():
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunError(f"{self.metrics_path}:{line_no}: not a JSON line ({e})") from None
        return history


@dataclass(frozen=True)
class Run:
    run_dir: str
    kind: str  # "kfold" or "train"
    config: Config  # the (best) configuration the fold models were trained with
    folds: tuple[FoldModelRef, ...]
    summary: dict[str, Any] | None = field(default=None, compare=False)  # summary.json of a K-fold run
    params: dict[str, Any] = field(default_factory=dict)  # the best configuration's grid values

    @property
    def fold_ids(self) -> list[int]:
        return [f.fold for f in self.folds]

    def checkpoint_record(self) -> dict[str, str]:
        """{fold: best.pt relative to the run folder}: which models a stored result (out-of-fold
        predictions, thresholds) came from, unchanged when the run folder is copied or moved."""
        return {str(r.fold): storage.relative_to_run(r.best, self.run_dir) for r in self.folds}


def _config_from_checkpoint(ref: FoldModelRef) -> Config:
    state = load_checkpoint(ref.best)
    if "config" not in state:
        raise CheckpointError(f"{ref.best}: checkpoint has no resolved config")
    return config_from_dict(state["config"])


def open_run(run_dir: str) -> Run:
    """Resolve a run directory into its configuration and fold checkpoints (best configuration)."""
    run_dir = str(run_dir).rstrip("/")
    summary_path = storage.join(run_dir, "summary.json")
    if storage.exists(summary_path):
        try:
            summary = storage.read_json_object(summary_path)
        except ValueError as e:
            raise RunError(str(e)) from None
        best = summary.get("best")
        if not isinstance(best, dict) or not best.get("fold_checkpoints"):
            raise RunError(f"{summary_path}: no best configuration with fold checkpoints (did every trial fail?)")
        try:
            refs = tuple(sorted(
                (FoldModelRef(int(f), storage.resolve_in_run(str(p), run_dir)) for f, p in best["fold_checkpoints"].items()),
                key=lambda r: r.fold,
            ))  # fmt: skip
        except (AttributeError, TypeError, ValueError):
            raise RunError(f"{summary_path}: best.fold_checkpoints must map fold numbers to checkpoint folders") from None
        missing = [r.best for r in refs if not storage.exists(r.best)]
        if missing:
            raise RunError(f"{run_dir}: fold checkpoints missing: {', '.join(missing)}")
        return Run(run_dir, "kfold", _config_from_checkpoint(refs[0]), refs, summary=summary, params=best.get("params", {}))
    single = FoldModelRef(-1, run_dir)
    if storage.exists(single.best):
        cfg = _config_from_checkpoint(single)
        return Run(run_dir, "train", cfg, (FoldModelRef(cfg.train.fold, run_dir),))
    raise RunError(
        f"{run_dir}: not a ptxray run (expected summary.json from a K-fold experiment or checkpoints/best.pt from `ptxray train`)"
    )


def build_inference_model(cfg: Config) -> nn.Module:
    """The architecture of `cfg` with no pretrained-weight loading (trained weights replace them)."""
    from ptxray.models import build_model

    return build_model(dataclasses.replace(cfg.model, encoder_weights="none"))


def load_fold_model(ref: FoldModelRef, which: str = "best", map_location: Any = "cpu") -> tuple[nn.Module, Config]:
    """One fold's model in eval mode with its trained weights, and the config it was trained with."""
    path = ref.best if which == "best" else ref.last
    state = load_checkpoint(path, map_location=map_location)
    cfg = config_from_dict(state["config"])
    model = build_inference_model(cfg)
    try:
        model.load_state_dict(strip_module_prefix(state["model"]))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {cfg.model.arch}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, cfg


def load_fold_models(run: Run, which: str = "best", map_location: Any = "cpu") -> list[tuple[int, nn.Module]]:
    """Every fold model of the run, in fold order."""
    return [(ref.fold, load_fold_model(ref, which, map_location)[0]) for ref in run.folds]


class FoldEnsemble(nn.Module):
    """uint8 (B, C, H, W) -> (mask_prob (B, 1, H, W), ptx_prob (B,)): mean of sigmoids over models.

    With `tta_flip`, each model also sees the horizontally flipped image; its mask is flipped back
    before averaging. One model without flip is simply that model's probabilities. Prediction,
    evaluation and export all average through this one module, so they cannot disagree.
    """

    def __init__(self, models: list[nn.Module], tta_flip: bool = False) -> None:
        super().__init__()
        if not models:
            raise ValueError("FoldEnsemble: needs at least one model")
        self.models = nn.ModuleList(models)
        self.tta_flip = bool(tta_flip)
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = image.to(torch.float32) / 255.0  # (B, C, H, W) in [0, 1], as ptxray.engine feeds models
        views = [x, torch.flip(x, dims=[3])] if self.tta_flip else [x]
        mask_sum = torch.zeros_like(x[:, :1])  # (B, 1, H, W)
        cls_sum = torch.zeros_like(x[:, 0, 0, 0])  # (B,)
        for model in self.models:
            for i, view in enumerate(views):
                seg_logits, cls_logits = model(view)  # (B, 1, H, W), (B, 1)
                mask = torch.sigmoid(seg_logits)
                mask_sum = mask_sum + (torch.flip(mask, dims=[3]) if i == 1 else mask)
                cls_sum = cls_sum + torch.sigmoid(cls_logits).reshape(-1)
        n = float(len(self.models) * len(views))
        return mask_sum / n, cls_sum / n


__all__ = [
    "FoldEnsemble", "FoldModelRef", "Run", "RunError", "build_inference_model", "load_fold_model", "load_fold_models",
    "open_run",
]  # fmt: skip
