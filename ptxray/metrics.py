"""Validation metrics kept as sums until the end, so they all-reduce across Ray Train workers.

- `dice_per_image` / `iou_per_image`: the competition rule (empty prediction on an empty mask = 1).
- `SegMetrics`: one float64 vector of sums (counts, Dice/IoU sums, confusion counts of the
  image-level decision, and two score histograms for the classification AUC). `all_reduce_()` sums
  it over ranks with a single collective; `compute()` divides.
- The registries (`register_sum`, `register_metric`): every sum and metric by name, with where each
  metric is shown (K-fold summary, benchmark results, epoch log line); those views read them here.

Why a histogram AUC: an exact ROC AUC needs every score, which would have to be gathered from every
rank. Binned scores all-reduce as sums and give the Mann-Whitney AUC exactly up to the binning
(pairs in the same bin count one half, as sklearn counts tied scores). The bins are equal-width in
*logit* space, not probability space: a trained classifier puts most scores within 1e-3 of 0 or 1,
where equal probability bins would tie (and half-count) most pairs, and float32 sigmoid saturates to
exactly 1.0 above a logit of ~17 anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

def _flat_masks(pred: Tensor, true: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    """(B, 1, H, W) or (B, H, W) masks -> bool (B, H*W); values > 0.5 are foreground."""
    if pred.shape != true.shape:
        raise ValueError(
            f"{fn}: pred shape {tuple(pred.shape)} != true shape {tuple(true.shape)}"
        )
    if pred.dim() not in (3, 4) or (pred.dim() == 4 and pred.shape[1] != 1):
        raise ValueError(f"{fn}: expected masks (B, 1, H, W) or (B, H, W), got {tuple(pred.shape)}")
    pred = pred if pred.dtype == torch.bool else pred > 0.5
    true = true if true.dtype == torch.bool else true > 0.5
    return pred.reshape(pred.shape[0], -1), true.reshape(true.shape[0], -1)


def _overlap_counts(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image |A∩B|, |A|, |B| as int64 (B,) from bool (B, N)."""
    # int64 pixel counts: exact, and cheap on GPUs whose float64 throughput is poor.
    inter = (pred & true).sum(dim=1)
    return inter, pred.sum(dim=1), true.sum(dim=1)


def _counts_f64(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(c.to(torch.float64) for c in _overlap_counts(pred, true))  # type: ignore[return-value]


def _dice_from_counts(inter: Tensor, n_pred: Tensor, n_true: Tensor) -> Tensor:
    denom = n_pred + n_true
    # Empty/empty scores 1 (the Kaggle rule); exactly one empty gives inter=0 -> 0.
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1.0), torch.ones_like(denom))


def _iou_from_counts(inter: Tensor, n_pred: Tensor, n_true: Tensor) -> Tensor:
    union = n_pred + n_true - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def dice_per_image(pred: Tensor, true: Tensor) -> Tensor:
    """Dice 2|A∩B| / (|A| + |B|) per image, (B,) float64; 1 when both masks are empty.

    `pred`, `true`: binary masks (B, 1, H, W) or (B, H, W), bool or {0, 1} floats.
    """
    return _dice_from_counts(*_counts_f64(*_flat_masks(pred, true, "dice_per_image")))


def iou_per_image(pred: Tensor, true: Tensor) -> Tensor:
    """IoU |A∩B| / |A∪B| per image, (B,) float64; 1 when both masks are empty."""
    return _iou_from_counts(*_counts_f64(*_flat_masks(pred, true, "iou_per_image")))


# ---- the metric registry ------------------------------------------------------------------------
# Two registries, both filled below and read by everything that names a metric: the per-batch sums
# (the layout of SegMetrics' state vector, in registration order) and the metrics computed from them
# (SegMetrics.compute's keys, in registration order) with where each one is shown. Registering a
# metric checks that every sum it reads exists, so a name without an implementation cannot exist.


@dataclass(frozen=True)
class BatchStats:
    """What one batch gives the per-batch sums; every tensor is (B,) on the state's device."""

    batch: int
    dice: Tensor  # float64, the competition rule
    iou: Tensor  # float64
    positive: Tensor  # float64 1.0 where the true mask is non-empty
    decided_pos: Tensor  # bool, sigmoid(cls_logits) >= cls_threshold
    is_pos: Tensor  # bool, the image-level label


