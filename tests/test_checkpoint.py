"""Checkpoints: atomic saves, weights_only loads, RNG state round trips, clear errors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from ptxray.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    strip_module_prefix,
)
from ptxray.config import Config, OptimConfig

torch.set_num_threads(2)


def _training_state() -> dict:
    """What fit saves: model, optimizer and scheduler state after a few steps, RNG, config, history."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedulers = {
        "onecycle": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10),
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=0.1)),
    }
    for _ in range(3):
        model(torch.rand(2, 1, 8, 8)).mean().backward()
        optimizer.step()
        schedulers["onecycle"].step()
    schedulers["plateau"].step(0.5)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {k: s.state_dict() for k, s in schedulers.items()},
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5).state_dict(),
        "epochs_completed": 3,
        "early_stopping": {"best": 0.5, "epochs_since_best": 1, "mode": "max"},
        "rng": capture_rng_state(),
        "config": Config(optim=OptimConfig(lr=1e-3)).to_dict(),
        "history": [{"epoch": 0, "val_dice": 0.5, "val_dice_pos": float("nan")}],
    }


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_round_trip_loads_with_weights_only(tmp_path):
    state = _training_state()
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, state)
    # Both our loader and a plain torch.load with weights_only=True read it.
    _assert_same(state, load_checkpoint(path))
    _assert_same(state, torch.load(path, weights_only=True))


def test_rng_state_round_trip_reproduces_draws(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in `random`'s state
    np.random.standard_normal()  # ... and in numpy's
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], random.gauss(0, 1))

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    assert expected[3] == got[3]


def test_failed_save_keeps_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(20)  # some bytes reached the disk, then the process "died"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    old = load_checkpoint(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(3))


def test_truncated_or_garbage_file_raises_checkpoint_error_naming_path(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _training_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    assert issubclass(CheckpointError, ValueError)


def test_checkpoint_with_disallowed_objects_is_refused_at_load_and_at_save(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"rng": np.random.get_state()}, path)  # numpy objects: weights_only refuses them
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(TypeError, match=r"checkpoint\.history\[0\]\.val_dice"):
        save_checkpoint(tmp_path / "x.pt", {"history": [{"val_dice": np.float64(0.5)}]})
    assert not (tmp_path / "x.pt").exists()


def test_file_uri_goes_through_the_storage_layer(tmp_path):
    uri = f"file://{tmp_path}/sub/last.pt"
    save_checkpoint(uri, {"w": torch.arange(4)})
    assert torch.equal(load_checkpoint(uri)["w"], torch.arange(4))
    assert torch.equal(load_checkpoint(tmp_path / "sub" / "last.pt")["w"], torch.arange(4))


def test_s3_checkpoint_is_one_atomic_upload_to_the_key(moto_s3):
    moto_s3.client().create_bucket(Bucket="ckpt")
    state = {"model": {"w": torch.randn(3, 3)}, "epochs_completed": 2}
    moto_s3.start_recording()
    save_checkpoint("s3://ckpt/runs/t1/last.pt", state)
    writes = [r for r in moto_s3.stop_recording() if r.get("method") in ("PUT", "POST")]
    # Either one PutObject or one multipart upload (create, parts, complete): S3 shows the object
    # only when that request / the completion succeeds. No temp objects, no directory markers.
    urls = [r["url"].split("?")[0] for r in writes]
    assert urls and all(u.endswith("/ckpt/runs/t1/last.pt") for u in urls), urls
    queries = [r["url"].partition("?")[2] for r in writes]
    single_put = len(writes) == 1 and writes[0]["method"] == "PUT" and "uploadId" not in queries[0]
    multipart = queries[0] == "uploads" and queries[-1].startswith("uploadId=") and writes[-1]["method"] == "POST"
    assert single_put or multipart, writes
    loaded = load_checkpoint("s3://ckpt/runs/t1/last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epochs_completed"] == 2
    with pytest.raises(CheckpointError, match="s3://ckpt/runs/t1/missing.pt"):
        load_checkpoint("s3://ckpt/runs/t1/missing.pt")


def test_strip_module_prefix():
    model = nn.Sequential(nn.Linear(2, 2))
    ddp_like = {f"module.{k}": v for k, v in model.state_dict().items()}
    stripped = strip_module_prefix(ddp_like)
    assert stripped.keys() == model.state_dict().keys()
    nn.Sequential(nn.Linear(2, 2)).load_state_dict(stripped)
    assert strip_module_prefix({"a.module.b": 1, "x": 2}) == {"a.module.b": 1, "x": 2}
