"""Tests for ptxray.augment: reproducibility, mask/image alignment, shapes, recipes."""

from __future__ import annotations

import random
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ptxray import augment as G

A = G._albumentations()  # the same lazily imported module the code uses

SIZE = 128


def _textured(channels: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 60, (channels, size, size), dtype=np.uint8)  # (C, H, W)


def _square_pair(channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dim textured stack with a bright off-centre rectangle exactly where the mask is 1."""
    image = _textured(channels, seed)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[34:66, 60:100] = 1  # off-centre, so rotations and flips really move it
    image[:, mask == 1] = 230
    return image, mask


def _geometric_only(pipeline) -> "A.Compose":
    """The recipe's geometric transforms (those that move the mask), nothing that changes intensities."""

    def geometric(t) -> bool:
        if isinstance(t, A.BaseCompose):
            return all(geometric(c) for c in t.transforms)
        return isinstance(t, A.DualTransform)

    kept = [t for t in pipeline.transforms if geometric(t)]
    assert kept, "recipe has no geometric transform"
    return A.Compose(kept, mask_interpolation=cv2.INTER_NEAREST, seed=0)


def _walk(transforms):
    for t in transforms:
        if isinstance(t, A.BaseCompose):
            yield from _walk(t.transforms)
        else:
            yield t


@pytest.fixture(scope="module", params=["paper", "kaggle"])
def recipe(request) -> str:
    return request.param


# ----------------------------------------------------------------------------- recipes


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError) as err:
        G.build_augment("imgaug", SIZE)
    message = str(err.value)
    for name in ("imgaug", "paper", "kaggle", "none"):
        assert name in message


def test_bad_size():
    with pytest.raises(ValueError, match="size"):
        G.build_augment("paper", 0)


