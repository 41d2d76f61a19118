"""Random augmentation of (image stack, mask) pairs with albumentations.

`build_augment(recipe, size)` builds a pipeline once per worker; `augment(image, mask, pipeline, rng)`
applies it to one uint8 (C, H, W) stack and its (H, W) {0, 1} mask. All randomness comes from the
numpy Generator handed in: the pipeline is re-seeded from it on every call, so one seed reproduces a
batch, whatever else the process has done with `random`, `np.random` or other pipelines.

albumentations is imported lazily: importing it asks PyPI for a newer version (a network call of up
to 2 s) unless NO_ALBUMENTATIONS_UPDATE is set, and `import ptxray.augment` must have no side effects.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

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
    zoom_lo, zoom_hi = 0.9, 1.5
    scale = (1.0 / zoom_hi, 1.0 / zoom_lo)
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(
            rotate=(-170.0, 170.0),
            scale={"x": scale, "y": scale},
            keep_ratio=False,
            translate_percent={"x": (-0.15, 0.15), "y": (-0.15, 0.15)},
            shear={"x": (-10.0, 10.0), "y": (0.0, 0.0)},
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=_MASK_INTERP,
            p=1.0,
            **_BORDER,
        ),
        A.MultiplicativeNoise(multiplier=(0.7, 1.2), per_channel=False, elementwise=False, p=1.0),
        A.GaussNoise(std_range=(0.01, 0.03), per_channel=False, p=0.3),
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
    k = size / 512.0
    # albumentations requires sigma >= 1; below ~85 px keep the displacement (alpha / sigma) scaled.
    sigma = max(1.0, 6.0 * k)
    alpha = 20.0 * k * sigma
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(
            translate_percent={"x": (-0.0625, 0.0625), "y": (-0.0625, 0.0625)},
            scale=(0.9, 1.1),
            keep_ratio=True,
            rotate=(-15.0, 15.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=_MASK_INTERP,
            p=0.5,
            **_BORDER,
        ),
        A.OneOf(
            [
                A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
                A.RandomGamma(gamma_limit=(80, 120), p=1.0),
            ],
            p=0.5,
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
                    num_steps=5,
                    distort_limit=0.3,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=_MASK_INTERP,
                    p=1.0,
                    **_BORDER,
                ),
            ],
            p=0.3,
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


def augment(
    image: np.ndarray,
    mask: np.ndarray,
    pipeline: "albumentations.Compose | None",
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a uint8 (C, H, W) image stack and its uint8 (H, W) mask together.

    Returns arrays of the same shapes and dtypes (C-contiguous). The pipeline's seed is drawn from
    `rng` on every call, so equal rng states give equal outputs. pipeline None returns the inputs.
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
    pipeline.set_random_seed(int(rng.integers(2**31)))
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, C): albumentations' layout
    out = pipeline(image=hwc, mask=mask)
    out_image = out["image"]
    if out_image.ndim == 2:  # (H, W): a single channel may come back squeezed
        out_image = out_image[:, :, None]
    return (
        np.ascontiguousarray(out_image.transpose(2, 0, 1)),  # (C, H, W)
        np.ascontiguousarray(out["mask"], dtype=np.uint8),  # (H, W)
    )


__all__ = ["RECIPES", "augment", "build_augment"]
