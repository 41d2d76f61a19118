import math

import pytest
import torch
from torch import nn

from ptxray.config import LossConfig, load_config
from ptxray.losses import SEG_LOSSES, build_loss, kernel_weights, weight_penalty

LOG2 = math.log(2.0)


def _batch(seed: int = 0, b: int = 4, size: int = 16):
    """Masks with some empty images, as in SIIM: (B, 1, H, W) and labels (B, 1)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, size, size)
    for i in range(0, b, 2):  # every other image has a random blob
        y, x = torch.randint(0, size - 6, (2,), generator=g).tolist()
        mask[i, 0, y : y + 6, x : x + 5] = 1.0
    label = (mask.flatten(1).amax(1, keepdim=True) > 0).float()
    return mask, label


def _loss(name: str, **kw):
    return build_loss(LossConfig(name=name, cls_weight=0.0, **kw))


def test_registry_names_and_unknown_name():
    assert set(SEG_LOSSES) == {"bce", "dice", "bce_dice", "focal", "focal_dice", "lovasz"}
    with pytest.raises(ValueError) as err:
        build_loss(LossConfig(name="hinge"))
    msg = str(err.value)
    assert "hinge" in msg and all(name in msg for name in SEG_LOSSES)


def test_negative_weight_rejected():
    with pytest.raises(ValueError, match="loss.dice_weight"):
        build_loss(LossConfig(dice_weight=-1.0))


def test_config_override_reaches_loss_config():
    cfg = load_config(overrides=["loss.name=focal_dice", "loss.dice_per_image=true", "loss.focal_weight=3"])
    assert cfg.loss.name == "focal_dice" and cfg.loss.dice_per_image is True
    assert cfg.loss.focal_weight == 3.0


# ---- hand-computed values ------------------------------------------------------------------------
def test_bce_hand_value():
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 2, 2)
    logits = torch.tensor([[[[0.0, 0.0], [math.log(3.0), -math.log(3.0)]]]])
    # pixels: p=.5,t=1 -> ln2; p=.5,t=0 -> ln2; p=.75,t=0 -> ln4; p=.25,t=0 -> ln(4/3)
    expected = (LOG2 + LOG2 + math.log(4.0) + math.log(4.0 / 3.0)) / 4
    got = _loss("bce")(logits, torch.zeros(1, 1), mask, torch.ones(1, 1))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_batch_dice_counts_false_positives_on_empty_images():
    # Image 0: mask all ones, p = 0.5 everywhere; image 1: empty mask, p = 0.5 everywhere.
    mask = torch.zeros(2, 1, 2, 2)
    mask[0] = 1.0
    logits = torch.zeros(2, 1, 2, 2)
    cls, label = torch.zeros(2, 1), torch.tensor([[1.0], [0.0]])
    # Batch soft Dice: 2 * sum(p t) / (sum p + sum t) = 2 * 2 / (4 + 4) = 0.5.
    batch = _loss("dice")(logits, cls, mask, label)
    assert batch.item() == pytest.approx(0.5, rel=1e-6)
    # Per image: image 0 -> 1 - 2*2/(2+4) = 1/3; the empty image's term is zero (smp); mean = 1/6.
    per_image = _loss("dice", dice_per_image=True)(logits, cls, mask, label)
    assert per_image.item() == pytest.approx(1.0 / 6.0, rel=1e-6)


def test_perfect_and_disjoint_dice():
    mask, label = _batch()
    cls = torch.zeros_like(label)
    perfect = 30.0 * (2 * mask - 1)
    assert _loss("dice")(perfect, cls, mask, label).item() == pytest.approx(0.0, abs=1e-6)
    assert _loss("dice")(-perfect, cls, mask, label).item() == pytest.approx(1.0, abs=1e-6)


def test_focal_hand_value():
    mask = torch.ones(1, 1, 1, 2)
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])
    # gamma=2: (1-pt)^2 * -ln(pt); pt = .5 -> .25 ln2; pt = .75 -> .0625 ln(4/3)
    expected = (0.25 * LOG2 + 0.0625 * math.log(4.0 / 3.0)) / 2
    got = _loss("focal", focal_gamma=2.0)(logits, torch.zeros(1, 1), mask, torch.ones(1, 1))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # gamma=0 is plain BCE
    bce = _loss("bce")(logits, torch.zeros(1, 1), mask, torch.ones(1, 1))
    assert _loss("focal", focal_gamma=0.0)(logits, torch.zeros(1, 1), mask, torch.ones(1, 1)).item() == pytest.approx(bce.item(), rel=1e-6)


def test_lovasz_hinge_hand_value():
    # Two pixels: positive with logit 0.5 (hinge error 0.5), negative with logit 0 (error 1).
    # Sorted errors [1 (neg), 0.5 (pos)]; Jaccard after each: [1 - 1/2, 1 - 0/2] -> grads [.5, .5].
    mask = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[0.5, 0.0]]]])
    got = _loss("lovasz")(logits, torch.zeros(1, 1), mask, torch.ones(1, 1))
    assert got.item() == pytest.approx(1.0 * 0.5 + 0.5 * 0.5, rel=1e-6)


def test_combined_losses_are_weighted_sums():
    mask, label = _batch(1)
    logits = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    cls = torch.zeros_like(label)
    bce = _loss("bce")(logits, cls, mask, label)
    dice = _loss("dice")(logits, cls, mask, label)
    focal = _loss("focal", focal_gamma=1.5)(logits, cls, mask, label)
    got = _loss("bce_dice", bce_weight=0.3, dice_weight=2.0)(logits, cls, mask, label)
    assert got.item() == pytest.approx(0.3 * bce.item() + 2.0 * dice.item(), rel=1e-6)
    got = _loss("focal_dice", focal_weight=4.0, dice_weight=0.5, focal_gamma=1.5)(logits, cls, mask, label)
    assert got.item() == pytest.approx(4.0 * focal.item() + 0.5 * dice.item(), rel=1e-6)


def test_cls_weight_adds_classification_bce():
    mask, label = _batch(2)
    logits = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    cls = torch.tensor([[0.0], [math.log(3.0)], [0.0], [-math.log(3.0)]])
    label = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    hand_bce = (LOG2 + math.log(4.0) + LOG2 + math.log(4.0 / 3.0)) / 4
    for name in SEG_LOSSES:
        base = build_loss(LossConfig(name=name, cls_weight=0.0))(logits, cls, mask, label)
        with_cls = build_loss(LossConfig(name=name, cls_weight=0.7))(logits, cls, mask, label)
        assert (with_cls - base).item() == pytest.approx(0.7 * hand_bce, rel=1e-5), name


@pytest.mark.parametrize("name", sorted(SEG_LOSSES))
def test_loss_finite_and_decreases_as_prediction_improves(name):
    mask, label = _batch(3)
    cls = torch.zeros_like(label)
    loss_fn = build_loss(LossConfig(name=name))
    values = []
    for confidence in (-1.0, -0.5, 0.0, 0.5, 0.9, 2.0):  # from wrong to right on every pixel
        logits = (confidence * (2 * mask - 1)).requires_grad_(True)
        value = loss_fn(logits, cls, mask, label)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
        values.append(value.item())
    if name == "lovasz":
        values = values[:-1]  # the hinge is exactly 0 once every margin exceeds 1
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_shape_mismatch_is_an_error():
    loss_fn = build_loss(LossConfig())
    with pytest.raises(ValueError, match="seg_logits shape"):
        loss_fn(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1), torch.zeros(2, 4, 4), torch.zeros(2, 1))


def test_bf16_logits_give_float32_loss():
    mask, label = _batch(4)
    logits = torch.randn(mask.shape).to(torch.bfloat16)
    value = build_loss(LossConfig())(logits, torch.zeros(4, 1, dtype=torch.bfloat16), mask, label)
    assert value.dtype == torch.float32 and torch.isfinite(value)


# ---- kernel regulariser --------------------------------------------------------------------------
def _tiny_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),  # weight (2, 1, 3, 3): 18 values
        nn.BatchNorm2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 3),  # weight (3, 8): 24 values
    )
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.fill_(7.0)  # biases and norm parameters must not count
        model[1].weight.fill_(3.0)
        model[1].bias.fill_(5.0)
        model[4].weight.fill_(-0.25)
        model[4].bias.fill_(9.0)
    return model


def test_weight_penalty_hand_sum():
    model = _tiny_model()
    # sum|w| = 18*0.5 + 24*0.25 = 15; sum w^2 = 18*0.25 + 24*0.0625 = 6
    assert weight_penalty(model, l1=0.01, l2=0.0).item() == pytest.approx(0.15, rel=1e-6)
    assert weight_penalty(model, l1=0.0, l2=0.1).item() == pytest.approx(0.6, rel=1e-6)
    assert weight_penalty(model, l1=0.01, l2=0.1).item() == pytest.approx(0.75, rel=1e-6)
    assert len(kernel_weights(model)) == 2


def test_weight_penalty_zero_and_shared_weights():
    model = _tiny_model()
    zero = weight_penalty(model, 0.0, 0.0)
    assert zero.item() == 0.0 and zero.dim() == 0
    assert zero.device == next(model.parameters()).device
    shared = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        shared.weight.fill_(1.0)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert weight_penalty(twice, l1=1.0).item() == pytest.approx(4.0)  # counted once
    with pytest.raises(ValueError, match="l1"):
        weight_penalty(model, l1=-1.0)


def test_weight_penalty_changes_the_gradient():
    l1, l2 = 0.01, 0.1
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def grads(penalised: bool):
        model = _tiny_model()
        model.train()
        with torch.no_grad():
            model[0].weight[0].neg_()  # mixed signs so the L1 sign term is visible
        loss = model(x).square().mean()
        if penalised:
            loss = loss + weight_penalty(model, l1, l2)
        loss.backward()
        return model, {n: p.grad.clone() for n, p in model.named_parameters()}

    model, plain = grads(False)
    _, penal = grads(True)
    for name, param in model.named_parameters():
        diff = penal[name] - plain[name]
        if name in ("0.weight", "4.weight"):
            w = param.detach()
            expected = l1 * torch.sign(w) + 2 * l2 * w
            torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(diff, torch.zeros_like(diff)), name


@pytest.mark.gpu
def test_losses_on_cuda_under_bf16_autocast():
    mask, label = _batch(5)
    mask, label = mask.cuda(), label.cuda()
    logits = torch.randn(mask.shape, device="cuda")
    for name in SEG_LOSSES:
        loss_fn = build_loss(LossConfig(name=name)).cuda()
        cpu = loss_fn(logits.cpu(), torch.zeros(4, 1), mask.cpu(), label.cpu())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu = loss_fn(logits.to(torch.bfloat16), torch.zeros(4, 1, device="cuda"), mask, label)
        assert gpu.dtype == torch.float32
        assert gpu.item() == pytest.approx(cpu.item(), rel=0.05), name
    model = _tiny_model().cuda()
    assert weight_penalty(model, 0.0, 0.0).device.type == "cuda"
    assert weight_penalty(model, 0.01, 0.1).item() == pytest.approx(0.75, rel=1e-5)
