"""The engine: batches, one epoch, evaluation, schedulers, early stopping, oversampling, fit/resume."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import time

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ptxray import engine
from ptxray.checkpoint import load_checkpoint, save_checkpoint
from ptxray.config import (
    ComputeConfig,
    Config,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PreprocessConfig,
    TrainConfig,
    VanillaUNetConfig,
    config_from_dict,
)
from ptxray.engine import (
    EarlyStopping,
    batch_from_numpy,
    build_optimizer,
    build_scheduler,
    epoch_indices,
    evaluate,
    fit,
    positive_rate_for_epoch,
    step_epoch_scheduler,
    train_epoch,
)
from ptxray.losses import build_loss, weight_penalty
from ptxray.models import build_model

torch.set_num_threads(2)


# ---- synthetic data and a tiny model ----------------------------------------------------------
def synth_images(n: int, size: int, channels: int = 1, seed: int = 0, empty_every: int = 4):
    """Bright discs on Gaussian noise; the mask is the discs. Every `empty_every`-th image is empty."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, channels, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    margin = size // 6
    for i in range(n):
        img = rng.normal(80, 25, (size, size))
        if i % empty_every != empty_every - 1:
            for _ in range(rng.integers(1, 3)):
                cy, cx = rng.integers(margin, size - margin, 2)
                r = rng.integers(size // 12, size // 6)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                img[disc] += 100
                masks[i][disc] = 1
        images[i] = np.clip(img, 0, 255).astype(np.uint8)[None]
    return images, masks


class TinySegNet(nn.Module):
    """Smallest model with the contract's outputs: (seg_logits (B,1,H,W), cls_logits (B,1))."""

    def __init__(self, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv2d(4, 1, 1)
        self.cls = nn.Linear(4, 1)

    def forward(self, x):
        h = self.drop(torch.relu(self.conv(x)))  # (B, 4, H, W)
        return self.head(h), self.cls(h.mean(dim=(2, 3)))


def tiny_batches(n_batches: int = 3, batch_size: int = 2, size: int = 16):
    images, masks = synth_images(n_batches * batch_size, size, seed=1)
    return [
        batch_from_numpy(images[i : i + batch_size], masks[i : i + batch_size])
        for i in range(0, n_batches * batch_size, batch_size)
    ]


# ---- batches ----------------------------------------------------------------------------------
def test_batch_from_numpy_follows_the_batch_contract():
    images = np.array([[[[0, 255], [128, 64]]], [[[1, 2], [3, 4]]]], np.uint8)  # (2, 1, 2, 2)
    masks = np.array([[[0, 1], [0, 0]], [[0, 0], [0, 0]]], np.uint8)  # (2, 2, 2)
    batch = batch_from_numpy(images, masks)
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 1, 2, 2)
    assert torch.allclose(batch["image"][0, 0], torch.tensor([[0.0, 1.0], [128 / 255, 64 / 255]]))
    assert batch["mask"].shape == (2, 1, 2, 2) and batch["mask"].dtype == torch.float32
    assert batch["mask"][0, 0, 0, 1] == 1 and batch["mask"].sum() == 1
    assert batch["label"].tolist() == [[1.0], [0.0]]
    assert batch_from_numpy(images, masks * 255)["mask"].sum() == 1  # 0/255 masks work too
    with pytest.raises(ValueError, match="uint8"):
        batch_from_numpy(images.astype(np.float32), masks)
    with pytest.raises(ValueError, match="does not match"):
        batch_from_numpy(images, masks[:, :1])


# ---- the vanilla U-Net learns ----------------------------------------------------------------
def test_vanilla_unet_overfits_eight_images():
    images, masks = synth_images(8, 64, channels=1, seed=0)
    batch = batch_from_numpy(images, masks)
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=1))  # the paper's vanilla U-Net, default widths
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0))
    loss_fn = build_loss(LossConfig())
    before = evaluate(model, [batch], device="cpu")["val_dice"]
    assert before < 0.5  # an untrained net does not already pass

    dice, steps = before, 0
    while steps < 300 and dice <= 0.9:
        for _ in range(5):
            train_epoch(model, [batch], optimizer, loss_fn, device="cpu")
        steps += 5
        # Eval mode (BN running statistics, no dropout) on the same 8 images, with SegMetrics.
        dice = evaluate(model, [batch], device="cpu")["val_dice"]
    assert dice > 0.9, f"train Dice {dice:.3f} after {steps} steps"


