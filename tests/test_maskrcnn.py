"""The maskrcnn architecture: instance targets from semantic masks, merged detections, and one real
training step + evaluation through ptxray.engine (CPU, 64 px)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ptxray.config import Config
from ptxray.engine import batch_from_numpy, build_optimizer, evaluate, train_epoch
from ptxray.losses import build_loss
from ptxray.models import build_model
from ptxray.models.maskrcnn import MAX_DETECTIONS_PER_IMAGE, instance_targets, merge_detections

BASE = dataclasses.replace(Config().model, arch="maskrcnn")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_instance_targets_one_instance_per_component():
    mask = torch.zeros(3, 1, 16, 20)
    mask[0, 0, 2:5, 3:9] = 1  # rows 2-4, cols 3-8
    mask[0, 0, 10, 15] = 1  # a single pixel
    mask[1, 0, 0:16, 0:2] = 1  # touches the border
    targets = instance_targets(mask)  # image 2 stays empty
    boxes0 = sorted(targets[0]["boxes"].tolist())
    assert boxes0 == [[3.0, 2.0, 9.0, 5.0], [15.0, 10.0, 16.0, 11.0]]  # (x1, y1, x2, y2), exclusive ends
    assert targets[0]["masks"].shape == (2, 16, 20) and targets[0]["masks"].dtype == torch.uint8
    assert int(targets[0]["masks"].sum()) == 18 + 1
    assert torch.equal(targets[0]["masks"].amax(0).bool(), mask[0, 0].bool())  # the instances tile the mask
    assert targets[1]["boxes"].tolist() == [[0.0, 0.0, 2.0, 16.0]]
    assert targets[2]["boxes"].shape == (0, 4) and targets[2]["masks"].shape == (0, 16, 20)
    assert targets[0]["labels"].tolist() == [1, 1] and targets[2]["labels"].dtype == torch.int64


def test_merge_detections_max_of_score_weighted_masks_and_best_score():
    m1 = torch.zeros(1, 4, 4)
    m1[0, 0, :] = 1.0
    m2 = torch.full((1, 4, 4), 0.5)
    detections = [
        {"scores": torch.tensor([0.9, 0.6]), "masks": torch.stack([m1, m2])},  # (N, 1, H, W)
        {"scores": torch.zeros(0), "masks": torch.zeros(0, 1, 4, 4)},
    ]
    seg_logits, cls_logits = merge_detections(detections, (4, 4))
    assert seg_logits.shape == (2, 1, 4, 4) and cls_logits.shape == (2, 1)
    prob = seg_logits.sigmoid()
    assert torch.allclose(prob[0, 0, 0], torch.full((4,), 0.9), atol=1e-5)  # max(0.9 * 1, 0.6 * 0.5)
    assert torch.allclose(prob[0, 0, 1:], torch.full((3, 4), 0.3), atol=1e-5)  # 0.6 * 0.5
    assert cls_logits[0].sigmoid().item() == pytest.approx(0.9, abs=1e-5)
    assert prob[1].max().item() < 1e-5 and cls_logits[1].sigmoid().item() < 1e-5  # nothing detected


def test_one_training_step_and_evaluation_through_the_engine():
    torch.manual_seed(0)
    model = build_model(BASE)
    assert model.loss_from_targets and model.net.roi_heads.detections_per_img == MAX_DETECTIONS_PER_IMAGE
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 20:40, 10:30] = 1  # one positive image, one empty
    batch = batch_from_numpy(images, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = train_epoch(model, [batch], build_optimizer(model, Config().optim), build_loss(Config().loss), device="cpu")
    assert math.isfinite(stats["train_loss"]) and stats["train_loss"] > 0 and stats["steps"] == 1
    assert math.isnan(stats["train_dice"])  # no predictions in train mode
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any(n.startswith("net.roi_heads.mask_head") for n in changed) and any(n.startswith("net.backbone") for n in changed)

    val = evaluate(model, [batch], device="cpu")
    assert val["val_n_images"] == 2 and val["val_n_positive"] == 1
    assert 0.0 <= val["val_dice"] <= 1.0 and val["val_empty_dice"] == 0.5
    with pytest.raises(ValueError, match="forward\\(image, mask\\) needs the masks"):
        model.train()(batch["image"])


def test_other_channel_counts_get_an_adapter_and_encoder_weights_are_refused():
    model = build_model(dataclasses.replace(BASE, in_channels=1)).eval()
    assert model.adapter.in_channels == 1 and model.adapter.out_channels == 3
    with torch.no_grad():
        seg, cls = model(torch.rand(1, 1, 64, 64))
    assert seg.shape == (1, 1, 64, 64) and cls.shape == (1, 1)
    with pytest.raises(ValueError, match="maskrcnn.*encoder_weights"):
        build_model(dataclasses.replace(BASE, encoder_weights="chexnet:/nope.pth.tar"))
