"""Decision rules and the threshold search, on hand-made probability maps (no model, no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ptxray.metrics import dice_per_image
from ptxray.postprocess import (
    Grid,
    OofStats,
    Thresholds,
    default_grid,
    default_thresholds,
    dice_table,
    first_level_above,
    load_thresholds,
    per_image_dice,
    quantize,
    save_search,
    search_thresholds,
    stats_from_probs,
)

S = 32


def _known_optimum_set(rng: np.random.Generator):
    """Positives: a 48 px lesion at p=0.8 exactly on the truth plus a 20 px halo at 0.42 outside it.
    Negatives: a 10 px spurious blob at 0.9. Background 0.1. The classification head is useless
    (some positives score 0.1), so only the triplet rule can be perfect: top score < 0.8 with a
    minimum area in (10, 48] drops the blobs, binarising in (0.42, 0.8) drops the halo."""
    probs, masks, cls = [], [], []
    for i in range(12):
        p = np.full((S, S), 0.1)
        m = np.zeros((S, S), np.uint8)
        r, c = rng.integers(2, S - 12, size=2)
        if i % 3 == 0:
            m[r : r + 6, c : c + 8] = 1  # 48 px
            p[m == 1] = 0.8
            p[r + 6 : r + 8, c : c + 8] = 0.42  # 16 px halo below
            p[r : r + 2, c + 8 : c + 10] = 0.42  # 4 px halo right
            cls.append(0.1 if i % 2 == 0 else 0.95)
        else:
            p[r : r + 2, c : c + 5] = 0.9  # 10 px blob
            cls.append(rng.uniform(0.05, 0.95))
        probs.append(p)
        masks.append(m)
    return np.stack(probs), np.stack(masks), np.array(cls, np.float32)


def test_search_finds_the_known_optimum_on_hand_made_probabilities():
    probs, masks, cls = _known_optimum_set(np.random.default_rng(0))
    stats = stats_from_probs(quantize(probs), masks, cls, [f"img{i}" for i in range(len(probs))], 0)
    grid = Grid(
        top_score=(0.5, 0.7, 0.85, 0.95),
        min_area_px=(0, 5, 20, 60),
        bin_threshold=(0.3, 0.4, 0.5, 0.6, 0.85),
        cls_threshold=(0.0, 0.2, 0.5),
    )
    result = search_thresholds(stats, grid)
    assert result.empty_dice == pytest.approx(8 / 12)
    assert result.chosen == "triplet"
    best = result.thresholds
    assert best.oof_dice == pytest.approx(1.0)
    assert best.top_score < 0.8 and 10 < best.min_area_px <= 48 and 0.42 < best.bin_threshold < 0.8
    # The other rules cannot be perfect here, and the search says so.
    assert result.best["plain"].oof_dice < 1.0 and result.best["cls"].oof_dice < 1.0 and result.best["both"].oof_dice < 1.0
    # Applying the chosen rule to the maps themselves reproduces the truth exactly.
    pred = best.masks(quantize(probs), cls)
    assert np.array_equal(pred, masks.astype(bool))


def test_every_grid_point_matches_applying_its_rule_to_the_maps():
    rng = np.random.default_rng(1)
    n = 10
    # Smooth-ish random maps: blurred noise stretched over [0, 1], and truths that overlap them partly.
    noise = rng.random((n, 16, 16))
    probs = (noise + np.roll(noise, 1, 1) + np.roll(noise, 1, 2)) / 3
    probs = (probs - probs.min()) / (probs.max() - probs.min())
    masks = (rng.random((n, 16, 16)) < 0.3) & (probs > 0.4)
    masks[:4] = False  # some empty truths
    cls = rng.random(n).astype(np.float32)
    stats = stats_from_probs(quantize(probs), masks, cls, [str(i) for i in range(n)], np.arange(n) % 2)
    grid = Grid((0.5, 0.7), (0, 3, 10, 40), (0.3, 0.45, 0.6, 0.9), (0.0, 0.5))
    table = dice_table(stats, grid)
    assert table.shape == grid.shape
    levels = quantize(probs)
    for (i, t), (j, a), (k, b), (c, x) in itertools.product(*(enumerate(v) for v in (grid.top_score, grid.min_area_px, grid.bin_threshold, grid.cls_threshold))):
        th = Thresholds(t, a, b, x, 16)
        pred = torch.from_numpy(th.masks(levels, cls))
        direct = dice_per_image(pred, torch.from_numpy(masks)).numpy()
        assert table[i, j, k, c] == pytest.approx(direct.mean(), abs=1e-12), (t, a, b, x)
        assert np.allclose(per_image_dice(stats, th)[0], direct)


def test_a_probability_equal_to_the_threshold_is_not_above_it():
    # The training metric counts sigmoid(logit) > 0.5, i.e. logit > 0; sigmoid rounds logits within
    # ~3e-8 of 0 to exactly 0.5 in float32, and those pixels must stay below the 0.5 threshold.
    probs = np.array([0.5, np.nextafter(np.float32(0.5), np.float32(1)), 0.4999, 0.0, 1.0], np.float32)
    levels = quantize(probs)
    assert list(levels >= first_level_above(0.5)) == [False, True, False, False, True]
    assert levels[0] == 127 and levels[1] == 128 and levels[3] == 0 and levels[4] == 255
    # The other thresholds keep deciding at the midpoint between two levels.
    assert list(quantize(np.array([0.4 + 0.4 / 255, 0.4 + 0.6 / 255])) >= first_level_above(0.4)) == [False, True]


def test_levels_and_histograms():
    assert first_level_above(0.4) == 103  # 0.4 * 255 = 102 (not 101.99...)
    assert first_level_above(0.0) == 1 and first_level_above(1.0) == 256
    with pytest.raises(ValueError):
        first_level_above(1.5)
    probs = np.random.default_rng(2).random((3, 8, 8))
    masks = probs > 0.7
    stats = stats_from_probs(quantize(probs), masks, np.zeros(3), ["a", "b", "c"], 1)
    assert (stats.hist_all.sum(1) == 64).all() and np.array_equal(stats.n_true, masks.reshape(3, -1).sum(1))
    ge_all, ge_gt = stats.counts_above()
    assert np.array_equal(ge_all[:, 0], np.full(3, 64)) and (ge_all[:, 256] == 0).all()
    assert np.array_equal(ge_all[:, 179], (quantize(probs) >= 179).reshape(3, -1).sum(1))


def test_thresholds_validate_and_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="bin_threshold"):
        Thresholds(0.5, 0, 1.2, 0.0, 64)
    th = default_thresholds(512)
    assert th.min_area_px == 500 and th.rule == "triplet" and "defaults" in th.source  # 2000 px at 1024 -> 500 at 512
    with pytest.raises(ValueError, match="512 px"):
        th.masks(np.zeros((1, 64, 64), np.uint8), np.ones(1))
    grid = default_grid(64)
    assert 0 in grid.min_area_px and 0.0 in grid.cls_threshold

    probs, masks, cls = _known_optimum_set(np.random.default_rng(3))
    stats = stats_from_probs(quantize(probs), masks, cls, [f"i{n}" for n in range(12)], 0)
    stats.meta = {"tta": True}
    stats.save(str(tmp_path / "oof" / "oof.npz"))
    back = OofStats.load(str(tmp_path / "oof" / "oof.npz"))
    assert back.meta == {"tta": True} and back.size_px == S and np.array_equal(back.hist_gt, stats.hist_gt)
    assert list(back.image_ids) == list(stats.image_ids)

    result = search_thresholds(back, Grid((0.5, 0.7), (0, 20), (0.5,), (0.0, 0.5)))
    save_search(result, str(tmp_path / "thresholds.json"))
    assert load_thresholds(str(tmp_path / "thresholds.json")).to_dict() == {**result.thresholds.to_dict(), "source": str(tmp_path / "thresholds.json")}
    assert load_thresholds(str(tmp_path / "thresholds.json"), "plain").rule == "plain"
    assert load_thresholds(str(tmp_path / "missing.json")) is None


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x00\xffgarbage", "not valid JSON"),
        (b'"a string"', "expected a JSON object"),
        (b'{"format": 1, "chosen": "plain"}', "not a thresholds search"),
        (b'{"format": 1, "chosen": "plain", "rules": {"plain": {"top_score": 0.5}}}', "rule 'plain': not a thresholds record"),
        (b'{"format": 99}', "unknown thresholds format 99"),
    ],
)
def test_a_garbage_thresholds_json_is_named(tmp_path, content, reason):
    path = tmp_path / "thresholds.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as info:
        load_thresholds(str(path))
    assert str(path) in str(info.value)
