"""Tests for the recipes on the training device (ptxray.augment.build_device_augment).

Three kinds of check:
- equivalence: with the random choices fixed, the torch path reproduces the host (OpenCV /
  albumentations) path: the image within a small tolerance, the mask with IoU >= 0.98;
- distributions: many draws from a seeded generator follow the host recipe's ranges and rates,
  and whole augmented outputs match host outputs statistically (two-sample KS tests);
- the contract: shapes, dtypes, reproducibility from the generator, clear errors.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import stats

from ptxray import augment as G

A = G._albumentations()
import albumentations.augmentations.geometric.functional as fgeo  # noqa: E402  (after _albumentations set its env)

SIZE = 128


def _film(size: int = SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth uint8 (H, W, C) image (interpolation differences stay small on it)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, channels)).astype(np.float32), (0, 0), size / 40)
    img = (img - img.min()) / (img.max() - img.min()) * 235 + 10
    return img.astype(np.uint8).reshape(size, size, channels)


def _lesion(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 3 : size * 3 // 4] = 1  # off-centre, so every transform moves it
    return mask


def _identity_params(batch: int = 1) -> dict[str, torch.Tensor]:
    one, zero = torch.ones(batch, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64)
    return {
        "flip_x": torch.zeros(batch, dtype=torch.bool), "flip_y": torch.zeros(batch, dtype=torch.bool),
        "rotate_deg": zero, "scale_x": one, "scale_y": one, "shift_x_px": zero, "shift_y_px": zero,
        "shear_x_deg": zero, "multiplier": one, "noise_std": zero, "contrast": one, "brightness": zero,
        "gamma": one, "distort": torch.zeros(batch, dtype=torch.long),
        "noise_field": torch.zeros(0, 1, SIZE, SIZE), "elastic_noise": torch.zeros(0, 2, SIZE, SIZE),
        "grid_steps": torch.zeros(0, 2, G.KAGGLE_GRID_STEPS + 1, dtype=torch.float64),
    }  # fmt: skip


def _sized(params: dict, size: int) -> dict:
    """The empty fields of `_identity_params` at another image size."""
    empty = {"noise_field": torch.zeros(0, 1, size, size), "elastic_noise": torch.zeros(0, 2, size, size)}
    return {**empty, **params}


def _device_apply(recipe: str, image_hwc: np.ndarray, mask: np.ndarray, **params) -> tuple[np.ndarray, np.ndarray]:
    p = _identity_params()
    for key, value in params.items():
        p[key] = value if torch.is_tensor(value) else torch.tensor([value], dtype=p[key].dtype)
    x = torch.from_numpy(image_hwc.transpose(2, 0, 1).copy())[None].float() / 255.0
    m = torch.from_numpy(mask)[None].float()
    out_x, out_m = G.build_device_augment(recipe, image_hwc.shape[0]).apply(x, m, p)
    return out_x[0].numpy(), out_m[0].numpy()


def _host_affine(rotate, zoom_x, zoom_y, shift, shear_x, flip_x=False, flip_y=False) -> "A.Compose":
    """The host recipe's transforms with every random range collapsed to one value."""
    ts = []
    if flip_x:
        ts.append(A.HorizontalFlip(p=1.0))
    if flip_y:
        ts.append(A.VerticalFlip(p=1.0))
    ts.append(
        A.Affine(
            rotate=(rotate, rotate), scale={"x": (1 / zoom_x,) * 2, "y": (1 / zoom_y,) * 2},
            translate_percent={"x": (shift, shift), "y": (shift, shift)}, shear={"x": (shear_x, shear_x), "y": (0, 0)},
            interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
            fill=0, fill_mask=0, p=1.0,
        )
    )  # fmt: skip
    return A.Compose(ts, seed=0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


def _affine_params(rotate, zoom_x, zoom_y, shift, shear_x, flip_x=False, flip_y=False, size=SIZE) -> dict:
    # albumentations negates the shear it draws and truncates the shift to whole pixels.
    return dict(
        flip_x=torch.tensor([flip_x]), flip_y=torch.tensor([flip_y]), rotate_deg=float(rotate),
        scale_x=1 / zoom_x, scale_y=1 / zoom_y, shift_x_px=float(int(shift * size)), shift_y_px=float(int(shift * size)),
        shear_x_deg=-float(shear_x),
    )  # fmt: skip


GEOMETRIES = [
    # rotate, zoom_x, zoom_y, shift, shear_x, flip_x, flip_y
    (30.0, 1.2, 1.2, 0.1, 0.0, False, False),  # the example
    (30.0, 1.2, 0.9, 0.1, 6.0, True, False),
    (-150.0, 0.95, 1.45, -0.13, -9.0, True, True),
    (0.0, 1.0, 1.0, 0.0, 0.0, False, True),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fixed_affine_matches_the_host(geometry):
    image, mask = _film(), _lesion()
    out = _host_affine(*geometry)(image=image, mask=mask)
    host_image = out["image"].transpose(2, 0, 1).astype(np.float32) / 255.0
    dev_image, dev_mask = _device_apply("paper", image, mask, **_affine_params(*geometry))
    # The host rounds to uint8 (and OpenCV quantises coordinates to 1/32 px): 1-2 grey levels.
    assert np.abs(dev_image - host_image).max() <= 3 / 255
    assert np.abs(dev_image - host_image).mean() <= 1 / 255
    assert set(np.unique(dev_mask)) <= {0.0, 1.0}
    assert out["mask"].sum() > 100 and _iou(dev_mask, out["mask"]) >= 0.98


def test_a_wrong_convention_would_fail_the_equivalence_check():
    # The check can fail: the same parameters with the zoom not inverted (Keras zoom used as scale).
    image, mask = _film(), _lesion()
    out = _host_affine(30.0, 1.2, 1.2, 0.1, 0.0)(image=image, mask=mask)
    wrong = _affine_params(30.0, 1 / 1.2, 1 / 1.2, 0.1, 0.0)
    dev_image, dev_mask = _device_apply("paper", image, mask, **wrong)
    assert np.abs(dev_image - out["image"].transpose(2, 0, 1) / 255.0).max() > 0.1
    assert _iou(dev_mask, out["mask"]) < 0.9


@pytest.mark.parametrize("size", [64, 100, 512])
def test_grid_distortion_map_is_albumentations(size):
    rng = np.random.default_rng(size)
    steps = 1 + rng.uniform(-0.3, 0.3, (2, G.KAGGLE_GRID_STEPS + 1))
    normalized = fgeo.normalize_grid_distortion_steps((size, size), G.KAGGLE_GRID_STEPS, list(steps[0]), list(steps[1]))
    map_x, map_y = fgeo.generate_grid((size, size), normalized["steps_x"], normalized["steps_y"], G.KAGGLE_GRID_STEPS)
    xs = G.grid_distortion_coords(torch.from_numpy(steps[:1]), size, G.KAGGLE_GRID_STEPS)[0].numpy()
    ys = G.grid_distortion_coords(torch.from_numpy(steps[1:]), size, G.KAGGLE_GRID_STEPS)[0].numpy()
    np.testing.assert_allclose(xs, map_x[0], atol=1e-4)
    np.testing.assert_allclose(ys, map_y[:, 0], atol=1e-4)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 6.0])
