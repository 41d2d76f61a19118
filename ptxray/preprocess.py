"""Deterministic image preprocessing: histogram equalisation variants, BEASF, channel stacks, resizing.

Every function takes and returns uint8 (H, W) images; `make_channels` returns the (C, size, size) uint8
stack that the Parquet cache stores and the models read. OpenCV does the pixel work throughout (resize,
equalizeHist, CLAHE, LUT); only BEASF is hand-written, because no library we depend on implements it,
and even there the per-pixel step is a 256-entry lookup table applied by `cv2.LUT`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import cv2
import numpy as np

from ptxray.config import PreprocessConfig

# OpenCV clips a tile's histogram at int(clip_limit * tile_pixels / 256). No bin of a tile can hold
# more than tile_pixels, so any clip_limit >= 256 means the clip never triggers: CLAHE with such a
# limit *is* plain adaptive histogram equalisation (AHE), with the same tiling and bilinear blending
# between tiles. 1000 leaves margin above 256 while int(1000 * tile_pixels / 256) still fits OpenCV's
# int for tiles of up to ~550 million pixels.
_AHE_CLIP_LIMIT = 1000.0

# A cv2.CLAHE object keeps per-call scratch buffers (the padded source, the tile LUTs) as members, so
# one object must not be shared by threads that call `apply` at the same time (Ray Data may run
# batches on several threads of one process). Creating one is not free, so we keep one per thread
# and per (clip_limit, tile_grid).
_clahe_local = threading.local()


def _clahe_object(clip_limit: float, tile_grid: int) -> cv2.CLAHE:
    cache: dict[tuple[float, int], cv2.CLAHE] | None = getattr(_clahe_local, "cache", None)
    if cache is None:
        cache = _clahe_local.cache = {}
    key = (float(clip_limit), int(tile_grid))
    obj = cache.get(key)
    if obj is None:
        obj = cache[key] = cv2.createCLAHE(clipLimit=key[0], tileGridSize=(key[1], key[1]))
    return obj


def _check_image(image: np.ndarray, where: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        got = (
            f"{image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"{where}: expected a uint8 (H, W) grey-level image, got a {got}")
    if image.size == 0:
        raise ValueError(f"{where}: expected a non-empty image, got shape {image.shape}")


def _check_tile_grid(tile_grid: int, where: str) -> None:
    if int(tile_grid) != tile_grid or tile_grid < 1:
        raise ValueError(f"{where}: tile_grid must be a positive integer, got {tile_grid!r}")


def _check_clip_limit(clip_limit: float, where: str) -> None:
    if not clip_limit > 0:
        raise ValueError(
            f"{where}: clip_limit must be > 0, got {clip_limit!r} (ahe() is CLAHE without clipping)"
        )


def he(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation (uint8 (H, W) -> uint8 (H, W))."""
    _check_image(image, "he")
    return cv2.equalizeHist(image)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation on a tile_grid x tile_grid grid of tiles.

    `clip_limit` is OpenCV's: a multiple of the mean bin height of a tile's histogram.
    """
    _check_image(image, "clahe")
    _check_tile_grid(tile_grid, "clahe")
    _check_clip_limit(clip_limit, "clahe")
    return _clahe_object(clip_limit, tile_grid).apply(image)


def ahe(image: np.ndarray, tile_grid: int = 8) -> np.ndarray:
    """Adaptive histogram equalisation: CLAHE whose clip limit can never be reached (see _AHE_CLIP_LIMIT)."""
    _check_image(image, "ahe")
    _check_tile_grid(tile_grid, "ahe")
    return _clahe_object(_AHE_CLIP_LIMIT, tile_grid).apply(image)


def _check_gamma(gamma: float, where: str) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{where}: beasf gamma must be in [0, 1], got {gamma!r}")


# Steepness of the BEASF sigmoid at gamma = 1, in logistic units across a whole sub-range (see beasf_lut).
_BEASF_MAX_STEEPNESS = 10.0


def _sigmoid_segment(
    counts: np.ndarray, lo: int, hi: int, gamma: float
) -> np.ndarray:
    """Normalised adaptive sigmoid for grey levels lo..hi (inclusive), given their histogram counts."""
    levels = np.arange(lo, hi + 1, dtype=np.float64)
    width = hi - lo
    if width == 0:
        return levels
    total = counts.sum()
    if total > 0:
        cdf = np.cumsum(counts) / total
        centre = lo + float(np.searchsorted(cdf, 0.5))  # first level where the sub-CDF reaches 0.5
    else:
        centre = (lo + hi) / 2.0  # an empty sub-histogram has no median: centre the curve
    alpha = _BEASF_MAX_STEEPNESS * gamma / width
    if alpha * width < 1e-6:
        # The normalised sigmoid tends to the identity as alpha -> 0; computing it would divide ~0 by ~0.
        return levels
    s = 1.0 / (1.0 + np.exp(-alpha * (levels - centre)))
    return lo + width * (s - s[0]) / (s[-1] - s[0])


def beasf_lut(image: np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """The (256,) uint8 lookup table of BEASF for this image.

    BEASF (Bi-histogram Equalization using Adaptive Sigmoid Functions, Arriaga-Garcia, Sanchez-Yanez
    and Garcia-Hernandez, 2014), as formulated here:

    1. m = floor(mean grey level). The histogram is split into a lower part on levels [0, m] and an
       upper part on levels [m+1, 255]; each part is transformed separately and onto itself, so the
       mean brightness is preserved (the bi-histogram idea) and the LUT is monotonic.
    2. For a part on [a, b] (width w = b - a), its centre c is the first level where the part's own
       CDF reaches 0.5 (its median; the midpoint (a+b)/2 if the part holds no pixel).
    3. The sigmoid s(x) = 1 / (1 + exp(-alpha * (x - c))) with alpha = K * gamma / w, K = 10.
       Derivation: only the dimensionless product alpha * w (how many logistic units the part spans)
       shapes the normalised curve, so tying it to gamma alone makes gamma mean the same thing for a
       narrow and a wide part. gamma = 1 spans K = 10 units (about +-5 around a central c, where the
       logistic runs from 0.007 to 0.993: a strong S-curve, slope ~K/4 = 2.5 at c relative to the
       identity); gamma -> 0 flattens the logistic to a straight line, i.e. the identity map
       (gamma = 0 returns the identity exactly).
    4. Normalise so the end points map onto themselves:
          T(x) = a + w * (s(x) - s(a)) / (s(b) - s(a)),    x in [a, b]
       which stretches contrast around each part's median, where its pixels are densest.
    5. The LUT is round(T) as uint8.

    Built with vectorised numpy over the 256 levels (histogram, cumsum, searchsorted), no loop over
    grey levels.
    """
    _check_image(image, "beasf_lut")
    _check_gamma(gamma, "beasf_lut")
    if image.size < 2**24:
        # cv2.calcHist is ~4x faster than np.bincount at 512 px; its float32 counts are exact below 2**24.
        hist = cv2.calcHist([image], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        hist = np.bincount(image.ravel(), minlength=256)
    # The mean from the histogram is exact and avoids a second pass over the pixels.
    m = int(np.dot(hist, np.arange(256)) // image.size)
    lut = np.empty(256, dtype=np.float64)
    lut[: m + 1] = _sigmoid_segment(hist[: m + 1], 0, m, gamma)
    if m < 255:
        lut[m + 1 :] = _sigmoid_segment(hist[m + 1 :], m + 1, 255, gamma)
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)


def beasf(image: np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """BEASF contrast enhancement (uint8 (H, W) -> uint8 (H, W)); see `beasf_lut` for the formula."""
    return cv2.LUT(image, beasf_lut(image, gamma))


def _resize_area(image: np.ndarray, size: int, dst: np.ndarray | None = None) -> np.ndarray:
    if image.shape == (size, size):
        if dst is None:
            return image
        dst[...] = image
        return dst
    return cv2.resize(image, (size, size), dst=dst, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class ChannelSettings:
    """The enhancement settings a channel may read (`PreprocessConfig`'s, validated by `make_channels`)."""

    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    ahe_tile_grid: int = 8
    beasf_gamma: float = 0.5


# A channel: (resized uint8 (S, S), settings, dst uint8 (S, S)) -> None, writing into dst.
ChannelFn = Callable[[np.ndarray, ChannelSettings, np.ndarray], None]

# name -> implementation. `config.CHANNEL_NAMES` (what a config may ask for, checked without
# importing OpenCV) must list exactly these names; tests/test_preprocess.py checks that the two agree.
CHANNELS: dict[str, ChannelFn] = {}


def register_channel(name: str) -> Callable[[ChannelFn], ChannelFn]:
    """Decorator: make `fn` the implementation of channel `name` (also add `name` to `config.CHANNEL_NAMES`)."""

    def add(fn: ChannelFn) -> ChannelFn:
        if name in CHANNELS:
            raise ValueError(f"register_channel: channel {name!r} is already registered ({CHANNELS[name].__name__})")
        CHANNELS[name] = fn
        return fn

    return add


# OpenCV writes straight into the (size, size) slice of the stack: no intermediate copies.
@register_channel("raw")
def _raw_channel(resized: np.ndarray, settings: ChannelSettings, dst: np.ndarray) -> None:
    dst[...] = resized


@register_channel("he")
def _he_channel(resized: np.ndarray, settings: ChannelSettings, dst: np.ndarray) -> None:
    cv2.equalizeHist(resized, dst=dst)


@register_channel("ahe")
def _ahe_channel(resized: np.ndarray, settings: ChannelSettings, dst: np.ndarray) -> None:
    _clahe_object(_AHE_CLIP_LIMIT, settings.ahe_tile_grid).apply(resized, dst=dst)


@register_channel("clahe")
def _clahe_channel(resized: np.ndarray, settings: ChannelSettings, dst: np.ndarray) -> None:
    _clahe_object(settings.clahe_clip_limit, settings.clahe_tile_grid).apply(resized, dst=dst)


@register_channel("beasf")
def _beasf_channel(resized: np.ndarray, settings: ChannelSettings, dst: np.ndarray) -> None:
    cv2.LUT(resized, beasf_lut(resized, settings.beasf_gamma), dst=dst)


def make_channels(
    image: np.ndarray,
    channels: Sequence[str] = ("raw", "clahe", "beasf"),
    size: int = 512,
    *,
    clahe_clip_limit: float = 2.0,
    clahe_tile_grid: int = 8,
    ahe_tile_grid: int = 8,
    beasf_gamma: float = 0.5,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resize a grey-level image to size x size and stack the requested enhancements.

    image: uint8 (H, W). Returns a C-contiguous uint8 (C, size, size), channel i = channels[i],
    computed by the function registered for that name (`register_channel`); written into `out`
    when given (C-contiguous uint8 of that shape: prepare hands each image its slot of one buffer).

    The image is resized FIRST (INTER_AREA, the right filter for downscaling 1024 -> 512) and the
    enhancements are computed on the resized image: the cache stores the training resolution, the
    model only ever sees that, and CLAHE/AHE tiles are a fraction of the image (tile_grid x tile_grid)
    rather than a pixel size, so equalising at 512 px gives the same kind of local contrast as at
    1024 px, for a quarter of the work.
    """
    _check_image(image, "make_channels")
    channels = tuple(channels)
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown or not channels:
        raise ValueError(
            f"make_channels: unknown channel name(s) {unknown or '(none given)'}; "
            f"valid names are {list(CHANNELS)}"
        )
    if int(size) != size or size < 1:
        raise ValueError(f"make_channels: size must be a positive integer, got {size!r}")
    size = int(size)
    # Validate every setting up front, so a bad config fails the same way whatever the channels.
    _check_clip_limit(clahe_clip_limit, "make_channels (clahe_clip_limit)")
    _check_tile_grid(clahe_tile_grid, "make_channels (clahe_tile_grid)")
    _check_tile_grid(ahe_tile_grid, "make_channels (ahe_tile_grid)")
    _check_gamma(beasf_gamma, "make_channels")
    settings = ChannelSettings(float(clahe_clip_limit), int(clahe_tile_grid), int(ahe_tile_grid), float(beasf_gamma))

    shape = (len(channels), size, size)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)  # (C, size, size)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"make_channels: out must be a C-contiguous uint8 array of shape {shape}, got {out.dtype} {out.shape}")
    # Resize once into the first "raw" slot if there is one, else into a scratch buffer.
    raw_index = channels.index("raw") if "raw" in channels else None
    resized = _resize_area(image, size, dst=out[raw_index] if raw_index is not None else None)
    for i, name in enumerate(channels):
        if i != raw_index:
            CHANNELS[name](resized, settings, out[i])
    return out


def channels_from_config(image: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None) -> np.ndarray:
    """`make_channels` with the settings of a `PreprocessConfig` (uint8 (C, size, size), in `out` if given)."""
    # ChannelSettings' fields are PreprocessConfig's enhancement settings, under the same names.
    settings = {f.name: getattr(cfg, f.name) for f in fields(ChannelSettings)}
    return make_channels(image, cfg.channels, cfg.image_size_px, out=out, **settings)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a binary mask (H, W) to uint8 {0, 1} (size, size), on the same grid as `make_channels`.

    Any non-zero input value counts as foreground, so {0, 1}, {0, 255} and bool masks all work.

    The mask is area-resized as float (the fraction of each output cell the lesion covers, the
    same footprint INTER_AREA gives the image) and kept where that is at least one half. Nearest-
    neighbour sampling would take the first source pixel of each cell rather than its centre: at
    1024 -> 128 the mask lands 0.44 px up and left of the image. When no cell reaches one half
    but the mask is not empty (a lesion smaller than half a cell), the most-covered cells are
    kept: the image stays positive at training size, as its cached label says.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.size == 0:
        got = f"shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"resize_mask: expected a non-empty (H, W) mask, got {got}")
    if int(size) != size or size < 1:
        raise ValueError(f"resize_mask: size must be a positive integer, got {size!r}")
    size = int(size)
    binary = mask != 0  # (H, W) bool
    if binary.shape == (size, size):
        return np.ascontiguousarray(binary.view(np.uint8))
    coverage = cv2.resize(binary.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)  # (S, S) in [0, 1]
    out = coverage >= 0.5
    if not out.any() and binary.any():
        out = coverage >= coverage.max()
    return out.view(np.uint8)


__all__ = [
    "CHANNELS",
    "ChannelSettings",
    "ahe",
    "beasf",
    "beasf_lut",
    "channels_from_config",
    "clahe",
    "he",
    "make_channels",
    "register_channel",
    "resize_mask",
]
