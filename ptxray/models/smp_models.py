"""segmentation_models_pytorch architectures, and a small FCN-32s on an smp encoder.

Every architecture the installed smp lists in `smp.MODEL_ARCHITECTURES_MAPPING` is registered
under smp's own name (unet, unetplusplus, manet, linknet, fpn, pspnet, deeplabv3, deeplabv3plus,
pan, upernet, segformer, dpt in smp 0.6). `model.encoder` is any encoder smp accepts (resnet34,
densenet121, efficientnet-b0..b7, timm's `tu-*`); dpt needs a timm ViT (`tu-vit_*`). Models are
always built with `encoder_weights=None`, so nothing downloads; pretrained encoder weights come
from `model.encoder_weights` through ptxray.models.weights.

Input sizes: H and W must be multiples of the encoder's output stride (`model.input_multiple`):
32 for most (unet, unetplusplus, manet, linknet, fpn, upernet, segformer, fcn), 16 for
deeplabv3plus, pan and dpt (the ViT patch), 8 for deeplabv3 and pspnet (dilated encoders). pan
also needs H, W >= 128 (its pyramid pools the 1/16 features three more times). Decoders whose
logits come out smaller than the input are upsampled (bilinear) back to it.

Parameters that neither output depends on are frozen (`requires_grad=False`) at build time: smp's
efficientnet encoders keep their ImageNet head (`_conv_head`, `_bn1`), pspnet's depth-3 encoder
keeps the two stages it never runs, a timm ViT keeps its final norm and head. Under DDP
(`find_unused_parameters=False`, Ray Train's default) such parameters make the gradient reducer
fail on the second step; frozen, they stay in the state_dict (so pretrained weights and
checkpoints load strictly) but leave the reducer and `count_parameters` (torch optimizers skip
them anyway: they never get a gradient).
"""

from __future__ import annotations

import functools

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from ptxray.config import ModelConfig
from ptxray.models import register

# Per-architecture extras. dpt: timm ViTs are built for one image size unless told otherwise.
_SMP_EXTRA_KWARGS: dict[str, dict] = {"dpt": {"dynamic_img_size": True}}
_SMP_MIN_INPUT_PX: dict[str, int] = {"pan": 128}


def _check_input(name: str, x: torch.Tensor, multiple: int, min_px: int) -> None:
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or min(h, w) < min_px:
        raise ValueError(
            f"{name}: input {h}x{w} px: height and width must be multiples of {multiple}"
            + (f" and at least {min_px}" if min_px > multiple else "")
        )


class SmpSegClassifier(nn.Module):
    """An smp model built with `aux_params`, returning (seg_logits, cls_logits) at input size."""

    def __init__(self, name: str, net: nn.Module, min_input_px: int = 0) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self.input_multiple = int(net.encoder.output_stride)
        self.min_input_px = max(min_input_px, self.input_multiple)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input(self.name, x, self.input_multiple, self.min_input_px)
        seg_logits, cls_logits = self.net(x)  # (B, 1, h, w), (B, 1)
        if seg_logits.shape[-2:] != x.shape[-2:]:
            seg_logits = F.interpolate(seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return seg_logits, cls_logits


def freeze_unused_parameters(model: nn.Module, in_channels: int) -> list[str]:
    """Freeze the parameters no output depends on; returns their names.

    Found with one probe forward/backward in eval mode (no BatchNorm statistics change) on a
    zero image of the smallest accepted size: which parameters are used is structural here.
    """
    px = max(model.min_input_px, 64)
    px = -(-px // model.input_multiple) * model.input_multiple
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            seg_logits, cls_logits = model(torch.zeros(1, in_channels, px, px))
            (seg_logits.sum() + cls_logits.sum()).backward()
    finally:
        model.train(was_training)
    unused = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            unused.append(name)
        p.grad = None
    return unused


def _encoder_error(cfg: ModelConfig, e: Exception) -> ValueError:
    return ValueError(f"model.encoder={cfg.encoder!r}: not usable with model.arch={cfg.arch!r}: {e}")


def _build_smp(arch: str, cfg: ModelConfig) -> SmpSegClassifier:
    cls = smp.MODEL_ARCHITECTURES_MAPPING[arch]
    try:
        net = cls(
            encoder_name=cfg.encoder,
            encoder_weights=None,  # never download; see ptxray.models.weights
            in_channels=cfg.in_channels,
            classes=1,
            aux_params=dict(classes=1, dropout=cfg.cls_dropout, pooling="avg"),
            **_SMP_EXTRA_KWARGS.get(arch, {}),
        )
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise _encoder_error(cfg, e) from None
    model = SmpSegClassifier(arch, net, _SMP_MIN_INPUT_PX.get(arch, 0))
    freeze_unused_parameters(model, cfg.in_channels)
    return model


for _arch in smp.MODEL_ARCHITECTURES_MAPPING:
    register(_arch)(functools.partial(_build_smp, _arch))


class FCN32s(nn.Module):
    """The plain FCN baseline the paper compares against, FCN-32s style.

    An smp encoder (default resnet34; resnet18 is the lighter choice) -> a 1x1 convolution on the
    deepest features (1/32 of the input) -> one bilinear upsampling to the input size. No skip
    connections: that is exactly what a U-Net adds. torchvision's fcn_resnet50 would be 35M
    parameters of dilated backbone for the same idea, so the baseline is built small and honest.
    Classification: global average pool of the deepest features -> dropout -> linear.
    """

    def __init__(self, encoder: nn.Module, cls_dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        deepest = int(encoder.out_channels[-1])
        self.input_multiple = int(encoder.output_stride)
        self.min_input_px = self.input_multiple
        self.seg_head = nn.Conv2d(deepest, 1, kernel_size=1)
        self.cls_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cls_dropout), nn.Linear(deepest, 1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_input("fcn", x, self.input_multiple, self.min_input_px)
        deepest = self.encoder(x)[-1]  # (B, C_deep, H / 32, W / 32)
        seg_logits = F.interpolate(self.seg_head(deepest), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return seg_logits, self.cls_head(deepest)  # (B, 1, H, W), (B, 1)


@register("fcn")
def build_fcn(cfg: ModelConfig) -> FCN32s:
    try:
        encoder = smp.encoders.get_encoder(cfg.encoder, in_channels=cfg.in_channels, depth=5, weights=None)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise _encoder_error(cfg, e) from None
    model = FCN32s(encoder, cls_dropout=cfg.cls_dropout)
    freeze_unused_parameters(model, cfg.in_channels)
    return model
