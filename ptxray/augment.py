"""Random augmentation of (image stack, mask) pairs with albumentations.

`build_augment(recipe, size)` builds a pipeline once per worker; `augment(image, mask, pipeline, rng)`
applies it to one uint8 (C, H, W) stack and its (H, W) {0, 1} mask. All randomness comes from the
numpy Generator handed in: the pipeline is re-seeded from it on every call, so one seed reproduces a
batch, whatever else the process has done with `random`, `np.random` or other pipelines.

albumentations is imported lazily: importing it asks PyPI for a newer version (a network call of up
to 2 s) unless NO_ALBUMENTATIONS_UPDATE is set, and `import ptxray.augment` must have no side effects.

The same recipes run on the training device too: `build_device_augment(recipe, size)` applies them
to a whole uint8 batch that is already on the GPU (batched torch ops, randomness from a
`torch.Generator` on that device), so a data-loading worker only reads, shuffles and hands over
uint8. Both paths draw every parameter from the same distributions (the numbers live once, in the
`*_AFFINE` / `*_NOISE` / ... constants below); `resolve_where` picks the path (`augment.where`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ptxray.config import AUGMENT_WHERE

if TYPE_CHECKING:
    import albumentations


def _albumentations() -> Any:
    # Workers and clusters have no business calling PyPI at import; respect an explicit user choice.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    return A


# Geometric transforms fill the uncovered corners with black in every channel and background in
# the mask. Keras' default ("nearest", i.e. BORDER_REPLICATE) smears the edge rows across large
# areas under the paper's +-170 degree rotations and 0.67x zoom-outs; black is what a chest film's
# surroundings look like in MONOCHROME2 and is neutral for all our enhancement channels.
_BORDER = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
# Masks are labels: nearest-neighbour keeps them exactly {0, 1}. Set on every geometric transform
# and on the Compose (which propagates it), so a transform added later cannot forget it.
_MASK_INTERP = cv2.INTER_NEAREST


@dataclass(frozen=True)
class AffineRanges:
    """The random affine of a recipe, as albumentations' `Affine` draws it (one draw per image).

    Each value is uniform in its range: rotation in [-rotate_deg, rotate_deg]; the scale (1 / Keras
    zoom) in `scale`, for x and y independently unless `keep_ratio`; the shift per axis in
    [-shift, shift] times the side (truncated to whole pixels, as albumentations does); shear along
    x in [-shear_x_deg, shear_x_deg]. `p` is the chance an image gets the affine at all.
    """

    p: float
    rotate_deg: float
    scale: tuple[float, float]
    keep_ratio: bool
    shift: float
    shear_x_deg: float


# The paper recipe (Keras semantics: see _paper). Zoom z in [0.9, 1.5] is albumentations scale 1 / z.
PAPER_FLIP_P = 0.5
PAPER_AFFINE = AffineRanges(p=1.0, rotate_deg=170.0, scale=(1 / 1.5, 1 / 0.9), keep_ratio=False, shift=0.15, shear_x_deg=10.0)
PAPER_BRIGHTNESS = (0.7, 1.2)  # one multiplier per image
PAPER_NOISE_STD = (0.01, 0.03)  # gaussian sigma as a fraction of full scale, one field for all channels
PAPER_NOISE_P = 0.3
# The kaggle recipe (see _kaggle).
KAGGLE_FLIP_P = 0.5
KAGGLE_AFFINE = AffineRanges(p=0.5, rotate_deg=15.0, scale=(0.9, 1.1), keep_ratio=True, shift=0.0625, shear_x_deg=0.0)
KAGGLE_INTENSITY_P = 0.5  # then brightness/contrast or gamma, each with probability 1/2
KAGGLE_BRIGHTNESS = 0.2  # added, as a fraction of full scale, in [-0.2, 0.2]
KAGGLE_CONTRAST = 0.2  # multiplier in [0.8, 1.2]
KAGGLE_GAMMA = (0.8, 1.2)
KAGGLE_DISTORT_P = 0.3  # then elastic or grid distortion, each with probability 1/2
KAGGLE_GRID_STEPS = 5
KAGGLE_GRID_LIMIT = 0.3


def elastic_alpha_sigma(size: int) -> tuple[float, float]:
    """(alpha, sigma) in pixels of the kaggle recipe's elastic field at `size` px (see _kaggle)."""
    k = size / 512.0
    # albumentations requires sigma >= 1; below ~85 px keep the displacement (alpha / sigma) scaled.
    sigma = max(1.0, 6.0 * k)
    return 20.0 * k * sigma, sigma


