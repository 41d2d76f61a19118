"""torchvision's Mask R-CNN (ResNet-50 FPN, one foreground class) behind ptxray's model contract.

The paper compares Mask R-CNN against the U-Nets. It is an instance-segmentation detector, so
two things differ from every other registered model:

- Training: its loss comes from the model. In train mode `forward(image, mask)` derives instance
  targets from the semantic mask (one instance per 8-connected component, via
  `cv2.connectedComponentsWithStats`: a box and a binary mask each; an image without positive
  pixels gets empty targets, which torchvision supports) and returns torchvision's loss dict
  (loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg). The model sets
  `loss_from_targets = True`; `ptxray.engine.train_epoch` then optimises the sum of those terms
  (model.loss is not used) and reports no train Dice (NaN).
- Inference: in eval mode `forward(image)` returns the usual `(seg_logits (B, 1, H, W),
  cls_logits (B, 1))`: the instance masks are merged into one semantic probability map as the
  pixelwise max of score x mask probability over the detections, and the best detection score is
  the image-level probability (0 without detections). Both are returned as logits
  (`logit(clamp(p, 1e-6, 1 - 1e-6))`), so evaluation, metrics and prediction treat it like any
  other model.

Input: torchvision normalises with ImageNet statistics itself and expects 3 channels in [0, 1],
which is what our (raw, clahe, beasf) stacks are. For another channel count a learned 1x1
convolution maps C channels to 3 first. torchvision's transform would resize every image to
800 px; `forward` sets its sizes to the input's, so the model runs at the cache's resolution.

Nothing downloads: `weights=None, weights_backbone=None` (the backbone uses trainable BatchNorm,
torchvision's choice for an untrained backbone). `model.encoder` / `model.encoder_weights` do
not apply (the backbone is fixed: ResNet-50 FPN); encoder weights are refused with a clear error.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from ptxray.config import ModelConfig
from ptxray.models import register

# A SIIM image has a handful of pneumothorax components, rarely more than ten; torchvision's
# default of 100 detections would run the mask head 100 times per image at inference.
MAX_DETECTIONS_PER_IMAGE = 20
_PROB_EPS = 1e-6


def instance_targets(mask: Tensor) -> list[dict[str, Tensor]]:
    """Semantic masks (B, 1, H, W) or (B, H, W) -> torchvision targets, one instance per component.

    Each target: boxes float32 (K, 4) as (x1, y1, x2, y2) with exclusive right/bottom edges (so a
    one-pixel component still has positive width), labels int64 (K,) all 1, masks uint8 (K, H, W).
    """
    if mask.dim() == 4:
        mask = mask[:, 0]
    binary = (mask.detach() > 0.5).to("cpu", torch.uint8).numpy()  # (B, H, W)
    targets = []
    for m in binary:
        n, components, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        boxes = np.asarray(
            [[x, y, x + w, y + h] for x, y, w, h, _area in stats[1:n]], dtype=np.float32
        ).reshape(-1, 4)
        masks = (components[None] == np.arange(1, n)[:, None, None]).astype(np.uint8)  # (K, H, W)
        targets.append(
            {
                "boxes": torch.from_numpy(boxes).to(mask.device),
                "labels": torch.ones(n - 1, dtype=torch.int64, device=mask.device),
                "masks": torch.from_numpy(masks).to(mask.device),
            }
        )
    return targets


def merge_detections(detections: list[dict[str, Tensor]], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """torchvision detections -> (seg_logits (B, 1, H, W), cls_logits (B, 1)), float32 logits."""
    probs, scores = [], []
    for det in detections:
        s = det["scores"].float()  # (N,)
        m = det["masks"].float()  # (N, 1, H, W) probabilities, pasted at the input size
        if s.numel():
            probs.append((s[:, None, None, None] * m).amax(dim=0))  # (1, H, W)
            scores.append(s.max())
        else:
            probs.append(m.new_zeros((1, *size)))
            scores.append(s.new_zeros(()))
    prob = torch.stack(probs)  # (B, 1, H, W)
    score = torch.stack(scores).reshape(-1, 1)  # (B, 1)
    return torch.logit(prob, eps=_PROB_EPS), torch.logit(score, eps=_PROB_EPS)


class MaskRCNNSegmenter(nn.Module):
    """Mask R-CNN with ptxray's contract in eval mode and torchvision's loss dict in train mode."""

    loss_from_targets = True  # ptxray.engine.train_epoch: the loss is forward(image, mask)'s

    def __init__(self, net: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(in_channels, 3, kernel_size=1) if in_channels != 3 else nn.Identity()
        self.net = net
        self.input_multiple = 1  # torchvision pads to its own multiple of 32 and crops back
        self.min_input_px = 32

    def forward(self, x: Tensor, mask: Tensor | None = None):
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input_px:
            raise ValueError(f"maskrcnn: input {h}x{w} px: height and width must be at least {self.min_input_px}")
        # Run at the input's own size instead of torchvision's 800 px rescale.
        self.net.transform.min_size = (min(h, w),)
        self.net.transform.max_size = max(h, w)
        images = list(self.adapter(x))  # B x (3, H, W)
        if self.training:
            if mask is None:
                raise ValueError(
                    "maskrcnn: in train mode forward(image, mask) needs the masks (its loss comes from "
                    "the model); call model.eval() for predictions"
                )
            return self.net(images, instance_targets(mask))  # {"loss_classifier": ..., ...}
        return merge_detections(self.net(images), (h, w))


# A detector: data-dependent shapes (torch.compile would recompile every batch), and a fixed
# ResNet-50 FPN backbone.
@register("maskrcnn", compilable=False, has_encoder=False)
def build_maskrcnn(cfg: ModelConfig) -> MaskRCNNSegmenter:
    if cfg.encoder_weights.strip().lower() not in ("", "none"):
        raise ValueError(
            f"model.arch='maskrcnn': model.encoder_weights={cfg.encoder_weights!r} is not supported "
            "(its ResNet-50 FPN backbone starts from random weights here); set model.encoder_weights=none"
        )
    # Lazy: torchvision's detection package is only needed when this model is built.
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    net = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=2,  # background + pneumothorax
        box_detections_per_img=MAX_DETECTIONS_PER_IMAGE,
    )
    return MaskRCNNSegmenter(net, cfg.in_channels)


__all__ = ["MAX_DETECTIONS_PER_IMAGE", "MaskRCNNSegmenter", "build_maskrcnn", "instance_targets", "merge_detections"]
