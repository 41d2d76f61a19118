"""Segmentation + classification losses: `build_loss(cfg.loss)` and the kernel `weight_penalty`.

Every loss built here is an `nn.Module` with
`forward(seg_logits (B, 1, H, W), cls_logits (B, 1), mask (B, 1, H, W), label (B, 1)) -> scalar`
and returns `seg_loss + cls_weight * BCEWithLogits(cls_logits, label)`.

The pixel losses come from `segmentation_models_pytorch.losses` (smp 0.4–0.6 signatures); this module
only chooses their settings and weights them.

Soft Dice is computed over the whole batch by default (`dice_per_image: false`), on purpose:
about 78% of SIIM images have an empty mask. A per-image soft Dice is undefined on an empty
mask; smp sets those images' term to zero, so with per-image Dice a false-positive blob on an
empty image costs nothing and the loss of a typical batch rests on one or two positive images.
The batch Dice pools all pixels: the positive pixels of the batch give one stable overlap
ratio, and false-positive pixels on empty images still enlarge its denominator. (A batch with no
positive pixel at all gets a zero Dice term from smp either way; the BCE / focal / classification
terms still supervise it, which is why `bce_dice` is the default rather than `dice`.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import Tensor, nn

from ptxray.config import LossConfig


class _PerImageDice(nn.Module):
    """smp's DiceLoss with one Dice per image instead of one per batch.

    smp's multilabel mode computes one Dice per channel over dims (batch, pixels); moving the batch
    into the channel axis, (B, 1, H, W) -> (1, B, H*W), gives one Dice per image with smp's own
    code (empty images get a zero term, as smp documents).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = smp_losses.DiceLoss(mode="multilabel", from_logits=True)

    def forward(self, seg_logits: Tensor, mask: Tensor) -> Tensor:
        batch = seg_logits.shape[0]
        return self.dice(seg_logits.reshape(1, batch, -1), mask.reshape(1, batch, -1))