def _host_affine(A: Any, r: AffineRanges) -> Any:
    scale = r.scale if r.keep_ratio else {"x": r.scale, "y": r.scale}
    return A.Affine(
        rotate=(-r.rotate_deg, r.rotate_deg),
        scale=scale,
        keep_ratio=r.keep_ratio,
        translate_percent={"x": (-r.shift, r.shift), "y": (-r.shift, r.shift)},
        shear={"x": (-r.shear_x_deg, r.shear_x_deg), "y": (0.0, 0.0)},
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=_MASK_INTERP,
        p=r.p,
        **_BORDER,
    )


def _paper(A: Any, size: int) -> list:
    """The paper's Keras ImageDataGenerator recipe, translated with Keras semantics.

    - rotation_range=170: Keras draws the angle uniformly in [-170, +170] degrees (not +-85).
    - horizontal_flip / vertical_flip: each with probability 0.5.
    - zoom_range=[0.9, 1.5]: Keras draws zx and zy independently in [0.9, 1.5] and uses them as the
      output->input coordinate scale, so zoom > 1 shrinks the content (zooms OUT). The equivalent
      albumentations scale is 1/zoom, per axis independently: [1/1.5, 1/0.9] = [0.667, 1.111].
      (Keras draws zoom uniformly, we draw 1/zoom uniformly: same range, slightly different density.)
    - width/height_shift_range=0.15: a fraction of the width/height, uniform in [-0.15, 0.15], drawn
      independently per axis.
    - brightness_range=[0.7, 1.2]: Keras multiplies the pixels by a factor drawn uniformly in that
      range (PIL ImageEnhance.Brightness) and clips; MultiplicativeNoise with one scalar per image
      does exactly that (RandomBrightnessContrast would add, not multiply). One factor for the whole
      stack: the channels are views of the same film.
    - What the paper planned next, with our choice of strength: shear (Keras shears along one axis;
      +-10 degrees) and gaussian noise (sigma 1-3 % of 255, shared by the channels, 30 % of images).
    Keras draws every parameter for every image (no per-transform probability), hence p=1.
    """
    return [
        A.HorizontalFlip(p=PAPER_FLIP_P),
        A.VerticalFlip(p=PAPER_FLIP_P),
        _host_affine(A, PAPER_AFFINE),
        A.MultiplicativeNoise(multiplier=PAPER_BRIGHTNESS, per_channel=False, elementwise=False, p=1.0),
        A.GaussNoise(std_range=PAPER_NOISE_STD, per_channel=False, p=PAPER_NOISE_P),
    ]