def test_none_recipe_is_the_identity():
    assert G.build_augment("none", SIZE) is None
    image, mask = _square_pair(3)
    out_image, out_mask = G.augment(image, mask, None, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_every_mask_moving_transform_uses_nearest_interpolation(recipe):
    pipeline = G.build_augment(recipe, SIZE)
    dual = [t for t in _walk(pipeline.transforms) if hasattr(t, "mask_interpolation")]
    assert dual
    for t in dual:
        assert t.mask_interpolation == cv2.INTER_NEAREST, type(t).__name__


def test_mask_interpolation_is_nearest_in_practice(recipe):
    # A mask with a non-{0,1} foreground value shows interpolation: nearest never invents values.
    pipeline = G.build_augment(recipe, SIZE)
    image, mask = _square_pair(3)
    mask = mask * 200
    rng = np.random.default_rng(5)
    for _ in range(15):
        _, out_mask = G.augment(image, mask, pipeline, rng)
        assert set(np.unique(out_mask)) <= {0, 200}


def test_paper_recipe_follows_keras_semantics():
    pipeline = G.build_augment("paper", SIZE)
    kinds = [type(t).__name__ for t in _walk(pipeline.transforms)]
    assert {"HorizontalFlip", "VerticalFlip", "Affine", "MultiplicativeNoise", "GaussNoise"} <= set(kinds)
    affine = next(t for t in pipeline.transforms if isinstance(t, A.Affine))
    assert tuple(affine.rotate) == (-170.0, 170.0)  # Keras rotation_range=170 draws in [-170, 170]
    for axis in ("x", "y"):
        # Keras zoom z in [0.9, 1.5] shrinks content for z > 1: albumentations scale = 1 / z.
        assert affine.scale[axis] == pytest.approx((1 / 1.5, 1 / 0.9))
        assert affine.translate_percent[axis] == pytest.approx((-0.15, 0.15))
    assert affine.p == 1.0
    brightness = next(t for t in pipeline.transforms if isinstance(t, A.MultiplicativeNoise))
    assert tuple(brightness.multiplier) == pytest.approx((0.7, 1.2))


def test_kaggle_recipe_contents():
    pipeline = G.build_augment("kaggle", SIZE)
    kinds = {type(t).__name__ for t in _walk(pipeline.transforms)}
    assert {
        "HorizontalFlip",
        "Affine",
        "RandomBrightnessContrast",
        "RandomGamma",
        "ElasticTransform",
        "GridDistortion",
    } <= kinds
    affine = next(t for t in pipeline.transforms if isinstance(t, A.Affine))
    assert tuple(affine.rotate) == (-15.0, 15.0)
    assert affine.scale["x"] == pytest.approx((0.9, 1.1))


# ----------------------------------------------------------------------------- reproducibility


def test_same_rng_state_gives_identical_output_whatever_else_ran(recipe):
    image, mask = _square_pair(3)
    runs = []
    for disturbance in (0, 1):
        pipeline = G.build_augment(recipe, SIZE)  # a fresh pipeline, as on another worker
        # Global RNGs and unrelated use of the pipeline must not leak into the result.
        random.seed(disturbance)
        np.random.seed(disturbance)
        cv2.setRNGSeed(disturbance + 17)
        for _ in range(disturbance * 3):
            G.augment(image, mask, pipeline, np.random.default_rng(99 + disturbance))
        rng = np.random.default_rng(1234)
        runs.append([G.augment(image, mask, pipeline, rng) for _ in range(6)])
    for (img_a, mask_a), (img_b, mask_b) in zip(*runs):
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_different_rng_states_give_different_outputs(recipe):
    pipeline = G.build_augment(recipe, SIZE)
    image, mask = _square_pair(3)
    seqs = {}
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        seqs[seed] = [G.augment(image, mask, pipeline, rng)[0] for _ in range(5)]
    assert any(not np.array_equal(x, y) for x, y in zip(seqs[0], seqs[1]))
    # Successive calls advance the rng, so one stream does not repeat itself either.
    assert any(not np.array_equal(seqs[0][0], later) for later in seqs[0][1:])


def test_augmentation_changes_the_image(recipe):
    pipeline = G.build_augment(recipe, SIZE)
    image, mask = _square_pair(3)
    rng = np.random.default_rng(3)
    changed = sum(not np.array_equal(G.augment(image, mask, pipeline, rng)[0], image) for _ in range(10))
    assert changed >= 5


# ----------------------------------------------------------------------------- alignment, shapes


def test_mask_moves_with_the_image_under_geometric_transforms(recipe):
    pipeline = _geometric_only(G.build_augment(recipe, SIZE))
    image, mask = _square_pair(3)
    rng = np.random.default_rng(7)
    moved = 0
    for _ in range(25):
        out_image, out_mask = G.augment(image, mask, pipeline, rng)
        assert set(np.unique(out_mask)) <= {0, 1}
        moved += not np.array_equal(out_mask, mask)
        inside = out_mask == 1
        if inside.sum() < 50:  # pushed (almost) out of the frame: nothing to compare
            continue
        bright = out_image.min(axis=0) > 140  # (H, W), bright in every channel
        for c in range(out_image.shape[0]):
            assert out_image[c][inside].mean() > 200
            assert out_image[c][~inside].mean() < 70
        # Pixel-level agreement, up to the interpolated rim of the rectangle.
        assert bright[inside].mean() > 0.9
        assert inside[bright].mean() > 0.9
    assert moved >= 10


def test_mask_stays_aligned_and_binary_with_the_full_recipe(recipe):
    pipeline = G.build_augment(recipe, SIZE)
    image, mask = _square_pair(3)
    rng = np.random.default_rng(8)
    for _ in range(15):
        out_image, out_mask = G.augment(image, mask, pipeline, rng)
        assert set(np.unique(out_mask)) <= {0, 1}
        inside = out_mask == 1
        if inside.sum() < 50:
            continue
        assert out_image[:, inside].mean() > 2.5 * out_image[:, ~inside].mean()


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_shapes_and_dtypes_are_preserved(recipe, channels):
    pipeline = G.build_augment(recipe, SIZE)
    image, mask = _square_pair(channels)
    rng = np.random.default_rng(channels)
    for _ in range(4):
        out_image, out_mask = G.augment(image, mask, pipeline, rng)
        assert out_image.shape == (channels, SIZE, SIZE) and out_image.dtype == np.uint8
        assert out_mask.shape == (SIZE, SIZE) and out_mask.dtype == np.uint8
        assert out_image.flags.c_contiguous and out_mask.flags.c_contiguous


def test_non_square_images(recipe):
    pipeline = G.build_augment(recipe, SIZE)
    image = _textured(2, size=SIZE)[:, :, :96]
    mask = np.zeros((SIZE, 96), np.uint8)
    mask[10:40, 10:40] = 1
    out_image, out_mask = G.augment(image, mask, pipeline, np.random.default_rng(0))
    assert out_image.shape == (2, SIZE, 96) and out_mask.shape == (SIZE, 96)


def test_intensity_changes_apply_to_the_whole_stack(recipe):
    # The channels are views of one film: identical channels in -> identical channels out
    # (one brightness factor, one gamma, one noise field and one geometry per image).
    pipeline = G.build_augment(recipe, SIZE)
    one = _textured(1, seed=4)
    image = np.repeat(one, 3, axis=0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    rng = np.random.default_rng(11)
    for _ in range(15):
        out_image, _ = G.augment(image, mask, pipeline, rng)
        np.testing.assert_array_equal(out_image[0], out_image[1])
        np.testing.assert_array_equal(out_image[0], out_image[2])


def test_paper_brightness_is_multiplicative_within_range():
    pipeline = G.build_augment("paper", SIZE)
    brightness = next(t for t in pipeline.transforms if isinstance(t, A.MultiplicativeNoise))
    only = A.Compose([brightness], seed=0)
    image = np.full((2, SIZE, SIZE), 100, np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    rng = np.random.default_rng(12)
    values = [int(G.augment(image, mask, only, rng)[0][0, 0, 0]) for _ in range(40)]
    assert min(values) >= 69 and max(values) <= 121
    assert max(values) - min(values) > 25  # spread over most of [70, 120]


def test_augment_rejects_bad_inputs():
    pipeline = G.build_augment("paper", SIZE)
    image, mask = _square_pair(3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image"):
        G.augment(image.astype(np.float32), mask, pipeline, rng)
    with pytest.raises(ValueError, match="image"):
        G.augment(image[0], mask, pipeline, rng)
    with pytest.raises(ValueError, match="mask"):
        G.augment(image, mask.astype(bool), pipeline, rng)
    with pytest.raises(ValueError, match="mask shape"):
        G.augment(image.transpose(1, 2, 0).copy(), mask, pipeline, rng)


def test_import_has_no_side_effects():
    code = (
        "import sys, os; import ptxray.augment, ptxray.preprocess; "
        "assert 'albumentations' not in sys.modules, 'albumentations imported eagerly'; "
        "assert 'ray' not in sys.modules; "
        "assert 'NO_ALBUMENTATIONS_UPDATE' not in os.environ"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("recipe", ["paper", "kaggle"])
@pytest.mark.parametrize("size", [32, 64, 1024])
def test_recipes_build_and_run_at_small_and_large_sizes(recipe, size):
    pipeline = G.build_augment(recipe, size)
    image = np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2] = 1
    out_img, out_mask = G.augment(image, mask, pipeline, np.random.default_rng(1))
    assert out_img.shape == image.shape and out_mask.shape == mask.shape
    assert set(np.unique(out_mask)) <= {0, 1}


def test_each_transform_draws_independently():
    # albumentations' Compose.set_random_seed hands every transform the same seed, so transforms
    # re-seeded per call would draw the same first number: the paper's horizontal and vertical flips
    # (p=0.5 each) would always come together (never a mirror image), and kaggle's flip, affine
    # (p=0.5) and intensity choice (p=0.5) likewise. Each transform must get its own stream.
    paper = G.build_augment("paper", SIZE)
    flips = A.Compose(list(paper.transforms[:2]), seed=0)
    image = np.zeros((1, SIZE, SIZE), np.uint8)
    image[0, :8, :8] = 255  # a marker in the top-left corner shows which flips were applied
    mask = np.zeros((SIZE, SIZE), np.uint8)
    rng = np.random.default_rng(0)
    seen = {}
    n = 400
    for _ in range(n):
        out, _ = G.augment(image, mask, flips, rng)
        corner = (bool(out[0, 0, -1]), bool(out[0, -1, 0]), bool(out[0, -1, -1]))  # h, v, both
        seen[corner] = seen.get(corner, 0) + 1
    assert len(seen) == 4, seen
    for count in seen.values():  # each of the four combinations about 1/4 of the time
        assert abs(count / n - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n), seen
