"""Tests for ptxray.preprocess on synthetic grey-level images."""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np
import pytest

from ptxray import preprocess as P
from ptxray.config import CHANNEL_NAMES, PreprocessConfig


def _structured(size: int = 256, seed: int = 0, lo: int = 40, hi: int = 220) -> np.ndarray:
    """A smooth random field with some fine texture, scaled into [lo, hi]: (size, size) uint8."""
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 32)
    field = (field - field.min()) / (field.max() - field.min() + 1e-9)
    field += 0.05 * rng.standard_normal((size, size)).astype(np.float32)
    field = np.clip(field, 0, 1)
    return np.round(lo + (hi - lo) * field).astype(np.uint8)


def _low_contrast(size: int = 256, seed: int = 1) -> np.ndarray:
    return _structured(size, seed, lo=100, hi=125)


# ----------------------------------------------------------------------------- make_channels


def test_make_channels_shape_dtype_and_order():
    image = _structured(512, seed=3)
    out = P.make_channels(image, ("raw", "clahe", "beasf"), 256)
    assert out.shape == (3, 256, 256)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    resized = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out[0], resized)
    np.testing.assert_array_equal(out[1], P.clahe(resized))
    np.testing.assert_array_equal(out[2], P.beasf(resized))


def test_make_channels_every_channel_in_any_order_matches_the_single_functions():
    image = _structured(300, seed=4)
    channels = ("beasf", "ahe", "raw", "he", "clahe", "raw")
    out = P.make_channels(
        image, channels, 128, clahe_clip_limit=3.0, clahe_tile_grid=4, ahe_tile_grid=2, beasf_gamma=0.8
    )
    assert out.shape == (6, 128, 128)
    resized = cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)
    expected = {
        "raw": resized,
        "he": P.he(resized),
        "ahe": P.ahe(resized, tile_grid=2),
        "clahe": P.clahe(resized, clip_limit=3.0, tile_grid=4),
        "beasf": P.beasf(resized, gamma=0.8),
    }
    for i, name in enumerate(channels):
        np.testing.assert_array_equal(out[i], expected[name], err_msg=f"channel {i} ({name})")


def test_make_channels_writes_into_a_given_buffer():
    img = _structured(128, seed=3)
    out = np.full((3, 64, 64), 7, np.uint8)
    assert P.make_channels(img, ("raw", "clahe", "beasf"), 64, out=out) is out
    np.testing.assert_array_equal(out, P.make_channels(img, ("raw", "clahe", "beasf"), 64))
    for bad in (np.empty((3, 64, 32), np.uint8), np.empty((2, 64, 64), np.uint8), np.empty((3, 64, 64), np.float32),
                np.empty((3, 64, 128), np.uint8)[:, :, ::2]):
        with pytest.raises(ValueError, match="out must be a C-contiguous uint8 array of shape"):
            P.make_channels(img, ("raw", "clahe", "beasf"), 64, out=bad)


def test_make_channels_without_raw_and_non_square_input():
    image = _structured(400, seed=5)[:, :280]  # (400, 280), a non-contiguous view
    out = P.make_channels(image, ("he",), 64)
    resized = cv2.resize(np.ascontiguousarray(image), (64, 64), interpolation=cv2.INTER_AREA)
    assert out.shape == (1, 64, 64)
    np.testing.assert_array_equal(out[0], P.he(resized))


def test_make_channels_at_native_size_copies_the_raw_image():
    image = _structured(64, seed=6)
    out = P.make_channels(image, ("raw", "clahe"), 64)
    np.testing.assert_array_equal(out[0], image)
    assert not np.shares_memory(out, image)


def test_every_configurable_channel_has_one_implementation_that_writes_every_pixel():
    # A name a config may ask for (config.CHANNEL_NAMES) without a registered implementation, or
    # an implementation that leaves part of its slice unwritten, would hand the model np.empty memory.
    assert set(P.CHANNELS) == set(CHANNEL_NAMES)
    image = _structured(48)
    settings = P.ChannelSettings()
    for name, fn in P.CHANNELS.items():
        outs = []
        for fill in (0, 255):
            dst = np.full((48, 48), fill, np.uint8)
            fn(image, settings, dst)
            outs.append(dst)
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=name)
        np.testing.assert_array_equal(P.make_channels(image, (name,), 48)[0], outs[0], err_msg=name)
    with pytest.raises(ValueError, match="already registered"):
        P.register_channel("raw")(lambda resized, settings, dst: None)


