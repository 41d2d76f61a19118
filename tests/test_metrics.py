import json
import math
from datetime import timedelta

import pytest
import torch
from sklearn.metrics import roc_auc_score

from ptxray.metrics import SegMetrics, dice_per_image, histogram_auc, iou_per_image

KEYS = {"dice", "dice_cls", "dice_pos", "iou", "auc", "sensitivity", "specificity", "empty_dice", "n_images", "n_positive"}


def _masks(*flat_lists, size=4):
    """Masks (B, 1, size, size) whose listed flat pixel indices are 1."""
    out = torch.zeros(len(flat_lists), 1, size * size)
    for i, pixels in enumerate(flat_lists):
        out[i, 0, list(pixels)] = 1.0
    return out.reshape(len(flat_lists), 1, size, size)


# Hand cases, one per image: (pred pixels, true pixels, dice, iou)
CASES = [
    ({0, 1, 2, 3}, {0, 1, 2, 3}, 1.0, 1.0),  # perfect
    (set(), set(), 1.0, 1.0),  # empty / empty: the Kaggle rule
    ({0, 1}, {8, 9}, 0.0, 0.0),  # disjoint
    ({0, 1, 2, 3}, {2, 3, 4, 5}, 0.5, 1.0 / 3.0),  # half overlap: 2*2/(4+4), 2/6
    ({0, 1}, {0, 1, 2, 3}, 2.0 / 3.0, 0.5),  # prediction inside the truth: 2*2/(2+4), 2/4
    ({5}, set(), 0.0, 0.0),  # false positive on an empty image
    (set(), {5}, 0.0, 0.0),  # missed a positive
]


def test_dice_and_iou_hand_cases():
    pred = _masks(*(c[0] for c in CASES))
    true = _masks(*(c[1] for c in CASES))
    dice = dice_per_image(pred, true)
    iou = iou_per_image(pred, true)
    assert dice.shape == (len(CASES),)
    assert dice.tolist() == pytest.approx([c[2] for c in CASES], abs=1e-12)
    assert iou.tolist() == pytest.approx([c[3] for c in CASES], abs=1e-12)
    # (B, H, W) and bool masks give the same numbers
    assert dice_per_image(pred[:, 0].bool(), true[:, 0].bool()).tolist() == dice.tolist()


def test_mask_shape_errors():
    with pytest.raises(ValueError, match="pred shape"):
        dice_per_image(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="expected masks"):
        iou_per_image(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))


def _hand_batch():
    """Four images with known metrics (see test_segmetrics_hand_batch)."""
    pred = _masks({0, 1, 2, 3}, set(), {0, 1, 2, 3}, {7})
    mask = _masks({0, 1, 2, 3}, set(), {2, 3, 4, 5}, set())
    seg_logits = 10.0 * (2 * pred - 1)
    cls_logits = torch.tensor([[2.0], [-1.0], [-0.5], [0.5]])
    label = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    return seg_logits, cls_logits, mask, label