# ---- one epoch --------------------------------------------------------------------------------
class SlowBatches:
    def __init__(self, batches, delay: float):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


def test_train_epoch_reports_and_skips_amp_on_cpu():
    torch.manual_seed(0)
    model = TinySegNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(
        model,
        SlowBatches(tiny_batches(3), delay=0.05),
        optimizer,
        build_loss(LossConfig()),
        device="cpu",
        amp=True,
        channels_last=True,
        grad_clip_norm=1.0,
        penalty=lambda m: weight_penalty(m, 0.0, 1e-2),
    )
    assert stats["images"] == 6 and stats["steps"] == 3
    assert math.isfinite(stats["train_loss"]) and 0.0 <= stats["train_dice"] <= 1.0
    assert stats["train_penalty"] > 0
    assert stats["data_wait_seconds"] >= 0.14 and stats["seconds"] >= stats["data_wait_seconds"]
    assert model.conv.weight.is_contiguous()  # train_epoch leaves the model's layout to fit
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_epoch_rejects_empty_input_and_bad_models():
    model = TinySegNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        train_epoch(model, [], optimizer, build_loss(LossConfig()), device="cpu")

    class SegOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(TypeError, match=r"SegOnly.forward must return \(seg_logits, cls_logits\)"):
        evaluate(SegOnly(), tiny_batches(1), device="cpu")


def test_evaluate_prefixes_metrics_and_restores_mode():
    model = TinySegNet(dropout=0.5)
    model.train()
    out = evaluate(model, tiny_batches(3), device="cpu", loss_fn=build_loss(LossConfig()))
    assert model.training
    expected = {"dice", "dice_cls", "dice_pos", "iou", "auc", "sensitivity", "specificity", "empty_dice", "n_images", "n_positive", "loss"}
    assert set(out) == {f"val_{k}" for k in expected}
    assert out["val_n_images"] == 6
    # Deterministic in eval mode despite dropout.
    assert evaluate(model, tiny_batches(3), device="cpu")["val_dice"] == out["val_dice"]
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [], device="cpu")


@pytest.mark.gpu
def test_train_epoch_and_evaluate_on_cuda_with_bf16_and_channels_last():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=1, vanilla=VanillaUNetConfig(depth=3, base_filters=8))).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3))
    images, masks = synth_images(8, 64, seed=0)
    batch = batch_from_numpy(images, masks)
    for _ in range(30):
        stats = train_epoch(
            model, [batch], optimizer, build_loss(LossConfig()), device=device, amp=True, channels_last=True
        )
    assert math.isfinite(stats["train_loss"])
    out = evaluate(model, [batch], device=device, amp=True, channels_last=True)
    assert out["val_dice"] > 0.5


# ---- optimizers and schedulers ---------------------------------------------------------------
def test_build_optimizer_variants_and_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    decays = sorted((g["weight_decay"], sum(p.numel() for p in g["params"])) for g in adamw.param_groups)
    # conv weight (18 values) decays; conv bias (2) and BN weight/bias (2 + 2) do not.
    assert decays == [(0.0, 6), (0.05, 18)]
    assert isinstance(adamw, torch.optim.AdamW)
    assert isinstance(build_optimizer(model, OptimConfig(name="adam")), torch.optim.Adam)
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(model, OptimConfig(name="lamb"))
    with pytest.raises(ValueError, match="optim.nesterov"):
        build_optimizer(model, OptimConfig(name="sgd", momentum=0.0, nesterov=True))