@dataclass(frozen=True)
class Totals:
    """What a metric is computed from: the all-reduced sums by name and the two score histograms."""

    sums: dict[str, float]
    hist_pos: Tensor  # (n_bins,) positives' classification logits
    hist_neg: Tensor  # (n_bins,) negatives'


@dataclass(frozen=True)
class LogField:
    """A metric's place in fit's per-epoch log line: the first field prints `label value`, the others
    follow it in parentheses."""

    position: int
    label: str
    fmt: str = ".4f"


@dataclass(frozen=True)
class Metric:
    name: str  # reported as prefix + name: val_dice
    compute: Callable[[Totals], float]
    summary: int | None = None  # column position in the K-fold summary (json, csv, table); None: not shown
    title: str | None = None  # its title in the K-fold summary table
    benchmark: int | None = None  # position among `ptxray benchmark`'s metric columns (results.csv)
    log: LogField | None = None  # where fit's epoch log line prints it


_SUMS: dict[str, Callable[[BatchStats], Tensor]] = {}
_METRICS: dict[str, Metric] = {}


def register_sum(name: str, per_batch: Callable[[BatchStats], Tensor]) -> None:
    """A new per-batch sum (a 0-d float64 tensor from BatchStats), appended to the state vector."""
    if name in _SUMS:
        raise ValueError(f"register_sum: {name!r} is already registered")
    if not callable(per_batch):
        raise TypeError(f"register_sum({name!r}): per_batch must be callable, got {per_batch!r}")
    _SUMS[name] = per_batch


def _check_sums(names: tuple[str, ...], who: str) -> None:
    unknown = [n for n in names if n not in _SUMS]
    if unknown:
        raise KeyError(f"{who}: unknown sum(s) {unknown}; registered: {list(_SUMS)}")


def total(name: str) -> Callable[[Totals], float]:
    """A metric that is one sum as it is (a count)."""
    _check_sums((name,), f"total({name!r})")
    return lambda t: t.sums[name]


def ratio(numerator: str, *denominator: str) -> Callable[[Totals], float]:
    """A metric that is one sum over the total of others; NaN when that total is zero."""
    _check_sums((numerator, *denominator), f"ratio({numerator!r}, ...)")
    if not denominator:
        raise ValueError(f"ratio({numerator!r}): name at least one denominator sum")

    def compute(t: Totals) -> float:
        den = sum(t.sums[d] for d in denominator)
        return t.sums[numerator] / den if den > 0 else float("nan")

    return compute


def register_metric(
    name: str,
    compute: Callable[[Totals], float],
    *,
    summary: int | None = None,
    title: str | None = None,
    benchmark: int | None = None,
    log: LogField | None = None,
) -> Metric:
    """Register a validation metric; `compute` comes from `ratio`/`total` (which check their sums)
    or is any callable of Totals. Positions must be unique within their view."""
    if name in _METRICS:
        raise ValueError(f"register_metric: {name!r} is already registered")
    if not callable(compute):
        raise TypeError(f"register_metric({name!r}): compute must be callable, got {compute!r}")
    if summary is not None and not title:
        raise ValueError(f"register_metric({name!r}): a summary column needs a title")
    metric = Metric(name, compute, summary, title, benchmark, log)
    for view, position in (("summary", summary), ("benchmark", benchmark), ("log", log and log.position)):
        taken = [m.name for m in _METRICS.values() if position is not None and _position(m, view) == position]
        if taken:
            raise ValueError(f"register_metric({name!r}): {view} position {position} is taken by {taken[0]!r}")
    _METRICS[name] = metric
    return metric


def _position(metric: Metric, view: str) -> int | None:
    if view == "log":
        return metric.log.position if metric.log else None
    return getattr(metric, view)


def registered_metrics() -> tuple[Metric, ...]:
    """Every metric, in SegMetrics.compute's order."""
    return tuple(_METRICS.values())