def test_gaussian_blur_is_opencvs(sigma):
    noise = np.random.default_rng(0).uniform(-1, 1, (2, 96, 80)).astype(np.float32)
    host = np.stack([cv2.GaussianBlur(f, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) for f in noise])
    np.testing.assert_allclose(G.gaussian_blur(torch.from_numpy(noise), sigma).numpy(), host, atol=1e-5)


@pytest.mark.parametrize("code", [G.ELASTIC, G.GRID])
def test_affine_then_distortion_in_one_grid_matches_the_host_in_two_steps(code):
    # At 256 px: the host's two nearest-neighbour passes staircase the mask's edge twice, the
    # device's one pass once, so the masks differ along the edge by about a pixel; at this size a
    # lesion of 64 x 96 px keeps IoU >= 0.98 (0.97 at 128 px).
    SIZE = 256
    image, mask = _film(SIZE), _lesion(SIZE)
    geometry = (12.0, 1.05, 1.05, 0.05, 0.0)
    host = _host_affine(*geometry)(image=image, mask=mask)
    rng = np.random.default_rng(3)
    params = _affine_params(*geometry, size=SIZE)
    if code == G.GRID:
        steps = 1 + rng.uniform(-0.3, 0.3, (2, G.KAGGLE_GRID_STEPS + 1))
        norm = fgeo.normalize_grid_distortion_steps((SIZE, SIZE), G.KAGGLE_GRID_STEPS, list(steps[0]), list(steps[1]))
        map_x, map_y = fgeo.generate_grid((SIZE, SIZE), norm["steps_x"], norm["steps_y"], G.KAGGLE_GRID_STEPS)
        params["grid_steps"] = torch.from_numpy(steps[None])
    else:
        noise = rng.uniform(-1, 1, (2, SIZE, SIZE)).astype(np.float32)
        alpha, sigma = G.elastic_alpha_sigma(SIZE)
        dx, dy = (cv2.GaussianBlur(f, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE) * alpha for f in noise)
        grid_x, grid_y = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32))
        map_x, map_y = grid_x + dx, grid_y + dy
        params["elastic_noise"] = torch.from_numpy(noise[None])
    params["distort"] = torch.tensor([code])
    remap = dict(borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    host_image = cv2.remap(host["image"], map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR, **remap)
    host_mask = cv2.remap(host["mask"], map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_NEAREST, **remap)
    dev_image, dev_mask = _device_apply("kaggle", image, mask, **_sized(params, SIZE))
    diff = np.abs(dev_image - host_image.transpose(2, 0, 1) / 255.0).max(axis=0)  # (H, W)
    # One interpolation instead of two: the device image is a little sharper than the host's, and
    # differs more along the edges of the frame, where the host's second pass blends its first
    # pass's black border in again. Inside (3 px away from any black or the frame):
    inside = np.zeros((SIZE, SIZE), np.uint8)
    inside[1:-1, 1:-1] = host_image.min(axis=2)[1:-1, 1:-1] > 0
    inside = cv2.erode(inside, np.ones((5, 5), np.uint8)) > 0
    assert inside.mean() > 0.7
    assert diff[inside].mean() <= 1.5 / 255 and np.quantile(diff[inside], 0.99) <= 4 / 255
    assert diff.mean() <= 3 / 255
    assert _iou(dev_mask, host_mask) >= 0.98


def test_intensity_transforms_match_albumentations():
    image, mask = _film(), np.zeros((SIZE, SIZE), np.uint8)
    cases = [
        ("paper", A.MultiplicativeNoise(multiplier=(1.15, 1.15), per_channel=False, elementwise=False, p=1.0), dict(multiplier=1.15)),
        ("paper", A.MultiplicativeNoise(multiplier=(0.72, 0.72), per_channel=False, elementwise=False, p=1.0), dict(multiplier=0.72)),
        ("kaggle", A.RandomBrightnessContrast(brightness_limit=(0.15, 0.15), contrast_limit=(-0.1, -0.1), p=1.0), dict(contrast=0.9, brightness=0.15)),
        ("kaggle", A.RandomGamma(gamma_limit=(85, 85), p=1.0), dict(gamma=0.85)),
        ("kaggle", A.RandomGamma(gamma_limit=(118, 118), p=1.0), dict(gamma=1.18)),
    ]  # fmt: skip
    for recipe, transform, params in cases:
        host = A.Compose([transform], seed=0)(image=image)["image"].transpose(2, 0, 1) / 255.0
        dev, _ = _device_apply(recipe, image, mask, **params)
        assert np.abs(dev - host).max() <= 1.01 / 255, type(transform).__name__  # host rounds / truncates


def test_gaussian_noise_is_shared_by_the_channels_and_scaled():
    image = np.repeat(np.full((SIZE, SIZE, 1), 128, np.uint8), 3, axis=2)
    field = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, SIZE, SIZE)).astype(np.float32))
    dev, _ = _device_apply("paper", image, np.zeros((SIZE, SIZE), np.uint8), noise_std=0.02, noise_field=field)
    np.testing.assert_array_equal(dev[0], dev[1])
    np.testing.assert_array_equal(dev[0], dev[2])
    assert np.std(dev[0] - 128 / 255) == pytest.approx(0.02, rel=0.05)