def test_make_channels_unknown_channel_names_it_and_the_valid_names():
    with pytest.raises(ValueError) as err:
        P.make_channels(_structured(32), ("raw", "sobel"), 32)
    message = str(err.value)
    assert "sobel" in message
    for name in CHANNEL_NAMES:
        assert name in message
    with pytest.raises(ValueError, match="channel"):
        P.make_channels(_structured(32), (), 32)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32), np.float32),
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((0, 5), np.uint8),
    ],
)
def test_functions_reject_non_grey_uint8_images(bad):
    for fn in (P.he, P.ahe, P.clahe, P.beasf, P.beasf_lut, P.make_channels):
        with pytest.raises(ValueError, match=fn.__name__):
            fn(bad)


def test_make_channels_rejects_bad_settings():
    image = _structured(32)
    with pytest.raises(ValueError, match="size"):
        P.make_channels(image, ("raw",), 0)
    with pytest.raises(ValueError, match="clip_limit"):
        P.make_channels(image, ("raw",), 32, clahe_clip_limit=0.0)
    with pytest.raises(ValueError, match="tile_grid"):
        P.make_channels(image, ("raw",), 32, ahe_tile_grid=0)
    with pytest.raises(ValueError, match="gamma"):
        P.make_channels(image, ("raw",), 32, beasf_gamma=1.5)


def test_channels_from_config_passes_every_setting():
    image = _structured(256, seed=7)
    cfg = PreprocessConfig(
        channels=("clahe", "ahe", "beasf", "raw"),
        image_size_px=96,
        clahe_clip_limit=4.0,
        clahe_tile_grid=4,
        ahe_tile_grid=3,
        beasf_gamma=0.9,
    )
    out = P.channels_from_config(image, cfg)
    expected = P.make_channels(
        image,
        ("clahe", "ahe", "beasf", "raw"),
        96,
        clahe_clip_limit=4.0,
        clahe_tile_grid=4,
        ahe_tile_grid=3,
        beasf_gamma=0.9,
    )
    np.testing.assert_array_equal(out, expected)
    # The non-default settings matter, so the equality above is not vacuous.
    defaults = P.make_channels(image, ("clahe", "ahe", "beasf", "raw"), 96)
    for i in range(3):
        assert not np.array_equal(out[i], defaults[i]), f"channel {i} ignores its setting"


def test_make_channels_is_thread_safe():
    images = [_structured(256, seed=s) for s in range(6)]
    expected = [P.make_channels(im, ("raw", "ahe", "clahe", "beasf"), 128) for im in images]
    results: dict[int, list[np.ndarray]] = {}

    def work(k: int) -> None:
        results[k] = [
            P.make_channels(im, ("raw", "ahe", "clahe", "beasf"), 128) for im in images * 5
        ]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for j, got in enumerate(results[k]):
            np.testing.assert_array_equal(got, expected[j % len(images)])


def test_clahe_objects_are_cached_per_setting():
    a = P._clahe_object(2.0, 8)
    assert P._clahe_object(2.0, 8) is a
    assert P._clahe_object(3.0, 8) is not a
    assert P._clahe_object(2.0, 4) is not a


# ----------------------------------------------------------------------------- HE / AHE / CLAHE