def _sgd(lr=0.1):
    return torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=lr, momentum=0.9)


def test_cosine_steps_per_epoch():
    optimizer = _sgd(0.1)
    scheduler = build_scheduler(optimizer, OptimConfig(scheduler="cosine", min_lr=0.0), epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_epoch_scheduler(scheduler, 0.0)
    expected = [0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert lrs == pytest.approx(expected)


def test_onecycle_steps_per_batch_inside_train_epoch():
    model = TinySegNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = OptimConfig(scheduler="onecycle", lr=1e-2)
    scheduler = build_scheduler(optimizer, cfg, epochs=2, steps_per_epoch=3)
    reference_optimizer = torch.optim.AdamW(nn.Linear(1, 1).parameters())
    reference = torch.optim.lr_scheduler.OneCycleLR(
        reference_optimizer, max_lr=1e-2, total_steps=6, pct_start=cfg.onecycle_pct_start
    )
    assert engine.scheduler_steps_per_batch(scheduler)
    loss_fn = build_loss(LossConfig())
    train_epoch(model, tiny_batches(3), optimizer, loss_fn, device="cpu", scheduler=scheduler)
    for _ in range(3):
        reference_optimizer.step()
        reference.step()
    assert scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])
    step_epoch_scheduler(scheduler, 0.5)  # per-batch schedulers ignore the epoch step
    assert scheduler.last_epoch == 3
    # One batch more than planned holds the final lr instead of raising.
    train_epoch(model, tiny_batches(3) + tiny_batches(1), optimizer, loss_fn, device="cpu", scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 25 / 1e4)
    with pytest.raises(ValueError, match="steps per epoch"):
        build_scheduler(optimizer, cfg, epochs=2)


def test_plateau_steps_on_the_monitored_metric():
    optimizer = _sgd(0.1)
    cfg = OptimConfig(scheduler="plateau", plateau_factor=0.5, plateau_patience=1)
    scheduler = build_scheduler(optimizer, cfg, epochs=10, mode="max")
    lrs = []
    for value in [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]:
        optimizer.step()
        step_epoch_scheduler(scheduler, value)
        lrs.append(optimizer.param_groups[0]["lr"])
    # max mode: 0.6 improves; two epochs without improvement (> patience 1) halve the lr.
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    assert build_scheduler(_sgd(), OptimConfig(scheduler="none"), epochs=3) is None
    with pytest.raises(ValueError, match="optim.scheduler"):
        build_scheduler(_sgd(), OptimConfig(scheduler="step"), epochs=3)


# ---- early stopping ---------------------------------------------------------------------------
def test_early_stopping_patience_min_delta_and_state():
    stopper = EarlyStopping("val_dice", "max", patience=2, min_delta=0.01)
    decisions = [stopper.step(v) for v in [0.5, 0.505, 0.52, float("nan"), 0.525]]
    # 0.505 is within min_delta (no improvement), 0.52 improves, NaN and 0.525 do not -> stop.
    assert decisions == [False, False, False, False, True]
    assert stopper.best == 0.52 and stopper.epochs_since_best == 2

    restored = EarlyStopping("val_dice", "max", patience=2, min_delta=0.01)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best == 0.52 and restored.epochs_since_best == 2

    lower = EarlyStopping("val_loss", "min", patience=1)
    assert [lower.step(v) for v in [1.0, 0.9, 0.95]] == [False, False, True]
    never = EarlyStopping(patience=0)
    assert not any(never.step(0.1) for _ in range(20))
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")


# ---- positive oversampling -------------------------------------------------------------------
def test_positive_rate_anneals_linearly():
    assert positive_rate_for_epoch(0, 11, 0.8, 0.4) == pytest.approx(0.8)
    assert positive_rate_for_epoch(5, 11, 0.8, 0.4) == pytest.approx(0.6)
    assert positive_rate_for_epoch(10, 11, 0.8, 0.4) == pytest.approx(0.4)
    assert positive_rate_for_epoch(0, 1, 0.8, 0.4) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="positive rate"):
        positive_rate_for_epoch(0, 5, 1.5, 0.4)