def _kaggle(A: Any, size: int) -> list:
    """The common recipe of the winning SIIM-ACR pipelines.

    Horizontal flip; ShiftScaleRotate(shift 0.0625, scale 0.1, rotate 15) written as the equivalent
    Affine (ShiftScaleRotate is a deprecated subclass of Affine in albumentations 2); one of
    brightness/contrast or gamma; one of elastic or grid distortion at p=0.3.

    The elastic field is the classic Simard-style one (uniform noise smoothed by a gaussian) with the
    Kaggle kernels' alpha=120, sigma=6 at 512 px. Those are pixel quantities: sigma scales with the
    image side and alpha with its square, so the displacement (which goes as alpha / sigma, about
    4 px on average at 512) stays the same fraction of the image at any `size`.
    """
    alpha, sigma = elastic_alpha_sigma(size)
    return [
        A.HorizontalFlip(p=KAGGLE_FLIP_P),
        _host_affine(A, KAGGLE_AFFINE),
        A.OneOf(
            [
                A.RandomBrightnessContrast(
                    brightness_limit=KAGGLE_BRIGHTNESS, contrast_limit=KAGGLE_CONTRAST, p=1.0
                ),
                A.RandomGamma(gamma_limit=(round(100 * KAGGLE_GAMMA[0]), round(100 * KAGGLE_GAMMA[1])), p=1.0),
            ],
            p=KAGGLE_INTENSITY_P,
        ),
        A.OneOf(
            [
                A.ElasticTransform(
                    alpha=alpha,
                    sigma=sigma,
                    noise_distribution="uniform",
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=_MASK_INTERP,
                    p=1.0,
                    **_BORDER,
                ),
                A.GridDistortion(
                    num_steps=KAGGLE_GRID_STEPS,
                    distort_limit=KAGGLE_GRID_LIMIT,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=_MASK_INTERP,
                    p=1.0,
                    **_BORDER,
                ),
            ],
            p=KAGGLE_DISTORT_P,
        ),
    ]


# recipe name -> builder of the transform list; None = no augmentation.
_RECIPES: dict[str, Callable[[Any, int], list] | None] = {
    "paper": _paper,
    "kaggle": _kaggle,
    "none": None,
}
RECIPES = tuple(_RECIPES)


def build_augment(recipe: str, size: int) -> "albumentations.Compose | None":
    """The augmentation pipeline of a recipe ("paper", "kaggle"; "none" -> None).

    size: the side in pixels of the images the pipeline will see (pixel-valued parameters scale
    with it). Build one pipeline per worker/thread: `augment` re-seeds it on every call.
    """
    if recipe not in _RECIPES:
        raise ValueError(f"unknown augment recipe {recipe!r}; valid recipes are {list(RECIPES)}")
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"build_augment({recipe!r}): size must be a positive integer, got {size!r}")
    builder = _RECIPES[recipe]
    if builder is None:
        return None
    A = _albumentations()
    return A.Compose(builder(A, int(size)), mask_interpolation=_MASK_INTERP, seed=0)


def _seed_each(pipeline: Any, rng: np.random.Generator) -> None:
    """Re-seed the pipeline and every transform in it from `rng`, each with its own seed.

    albumentations' `Compose.set_random_seed` gives every transform the SAME seed, so transforms
    re-seeded per call draw the same first numbers: two p=0.5 flips would always come together
    and a p=0.3 noise only ever with them. Parents first: a nested OneOf passes its seed down,
    then its members get their own.
    """
    nodes = [pipeline]
    for node in nodes:  # breadth-first; the list grows as it is walked
        nodes.extend(getattr(node, "transforms", ()))
    for node, seed in zip(nodes, rng.integers(2**31, size=len(nodes)).tolist()):
        node.set_random_seed(seed)


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    pipeline: "albumentations.Compose | None",
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a uint8 (C, H, W) image stack and its uint8 (H, W) mask together.

    Returns arrays of the same shapes and dtypes (C-contiguous). The seeds of the pipeline and of
    each of its transforms are drawn from `rng` on every call, so equal rng states give equal
    outputs. pipeline None returns the inputs.
    Not thread-safe for one pipeline (re-seeding mutates it): use one pipeline per thread.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"augment: image must be a uint8 (C, H, W) array, got {got}")
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"augment: mask must be a uint8 (H, W) array, got {got}")
    if mask.shape != image.shape[1:]:
        raise ValueError(
            f"augment: mask shape {mask.shape} does not match the image's (H, W) {image.shape[1:]}"
        )
    if pipeline is None:
        return image, mask
    _seed_each(pipeline, rng)
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, C): albumentations' layout
    out = pipeline(image=hwc, mask=mask)
    out_image = out["image"]
    if out_image.ndim == 2:  # (H, W): a single channel may come back squeezed
        out_image = out_image[:, :, None]
    return (
        np.ascontiguousarray(out_image.transpose(2, 0, 1)),  # (C, H, W)
        np.ascontiguousarray(out["mask"], dtype=np.uint8),  # (H, W)
    )