def _in_view(view: str) -> list[Metric]:
    shown = [m for m in _METRICS.values() if _position(m, view) is not None]
    return sorted(shown, key=lambda m: _position(m, view))


def summary_metrics(prefix: str = "val_") -> tuple[str, ...]:
    """The K-fold summary's metric columns, in order."""
    return tuple(prefix + m.name for m in _in_view("summary"))


def summary_titles() -> tuple[str, ...]:
    return tuple(m.title for m in _in_view("summary"))  # type: ignore[misc]


def benchmark_metrics(prefix: str = "val_") -> tuple[str, ...]:
    """`ptxray benchmark`'s metric columns (results.csv), in order."""
    return tuple(prefix + m.name for m in _in_view("benchmark"))


def format_epoch_metrics(values: dict[str, float], prefix: str = "val_") -> str:
    """The validation part of fit's epoch log line: `val_dice 0.7012 (cls-gated 0.7100, ...)`."""
    fields = [f"{m.log.label} {values[prefix + m.name]:{m.log.fmt}}" for m in _in_view("log")]  # type: ignore[union-attr]
    if len(fields) < 2:
        return "".join(fields)
    return f"{fields[0]} ({', '.join(fields[1:])})"


def _count(flags: Tensor) -> Tensor:
    return flags.sum(dtype=torch.float64)


register_sum("n_images", lambda b: b.dice.new_full((), float(b.batch)))
register_sum("n_positive", lambda b: b.positive.sum())
register_sum("dice_sum", lambda b: b.dice.sum())
register_sum("dice_pos_sum", lambda b: (b.dice * b.positive).sum())
register_sum("iou_sum", lambda b: b.iou.sum())
register_sum("empty_dice_sum", lambda b: (1.0 - b.positive).sum())
register_sum("tp", lambda b: _count(b.decided_pos & b.is_pos))
register_sum("fp", lambda b: _count(b.decided_pos & ~b.is_pos))
register_sum("tn", lambda b: _count(~b.decided_pos & ~b.is_pos))
register_sum("fn", lambda b: _count(~b.decided_pos & b.is_pos))
# The classification head decides empty vs non-empty: an image it calls negative is predicted empty,
# which scores 1 on an empty mask and 0 otherwise.
register_sum("dice_cls_sum", lambda b: torch.where(b.decided_pos, b.dice, 1.0 - b.positive).sum())

# SegMetrics.compute's order is the registration order below (metrics.jsonl keeps it); the summary,
# benchmark and log positions give each view its own order, as the files have always had it.
register_metric("dice", ratio("dice_sum", "n_images"), summary=0, title="Dice", benchmark=0, log=LogField(0, "val_dice"))
register_metric("dice_pos", ratio("dice_pos_sum", "n_positive"), summary=2, title="Dice pos.", benchmark=1, log=LogField(3, "pos"))
register_metric("iou", ratio("iou_sum", "n_images"), summary=3, title="IoU", benchmark=2)
register_metric("empty_dice", ratio("empty_dice_sum", "n_images"), summary=5, title="empty baseline", benchmark=4, log=LogField(2, "empty"))
register_metric("dice_cls", ratio("dice_cls_sum", "n_images"), summary=1, title="Dice cls-gated", benchmark=5, log=LogField(1, "cls-gated"))
register_metric("auc", lambda t: histogram_auc(t.hist_pos, t.hist_neg), summary=4, title="AUC", benchmark=3, log=LogField(4, "auc", ".3f"))
register_metric("sensitivity", ratio("tp", "tp", "fn"))
register_metric("specificity", ratio("tn", "tn", "fp"))
register_metric("n_images", total("n_images"), benchmark=6)
register_metric("n_positive", total("n_positive"), benchmark=7)


def _state_device(device: torch.device) -> torch.device:
    # MPS has no float64: keep the (small) sums on the CPU there.
    return torch.device("cpu") if device.type == "mps" else device