def test_segmetrics_hand_batch():
    metrics = SegMetrics()
    metrics.update(*_hand_batch())
    out = metrics.compute()
    assert set(out) == {"val_" + k for k in KEYS}
    assert all(isinstance(v, float) for v in out.values())
    # per-image dice: perfect 1, empty/empty 1, half overlap 0.5, false positive 0
    assert out["val_dice"] == pytest.approx(2.5 / 4)
    assert out["val_dice_pos"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["val_iou"] == pytest.approx((1.0 + 1.0 + 1.0 / 3.0 + 0.0) / 4)
    assert out["val_empty_dice"] == pytest.approx(0.5)  # 2 of 4 masks are empty
    assert out["val_n_images"] == 4.0 and out["val_n_positive"] == 2.0
    # decisions (p >= 0.5): [1, 0, 0, 1] vs labels [1, 0, 1, 0] -> TP 1, TN 1, FN 1, FP 1
    assert out["val_sensitivity"] == pytest.approx(0.5)
    assert out["val_specificity"] == pytest.approx(0.5)
    # positives score {2, -0.5}, negatives {-1, 0.5}: 3 of 4 pairs ordered correctly
    assert out["val_auc"] == pytest.approx(0.75)
    assert metrics.compute(prefix="")["dice"] == out["val_dice"]


def test_segmentation_threshold():
    mask = _masks({0, 1})
    seg_logits = torch.full((1, 1, 4, 4), -5.0)
    seg_logits.view(-1)[:2] = 0.3  # sigmoid(0.3) = 0.574
    cls, label = torch.zeros(1, 1), torch.ones(1, 1)
    at_half, at_six = SegMetrics(), SegMetrics()
    at_half.update(seg_logits, cls, mask, label, threshold=0.5)
    at_six.update(seg_logits, cls, mask, label, threshold=0.6)
    assert at_half.compute()["val_dice"] == 1.0
    assert at_six.compute()["val_dice"] == 0.0


def test_empty_dice_is_fraction_of_negative_images():
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(50, 1, 8, 8, generator=g) > 0.9).float()
    mask[torch.rand(50, generator=g) < 0.7] = 0.0
    n_negative = int((mask.flatten(1).sum(1) == 0).sum())
    metrics = SegMetrics()
    # an all-empty prediction must score exactly empty_dice
    metrics.update(torch.full_like(mask, -20.0), torch.zeros(50, 1), mask, torch.zeros(50, 1))
    out = metrics.compute()
    assert out["val_empty_dice"] == pytest.approx(n_negative / 50)
    assert out["val_dice"] == pytest.approx(out["val_empty_dice"])
    assert out["val_dice_pos"] == 0.0 and out["val_n_positive"] == 50 - n_negative


def test_nan_rules():
    empty = SegMetrics().compute()
    assert empty["val_n_images"] == 0.0
    assert all(math.isnan(empty["val_" + k]) for k in KEYS - {"n_images", "n_positive"})
    metrics = SegMetrics()
    mask = torch.zeros(3, 1, 4, 4)  # no positive masks, one label class
    metrics.update(torch.randn(3, 1, 4, 4), torch.randn(3, 1), mask, torch.zeros(3, 1))
    out = metrics.compute()
    assert math.isnan(out["val_dice_pos"]) and math.isnan(out["val_auc"])
    assert math.isnan(out["val_sensitivity"]) and not math.isnan(out["val_specificity"])
    assert not math.isnan(out["val_dice"])


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_histogram_auc_matches_sklearn(scale):
    # scale 6: a confident classifier, most probabilities within 1e-3 of 0 or 1
    g = torch.Generator().manual_seed(int(scale))
    n = 3000
    label = (torch.rand(n, generator=g) < 0.25).float()
    logits = scale * (torch.randn(n, generator=g) + 0.8 * label)
    metrics = SegMetrics()
    for chunk in range(0, n, 500):  # several batches
        sl = slice(chunk, chunk + 500)
        metrics.update(torch.zeros(500, 1, 2, 2), logits[sl, None], torch.zeros(500, 1, 2, 2), label[sl, None])
    expected = roc_auc_score(label.numpy(), logits.numpy())
    assert abs(metrics.compute()["val_auc"] - expected) < 0.01
    assert 0.6 < expected < 0.95  # the comparison is not trivial


def test_histogram_auc_ties_count_half():
    assert histogram_auc(torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.0, 5.0, 0.0])) == 0.5
    assert histogram_auc(torch.tensor([0.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])) == 1.0
    assert histogram_auc(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.25)


def _random_batch(seed: int, b: int = 12, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, 1, size, size, generator=g) > 0.6).float()
    mask[torch.rand(b, generator=g) < 0.5] = 0.0
    label = (mask.flatten(1).amax(1) > 0).float()[:, None]
    seg_logits = 2.0 * (2 * mask - 1) + torch.randn(b, 1, size, size, generator=g) * 2
    cls_logits = 2.0 * (2 * label - 1) + torch.randn(b, 1, generator=g) * 2
    return seg_logits, cls_logits, mask, label


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12, nan_ok=True), key


def test_merge_and_state_round_trip():
    seg, cls, mask, label = _random_batch(2)
    whole = SegMetrics()
    whole.update(seg, cls, mask, label)
    first, second = SegMetrics(), SegMetrics()
    first.update(seg[:5], cls[:5], mask[:5], label[:5])
    second.update(seg[5:], cls[5:], mask[5:], label[5:])
    merged = SegMetrics().merge_(first).merge_(second)
    _assert_same(merged.compute(), whole.compute())
    _assert_same(SegMetrics.from_state(merged.state()).compute(), whole.compute())
    assert merged.state().dtype == torch.float64
    with pytest.raises(ValueError, match="n_bins"):
        SegMetrics(n_bins=16).merge_(whole)
    with pytest.raises(ValueError, match="1-D vector"):
        SegMetrics.from_state(torch.zeros(11))