# ---------------------------------------------------------------------------- distributions


def _draws(recipe: str, n: int = 4000, seed: int = 0) -> dict[str, np.ndarray]:
    params = G.build_device_augment(recipe, 256).draw(n, G.augment_generator("cpu", [seed]), 256, 256)
    return {k: v.numpy() for k, v in params.items() if v.ndim == 1}


def _rate_ok(flags: np.ndarray, p: float) -> bool:
    return abs(flags.mean() - p) <= 4 * np.sqrt(p * (1 - p) / len(flags))


def _uniform_ok(values: np.ndarray, lo: float, hi: float) -> bool:
    return values.min() >= lo and values.max() <= hi and stats.kstest(values, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3


def test_paper_parameters_follow_the_host_distributions():
    d = _draws("paper")
    a = G.PAPER_AFFINE
    assert _rate_ok(d["flip_x"], 0.5) and _rate_ok(d["flip_y"], 0.5)
    assert _uniform_ok(d["rotate_deg"], -170, 170)
    assert _uniform_ok(d["scale_x"], *a.scale) and _uniform_ok(d["scale_y"], *a.scale)
    assert abs(np.corrcoef(d["scale_x"], d["scale_y"])[0, 1]) < 0.1  # x and y zoom drawn independently
    assert _uniform_ok(d["shear_x_deg"], -10, 10)
    limit = int(0.15 * 256)
    shifts = d["shift_x_px"]
    assert np.all(shifts == np.trunc(shifts)) and shifts.min() == -limit and shifts.max() == limit
    # trunc(U(-38.4, 38.4)): zero is twice as likely as any other value
    assert _rate_ok(shifts == 0, 2 / 76.8) and _rate_ok(shifts == 10, 1 / 76.8)
    assert _uniform_ok(d["multiplier"], *G.PAPER_BRIGHTNESS)
    noisy = d["noise_std"] > 0
    assert _rate_ok(noisy, 0.3) and _uniform_ok(d["noise_std"][noisy], *G.PAPER_NOISE_STD)
    assert not d["distort"].any() and np.all(d["gamma"] == 1) and np.all(d["contrast"] == 1)


def test_kaggle_parameters_follow_the_host_distributions():
    d = _draws("kaggle")
    assert _rate_ok(d["flip_x"], 0.5) and not d["flip_y"].any()
    affine = d["scale_x"] != 1
    assert _rate_ok(affine, 0.5)
    assert _uniform_ok(d["rotate_deg"][affine], -15, 15) and np.all(d["rotate_deg"][~affine] == 0)
    assert _uniform_ok(d["scale_x"][affine], 0.9, 1.1) and np.array_equal(d["scale_x"], d["scale_y"])
    assert np.all(np.abs(d["shift_x_px"]) <= int(0.0625 * 256)) and np.all(d["shear_x_deg"] == 0)
    rbc = (d["contrast"] != 1) | (d["brightness"] != 0)
    gamma = d["gamma"] != 1
    assert not (rbc & gamma).any() and _rate_ok(rbc, 0.25) and _rate_ok(gamma, 0.25)
    assert _uniform_ok(d["contrast"][rbc], 0.8, 1.2) and _uniform_ok(d["brightness"][rbc], -0.2, 0.2)
    assert _uniform_ok(d["gamma"][gamma], 0.8, 1.2)
    assert _rate_ok(d["distort"] == G.ELASTIC, 0.15) and _rate_ok(d["distort"] == G.GRID, 0.15)
    assert np.all(d["multiplier"] == 1) and np.all(d["noise_std"] == 0)


def test_a_wrong_range_would_fail_the_distribution_checks():
    d = _draws("paper")
    assert not _uniform_ok(d["rotate_deg"], -85, 85)  # Keras' range read as +-85 degrees
    assert not _uniform_ok(1 / d["scale_x"], *G.PAPER_AFFINE.scale)  # zoom drawn where scale should be
    assert not _rate_ok(d["noise_std"] > 0, 0.5)


def _summaries(images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per augmented image: lesion area kept, its centroid, and the mean intensity."""
    area = masks.reshape(len(masks), -1).mean(axis=1)
    ys, xs = np.mgrid[: masks.shape[1], : masks.shape[2]]
    weight = masks.reshape(len(masks), -1).sum(axis=1).clip(min=1)
    cx = (masks * xs).reshape(len(masks), -1).sum(axis=1) / weight
    cy = (masks * ys).reshape(len(masks), -1).sum(axis=1) / weight
    return {"area": area, "cx": cx, "cy": cy, "brightness": images.reshape(len(images), -1).mean(axis=1)}


@pytest.mark.parametrize("recipe", ["paper", "kaggle"])
def test_augmented_outputs_match_the_host_statistically(recipe):
    size, n = 64, 800
    image = _film(size, 3, seed=1).transpose(2, 0, 1).copy()  # (C, H, W)
    mask = _lesion(size)
    pipeline, rng = G.build_augment(recipe, size), np.random.default_rng(0)
    host = [G.augment(image, mask, pipeline, rng) for _ in range(n)]
    host_stats = _summaries(np.stack([h[0] for h in host]) / 255.0, np.stack([h[1] for h in host]).astype(float))
    dev = G.build_device_augment(recipe, size)
    x = torch.from_numpy(np.repeat(image[None], n, axis=0))
    m = torch.from_numpy(np.repeat(mask[None], n, axis=0))
    dev_images, dev_masks = dev(x, m, G.augment_generator("cpu", [0]))
    dev_stats = _summaries(dev_images.numpy(), dev_masks.numpy())
    for key in ("area", "cx", "cy"):  # the geometry: masks are exact on both paths
        p = stats.ks_2samp(host_stats[key], dev_stats[key]).pvalue
        assert p > 1e-3, (recipe, key, p, host_stats[key].mean(), dev_stats[key].mean())
    # Intensities: the host rounds to uint8 (images the recipe leaves as they are give one exact
    # value there, a slightly different one here), which a KS test on this concentrated statistic
    # would flag; compare the mean and the spread instead.
    h, d = host_stats["brightness"], dev_stats["brightness"]
    assert stats.ttest_ind(h, d, equal_var=False).pvalue > 1e-3, (recipe, h.mean(), d.mean())
    assert 0.85 < d.std() / h.std() < 1.18, (recipe, h.std(), d.std())


def test_the_statistical_comparison_can_fail():
    # The same comparison against a device path with a stronger zoom out must fail.
    size, n = 64, 400
    image, mask = _film(size, 3, seed=1).transpose(2, 0, 1).copy(), _lesion(size)
    pipeline, rng = G.build_augment("paper", size), np.random.default_rng(0)
    host = [G.augment(image, mask, pipeline, rng)[1] for _ in range(n)]
    dev = G.build_device_augment("paper", size)
    params = dev.draw(n, G.augment_generator("cpu", [0]), size, size)
    params["scale_x"], params["scale_y"] = params["scale_x"] * 0.8, params["scale_y"] * 0.8
    x = torch.from_numpy(np.repeat(image[None], n, axis=0)).float() / 255
    _, dev_masks = dev.apply(x, torch.from_numpy(np.repeat(mask[None], n, axis=0)).float(), params)
    area_host = np.stack(host).reshape(n, -1).mean(axis=1)
    area_dev = dev_masks.numpy().reshape(n, -1).mean(axis=1)
    assert stats.ks_2samp(area_host, area_dev).pvalue < 1e-3


# ---------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("recipe", ["paper", "kaggle", "none"])
def test_shapes_dtypes_and_reproducibility(recipe):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 48, 48), dtype=np.uint8))
    masks = torch.zeros(6, 48, 48, dtype=torch.uint8)
    masks[:, 10:30, 12:40] = 7  # any non-zero value is foreground
    aug = G.build_device_augment(recipe, 48)
    a_img, a_mask = aug(images, masks, G.augment_generator("cpu", [1, 2]))
    b_img, b_mask = aug(images, masks, G.augment_generator("cpu", [1, 2]))
    c_img, _ = aug(images, masks, G.augment_generator("cpu", [1, 3]))
    assert a_img.shape == (6, 3, 48, 48) and a_img.dtype == torch.float32
    assert a_mask.shape == (6, 48, 48) and set(a_mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 <= float(a_img.min()) and float(a_img.max()) <= 1.0
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    if recipe == "none":
        assert torch.equal(a_img, images.float() / 255) and torch.equal(a_mask, (masks > 0).float())
        assert torch.equal(a_img, c_img)
    else:
        assert not torch.equal(a_img, c_img)


def test_the_generator_decides_not_the_global_rng():
    images = torch.randint(0, 256, (4, 2, 32, 32), dtype=torch.uint8)
    masks = torch.zeros(4, 32, 32, dtype=torch.uint8)
    aug = G.build_device_augment("paper", 32)
    torch.manual_seed(0)
    first = aug(images, masks, G.augment_generator("cpu", [5]))[0]
    torch.manual_seed(1)
    torch.rand(100)
    second = aug(images, masks, G.augment_generator("cpu", [5]))[0]
    assert torch.equal(first, second)


def test_bad_inputs_are_named():
    aug = G.build_device_augment("paper", 32)
    g = G.augment_generator("cpu", [0])
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="images must be a uint8"):
        aug(images.float(), masks, g)
    with pytest.raises(ValueError, match="masks must be a uint8"):
        aug(images, masks[:, None], g)
    with pytest.raises(ValueError, match="do not match"):
        aug(images, masks[:1], g)
    with pytest.raises(ValueError, match="torch.Generator"):
        aug(images, masks, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown augment recipe 'imgaug'"):
        G.build_device_augment("imgaug", 32)
    with pytest.raises(ValueError, match="size"):
        G.build_device_augment("paper", 0)


def test_where_resolves_auto_by_device():
    assert G.resolve_where("auto", "cpu") == "host"
    assert G.resolve_where("auto", torch.device("cuda", 0)) == "device"
    assert G.resolve_where("device", "cpu") == "device" and G.resolve_where("host", "cuda") == "host"
    with pytest.raises(ValueError, match="augment.where"):
        G.resolve_where("gpu", "cpu")


@pytest.mark.gpu
def test_on_cuda_the_same_parameters_give_the_cpu_result():
    aug = G.build_device_augment("kaggle", 96)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 96, 96), dtype=np.uint8))
    masks = torch.zeros(8, 96, 96, dtype=torch.uint8)
    masks[:, 20:60, 30:70] = 1
    params = aug.draw(8, G.augment_generator("cpu", [0]), 96, 96)
    cpu = aug.apply(images.float() / 255, masks.float(), params)
    gpu = aug.apply(images.cuda().float() / 255, masks.cuda().float(), {k: v.cuda() for k, v in params.items()})
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=2e-3)
    assert (cpu[1] != gpu[1].cpu()).float().mean() < 0.002
    out = aug(images.cuda(), masks.cuda(), G.augment_generator("cuda", [0]))
    assert out[0].is_cuda and out[0].dtype == torch.float32