class _WeightedSum(nn.Module):
    """sum_i weight_i * loss_i(seg_logits, mask); terms with weight 0 are not evaluated."""

    def __init__(self, terms: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        kept = [(float(w), m) for w, m in terms if w != 0.0]
        self.weights = [w for w, _ in kept]
        self.terms = nn.ModuleList([m for _, m in kept])

    def forward(self, seg_logits: Tensor, mask: Tensor) -> Tensor:
        total = seg_logits.new_zeros(())
        for weight, term in zip(self.weights, self.terms):
            total = total + weight * term(seg_logits, mask)
        return total


def _bce(cfg: LossConfig) -> nn.Module:
    # ignore_index=None: our masks are strictly {0, 1}; smp's default (-100) would only cost a compare.
    return smp_losses.SoftBCEWithLogitsLoss(ignore_index=None)


def _dice(cfg: LossConfig) -> nn.Module:
    if cfg.dice_per_image:
        return _PerImageDice()
    return smp_losses.DiceLoss(mode="binary", from_logits=True)


def _focal(cfg: LossConfig) -> nn.Module:
    # alpha=None: class balance is left to the Dice term / positive oversampling, as in the paper.
    return smp_losses.FocalLoss(mode="binary", alpha=None, gamma=cfg.focal_gamma)


def _lovasz(cfg: LossConfig) -> nn.Module:
    # Lovász hinge over the batch (per_image=False): smp's per-image variant loops over images in
    # Python, and an empty image's hinge only penalises its single worst pixel.
    return smp_losses.LovaszLoss(mode="binary", per_image=False, from_logits=True)


def _bce_dice(cfg: LossConfig) -> nn.Module:
    return _WeightedSum([(cfg.bce_weight, _bce(cfg)), (cfg.dice_weight, _dice(cfg))])


def _focal_dice(cfg: LossConfig) -> nn.Module:
    return _WeightedSum([(cfg.focal_weight, _focal(cfg)), (cfg.dice_weight, _dice(cfg))])


SEG_LOSSES: dict[str, Callable[[LossConfig], nn.Module]] = {
    "bce": _bce,
    "dice": _dice,
    "bce_dice": _bce_dice,
    "focal": _focal,
    "focal_dice": _focal_dice,
    "lovasz": _lovasz,
}


class SegClsLoss(nn.Module):
    """seg_loss(seg_logits, mask) + cls_weight * BCEWithLogits(cls_logits, label)."""

    def __init__(self, seg_loss: nn.Module, cls_weight: float, name: str = "") -> None:
        super().__init__()
        self.seg_loss = seg_loss
        self.cls_weight = float(cls_weight)
        self.name = name

    def forward(self, seg_logits: Tensor, cls_logits: Tensor, mask: Tensor, label: Tensor) -> Tensor:
        if seg_logits.shape != mask.shape:
            raise ValueError(
                f"loss {self.name!r}: seg_logits shape {tuple(seg_logits.shape)} != mask shape "
                f"{tuple(mask.shape)}; both must be (B, 1, H, W)"
            )
        if self.cls_weight != 0.0 and cls_logits.shape != label.shape:
            raise ValueError(
                f"loss {self.name!r}: cls_logits shape {tuple(cls_logits.shape)} != label shape "
                f"{tuple(label.shape)}; both must be (B, 1)"
            )
        # Losses in float32 even under bf16 autocast: the soft-Dice sums run over B*H*W pixels,
        # far beyond bf16's 8-bit mantissa, and Lovász's dot product would otherwise be autocast.
        with torch.autocast(device_type=seg_logits.device.type, enabled=False):
            seg_logits = seg_logits.float()
            total = self.seg_loss(seg_logits, mask.float())
            if self.cls_weight != 0.0:
                cls_loss = F.binary_cross_entropy_with_logits(cls_logits.float(), label.float())
                total = total + self.cls_weight * cls_loss
        return total

    def extra_repr(self) -> str:
        return f"name={self.name!r}, cls_weight={self.cls_weight}"


def build_loss(cfg: LossConfig) -> SegClsLoss:
    """The training loss named by `cfg.name` (see `SEG_LOSSES`), plus the classification term."""
    builder = SEG_LOSSES.get(cfg.name)
    if builder is None:
        raise ValueError(f"loss.name: unknown loss {cfg.name!r}; choose from {sorted(SEG_LOSSES)}")
    for key in ("bce_weight", "dice_weight", "focal_weight", "cls_weight", "l1_penalty", "l2_penalty"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"loss.{key}: must be >= 0, got {getattr(cfg, key)}")
    if cfg.focal_gamma < 0:
        raise ValueError(f"loss.focal_gamma: must be >= 0, got {cfg.focal_gamma}")
    return SegClsLoss(builder(cfg), cfg.cls_weight, name=cfg.name)


# Module types whose `.weight` is a kernel in the Keras sense (kernel_regularizer); norm layers,
# embeddings and all biases are left out. Subclasses (timm's Conv2dSame, StdConv2d, ...) count.
_KERNEL_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def kernel_weights(model: nn.Module) -> list[Tensor]:
    """The conv / linear weight tensors of `model`, each once even if shared between modules."""
    seen: set[int] = set()
    weights = []
    for module in model.modules():
        if isinstance(module, _KERNEL_MODULES):
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and id(weight) not in seen:
                seen.add(id(weight))
                weights.append(weight)
    return weights


def weight_penalty(model: nn.Module, l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """l1 * sum|w| + l2 * sum w^2 over conv and linear kernels (Keras kernel_regularizer semantics).

    Sums, not means, as Keras adds `l1 * reduce_sum(abs(w)) + l2 * reduce_sum(square(w))` per layer:
    the same `l2` means the same thing as in the paper. Returns a zero scalar on the model's device
    when both are 0, so callers can always add it.
    """
    if l1 < 0 or l2 < 0:
        raise ValueError(f"weight_penalty: l1 and l2 must be >= 0, got l1={l1}, l2={l2}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), device=device, dtype=torch.float32)
    if l1 == 0.0 and l2 == 0.0:
        return total
    for weight in kernel_weights(model):
        w = weight.float()
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.square().sum()
    return total


__all__ = ["SEG_LOSSES", "SegClsLoss", "build_loss", "kernel_weights", "weight_penalty"]