def test_all_reduce_is_a_noop_without_distributed():
    metrics = SegMetrics()
    metrics.update(*_hand_batch())
    before = metrics.compute()
    _assert_same(metrics.all_reduce_().compute(), before)


def _rank_worker(rank: int, world_size: int, tmp: str) -> None:
    """One simulated Ray Train worker: its shard of the batch, then all_reduce_ (gloo)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Rendezvous through a file: a port picked free beforehand can be taken by another process
    # before rank 0 listens on it (EADDRINUSE on a busy machine).
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        seg, cls, mask, label = torch.load(f"{tmp}/batch.pt")
        shard = SegMetrics()
        # uneven shards; rank 1 sees two batches
        parts = [slice(0, 5)] if rank == 0 else [slice(5, 9), slice(9, None)]
        for sl in parts:
            shard.update(seg[sl], cls[sl], mask[sl], label[sl])
        shard.all_reduce_()
        # a rank that saw no batch must still join the collective
        lonely = SegMetrics()
        if rank == 0:
            lonely.update(seg, cls, mask, label)
        lonely.all_reduce_()
        out = {"shard": shard.compute(), "lonely": lonely.compute()}
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_gloo_ranks_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    batch = _random_batch(7)
    torch.save(batch, tmp_path / "batch.pt")
    single = SegMetrics()
    single.update(*batch)
    expected = single.compute()
    assert 0 < expected["val_n_positive"] < expected["val_n_images"]

    mp.spawn(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        _assert_same(got["shard"], expected)
        _assert_same(got["lonely"], expected)


@pytest.mark.gpu
def test_cuda_update_matches_cpu():
    batch = _random_batch(3, b=16, size=32)
    cpu = SegMetrics()
    cpu.update(*batch)
    gpu = SegMetrics()
    gpu.update(*(t.cuda() for t in batch[:2]), *(t.cuda() for t in batch[2:]))
    gpu.update(*(t.cuda().to(torch.bfloat16) for t in batch[:2]), *(t.cuda() for t in batch[2:]))
    assert gpu.state().device.type == "cuda"
    cpu.update(*(t.to(torch.bfloat16) for t in batch[:2]), *batch[2:])
    _assert_same(gpu.compute(), cpu.compute())


def test_dice_cls_empties_the_mask_where_the_classifier_says_negative():
    # Four 2x2 images: (true mask, predicted mask, classifier logit)
    true = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32).reshape(4, 1, 2, 2)
    pred = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32).reshape(4, 1, 2, 2)
    seg_logits = (pred * 2 - 1) * 10
    cls_logits = torch.tensor([[5.0], [-5.0], [5.0], [-5.0]])
    label = true.flatten(1).amax(1, keepdim=True)
    m = SegMetrics()
    m.update(seg_logits, cls_logits, true, label)
    out = m.compute()
    # raw: 1 (perfect), 0 (FP on empty), 0 (FP on empty), 1 (perfect)
    assert out["val_dice"] == pytest.approx(0.5)
    # gated: 1 (kept, perfect), 1 (emptied, true empty), 0 (kept FP), 0 (emptied, true positive)
    assert out["val_dice_cls"] == pytest.approx(0.5)
    cls_logits2 = torch.tensor([[5.0], [-5.0], [-5.0], [5.0]])
    m2 = SegMetrics()
    m2.update(seg_logits, cls_logits2, true, label)
    assert m2.compute()["val_dice_cls"] == pytest.approx(1.0)


# ---- the metric registry ----------------------------------------------------------------------


def _hand_metrics() -> SegMetrics:
    metrics = SegMetrics()
    pred = _masks(*[c[0] for c in CASES])
    true = _masks(*[c[1] for c in CASES])
    labels = true.flatten(1).amax(1, keepdim=True)
    metrics.update(pred * 20 - 10, torch.linspace(-3, 3, len(CASES)).reshape(-1, 1), true, labels)
    return metrics


def test_every_registered_metric_is_computed_and_every_view_names_only_registered_metrics():
    from ptxray import summary
    from ptxray.benchmark import result_columns
    from ptxray.metrics import benchmark_metrics, registered_metrics, summary_metrics, summary_titles

    computed = _hand_metrics().compute()
    names = [m.name for m in registered_metrics()]
    assert list(computed) == [f"val_{n}" for n in names]
    assert all(isinstance(v, float) for v in computed.values())
    assert set(summary_metrics()) <= set(computed) and set(benchmark_metrics()) <= set(computed)
    assert len(summary_titles()) == len(summary_metrics())
    # The views keep the orders their files have always had (summary.json/csv, results.csv, log line).
    assert summary_metrics() == ("val_dice", "val_dice_cls", "val_dice_pos", "val_iou", "val_auc", "val_empty_dice")
    assert summary_titles() == ("Dice", "Dice cls-gated", "Dice pos.", "IoU", "AUC", "empty baseline")
    expected_bench = ("val_dice", "val_dice_pos", "val_iou", "val_auc", "val_empty_dice", "val_dice_cls", "val_n_images", "val_n_positive")
    assert benchmark_metrics() == expected_bench
    columns = result_columns()
    start = columns.index("train_seconds") + 1
    assert columns[start : start + len(expected_bench)] == expected_bench and columns[start + len(expected_bench)] == "device"
    rows = summary.summarize(
        [summary.TrialRecord("t", {}, 0, "TERMINATED", [{**computed, "epoch": 0}])],
        metric="val_dice", mode="max", num_folds=1, max_epochs=1,
    )["rows"]  # fmt: skip
    assert [k for k in rows[0] if k.endswith("_mean")] == [f"{m}_mean" for m in summary_metrics()]


def test_epoch_log_text_keeps_its_layout():
    from ptxray.metrics import format_epoch_metrics

    values = {"val_dice": 0.5, "val_dice_cls": 0.25, "val_empty_dice": 0.125, "val_dice_pos": float("nan"), "val_auc": 0.75}
    assert format_epoch_metrics(values) == "val_dice 0.5000 (cls-gated 0.2500, empty 0.1250, pos nan, auc 0.750)"


def test_a_new_metric_reaches_compute_summary_benchmark_and_log(monkeypatch):
    from ptxray import metrics as m
    from ptxray.benchmark import result_columns

    monkeypatch.setattr(m, "_METRICS", dict(m._METRICS))
    monkeypatch.setattr(m, "_SUMS", dict(m._SUMS))
    m.register_sum("n_big", lambda b: (b.iou > 0.4).sum(dtype=torch.float64))
    m.register_metric("big_share", m.ratio("n_big", "n_images"), summary=6, title="big", benchmark=8, log=m.LogField(5, "big"))
    computed = _hand_metrics().compute()
    iou = torch.tensor([c[3] for c in CASES], dtype=torch.float64)
    assert computed["val_big_share"] == pytest.approx(float((iou > 0.4).double().mean()))
    assert m.summary_metrics()[-1] == "val_big_share" and m.summary_titles()[-1] == "big"
    assert "val_big_share" in result_columns()
    assert m.format_epoch_metrics(computed).endswith(f", big {computed['val_big_share']:.4f})")


def test_registering_a_metric_without_an_implementation_fails(monkeypatch):
    from ptxray import metrics as m

    monkeypatch.setattr(m, "_METRICS", dict(m._METRICS))
    with pytest.raises(TypeError, match="compute must be callable"):
        m.register_metric("nothing", None)
    with pytest.raises(KeyError, match="unknown sum"):
        m.register_metric("ghost", m.ratio("ghost_sum", "n_images"))
    with pytest.raises(KeyError, match="unknown sum"):
        m.total("ghost_count")
    with pytest.raises(ValueError, match="already registered"):
        m.register_metric("dice", m.ratio("dice_sum", "n_images"))
    with pytest.raises(ValueError, match="summary position 0 is taken by 'dice'"):
        m.register_metric("other", m.ratio("dice_sum", "n_images"), summary=0, title="other")
    with pytest.raises(ValueError, match="needs a title"):
        m.register_metric("untitled", m.ratio("dice_sum", "n_images"), summary=9)
    assert "nothing" not in m._METRICS and "ghost" not in m._METRICS