class SegMetrics:
    """Sums for segmentation and image-level classification metrics over many batches.

    `update()` adds a batch (no host sync: state lives on the tensors' device, created lazily);
    `all_reduce_()` sums over torch.distributed ranks; `compute()` returns python floats.

    Reported (with `prefix`): `dice` (mean per-image Dice, competition rule), `dice_pos` (mean Dice
    over images whose true mask is non-empty), `iou`, `empty_dice` (what predicting empty everywhere
    scores on the same images = fraction of empty masks), `dice_cls` (competition Dice when the
    classification head decides empty vs non-empty: the mask counts only where it says positive), `auc`, `sensitivity`, `specificity` (of
    sigmoid(cls_logits) >= cls_threshold against the label), `n_images`, `n_positive` (non-empty
    true masks). A ratio with a zero denominator is NaN: no images -> everything NaN; no positive
    masks -> `dice_pos` NaN; a single label class -> `auc` and one of sensitivity/specificity NaN.
    """

    def __init__(self, n_bins: int = 2048, logit_range: float = 16.0, cls_threshold: float = 0.5):
        if n_bins < 1:
            raise ValueError(f"SegMetrics: n_bins must be >= 1, got {n_bins}")
        if not logit_range > 0:
            raise ValueError(f"SegMetrics: logit_range must be > 0, got {logit_range}")
        if not 0.0 < cls_threshold < 1.0:
            raise ValueError(f"SegMetrics: cls_threshold must be in (0, 1), got {cls_threshold}")
        self.n_bins = int(n_bins)
        self.logit_range = float(logit_range)
        self.cls_threshold = float(cls_threshold)
        self._state: Tensor | None = None
        self._reduced = False

    # ---- state -------------------------------------------------------------------------------
    @property
    def state_size(self) -> int:
        return len(_SUMS) + 2 * self.n_bins

    def _zeros(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.zeros(self.state_size, dtype=torch.float64, device=device)

    def state(self) -> Tensor:
        """A copy of the float64 sum vector (zeros if nothing was added yet)."""
        return self._zeros() if self._state is None else self._state.clone()

    @classmethod
    def from_state(cls, state: Tensor, logit_range: float = 16.0, cls_threshold: float = 0.5) -> "SegMetrics":
        """Rebuild an accumulator from `state()`; n_bins is read from its length."""
        state = torch.as_tensor(state)
        n_sums = len(_SUMS)
        if state.dim() != 1 or state.numel() <= n_sums or (state.numel() - n_sums) % 2:
            raise ValueError(
                f"SegMetrics.from_state: expected a 1-D vector of {n_sums} + 2*n_bins sums, "
                f"got shape {tuple(state.shape)}"
            )
        metrics = cls((state.numel() - n_sums) // 2, logit_range, cls_threshold)
        metrics._state = state.detach().to(dtype=torch.float64, copy=True)
        return metrics

    def reset(self) -> None:
        self._state = None
        self._reduced = False

    def _check_compatible(self, other: "SegMetrics") -> None:
        mine = (self.n_bins, self.logit_range, self.cls_threshold)
        theirs = (other.n_bins, other.logit_range, other.cls_threshold)
        if mine != theirs:
            raise ValueError(
                f"SegMetrics.merge_: (n_bins, logit_range, cls_threshold) differ: {mine} vs {theirs}"
            )

    def merge_(self, other: "SegMetrics") -> "SegMetrics":
        """Add another accumulator's sums into this one (e.g. a simulated rank)."""
        self._check_compatible(other)
        if other._state is not None:
            if self._state is None:
                self._state = other._state.clone()
            else:
                self._state += other._state.to(self._state.device)
        return self

    # ---- accumulation ------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        seg_logits: Tensor,
        cls_logits: Tensor,
        mask: Tensor,
        label: Tensor,
        threshold: float = 0.5,
    ) -> None:
        """Add one batch: seg_logits, mask (B, 1, H, W); cls_logits, label (B, 1).

        Pixels with sigmoid(seg_logits) > threshold form the predicted mask.
        """
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SegMetrics.update: threshold must be in (0, 1), got {threshold}")
        batch = seg_logits.shape[0]
        if cls_logits.numel() != batch or label.numel() != batch:
            raise ValueError(
                f"SegMetrics.update: cls_logits {tuple(cls_logits.shape)} and label "
                f"{tuple(label.shape)} must hold one value per image (batch {batch})"
            )
        # Compare logits with logit(threshold) instead of sigmoid(logits) with threshold: the same
        # decision without materialising a float32 probability map, and no saturation at 1.0.
        seg_pred = seg_logits.detach() > math.log(threshold / (1.0 - threshold))
        pred, true = _flat_masks(seg_pred, mask.detach(), "SegMetrics.update")
        # Everything below is (B,)-sized: move it to where the state lives and work in float64.
        device = _state_device(seg_logits.device)
        inter, n_pred, n_true = (c.to(device, torch.float64) for c in _overlap_counts(pred, true))
        dice = _dice_from_counts(inter, n_pred, n_true)  # (B,)
        iou = _iou_from_counts(inter, n_pred, n_true)  # (B,)
        positive = (n_true > 0).to(torch.float64)  # (B,)

        logits = cls_logits.detach().reshape(-1).to(device, torch.float64)  # (B,)
        is_pos = label.detach().reshape(-1).to(device) > 0.5  # (B,)
        stats = BatchStats(batch, dice, iou, positive, logits.sigmoid() >= self.cls_threshold, is_pos)
        scalars = torch.stack([per_batch(stats) for per_batch in _SUMS.values()])
        bins = self._bin_index(logits)  # (B,)
        # One bincount for both histograms: positives fill bins [0, n_bins), negatives the next n_bins.
        hist = torch.bincount(bins + self.n_bins * (~is_pos).long(), minlength=2 * self.n_bins)

        if self._state is None:
            self._state = self._zeros(device)
        self._state[: len(_SUMS)] += scalars.to(self._state.device)
        self._state[len(_SUMS) :] += hist.to(self._state.device, torch.float64)

    def _bin_index(self, logits: Tensor) -> Tensor:
        r = self.logit_range
        scaled = (logits.clamp(-r, r) + r) * (self.n_bins / (2.0 * r))
        return scaled.floor().long().clamp_(0, self.n_bins - 1)

    # ---- distributed -------------------------------------------------------------------------
    def all_reduce_(self, group=None) -> "SegMetrics":
        """Sum the state over all ranks (one collective); a no-op without torch.distributed.

        Every rank must call it, also a rank that saw no batch. Call it once, after the last update:
        a second call would double-count, so it raises.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._reduced:
            raise RuntimeError("SegMetrics.all_reduce_: already all-reduced; call it once per epoch")
        state = self.state()
        home = state.device
        if dist.get_backend(group) == "nccl" and state.device.type != "cuda":
            state = state.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        self._state = state.to(home) if self._state is not None else state
        self._reduced = True
        return self

    # ---- results -----------------------------------------------------------------------------
    def compute(self, prefix: str = "val_") -> dict[str, float]:
        """The metrics as python floats (one host transfer), keys prefixed with `prefix`."""
        state = self.state().cpu()
        n_sums = len(_SUMS)
        totals = Totals(
            sums={name: float(state[i]) for i, name in enumerate(_SUMS)},
            hist_pos=state[n_sums : n_sums + self.n_bins],
            hist_neg=state[n_sums + self.n_bins :],
        )
        return {prefix + m.name: m.compute(totals) for m in _METRICS.values()}


def histogram_auc(hist_pos: Tensor, hist_neg: Tensor) -> float:
    """Mann-Whitney ROC AUC from score histograms with ascending bins; ties in a bin count 1/2.

    NaN when either class is absent.
    """
    hist_pos = hist_pos.to(torch.float64)
    hist_neg = hist_neg.to(torch.float64)
    n_pos, n_neg = float(hist_pos.sum()), float(hist_neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = torch.cumsum(hist_neg, 0) - hist_neg  # negatives in strictly lower bins
    wins = (hist_pos * (neg_below + 0.5 * hist_neg)).sum()
    return float(wins) / (n_pos * n_neg)


__all__ = [
    "BatchStats",
    "LogField",
    "Metric",
    "SegMetrics",
    "Totals",
    "benchmark_metrics",
    "dice_per_image",
    "format_epoch_metrics",
    "histogram_auc",
    "iou_per_image",
    "ratio",
    "register_metric",
    "register_sum",
    "registered_metrics",
    "summary_metrics",
    "summary_titles",
    "total",
]