def test_epoch_indices_hit_the_rate_evenly_and_rate_zero_is_a_permutation():
    labels = np.zeros(5000, bool)
    labels[np.random.default_rng(0).choice(5000, 1000, replace=False)] = True  # 20% positive

    idx = epoch_indices(labels, 0, 10, 0.8, 0.4, np.random.default_rng(1))
    assert idx.shape == (5000,)
    assert labels[idx].mean() == pytest.approx(0.8, abs=1e-3)
    counts = np.bincount(idx, minlength=5000)
    assert set(counts[labels]) == {4} and set(counts[~labels]) <= {0, 1}  # as even as possible
    assert not np.array_equal(idx[:50], np.sort(idx[:50]))  # shuffled

    last = epoch_indices(labels, 9, 10, 0.8, 0.4, np.random.default_rng(1))
    assert labels[last].mean() == pytest.approx(0.4, abs=1e-3)

    natural = epoch_indices(labels, 3, 10, 0.0, 0.0, np.random.default_rng(2))
    assert np.array_equal(np.sort(natural), np.arange(5000))
    assert not np.array_equal(natural, np.arange(5000))
    same = epoch_indices(labels, 3, 10, 0.0, 0.0, np.random.default_rng(2))
    assert np.array_equal(natural, same)  # the handed-in rng decides everything

    no_positives = epoch_indices(np.zeros(10, bool), 0, 2, 0.5, 0.5, np.random.default_rng(0))
    assert np.array_equal(np.sort(no_positives), np.arange(10))


# ---- fit: resume, early stopping, files -------------------------------------------------------
def small_config(**train) -> Config:
    return Config(
        preprocess=PreprocessConfig(channels=("raw",), image_size_px=32),
        model=ModelConfig(cls_dropout=0.3, vanilla=VanillaUNetConfig(depth=2, base_filters=4, dropout=0.3)),
        optim=OptimConfig(lr=3e-3, scheduler="cosine"),
        train=TrainConfig(**{"epochs": 4, "batch_size": 4, "seed": 3, "early_stop_patience": 0, **train}),
        compute=ComputeConfig(amp=False, channels_last=False),
    )


def make_loaders(batch_size: int = 4):
    images, masks = synth_images(8, 32, seed=5)
    val = [batch_from_numpy(images[i : i + 4], masks[i : i + 4]) for i in (0, 4)]

    def train_batches(epoch: int, rng: np.random.Generator):
        order = rng.permutation(len(images))
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            batch = batch_from_numpy(images[sel], masks[sel])
            # Augmentation drawing from the global RNGs (as some libraries do): a resume must
            # restore numpy's and random's states for the data to match.
            batch["image"] = (batch["image"] + 0.05 * torch.from_numpy(np.random.rand(*batch["image"].shape)).float()
                              + 0.05 * random.random()).clamp(0, 1)
            yield batch

    return train_batches, lambda: val


class Crash(RuntimeError):
    pass


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _new_model(cfg, seed):
    torch.manual_seed(seed)
    return build_model(cfg.model)