# ---- the same recipes on the training device ---------------------------------------------------
#
# Plain torch, not kornia (checked: kornia 0.9 from PyPI). kornia handles masks well (nearest for
# data_keys="mask"), but its random augmentations draw from the global torch RNG
# (torch.distributions, no generator argument), so a seed could not be handed in and any other use
# of torch's RNG in the process would shift the stream; and its geometric transforms each warp on
# their own. Here every image's flips, rotation, x/y scale, shift and shear (and, for kaggle, the
# elastic or grid field) become ONE sampling grid and one `grid_sample` per tensor (bilinear for
# the image, nearest for the mask, zeros outside): one interpolation, as on the host. Measured on
# this CPU (benchmarks/feed.py, one thread, batch 8): kornia's flips + affine alone 4.0 / 17.6 ms
# per image at 256 / 512 px, the whole paper recipe here 1.5 / 7.3 ms.
_AUGMENT_SEED_TAG = 0x617567  # "aug": keeps this stream apart from numpy ones seeded from the same numbers


def resolve_where(where: str, device: "torch.device | str") -> str:
    """`augment.where` -> "host" or "device" for training on `device`.

    auto: on the device when it is a GPU; on the host otherwise (on a CPU, OpenCV warps an image
    several times faster than `grid_sample`).
    """
    if where not in AUGMENT_WHERE:
        raise ValueError(f"augment.where: {where!r} is not one of {list(AUGMENT_WHERE)}")
    if where == "auto":
        return "device" if torch.device(device).type == "cuda" else "host"
    return where


def augment_generator(device: "torch.device | str", seed: Sequence[int]) -> torch.Generator:
    """A torch.Generator on `device` seeded from the integers `seed` (e.g. [train.seed, epoch, rank])."""
    entropy = [int(v) for v in seed] + [_AUGMENT_SEED_TAG]
    state = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(state)
    return generator


@dataclass(frozen=True)
class _DeviceRecipe:
    hflip_p: float = 0.0
    vflip_p: float = 0.0
    affine: AffineRanges | None = None
    multiply: tuple[float, float] | None = None  # brightness factor (paper)
    noise_p: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.0)
    intensity_p: float = 0.0  # brightness/contrast or gamma (kaggle)
    distort_p: float = 0.0  # elastic or grid distortion (kaggle)


_DEVICE_RECIPES: dict[str, _DeviceRecipe] = {
    "paper": _DeviceRecipe(
        hflip_p=PAPER_FLIP_P, vflip_p=PAPER_FLIP_P, affine=PAPER_AFFINE, multiply=PAPER_BRIGHTNESS,
        noise_p=PAPER_NOISE_P, noise_std=PAPER_NOISE_STD,
    ),
    "kaggle": _DeviceRecipe(
        hflip_p=KAGGLE_FLIP_P, affine=KAGGLE_AFFINE, intensity_p=KAGGLE_INTENSITY_P, distort_p=KAGGLE_DISTORT_P,
    ),
    "none": _DeviceRecipe(),
}
assert set(_DEVICE_RECIPES) == set(_RECIPES)

