"""One factory for every segmentation + classification model: `build_model(cfg.model)`.

Each architecture registers a builder `ModelConfig -> nn.Module` under its name (timm's
`create_model` pattern), so adding an architecture is one decorated function and no caller
branches on `cfg.arch`.

Every model built here follows one contract: `forward(x)` takes float32 `(B, C, H, W)` in [0, 1]
and returns `(seg_logits (B, 1, H, W), cls_logits (B, 1))`, logits not probabilities. Models are
single-device (no DDP, `.cuda()` or autocast inside). Each model also carries two ints that say
which inputs it accepts, for the data pipeline and predict to pad or resize to:
`input_multiple` (H and W must be multiples of it) and `min_input_px` (H and W at least this).
One exception in train mode: a model with `loss_from_targets = True` (maskrcnn, a detector whose
loss comes from the model) is called as `forward(image, mask)` and returns a dict of loss terms;
`ptxray.engine.train_epoch` handles it. In eval mode it follows the contract above.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ptxray.config import ModelConfig

Builder = Callable[[ModelConfig], nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: `@register("unet_vanilla") def build(cfg: ModelConfig) -> nn.Module`."""

    def decorator(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model architecture {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorator


def available_architectures() -> list[str]:
    return sorted(_BUILDERS)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build `cfg.arch` and load `cfg.encoder_weights` into its encoder (nothing downloads)."""
    if cfg.in_channels < 1:
        raise ValueError(
            f"model.in_channels={cfg.in_channels}: must be >= 1 (0 means 'len(preprocess.channels)' "
            "and is resolved by ptxray.config.Config; pass Config(...).model)"
        )
    try:
        builder = _BUILDERS[cfg.arch]
    except KeyError:
        raise ValueError(
            f"model.arch={cfg.arch!r}: unknown architecture; registered: {available_architectures()}"
        ) from None
    model = builder(cfg)
    if cfg.encoder_weights.strip().lower() not in ("", "none"):
        load_encoder_weights(model, cfg)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Imported last: these modules register their builders with the registry defined above.
from ptxray.models import maskrcnn, smp_models, vanilla  # noqa: E402,F401
from ptxray.models.weights import load_encoder_weights  # noqa: E402

__all__ = [
    "available_architectures",
    "build_model",
    "count_parameters",
    "load_encoder_weights",
    "register",
]