def test_killed_and_resumed_fit_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = small_config()
    train_batches, val_batches = make_loaders()

    model_a = _new_model(cfg, 0)
    full = fit(model_a, cfg, train_batches, val_batches, run_dir=tmp_path / "a", device="cpu")
    assert full.epochs_run == 4 and not full.stopped_early

    def crash_after_epoch_1(epoch, metrics, checkpoint):
        assert checkpoint is not None and metrics["epoch"] == epoch
        if epoch == 1:
            raise Crash("killed")

    with pytest.raises(Crash):
        fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path / "b", device="cpu",
            on_epoch_end=crash_after_epoch_1)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epochs_completed"] == 2
    # An epoch that reached metrics.jsonl but not the checkpoint before the crash.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "val_dice": 0.0}) + "\n")
    shutil.copytree(tmp_path / "b", tmp_path / "c")

    # The restarted process: other seeds, a freshly initialised model.
    np.random.seed(123)
    random.seed(123)
    model_b = _new_model(cfg, 999)
    seen = []
    resumed = fit(model_b, cfg, train_batches, val_batches, run_dir=tmp_path / "b", device="cpu",
                  on_epoch_end=lambda e, m, c: seen.append(e))
    assert seen == [2, 3] and resumed.epochs_run == 4

    a, b = _weights(model_a), _weights(model_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = ["epoch", "train_loss", "train_dice", "val_dice", "val_loss", "lr"]
    assert [{k: m[k] for k in keys} for m in resumed.history] == [{k: m[k] for k in keys} for m in full.history]
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2, 3]
    assert lines[2]["val_dice"] == resumed.history[2]["val_dice"]

    # Without restoring the RNG streams (dropout, global-RNG augmentation) the runs diverge, so
    # the equality above is evidence, not luck.
    monkeypatch.setattr(engine, "restore_rng_state", lambda state: None)
    model_c = _new_model(cfg, 999)
    fit(model_c, cfg, train_batches, val_batches, run_dir=tmp_path / "c", device="cpu")
    assert any(not torch.equal(a[k], v) for k, v in _weights(model_c).items())
    monkeypatch.undo()

    # A finished run resumes to a no-op.
    def must_not_train(epoch, rng):
        raise AssertionError("trained again")

    again = fit(_new_model(cfg, 1), cfg, must_not_train, val_batches, run_dir=tmp_path / "b", device="cpu")
    assert again.epochs_run == 4 and again.history == resumed.history

    saved = config_from_dict(yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()))
    assert saved == cfg
    best = load_checkpoint(resumed.checkpoint)
    assert resumed.checkpoint.endswith("best.pt") and best["epoch"] == resumed.best["epoch"]
    assert "optimizer" not in best and best["config"] == cfg.to_dict()


def _with_flat_model_keys(config: dict, **flat) -> dict:
    """A saved config as ptxray wrote it before model.vanilla existed (model.depth, ...)."""
    config = copy.deepcopy(config)
    config["model"].update(config["model"].pop("vanilla"), **flat)
    return config


@pytest.mark.parametrize("changed", [False, True])
def test_resume_from_an_old_flat_config_reports_only_real_changes(tmp_path, caplog, changed):
    cfg = small_config(epochs=2)
    train_batches, val_batches = make_loaders()

    def crash_after_epoch_0(epoch, metrics, checkpoint):
        raise Crash("killed")

    with pytest.raises(Crash):
        fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path, device="cpu", on_epoch_end=crash_after_epoch_0)
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["config"] = _with_flat_model_keys(state["config"], **({"dropout": 0.1} if changed else {}))
    assert "vanilla" not in state["config"]["model"] and state["config"]["model"]["depth"] == 2
    save_checkpoint(last, state)

    with caplog.at_level(logging.WARNING, logger="ptxray"), pytest.warns(FutureWarning, match=r"model\.depth -> model\.vanilla\.depth"):
        resumed = fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path, device="cpu")
    assert resumed.epochs_run == 2
    reported = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    if changed:
        (message,) = reported
        assert "'model.vanilla.dropout': 0.3" in message and "model.depth" not in message
    else:
        assert reported == []


def test_fit_stops_early_and_a_resume_does_not_restart_it(tmp_path):
    # val_empty_dice depends on the labels only, so it never improves after epoch 0.
    cfg = small_config(epochs=10, monitor="val_empty_dice", early_stop_patience=2, early_stop_min_delta=0.0)
    train_batches, val_batches = make_loaders()
    result = fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path, device="cpu")
    assert result.stopped_early and result.epochs_run == 3
    assert result.best["epoch"] == 0
    assert result.checkpoint == str(tmp_path / "checkpoints" / "best.pt")
    assert load_checkpoint(result.checkpoint)["epoch"] == 0

    again = fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path, device="cpu")
    assert again.stopped_early and again.epochs_run == 3

    with pytest.raises(KeyError, match="val_nonsense"):
        fit(_new_model(cfg, 0), small_config(monitor="val_nonsense"), train_batches, val_batches,
            run_dir=None, device="cpu")