@pytest.mark.parametrize("fn", [P.he, P.ahe, P.clahe, P.beasf])
def test_enhancements_increase_contrast_of_a_low_contrast_image(fn):
    image = _low_contrast()
    out = fn(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.std() > 1.5 * image.std()


def test_ahe_is_clahe_without_clipping():
    image = _low_contrast(256, seed=8)
    unclipped = P.ahe(image)
    # OpenCV can never clip at a limit >= 256 (no bin of a tile holds more than the tile's pixels).
    np.testing.assert_array_equal(unclipped, P.clahe(image, clip_limit=256.0))
    np.testing.assert_array_equal(unclipped, P.clahe(image, clip_limit=10_000.0))
    clipped = P.clahe(image, clip_limit=2.0)
    assert not np.array_equal(unclipped, clipped)
    # Clipping limits the contrast gain, so AHE stretches a flat image further than CLAHE.
    assert unclipped.std() > clipped.std()


def test_ahe_tile_grid_matters():
    image = _structured(256, seed=9)
    assert not np.array_equal(P.ahe(image, tile_grid=2), P.ahe(image, tile_grid=8))


# ----------------------------------------------------------------------------- BEASF


def _reference_beasf_lut(image: np.ndarray, gamma: float) -> np.ndarray:
    """The formula in beasf_lut's docstring, written out level by level (slow and plain)."""
    hist = [0] * 256
    for v in image.ravel().tolist():
        hist[v] += 1
    m = sum(i * h for i, h in enumerate(hist)) // image.size
    lut = [0] * 256
    for a, b in ((0, m), (m + 1, 255)):
        if a > b:
            continue
        w = b - a
        counts = hist[a : b + 1]
        total = sum(counts)
        if total:
            acc, c = 0, None
            for i, n in enumerate(counts):
                acc += n
                if acc / total >= 0.5:
                    c = a + i
                    break
        else:
            c = (a + b) / 2
        for x in range(a, b + 1):
            if w == 0 or gamma == 0:
                t = x
            else:
                alpha = 10.0 * gamma / w
                s = lambda v: 1 / (1 + math.exp(-alpha * (v - c)))  # noqa: E731
                t = a + w * (s(x) - s(a)) / (s(b) - s(a))
            lut[x] = min(255, max(0, round(t)))
    return np.array(lut, dtype=np.uint8)


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beasf_lut_matches_the_documented_formula(seed, gamma):
    image = _structured(64, seed=seed, lo=10 + 30 * seed, hi=200 + 20 * seed)
    got = P.beasf_lut(image, gamma)
    want = _reference_beasf_lut(image, gamma)
    # Rounding at exact .5 ties may differ by one level between the two float paths.
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_beasf_lut_properties_on_many_images():
    rng = np.random.default_rng(10)
    for k in range(40):
        lo = int(rng.integers(0, 200))
        hi = int(rng.integers(lo + 1, 256))
        image = _structured(48, seed=k, lo=lo, hi=hi)
        gamma = float(rng.uniform(0, 1))
        lut = P.beasf_lut(image, gamma)
        assert lut.shape == (256,) and lut.dtype == np.uint8
        assert np.all(np.diff(lut.astype(int)) >= 0), f"LUT not monotonic (image {k}, gamma {gamma})"
        m = int(image.mean())
        assert lut[: m + 1].max() <= m, "lower half leaves [0, m]"
        if m < 255:
            assert lut[m + 1 :].min() >= m, "upper half leaves [m, 255]"
        assert lut[0] == 0 and lut[m] == m and lut[255] == 255


@pytest.mark.parametrize("value", [0, 1, 77, 128, 254, 255])
def test_beasf_on_a_constant_image_is_valid(value):
    image = np.full((16, 16), value, np.uint8)
    with np.errstate(all="raise"):  # no division by zero, no NaN
        lut = P.beasf_lut(image)
        out = P.beasf(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    # The mean is the end point of the lower part, and end points map onto themselves.
    assert np.all(out == value)
    assert np.all(np.diff(lut.astype(int)) >= 0)


def test_beasf_gamma_changes_the_result():
    image = _structured(128, seed=11, lo=60, hi=200)
    outs = {g: P.beasf(image, g) for g in (0.0, 0.3, 0.6, 1.0)}
    np.testing.assert_array_equal(outs[0.0], image)  # gamma = 0 is the identity
    stds = [outs[g].std() for g in (0.0, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(stds, stds[1:])), stds
    assert not np.array_equal(outs[0.3], outs[0.6])


def test_beasf_stretches_around_each_part_median():
    # Two clusters, one below and one above the mean: BEASF should pull each cluster apart
    # (slope > 1 at its median) while keeping the levels between the parts in order.
    rng = np.random.default_rng(12)
    image = np.concatenate(
        [rng.normal(60, 4, 2000), rng.normal(180, 4, 2000)]
    ).clip(0, 255).astype(np.uint8).reshape(40, 100)
    lut = P.beasf_lut(image, 1.0).astype(int)
    for centre in (60, 180):
        assert lut[centre + 6] - lut[centre - 6] > 12


def test_beasf_gamma_out_of_range():
    with pytest.raises(ValueError, match="gamma"):
        P.beasf(_structured(16), -0.1)
    with pytest.raises(ValueError, match="gamma"):
        P.beasf_lut(_structured(16), 1.01)


# ----------------------------------------------------------------------------- resize_mask


def test_resize_mask_stays_binary_and_aligned():
    mask = np.zeros((512, 512), np.uint8)
    mask[100:300, 200:260] = 1
    cv2.circle(mask, (400, 400), 50, 1, -1)
    out = P.resize_mask(mask, 128)
    assert out.shape == (128, 128) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    assert out[25:75, 50:65].all() and out[:20].sum() == 0
    # Area scales by (128 / 512)**2 to within the boundary pixels.
    assert abs(out.sum() - mask.sum() / 16) < 0.05 * mask.sum() / 16


@pytest.mark.parametrize(
    "mask",
    [
        (np.arange(64 * 64).reshape(64, 64) % 7 == 0).astype(np.uint8) * 255,
        np.arange(64 * 64).reshape(64, 64) % 5 == 0,
        (np.arange(64 * 64).reshape(64, 64) % 3 == 0).astype(np.int32),
    ],
    ids=["uint8_0_255", "bool", "int32"],
)
def test_resize_mask_accepts_common_mask_encodings(mask):
    for size in (32, 64, 100):
        out = P.resize_mask(mask, size)
        assert out.shape == (size, size) and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1} and out.any()
    np.testing.assert_array_equal(P.resize_mask(mask, 64), (mask != 0).astype(np.uint8))


def _centroid(weights: np.ndarray) -> np.ndarray:
    """(row, column) centroid of a non-negative (H, W) array, in pixel-centre coordinates."""
    w = weights.astype(np.float64)
    rows, cols = np.indices(w.shape)
    return np.array([(rows * w).sum(), (cols * w).sum()]) / w.sum()


@pytest.mark.parametrize("chain", [(512,), (128,), (512, 128)], ids=["1024-512", "1024-128", "1024-512-128"])
def test_resized_mask_lines_up_with_the_area_resized_image(chain):
    # A bright square on a dark 1024 px image, its mask the same square. The image goes through
    # INTER_AREA (make_channels), step by step along `chain`; the mask goes straight to the last
    # size, as the cache does. Nearest-neighbour sampling takes the first source pixel of each cell,
    # not its centre: on average over the square's sub-cell positions the mask sits 0.25 px (at 512)
    # and 0.44 px (at 128) off the image. A binary mask cannot follow a sub-cell shift (each edge
    # snaps to a cell border, up to half a cell away), so the check is per position within half a
    # pixel plus no bias over all the positions of one cell.
    cell = 1024 // chain[-1]
    offsets = []
    for shift in range(cell):
        mask = np.zeros((1024, 1024), np.uint8)
        mask[301 + shift : 559 + shift, 123 + shift : 701 + shift] = 1
        image = mask * np.uint8(255)
        for size in chain:
            image = P.make_channels(image, ("raw",), size)[0]
        small = P.resize_mask(mask, chain[-1])
        assert image.shape == small.shape == (chain[-1], chain[-1])
        offsets.append(_centroid(small) - _centroid(image))
    offsets = np.array(offsets)  # (cell, 2): (row, column) of mask minus image, in output px
    assert np.abs(offsets).max() <= 0.5, offsets
    np.testing.assert_allclose(offsets.mean(axis=0), 0.0, atol=0.05)


def test_resized_mask_keeps_a_lesion_smaller_than_half_a_cell():
    # A 3 x 3 px lesion covers under half of every 8 x 8 cell at 1024 -> 128: the mask must not
    # come out empty (the cache's label says positive), so the most-covered cell is kept.
    mask = np.zeros((1024, 1024), np.uint8)
    mask[403:406, 602:605] = 1
    small = P.resize_mask(mask, 128)
    assert small.sum() == 1 and small[50, 75] == 1
    assert not P.resize_mask(np.zeros((1024, 1024), np.uint8), 128).any()


def test_resize_mask_errors():
    with pytest.raises(ValueError, match="resize_mask"):
        P.resize_mask(np.zeros((4, 4, 1), np.uint8), 8)
    with pytest.raises(ValueError, match="size"):
        P.resize_mask(np.zeros((4, 4), np.uint8), -1)
