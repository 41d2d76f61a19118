"""The paper's custom vanilla U-Net (Keras original, rebuilt in torch), plus a classification head.

Encoder: `depth` blocks of [conv(k, dilation, stride) -> (BN) -> ReLU -> conv(k, dilation) -> (BN)
-> ReLU -> dropout], each followed by 2x2 max-pooling; a bottleneck block of the same form; a
mirrored decoder of [2x2 stride-2 up-convolution -> concatenate the encoder block's output (skip)
-> the same two-conv block]; a final 1x1 convolution to one channel. Padding is "same" (the paper
keeps sizes through every convolution), so kernel_size must be odd.

Widths: block i has round(base_filters * filter_growth**i) filters, i = 0..depth (depth = the
bottleneck). Dropout rises linearly with depth, dropout * (i + 1) / (depth + 1) in block i, up to
`dropout` at the bottleneck (the paper: lower rates near the input to avoid underfitting); each
decoder block uses the rate of the encoder block it mirrors.

Stride (the paper's "kernel stride"; 1 = the paper's model): the first convolution of each
encoder block uses it, so a block downsamples by `stride` *and then* by the 2x2 pooling, 2*stride
in all; the skip connection is taken at 1/stride of the block's input. To stay a mirror, each
decoder block ends with a stride x stride up-convolution (kernel = stride) when stride > 1, which
brings it back to its encoder block's input resolution. The bottleneck's convolutions use stride
1. H and W must therefore be multiples of (2 * stride) ** depth: 16 at depth 4, 32 at depth 5
(64 px works for both), 256 at depth 4 with stride 2.

Initializer: "glorot_uniform" (Keras' default, Xavier uniform) or "he_normal" (Kaiming normal,
fan-in, ReLU gain) for conv, up-conv and linear weights; biases start at zero as in Keras.

Classification head: global average pool of the bottleneck -> dropout(cls_dropout) -> linear -> 1
logit. L1/L2 weight penalties are the loss's job (ptxray.losses.weight_penalty); nothing here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ptxray.config import ModelConfig
from ptxray.models import register

_INITIALIZERS = {
    "glorot_uniform": nn.init.xavier_uniform_,
    "xavier_uniform": nn.init.xavier_uniform_,
    # Keras' he_normal draws from a truncated normal; torch's plain normal has the same std.
    "he_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
}


class ConvBlock(nn.Sequential):
    """Two same-padded convolutions, each -> (BN) -> ReLU, then dropout (identity at rate 0)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        stride: int,
        batch_norm: bool,
        dropout: float,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = []
        for i, c_in in enumerate((in_channels, out_channels)):
            layers.append(
                nn.Conv2d(
                    c_in,
                    out_channels,
                    kernel_size,
                    stride=stride if i == 0 else 1,
                    padding=padding,
                    dilation=dilation,
                    bias=not batch_norm,  # BN's shift makes a conv bias redundant
                )
            )
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Dropout(dropout) if dropout > 0 else nn.Identity())
        super().__init__(*layers)


class VanillaUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        depth: int = 4,
        base_filters: int = 16,
        filter_growth: float = 2.0,
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        initializer: str = "glorot_uniform",
        dropout: float = 0.0,
        batch_norm: bool = True,
        cls_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_args(depth, base_filters, filter_growth, kernel_size, dilation, stride, initializer, dropout, cls_dropout)
        widths = [max(1, round(base_filters * filter_growth**i)) for i in range(depth + 1)]
        rates = [dropout * (i + 1) / (depth + 1) for i in range(depth)]
        conv = dict(kernel_size=kernel_size, dilation=dilation, batch_norm=batch_norm)

        self.input_multiple = (2 * stride) ** depth
        self.min_input_px = self.input_multiple
        self.widths = tuple(widths)
        self.dropout_rates = tuple(rates) + (dropout,)

        self.encoder_blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, stride=stride, dropout=rate, **conv)
            for c_in, c_out, rate in zip([in_channels] + widths[:-2], widths[:-1], rates)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], stride=1, dropout=dropout, **conv)
        # Decoder lists run deepest first, the order forward() walks them.
        self.up_convs = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2) for i in reversed(range(depth))
        )
        self.decoder_blocks = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i], stride=1, dropout=rates[i], **conv) for i in reversed(range(depth))
        )
        self.unstride = nn.ModuleList(
            nn.ConvTranspose2d(widths[i], widths[i], kernel_size=stride, stride=stride) if stride > 1 else nn.Identity()
            for i in reversed(range(depth))
        )
        self.seg_head = nn.Conv2d(widths[0], 1, kernel_size=1)
        self.cls_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cls_dropout), nn.Linear(widths[-1], 1)
        )
        init_weight = _INITIALIZERS[initializer]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                init_weight(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        if h % self.input_multiple or w % self.input_multiple:
            raise ValueError(
                f"unet_vanilla: input {h}x{w} px: height and width must be multiples of "
                f"{self.input_multiple} ((2 * stride) ** depth)"
            )
        skips = []
        for block in self.encoder_blocks:
            x = block(x)  # (B, w_i, H_i / stride, W_i / stride)
            skips.append(x)
            x = self.pool(x)
        bottom = self.bottleneck(x)  # (B, w_depth, H / (2 stride)^depth, ...)
        x = bottom
        for up, block, unstride, skip in zip(self.up_convs, self.decoder_blocks, self.unstride, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
            x = unstride(x)  # back to the encoder block's input resolution
        return self.seg_head(x), self.cls_head(bottom)  # (B, 1, H, W), (B, 1)


def _check_args(depth, base_filters, filter_growth, kernel_size, dilation, stride, initializer, dropout, cls_dropout):
    problems = []
    if not 1 <= depth <= 8:
        problems.append(f"model.vanilla.depth={depth}: expected 1..8 pooling blocks (the paper uses 4-5)")
    if base_filters < 1:
        problems.append(f"model.vanilla.base_filters={base_filters}: must be >= 1")
    if filter_growth <= 0:
        problems.append(f"model.vanilla.filter_growth={filter_growth}: must be > 0")
    if kernel_size < 1 or kernel_size % 2 == 0:
        problems.append(f"model.vanilla.kernel_size={kernel_size}: must be odd (same padding keeps sizes)")
    if dilation < 1:
        problems.append(f"model.vanilla.dilation={dilation}: must be >= 1")
    if stride < 1:
        problems.append(f"model.vanilla.stride={stride}: must be >= 1")
    if initializer not in _INITIALIZERS:
        problems.append(f"model.vanilla.initializer={initializer!r}: choose from {sorted(_INITIALIZERS)}")
    for name, rate in (("vanilla.dropout", dropout), ("cls_dropout", cls_dropout)):
        if not 0 <= rate < 1:
            problems.append(f"model.{name}={rate}: must be in [0, 1)")
    if problems:
        raise ValueError("unet_vanilla: " + "; ".join(problems))


@register("unet_vanilla", has_encoder=False)
def build_vanilla_unet(cfg: ModelConfig) -> VanillaUNet:
    return VanillaUNet(in_channels=cfg.in_channels, cls_dropout=cfg.cls_dropout, **dataclasses.asdict(cfg.vanilla))