def test_resuming_an_early_stopped_run_with_more_epochs_says_why_and_leaves_it(tmp_path, caplog):
    """More train.epochs on a run that stopped early trains nothing: the log says why and what
    would train on, and config.yaml and metrics.jsonl keep what the run trained with."""
    cfg = small_config(epochs=10, monitor="val_empty_dice", early_stop_patience=2, early_stop_min_delta=0.0)
    train_batches, val_batches = make_loaders()
    fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path, device="cpu")
    saved = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt")}

    longer = small_config(epochs=20, monitor="val_empty_dice", early_stop_patience=2, early_stop_min_delta=0.0)
    with caplog.at_level(logging.WARNING, logger="ptxray.engine"):
        again = fit(_new_model(longer, 0), longer, train_batches, val_batches, run_dir=tmp_path, device="cpu")
    assert again.stopped_early and again.epochs_run == 3 and again.checkpoint == str(tmp_path / "checkpoints" / "best.pt")
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "stopped early" in r.getMessage()]
    assert "stopped early after epoch 3: val_empty_dice did not improve for 2 epochs (train.early_stop_patience 2" in warning
    assert "whatever train.epochs says (now 20)" in warning and "train.early_stop_patience=0" in warning

    # A patience that now allows more epochs continues the run where it stopped.
    patient = small_config(epochs=5, monitor="val_empty_dice", early_stop_patience=0)
    more = fit(_new_model(patient, 0), patient, train_batches, val_batches, run_dir=tmp_path, device="cpu")
    assert not more.stopped_early and [h["epoch"] for h in more.history] == [0, 1, 2, 3, 4]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["epochs"] == 5


def test_fit_logs_progress_inside_an_epoch_and_not_under_a_progress_bar(tmp_path, caplog):
    cfg = small_config(epochs=1)
    train_batches, val_batches = make_loaders(batch_size=2)  # 4 batches an epoch
    with caplog.at_level(logging.INFO, logger="ptxray.engine"):
        fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=None, device="cpu", steps_per_epoch=4,
            progress_interval_s=1e-9)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1: batch")]
    assert [line.split(" after ")[0] for line in lines] == [f"epoch 1/1: batch {i}/4" for i in (1, 2, 3, 4)]
    assert "s left in the epoch" in lines[0] and "left" not in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ptxray.engine"):
        fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=None, device="cpu", progress_interval_s=0)
    assert not [r for r in caplog.records if ": batch " in r.getMessage()]


def test_fit_in_memory_with_onecycle_and_step_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = small_config(epochs=2, max_steps_per_epoch=1)
    cfg = cfg.with_overrides({"optim.scheduler": "onecycle", "loss.l2_penalty": 1e-4})
    train_batches, val_batches = make_loaders()
    result = fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=None, device="cpu", max_epochs=1)
    assert result.epochs_run == 1 and result.checkpoint is None and result.last_checkpoint is None
    m = result.history[0]
    assert m["train_steps"] == 1 and m["train_images"] == 4 and m["train_penalty"] > 0
    assert m["val_n_images"] == 8 and m["lr"] > 0
    assert list(tmp_path.iterdir()) == []  # no run_dir, no files