# Distortion codes of `DeviceAugment.draw`'s "distort" parameter.
NO_DISTORTION, ELASTIC, GRID = 0, 1, 2


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def sampling_matrices(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """float64 (B, 3, 3): for each image, output pixel (x, y, 1) -> the input pixel it samples.

    Pixel centres are integers, as in OpenCV. The affine is albumentations' `Affine` matrix
    (scale, then rotation, then shear, then shift, about the centre ((W - 1) / 2, (H - 1) / 2));
    warpAffine maps input to output with it, so sampling uses its inverse. The flips come before
    the affine in the recipes: sample the flipped image, i.e. flip the sampled coordinates.
    """
    angle = torch.deg2rad(params["rotate_deg"])  # (B,)
    b = angle.shape[0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = params["scale_x"], params["scale_y"]
    shear = torch.tan(torch.deg2rad(params["shear_x_deg"]))
    cx, cy = width / 2 - 0.5, height / 2 - 0.5
    # M = centre @ shift @ shear @ rotation @ scale @ (-centre): composed by hand for the batch.
    a11 = (cos - shear * sin) * sx
    a12 = (sin + shear * cos) * sy
    a21 = -sin * sx
    a22 = cos * sy
    m = torch.zeros(b, 3, 3, dtype=torch.float64, device=angle.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = a11, a12, a21, a22, 1.0
    m[:, 0, 2] = cx + params["shift_x_px"] - a11 * cx - a12 * cy
    m[:, 1, 2] = cy + params["shift_y_px"] - a21 * cx - a22 * cy
    sample = torch.linalg.inv(m)  # output -> input of the affine
    flip = torch.zeros_like(m)  # input of the affine -> original pixel: x -> W - 1 - x when flipped
    fx = torch.where(params["flip_x"], -1.0, 1.0).to(m)
    fy = torch.where(params["flip_y"], -1.0, 1.0).to(m)
    flip[:, 0, 0], flip[:, 1, 1], flip[:, 2, 2] = fx, fy, 1.0
    flip[:, 0, 2] = torch.where(params["flip_x"], width - 1.0, 0.0).to(m)
    flip[:, 1, 2] = torch.where(params["flip_y"], height - 1.0, 0.0).to(m)
    return flip @ sample


def _pixels_to_normalized(height: int, width: int, device: torch.device) -> torch.Tensor:
    # grid_sample with align_corners=False: u = (2 x + 1) / W - 1 puts pixel centres where OpenCV has them.
    n = torch.zeros(3, 3, dtype=torch.float64, device=device)
    n[0, 0], n[0, 2] = 2.0 / width, 1.0 / width - 1.0
    n[1, 1], n[1, 2] = 2.0 / height, 1.0 / height - 1.0
    n[2, 2] = 1.0
    return n


def gaussian_blur(fields: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) float -> the same blurred by a gaussian of `sigma` px: OpenCV's GaussianBlur with
    ksize (0, 0) on float32 (kernel side round(8 sigma + 1) | 1) and BORDER_REPLICATE, separable."""
    radius = (int(round(8 * sigma + 1)) | 1) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=fields.device)
    kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    out = fields.unsqueeze(1)  # (N, 1, H, W)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def grid_distortion_coords(steps: torch.Tensor, length: int, num_steps: int) -> torch.Tensor:
    """albumentations' GridDistortion map along one axis (normalized=True): steps (N, num_steps + 1)
    drawn as 1 + U(-limit, limit) -> source coordinates (N, length), float32 pixels.

    Piecewise linear over cells of length // num_steps px (plus a short last cell), each stretched
    by its step, the steps rescaled so the map ends at the image edge (never samples outside).
    """
    cell = length // num_steps
    steps = steps.to(torch.float64).clone()
    last = min(length, (num_steps + 1) * cell) - num_steps * cell
    steps[:, -1] *= last / cell
    steps = steps * ((length / math.floor(length / num_steps)) / steps.sum(dim=1, keepdim=True))
    ends = torch.cumsum(steps * cell, dim=1)  # (N, num_steps + 1): map value at each cell's last pixel
    starts = ends - steps * cell
    j = torch.arange(length, device=steps.device)
    seg = torch.clamp(j // cell, max=num_steps)  # (length,)
    seg_start = seg * cell
    seg_len = torch.clamp(seg_start + cell, max=length) - seg_start
    # np.linspace(prev, cur, n) over the cell's pixels: both ends included.
    t = (j - seg_start).to(torch.float64) / torch.clamp(seg_len - 1, min=1).to(torch.float64)
    return (starts[:, seg] + t * (ends[:, seg] - starts[:, seg])).to(torch.float32)


class DeviceAugment:
    """A recipe applied to a uint8 batch on its own device (see `build_device_augment`).

    `draw` makes every random choice of a batch (the parameters, and the noise and distortion
    fields of the images that get them); `apply` is a pure function of those, so a test can fix
    them and compare with the host.
    """

    def __init__(self, recipe: str, size: int):
        self.recipe_name = recipe
        self.size = int(size)
        self.recipe = _DEVICE_RECIPES[recipe]
        self.elastic_alpha, self.elastic_sigma = elastic_alpha_sigma(self.size)

    def __repr__(self) -> str:
        return f"DeviceAugment({self.recipe_name!r}, size={self.size})"

    def draw(self, batch: int, generator: torch.Generator, height: int, width: int) -> dict[str, torch.Tensor]:
        """The random choices for `batch` images of height x width, on the generator's device.

        Per image, (B,) tensors, the identity where a transform is not applied: flip_x, flip_y
        (bool), rotate_deg, scale_x, scale_y, shift_x_px, shift_y_px, shear_x_deg (the angle in
        the matrix), multiplier, noise_std (fraction of full scale; 0 = no noise), contrast,
        brightness (added), gamma, distort (NO_DISTORTION, ELASTIC or GRID). Fields, for the images
        that get them, in batch order: noise_field (N, 1, H, W) standard normal, elastic_noise
        (N, 2, H, W) uniform in [-1, 1], grid_steps (N, 2, KAGGLE_GRID_STEPS + 1) (x then y).
        Uniform draws with the host's ranges and probabilities (AffineRanges and the constants).
        """
        r = self.recipe
        dev = generator.device
        f64 = dict(device=dev, dtype=torch.float64)
        u = torch.rand(batch, 16, generator=generator, **f64)
        one, zero = torch.ones(batch, **f64), torch.zeros(batch, **f64)
        p: dict[str, torch.Tensor] = {"flip_x": u[:, 0] < r.hflip_p, "flip_y": u[:, 1] < r.vflip_p}
        a = r.affine
        if a is None:
            p.update(rotate_deg=zero, scale_x=one, scale_y=one, shift_x_px=zero, shift_y_px=zero, shear_x_deg=zero)
        else:
            on = u[:, 2] < a.p
            scale_x = _uniform(u[:, 4], *a.scale)
            scale_y = scale_x if a.keep_ratio else _uniform(u[:, 5], *a.scale)
            drawn = {
                "rotate_deg": (_uniform(u[:, 3], -a.rotate_deg, a.rotate_deg), zero),
                "scale_x": (scale_x, one),
                "scale_y": (scale_y, one),
                # albumentations: int(fraction * side), i.e. truncated towards zero
                "shift_x_px": (torch.trunc(_uniform(u[:, 6], -a.shift, a.shift) * width), zero),
                "shift_y_px": (torch.trunc(_uniform(u[:, 7], -a.shift, a.shift) * height), zero),
                "shear_x_deg": (_uniform(u[:, 8], -a.shear_x_deg, a.shear_x_deg), zero),
            }
            p.update({key: torch.where(on, value, identity) for key, (value, identity) in drawn.items()})
        p["multiplier"] = one if r.multiply is None else _uniform(u[:, 9], *r.multiply)
        p["noise_std"] = torch.where(u[:, 10] < r.noise_p, _uniform(u[:, 11], *r.noise_std), zero)
        # kaggle: OneOf(brightness/contrast, gamma) with probability intensity_p, then either member
        # with probability 1/2; columns 14-15 serve whichever member an image gets.
        intensity = u[:, 12] < r.intensity_p
        rbc, gamma = intensity & (u[:, 13] < 0.5), intensity & (u[:, 13] >= 0.5)
        p["contrast"] = torch.where(rbc, 1.0 + _uniform(u[:, 14], -KAGGLE_CONTRAST, KAGGLE_CONTRAST), one)
        p["brightness"] = torch.where(rbc, _uniform(u[:, 15], -KAGGLE_BRIGHTNESS, KAGGLE_BRIGHTNESS), zero)
        p["gamma"] = torch.where(gamma, _uniform(u[:, 14], *KAGGLE_GAMMA), one)
        # kaggle: OneOf(elastic, grid distortion) with probability distort_p, then 1/2 each
        v = torch.rand(batch, 2, generator=generator, **f64)
        p["distort"] = torch.where(v[:, 0] < r.distort_p, torch.where(v[:, 1] < 0.5, ELASTIC, GRID), NO_DISTORTION)
        # The fields, only for the images that get them (one host sync each; a step costs far more).
        n_noise = int((p["noise_std"] > 0).sum()) if r.noise_p > 0 else 0
        n_elastic = int((p["distort"] == ELASTIC).sum()) if r.distort_p > 0 else 0
        n_grid = int((p["distort"] == GRID).sum()) if r.distort_p > 0 else 0
        p["noise_field"] = torch.randn(n_noise, 1, height, width, generator=generator, device=dev)
        p["elastic_noise"] = torch.rand(n_elastic, 2, height, width, generator=generator, device=dev).mul_(2.0).sub_(1.0)
        steps = torch.rand(n_grid, 2, KAGGLE_GRID_STEPS + 1, generator=generator, **f64)
        p["grid_steps"] = 1.0 + _uniform(steps, -KAGGLE_GRID_LIMIT, KAGGLE_GRID_LIMIT)
        return p

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_device_batch(images, masks, generator)
        b, _, h, w = images.shape
        x = images.float().div_(255.0)  # (B, C, H, W)
        m = (masks > 0).float()  # (B, H, W)
        if self.recipe_name == "none" or b == 0:
            return x, m
        return self.apply(x, m, self.draw(b, generator, h, w))

    def apply(
        self, x: torch.Tensor, m: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply drawn `params` to float images x (B, C, H, W) in [0, 1] and masks m (B, H, W) in {0, 1}.

        Geometry first (flips + affine + distortion in one grid), then intensities. The host's
        kaggle recipe changes intensities before the distortion; the two orders differ only in
        the few border pixels a distortion pulls in from outside the image.
        """
        b, _, h, w = x.shape
        dev = x.device
        n = _pixels_to_normalized(h, w, dev)
        theta = (n @ sampling_matrices(params, h, w).to(dev) @ torch.linalg.inv(n))[:, :2].float()  # (B, 2, 3)
        grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)  # (B, H, W, 2)
        distort = params["distort"].to(dev)
        for code, field in ((ELASTIC, "elastic_noise"), (GRID, "grid_steps")):
            if params[field].shape[0]:
                idx = torch.nonzero(distort == code).squeeze(1)
                xs, ys = self._source_pixels(code, params[field].to(dev), h, w)
                grid[idx] = _affine_of_pixels(theta[idx], xs, ys, h, w)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = F.grid_sample(m.unsqueeze(1), grid, mode="nearest", padding_mode="zeros", align_corners=False).squeeze(1)

        def per_image(key: str) -> torch.Tensor:
            return params[key].to(device=dev, dtype=x.dtype).view(b, 1, 1, 1)

        if self.recipe.multiply is not None:
            x = x.mul_(per_image("multiplier")).clamp_(0.0, 1.0)
        if params["noise_field"].shape[0]:
            # One field per image, shared by the channels (views of one film), as on the host.
            noisy = torch.nonzero(params["noise_std"].to(dev) > 0).squeeze(1)
            x[noisy] = (x[noisy] + params["noise_field"].to(dev) * per_image("noise_std")[noisy]).clamp_(0.0, 1.0)
        if self.recipe.intensity_p > 0:
            changed = (params["contrast"] != 1) | (params["brightness"] != 0) | (params["gamma"] != 1)
            some = torch.nonzero(changed.to(dev)).squeeze(1)
            if some.numel():  # brightness/contrast or gamma (an image gets one; the other is the identity)
                c, br, ga = (per_image(key)[some] for key in ("contrast", "brightness", "gamma"))
                x[some] = (x[some] * c + br).clamp_(0.0, 1.0).pow_(ga)
        return x, m

    def _source_pixels(self, code: int, field: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each pixel of a distorted image comes from in its input: (xs, ys), each (N, H, W)."""
        k = field.shape[0]
        if code == ELASTIC:  # Simard: uniform noise, blurred, times alpha; dx and dy independent
            shift = gaussian_blur(field.reshape(k * 2, h, w), self.elastic_sigma).mul_(self.elastic_alpha).view(k, 2, h, w)
            xs = torch.arange(w, device=field.device, dtype=torch.float32).view(1, 1, w) + shift[:, 0]
            ys = torch.arange(h, device=field.device, dtype=torch.float32).view(1, h, 1) + shift[:, 1]
            return xs, ys
        xs = grid_distortion_coords(field[:, 0], w, KAGGLE_GRID_STEPS).view(k, 1, w).expand(k, h, w)
        ys = grid_distortion_coords(field[:, 1], h, KAGGLE_GRID_STEPS).view(k, h, 1).expand(k, h, w)
        return xs, ys


def _affine_of_pixels(theta: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """theta (N, 2, 3) applied to the pixel positions (xs, ys) (N, H, W), as a grid_sample grid
    (N, H, W, 2). The host distorts the affine's output, so output pixel p samples the original
    at affine(D(p)): one interpolation instead of two."""
    u = (2.0 * xs + 1.0) / w - 1.0  # pixel -> normalized (align_corners=False)
    v = (2.0 * ys + 1.0) / h - 1.0
    t = theta.view(-1, 2, 3, 1, 1)
    return torch.stack([t[:, 0, 0] * u + t[:, 0, 1] * v + t[:, 0, 2], t[:, 1, 0] * u + t[:, 1, 1] * v + t[:, 1, 2]], dim=-1)


def _check_device_batch(images: Any, masks: Any, generator: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"device augment: images must be a uint8 (B, C, H, W) tensor, got {got}")
    if not isinstance(masks, torch.Tensor) or masks.dtype not in (torch.uint8, torch.bool) or masks.ndim != 3:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"device augment: masks must be a uint8 (B, H, W) tensor, got {got}")
    if masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
        raise ValueError(
            f"device augment: masks {tuple(masks.shape)} do not match images {tuple(images.shape)} (expected (B, H, W))"
        )
    if masks.device != images.device:
        raise ValueError(f"device augment: masks are on {masks.device} but images on {images.device}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"device augment: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != images.device.type:
        raise ValueError(
            f"device augment: the generator is on {generator.device} but the batch on {images.device}; "
            "make it with augment_generator(batch device, seed)"
        )


def build_device_augment(recipe: str, size: int) -> DeviceAugment:
    """The recipe ("paper", "kaggle", "none") as a batched function on the training device:

        images_float, masks = build_device_augment(recipe, size)(images_uint8, masks_uint8, generator)

    images_uint8 (B, C, S, S) and masks_uint8 (B, S, S) (any non-zero = foreground) on one device;
    returns float32 images (B, C, S, S) in [0, 1] and float32 masks (B, S, S) in {0, 1} on that
    device. All randomness comes from `generator` (a torch.Generator on the same device), so equal
    generator states give equal outputs. Parameters follow the host recipes' distributions
    (`build_augment`); `size` is the side the pixel-valued parameters are set for (elastic).
    """
    if recipe not in _RECIPES:
        raise ValueError(f"unknown augment recipe {recipe!r}; valid recipes are {list(RECIPES)}")
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"build_device_augment({recipe!r}): size must be a positive integer, got {size!r}")
    return DeviceAugment(recipe, int(size))


__all__ = [
    "AUGMENT_WHERE", "RECIPES", "DeviceAugment", "augment", "augment_generator", "build_augment",
    "build_device_augment", "resolve_where",
]  # fmt: skip
