"""Pretrained encoder weights from a local file or S3, including the CheXNet checkpoint.

`model.encoder_weights` is one of:
- "none": random initialisation (the default; nothing is ever downloaded).
- a local path or URI (s3://bucket/key.pth): a torch file holding the encoder's state_dict, bare
  or as {"state_dict": ...}. Accepted key layouts: the smp encoder's own keys, a whole smp or
  ptxray model's (its `encoder.` keys are taken, the rest ignored: reuse a trained encoder),
  DataParallel's `module.` prefix, timm's keys for `tu-*`
  encoders, and torchvision's ImageNet classification checkpoints (their `fc.*`/`classifier.*`
  head is dropped; DenseNet's old `norm.1`-style names are renamed).
- "chexnet:<path or URI>": the `model.pth.tar` of the common public CheXNet re-implementation, a
  DenseNet-121 trained on ChestX-ray14: {"state_dict": {"module.densenet121.features.…",
  "module.densenet121.classifier.0.weight/bias"}, ...} in old torchvision naming
  (`denselayer1.norm.1.weight`, `conv.2.weight`). Its 14-class head is dropped and its features
  land in smp's densenet121 encoder; only for `model.encoder: densenet121`.

The first convolution is adapted when the model has C != 3 input channels, with smp's rule
(`segmentation_models_pytorch.encoders._utils.patch_first_conv`): C = 1 sums the RGB kernels (a
grey image then gives the RGB model's response to that grey image); C >= 2 gives channel i the
RGB kernel i mod 3, scaled by 3 / C, so a stack of C identical grey channels gives about the RGB
model's response (exactly when C is a multiple of 3). Checkpoints saved before torch 0.4
(CheXNet's) lack BatchNorm's `num_batches_tracked` counters; those keep the model's values. Any
other missing or unexpected key, or a shape that does not fit, is a ValueError that lists the keys
(the first 10 of each kind, and how many).
"""

from __future__ import annotations

import io
import logging
import re

import torch
from torch import nn

from ptxray.config import ModelConfig

log = logging.getLogger("ptxray")

CHEXNET_PREFIX = "chexnet:"
# Keys of ImageNet classifier heads (torchvision, pretrainedmodels, timm: efficientnet's head is
# conv_head + bn2 + classifier), dropped when the encoder
# has no such key: an encoder is the classifier without its head.
_HEAD_PREFIXES = ("fc.", "classifier.", "_fc.", "last_linear.", "head.", "conv_head.", "bn2.")
# torchvision's old DenseNet naming: `denselayer1.norm.1.weight` -> `denselayer1.norm1.weight`.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.*)$")
_SHOW_KEYS = 10


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local path or URI; accepts a bare one or {"state_dict": ...}."""
    from ptxray.storage import open_input_stream  # lazy: pyarrow only when weights are loaded

    with open_input_stream(uri) as f:
        data = f.read()
    try:
        # weights_only: a checkpoint from the internet must not run code on load.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{uri}: not a loadable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{uri}: expected a state_dict (name -> tensor) or a dict with 'state_dict'")
    return dict(obj)


def rename_old_densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_OLD_DENSENET_KEY.sub(r"\1\2.\3", k): v for k, v in state_dict.items()}


def chexnet_to_densenet_encoder(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CheXNet keys (`module.densenet121.features.…`, old naming) -> smp DenseNetEncoder keys.

    The `classifier.0.*` 14-class head is dropped. The `module.` (DataParallel) and
    `densenet121.` prefixes are optional, so re-saved copies of the checkpoint also load.
    """
    out = {}
    for key, value in state_dict.items():
        k = key.removeprefix("module.").removeprefix("densenet121.")
        if k.startswith("classifier."):
            continue
        out[k] = value
    return rename_old_densenet_keys(out)


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(O, 3, k, k) RGB kernels -> (O, in_channels, k, k), by smp's patch_first_conv rule.

    Written for a tensor because smp's helper patches a module in place and finds it by
    `in_channels == 3`, which the C-channel model no longer has.
    """
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def _normalize_generic(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # `module.`: DataParallel; `net.`: a ptxray model wrapping an smp one (SmpSegClassifier).
    sd = {k.removeprefix("module.").removeprefix("net."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in sd):  # a whole model's state_dict: take its encoder
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    if all(k.startswith("model.") for k in expected) and not any(k.startswith("model.") for k in sd):
        sd = {f"model.{k}": v for k, v in sd.items()}  # timm's own keys for smp's tu-* wrapper
    sd = rename_old_densenet_keys(sd)
    return {
        k: v
        for k, v in sd.items()
        if k in expected or not k.removeprefix("model.").startswith(_HEAD_PREFIXES)
    }


def _first_conv_key(expected: dict[str, torch.Tensor], in_channels: int) -> str | None:
    for key, value in expected.items():
        if key.endswith("weight") and value.ndim == 4:
            return key if value.shape[1] == in_channels else None
    return None


def _fmt(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return f"{len(keys)} ({shown}{', …' if len(keys) > _SHOW_KEYS else ''})"


def load_into_encoder(
    encoder: nn.Module, state_dict: dict[str, torch.Tensor], in_channels: int, source: str
) -> None:
    """Load already-renamed weights into `encoder`, strictly, adapting the first conv to C."""
    expected = encoder.state_dict()
    state_dict = dict(state_dict)
    first = _first_conv_key(expected, in_channels)
    if first is not None and first in state_dict:
        w = state_dict[first]  # (O, 3, k, k) in an RGB checkpoint
        if w.ndim == 4 and w.shape[1] == 3 and w.shape[0] == expected[first].shape[0]:
            state_dict[first] = adapt_first_conv(w, in_channels)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = value
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    problems = [
        f"{label} {_fmt(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"{source}: does not fit the encoder: " + "; ".join(problems))
    # nn.Module's loader on purpose: smp's encoder overrides rename keys again and drop `strict`.
    nn.Module.load_state_dict(encoder, state_dict, strict=True)


def load_encoder_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Load `cfg.encoder_weights` into `model.encoder` (see the module docstring for formats)."""
    spec = cfg.encoder_weights.strip()
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"model.encoder_weights={spec!r}: model.arch={cfg.arch!r} has no pretrained encoder "
            "to load into; set model.encoder_weights=none"
        )
    if spec.startswith(CHEXNET_PREFIX):
        uri = spec[len(CHEXNET_PREFIX) :].strip()
        if cfg.encoder != "densenet121":
            raise ValueError(
                f"model.encoder_weights={spec!r}: CheXNet is a DenseNet-121; it needs "
                f"model.encoder=densenet121, not {cfg.encoder!r}"
            )
        state_dict = chexnet_to_densenet_encoder(read_state_dict(uri))
        load_into_encoder(encoder, state_dict, cfg.in_channels, source=f"CheXNet checkpoint {uri}")
        # One line per model built: a run (or a benchmark row) that says CheXNet must show that it loaded.
        log.info("CheXNet weights loaded into the %s encoder of %s: %d tensors from %s (first conv adapted to %d channel(s))",
                 cfg.encoder, cfg.arch, len(state_dict), uri, cfg.in_channels)  # fmt: skip
        return
    state_dict = _normalize_generic(read_state_dict(spec), encoder.state_dict())
    load_into_encoder(encoder, state_dict, cfg.in_channels, source=f"encoder weights {spec}")