def test_fit_uses_channels_last_on_cpu_with_the_same_numbers(tmp_path):
    # compute.channels_last applies on CPU too (oneDNN's NHWC kernels train faster); it changes the
    # memory layout, not the maths: one epoch gives the same metrics as the NCHW run (without
    # dropout, whose random mask is drawn in memory order and so differs between layouts).
    cfg = small_config(epochs=1).with_overrides({"model.vanilla.dropout": 0.0})
    histories = {}
    for nhwc in (False, True):
        c = cfg.with_overrides({"compute.channels_last": nhwc})
        train_batches, val_batches = make_loaders()
        model = _new_model(c, 0)
        histories[nhwc] = fit(model, c, train_batches, val_batches, run_dir=None, device="cpu").history[0]
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == nhwc
    for key in ("train_loss", "val_loss", "val_dice_pos"):
        assert histories[True][key] == pytest.approx(histories[False][key], rel=1e-3, abs=1e-4), key


def _rows(n: int, positive: np.ndarray, first_id: int = 0, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((n, 1, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    ids = first_id + np.arange(n)  # a row's identity, in two pixels
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
    masks[positive, 2:4, 2:4] = 1
    return images, masks


def _ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_positive_reservoir_raises_the_rate_and_keeps_row_counts():
    rng = np.random.default_rng(0)
    natural, target = 0.2, 0.6
    res = engine.PositiveReservoir(natural, capacity=16)
    assert res.swap_probability(natural) == 0.0 and res.swap_probability(0.1) == 0.0
    assert res.swap_probability(target) == pytest.approx(0.5)
    seen_pos = seen = 0
    positive_ids: set[int] = set()
    for step in range(400):
        positive = rng.random(8) < natural
        images, masks = _rows(8, positive, first_id=8 * step)
        out_images, out_masks = res.apply(images, masks, target, rng)
        assert out_images.shape == images.shape and out_masks.shape == masks.shape
        is_pos = out_masks.reshape(8, -1).any(axis=1)
        assert np.array_equal(_ids(out_images)[positive], _ids(images)[positive])  # positives stay
        positive_ids |= set(_ids(images)[positive].tolist())
        # a swapped-in row is a whole positive seen on the stream: its image travels with its mask
        assert set(_ids(out_images)[is_pos & ~positive].tolist()) <= positive_ids
        assert np.array_equal(_ids(out_images)[~is_pos], _ids(images)[~is_pos])
        if step >= 50:
            seen_pos += int(is_pos.sum())
            seen += 8
    assert seen_pos / seen == pytest.approx(target, abs=0.03)
    assert len(res._images) <= 16 and res.swapped > 0


def test_positive_reservoir_without_positives_or_below_the_natural_rate_changes_nothing():
    rng = np.random.default_rng(1)
    images, masks = _rows(6, np.zeros(6, bool))
    res = engine.PositiveReservoir(0.3)
    out_images, out_masks = res.apply(images, masks, 0.9, rng)  # nothing seen yet to copy
    assert np.array_equal(out_images, images) and np.array_equal(out_masks, masks)
    images, masks = _rows(6, np.array([1, 0, 0, 0, 0, 0], bool))
    out_images, out_masks = engine.PositiveReservoir(0.3).apply(images, masks, 0.2, rng)
    assert np.array_equal(out_images, images) and np.array_equal(out_masks, masks)
    with pytest.raises(ValueError, match="natural positive rate"):
        engine.PositiveReservoir(1.5)


def test_train_epoch_skips_a_trailing_one_image_batch():
    """BatchNorm cannot train on a single sample: the last batch of 9 images at batch 4 is skipped."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(vanilla=VanillaUNetConfig(base_filters=4, depth=2)), preprocess=PreprocessConfig(image_size_px=32))
    model = build_model(cfg.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8)
    masks = np.zeros((9, 32, 32), np.uint8)
    masks[:3, 8:16, 8:16] = 1
    batches = [engine.batch_from_numpy(images[i : i + 4], masks[i : i + 4]) for i in range(0, 9, 4)]
    assert [len(b["image"]) for b in batches] == [4, 4, 1]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = engine.train_epoch(model, batches, optimizer, build_loss(cfg.loss), device="cpu")
    assert out["steps"] == 2 and out["images"] == 8


# ---- uint8 hand-over and device augmentation --------------------------------------------------
def test_uint8_batch_gathers_in_one_copy_and_the_device_scales_it():
    images, masks = synth_images(6, 16, channels=2, seed=2)
    masks[0] *= 255  # any non-zero is foreground
    batch = engine.uint8_batch(images, masks, np.array([4, 0, 2]))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 2, 16, 16) and "label" not in batch
    assert torch.equal(batch["image"], torch.from_numpy(images[[4, 0, 2]]))
    assert torch.equal(batch["mask"], torch.from_numpy(masks[[4, 0, 2]]))
    image, mask, label = engine.batch_to_device(batch, torch.device("cpu"), channels_last=False)
    reference = batch_from_numpy(images[[4, 0, 2]], masks[[4, 0, 2]])
    assert torch.equal(image, reference["image"]) and torch.equal(mask, reference["mask"])
    assert torch.equal(label, reference["label"])
    assert torch.equal(engine.uint8_batch(images, masks)["image"], torch.from_numpy(images))
    with pytest.raises(ValueError, match="uint8_batch"):
        engine.uint8_batch(images.astype(np.float32), masks)
    with pytest.raises(ValueError, match="uint8_batch"):
        engine.uint8_batch(images, masks[:, :8])


def test_device_augmentation_needs_uint8_batches_and_relabels_after_augmenting():
    from ptxray.augment import augment_generator, build_device_augment

    images, masks = synth_images(4, 16, seed=3)
    aug = build_device_augment("paper", 16)
    with pytest.raises(ValueError, match="uint8"):
        engine.batch_to_device(batch_from_numpy(images, masks), torch.device("cpu"), False, aug, augment_generator("cpu", [0]))

    def moves_the_lesion_out(images, masks, generator):  # an augmentation that empties every mask
        return images.float() / 255, torch.zeros_like(masks, dtype=torch.float32)

    batch = engine.uint8_batch(images, masks)
    batch["label"] = torch.ones(4, 1)  # a label from before augmentation must not survive it
    _, mask, label = engine.batch_to_device(batch, torch.device("cpu"), False, moves_the_lesion_out, None)
    assert mask.shape == (4, 1, 16, 16) and float(label.sum()) == 0.0


def test_fit_with_device_augmentation_trains_and_a_seed_reproduces_it(tmp_path):
    from ptxray.augment import build_device_augment

    cfg = small_config(epochs=2).with_overrides({"model.vanilla.dropout": 0.0, "model.cls_dropout": 0.0})
    images, masks = synth_images(8, 32, seed=5)

    def train_batches(epoch, rng):
        order = rng.permutation(len(images))
        return [engine.uint8_batch(images, masks, order[i : i + 4]) for i in (0, 4)]

    def val_batches():
        return [engine.uint8_batch(images, masks)]

    runs = {}
    for name, recipe in (("a", "paper"), ("b", "paper"), ("none", "none")):
        result = fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=tmp_path / name, device="cpu",
                     device_augment=build_device_augment(recipe, 32))  # fmt: skip
        runs[name] = result.history
    assert [h["epoch"] for h in runs["a"]] == [0, 1]
    assert all(math.isfinite(h["train_loss"]) and h["train_first_batch_seconds"] >= 0 for h in runs["a"])
    for key in ("train_loss", "val_loss", "val_dice"):
        assert [h[key] for h in runs["a"]] == [h[key] for h in runs["b"]], key  # same seed, same stream
    assert runs["a"][0]["train_loss"] != runs["none"][0]["train_loss"]  # the augmentation changed the data
    # A different augment_rank (another DDP rank) draws another stream.
    other = fit(_new_model(cfg, 0), cfg, train_batches, val_batches, run_dir=None, device="cpu",
                device_augment=build_device_augment("paper", 32), augment_rank=1).history  # fmt: skip
    assert other[0]["train_loss"] != runs["a"][0]["train_loss"]
