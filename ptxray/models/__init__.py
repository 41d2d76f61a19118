"""One factory for every segmentation + classification model: `build_model(cfg.model)`.

Each architecture registers a builder `ModelConfig -> nn.Module` under its name (timm's
`create_model` pattern), so adding an architecture is one decorated function and no caller
branches on `cfg.arch`: what callers need to know (`compilable`, `has_encoder`) is registered with
it and read through `capabilities(arch)`.

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

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ptxray.config import ModelConfig

Builder = Callable[[ModelConfig], nn.Module]


@dataclass(frozen=True)
class Capabilities:
    """What callers may ask of an architecture without branching on its name."""

    # torch.compile keeps one graph for it (False: data-dependent shapes, e.g. a detector, would
    # recompile every batch).
    compilable: bool = True
    # `model.encoder` / `model.encoder_weights` choose its backbone (False: the architecture fixes
    # its own and ignores model.encoder).
    has_encoder: bool = True


_BUILDERS: dict[str, Builder] = {}
_CAPABILITIES: dict[str, Capabilities] = {}


def register(name: str, *, compilable: bool = True, has_encoder: bool = True) -> Callable[[Builder], Builder]:
    """Decorator: `@register("unet_vanilla", has_encoder=False) def build(cfg: ModelConfig) -> nn.Module`."""

    def decorator(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model architecture {name!r} is registered twice")
        _BUILDERS[name] = builder
        _CAPABILITIES[name] = Capabilities(compilable=compilable, has_encoder=has_encoder)
        return builder

    return decorator


def available_architectures() -> list[str]:
    return sorted(_BUILDERS)


def capabilities(arch: str) -> Capabilities:
    """The registered capabilities of `arch` (ValueError naming the registered ones when unknown)."""
    try:
        return _CAPABILITIES[arch]
    except KeyError:
        raise ValueError(f"model.arch={arch!r}: unknown architecture; registered: {available_architectures()}") from None


def describe_architecture(cfg: ModelConfig) -> str:
    """'unet(resnet34)', or the bare name for an architecture that has no configurable encoder."""
    return f"{cfg.arch}({cfg.encoder})" if capabilities(cfg.arch).has_encoder else cfg.arch


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build `cfg.arch` and load `cfg.encoder_weights` into its encoder (nothing downloads)."""
    if cfg.in_channels < 1:
        raise ValueError(
            f"model.in_channels={cfg.in_channels}: must be >= 1 (0 means 'len(preprocess.channels)' "
            "and is resolved by ptxray.config.Config; pass Config(...).model)"
        )
    capabilities(cfg.arch)  # the unknown-architecture error
    model = _BUILDERS[cfg.arch](cfg)
    if cfg.encoder_weights.strip().lower() not in ("", "none"):
        load_encoder_weights(model, cfg)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Imported last: these modules register their builders with the registry defined above.
from ptxray.models import maskrcnn, smp_models, vanilla  # noqa: E402,F401
from ptxray.models.weights import load_encoder_weights  # noqa: E402

__all__ = [
    "Capabilities",
    "available_architectures",
    "build_model",
    "capabilities",
    "count_parameters",
    "describe_architecture",
    "load_encoder_weights",
    "register",
]
