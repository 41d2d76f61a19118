"""Synthetic SIIM-layout dataset: real JPEG-baseline DICOMs of drawn chest radiographs + an RLE CSV.

`make demo`, the tests and the benchmarks need data that has the exact shape of the Kaggle set
(`dicom-images-train/<Study>/<Series>/<SOP>.dcm` and `train-rle.csv`) and a lesion a small U-Net
can learn, without shipping the competition's images. The drawings are plain OpenCV/numpy:

- anatomy (body, lungs, mediastinum, heart, diaphragm) is computed on a coarse grid and upsampled,
  which gives the smooth borders of a radiograph for the price of a 256 px image;
- ribs, clavicles and lung markings (a branching vessel tree plus a band-pass reticular texture)
  are drawn at full resolution;
- a pneumothorax collapses one lung towards its medial base: the gap between the chest wall and
  the collapsed lung loses its markings, turns slightly darker, and a thin bright visceral
  pleural line bounds it on the inside; the collapsed lung keeps its (compressed) markings.

Everything is deterministic for a seed: every image has its own generator seeded from
(seed, patient, image), so the bytes do not depend on the number of worker processes.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import cv2
import numpy as np

# Layout of the Kaggle download, kept so that the ingest code is exercised on the real paths.
IMAGES_DIR = "dicom-images-train"
LABELS_FILE = "train-rle.csv"
_UID_ROOT = "1.2.276.0.7230010.3.1"
_COARSE_PX = 256  # grid of the smooth anatomy; upsampled to the image size


@dataclass(frozen=True)
class SynthSummary:
    out: str
    images: int
    positive: int
    patients: int
    rows: int  # CSV rows (one per annotation; negatives have one "-1" row)


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def draw_build(rng: np.random.Generator) -> dict[str, float]:
    """Body build shared by all radiographs of one patient (sizes as fractions of the film)."""
    return {
        "body_half_width": float(rng.uniform(0.43, 0.52)),
        "shoulder_y": float(rng.uniform(0.0, 0.05)),
        "shoulder_slope": float(rng.uniform(0.12, 0.2)),
        "neck_half_width": float(rng.uniform(0.09, 0.12)),
        "lung_dx": float(rng.uniform(0.20, 0.23)),  # lung centre distance from the midline
        "lung_half_width": float(rng.uniform(0.15, 0.18)),
        "lung_top": float(rng.uniform(0.08, 0.14)),
        "lung_bottom": float(rng.uniform(0.76, 0.86)),  # costophrenic angles
        "dome_height": float(rng.uniform(0.09, 0.13)),
        "mediastinum_half_width": float(rng.uniform(0.055, 0.07)),
        "heart_half_width": float(rng.uniform(0.15, 0.19)),
        "heart_half_height": float(rng.uniform(0.13, 0.16)),
        "soft_tissue": float(rng.uniform(0.62, 0.72)),
        "lung_depth": float(rng.uniform(0.28, 0.36)),  # how much darker the aerated lung is
        "rib_spacing": float(rng.uniform(0.064, 0.074)),
        "female": float(rng.random() < 0.5),
    }


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres in film fractions.  (n, n) each
    ax = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.meshgrid(ax, ax)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _anatomy(b: dict[str, float], n: int) -> dict[str, np.ndarray]:
    """Smooth anatomy on an (n, n) grid: soft lung masks (2, n, n) and the base density (n, n)."""
    u, v = _grid(n)
    edge = 0.01  # soft border width of the anatomy, film fraction
    dx = np.abs(u - 0.5)

    # Body: the neck rises to the top of the film, the shoulders slope down to the arms.
    bh, nh = b["body_half_width"], b["neck_half_width"]
    t = np.clip((dx - nh) / (bh - nh), 0.0, 1.5)
    top_edge = np.where(dx < nh, -1.0, b["shoulder_y"] + b["shoulder_slope"] * t**1.5)
    half = bh + 0.02 * np.clip(v - 0.3, 0, 1)
    body = _smoothstep(top_edge - edge, top_edge + 2 * edge, v) * _smoothstep(half + edge, half - 2 * edge, dx)
    thickness = np.sqrt(np.clip(1.0 - (dx / (half + 0.04)) ** 2, 0.0, 1.0))
    tissue = b["soft_tissue"] * (0.78 + 0.22 * thickness)
    # Humeral heads at the upper corners.
    for side in (-1.0, 1.0):
        hx, hy = 0.5 + side * (bh + 0.01), b["shoulder_y"] + b["shoulder_slope"] + 0.06
        r = np.sqrt(((u - hx) / 0.06) ** 2 + ((v - hy) / 0.08) ** 2)
        tissue = tissue + 0.08 * _smoothstep(1.1, 0.8, r)
    # Structures are blended towards their own density rather than added, so overlaps
    # (heart over liver, column over heart) do not saturate.
    top, bottom = b["lung_top"], b["lung_bottom"]
    dense = b["soft_tissue"] + 0.18  # mediastinum, heart, liver
    abdomen = _smoothstep(bottom - 0.1, bottom + 0.04, v)
    tissue = tissue + (dense - tissue) * abdomen

    # Mediastinum: a bright central column widening towards the heart, spine and trachea in it.
    med = b["mediastinum_half_width"] * (1.0 + 0.3 * np.clip((v - top) / 0.5, 0, 1))
    # The column fades into the neck's soft tissue above the apices.
    column = _smoothstep(med + 0.025, med - 0.01, dx) * _smoothstep(top - 0.08, top + 0.04, v)
    # Heart: its left border sweeps from the hilum down and out to the diaphragm (image right).
    hcx, hcy = 0.5 + 0.05, bottom + 0.01
    hw, hh = b["heart_half_width"], b["heart_half_height"] + 0.07
    rh = np.sqrt(((u - hcx) / hw) ** 2 + ((v - hcy) / hh) ** 2)
    heart = _smoothstep(1.08, 0.92, rh) * _smoothstep(-0.06, 0.0, u - 0.5)
    centre = np.maximum(column, heart)
    tissue = tissue + (dense - tissue) * centre
    tissue = tissue + 0.06 * _smoothstep(0.04, 0.025, dx)  # spine
    trachea = _smoothstep(0.02, 0.01, dx) * _smoothstep(top + 0.22, top + 0.12, v)
    tissue = tissue - 0.10 * trachea
    density = 0.03 + body * tissue

    lungs = []
    for side in (-1.0, 1.0):  # image left (patient right), image right (patient left)
        cx = 0.5 + side * b["lung_dx"]
        cy = bottom + 0.10
        ay = cy - top
        # Lateral wall slopes outward going down: shift the ellipse centre medially at the top.
        shift = side * 0.035 * np.clip((cy - v) / ay, 0.0, 1.0) ** 2
        r = np.sqrt(((u - cx + shift) / b["lung_half_width"]) ** 2 + ((v - cy) / ay) ** 2)
        outline = _smoothstep(1.0 + 0.04, 1.0 - 0.04, r)
        # Diaphragm dome: highest in the middle of the lung, meeting the lateral wall at an acute
        # angle (the costophrenic angle).  The left hemidiaphragm lies a little lower.
        dome = bottom + (0.015 if side > 0 else 0.0) - b["dome_height"] * np.clip(
            1.0 - ((u - cx + side * 0.02) / (b["lung_half_width"] * 1.1)) ** 2, 0, 1
        )
        above = _smoothstep(dome + edge, dome - edge, v)
        medial = _smoothstep(med + 0.012, med + 0.03, dx) * (side * (u - 0.5) > 0)
        lung = outline * above * medial
        if side > 0:
            lung = lung * (1.0 - heart)
        lungs.append(lung.astype(np.float32))
    return {"density": density.astype(np.float32), "lungs": np.stack(lungs)}  # (n, n), (2, n, n)


def _draw_ribs(b: dict[str, float], size: int, rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs, fainter anterior ribs and clavicles as thick curves. (size, size) uint8"""
    canvas = np.zeros((size, size), np.uint8)
    s = size
    thick = max(1, int(round(0.024 * s)))
    t = np.linspace(0.0, 1.0, 40)

    def stroke(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, width: int, value: int, cortex: bool) -> None:
        pts = np.round(np.stack([xs, ys], axis=1) * s).astype(np.int32)
        cv2.polylines(img, [pts], False, value, width, cv2.LINE_AA)
        if cortex:  # cortices brighter than the medullary cavity: thin lines along both edges
            d = np.gradient(np.stack([xs, ys], axis=1), axis=0)
            nrm = np.stack([-d[:, 1], d[:, 0]], axis=1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
            for off in (-0.5, 0.5):
                edge = np.round((np.stack([xs, ys], axis=1) + nrm * off * width / s) * s).astype(np.int32)
                cv2.polylines(img, [edge], False, 235, max(1, width // 6), cv2.LINE_AA)

    for side in (-1, 1):
        spine_x = 0.5 + side * 0.03
        reach = b["lung_dx"] + b["lung_half_width"] + 0.035 - 0.03
        y = b["lung_top"] - 0.03
        k = 0
        while y < b["lung_bottom"] - 0.12 and k < 10:
            # Posterior rib: rises from the spine, peaks over the inner lung, slopes down and turns
            # vertical at the lateral wall.
            drop = rng.uniform(0.15, 0.2) * (0.9 + 0.3 * k / 10)
            r = reach * rng.uniform(0.97, 1.03)
            xs = spine_x + side * r * np.sin(0.5 * np.pi * t)
            ys = y + drop * t**1.8 - rng.uniform(0.025, 0.035) * np.sin(np.pi * t**0.5)
            stroke(canvas, xs, ys, thick + int(0.004 * s * k / 4), 190, True)
            y += b["rib_spacing"] * (1.0 + 0.1 * k / 10) * rng.uniform(0.95, 1.05)
            k += 1
        # Anterior ribs: fainter, descending from the lateral wall towards the midline.
        anterior = np.zeros_like(canvas)
        y = b["lung_top"] + 0.07
        for _ in range(5):
            lateral_x = spine_x + side * reach * 0.97
            xs = lateral_x - side * reach * 0.7 * t
            ys = y + 0.11 * t**1.3 - 0.02 * np.sin(np.pi * t)
            stroke(anterior, xs, ys, thick, 255, False)
            y += b["rib_spacing"] * 1.6
        canvas = np.maximum(canvas, (anterior * 0.35).astype(np.uint8))
        # Clavicle: from the shoulder to the manubrium, bowing upward over the apex.
        p0 = np.array([0.5 + side * (b["body_half_width"] - 0.02), b["shoulder_y"] + b["shoulder_slope"] * 0.6])
        p1 = np.array([0.5 + side * 0.05, b["lung_top"] + 0.05])
        pm = np.array([(p0[0] + p1[0]) / 2, min(p0[1], p1[1]) - 0.03])
        tt = t[:, None]
        curve = (1 - tt) ** 2 * p0 + 2 * tt * (1 - tt) * pm + tt**2 * p1
        stroke(canvas, curve[:, 0], curve[:, 1], thick, 200, True)
    return canvas


def _rotate(d: np.ndarray, angle_rad: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return np.stack([d[:, 0] * c - d[:, 1] * s, d[:, 0] * s + d[:, 1] * c], axis=1)


def _draw_vessels(b: dict[str, float], size: int, rng: np.random.Generator) -> np.ndarray:
    """Lung markings: a branching vessel tree from each hilum, thinning and fading outwards. (size, size)

    Hand-written because no library draws vascular trees. The tree grows one generation at a
    time over arrays of branch tips (every branch of a generation shares width and intensity),
    so each generation is one vectorised step and one `cv2.polylines` call.
    """
    starts, dirs = [], []
    for side in (-1.0, 1.0):
        hilum = (
            0.5 + side * (b["mediastinum_half_width"] + 0.05),
            b["lung_top"] + 0.42 * (b["lung_bottom"] - b["lung_top"]),
        )
        n_trunks = int(rng.integers(7, 10))
        # Fan from up-lateral through lateral to down (angles in image coordinates, y down).
        theta = np.radians(np.linspace(-80, 85, n_trunks) + rng.normal(0, 6, n_trunks))
        dirs.append(np.stack([side * np.cos(theta), np.sin(theta)], axis=1))
        starts.append(np.tile(hilum, (n_trunks, 1)))
    pos, d = np.concatenate(starts), np.concatenate(dirs)  # (N, 2) each
    length = 0.06 * rng.uniform(0.8, 1.2, len(pos))  # (N,)
    stretch = np.array([1.0, 1.6])  # the lungs are taller than wide
    generations = 8
    canvas = np.zeros((size, size), np.uint8)
    segments = []
    for gen in range(generations):
        d = _rotate(d, np.radians(rng.normal(0, 12, len(d))))  # vessels curve a little
        end = pos + d * length[:, None] * stretch
        segments.append(np.stack([pos, end], axis=1))  # (N, 2, 2)
        spread = np.radians(rng.uniform(12, 32, (len(d), 2)) * np.array([-1.0, 1.0]))  # (N, 2)
        d = _rotate(np.repeat(d, 2, axis=0), spread.ravel())
        pos = np.repeat(end, 2, axis=0)
        length = np.repeat(length, 2) * rng.uniform(0.76, 0.9, 2 * len(length))
    # Faint generations first, so trunks are not notched by the branches drawn over them.
    for gen in reversed(range(generations)):
        width = max(1, int(round(0.007 * 0.75**gen * size)))
        pts = np.round(segments[gen] * size).astype(np.int32)
        cv2.polylines(canvas, list(pts), False, int(255 * 0.85**gen), width, cv2.LINE_AA)
    return canvas


def _bandpass_noise(rng: np.random.Generator, size: int, scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std texture with blobs about `scale_px` wide. (size, size)"""
    n = max(16, size // 2)
    white = rng.standard_normal((n, n), dtype=np.float32)
    sig = max(0.5, scale_px * n / size / 2)
    band = cv2.GaussianBlur(white, (0, 0), sig) - cv2.GaussianBlur(white, (0, 0), sig * 2.5)
    band = cv2.resize(band, (size, size), interpolation=cv2.INTER_LINEAR)
    return band / (band.std() + 1e-6)


def make_radiograph(
    rng: np.random.Generator, size: int = 1024, build: dict[str, float] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one chest radiograph.

    Returns the image, uint8 (size, size), and its geometry: `lungs` (2, size, size) uint8 {0,1}
    field masks (image left, image right), `lung_soft` (2, size, size) float32, `markings`
    (2, size, size) float32, the grey levels each lung's markings added to the image,
    `affine` (2, 3) canonical→image, `build`, `view`. `build` (from `draw_build`) fixes the
    body of one patient; per image the position, scale, rotation and contrast vary.
    """
    if size < 32:
        raise ValueError(f"make_radiograph: size={size} px is too small (need >= 32)")
    b = draw_build(rng) if build is None else build
    n = min(size, _COARSE_PX)
    anat = _anatomy(b, n)
    density = cv2.resize(anat["density"], (size, size), interpolation=cv2.INTER_CUBIC)
    lung_soft = np.stack(
        [cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC) for m in anat["lungs"]]
    ).clip(0.0, 1.0)  # (2, size, size)
    lung_any = lung_soft.max(axis=0)

    # Aerated lung is darker; less so at the base and the apex (overlying soft tissue, breasts).
    _, v = _grid(size)
    profile = 1.0 - 0.3 * _smoothstep(b["lung_bottom"] - 0.3, b["lung_bottom"] + 0.02, v)
    profile -= 0.2 * _smoothstep(b["lung_top"] + 0.1, b["lung_top"], v)
    if b["female"]:
        profile -= 0.2 * _smoothstep(b["lung_bottom"] - 0.25, b["lung_bottom"] - 0.08, v)
    density = density - b["lung_depth"] * lung_any * profile

    ribs = _draw_ribs(b, size, rng).astype(np.float32) / 255.0
    ribs = cv2.GaussianBlur(ribs, (0, 0), max(0.7, 0.002 * size))
    density = density + 0.11 * ribs * (0.35 + 0.65 * lung_any)

    # Markings: vessels dense near the hilum plus a fine reticular texture everywhere in the lung.
    vessels = _draw_vessels(b, size, rng).astype(np.float32) / 255.0
    vessels = cv2.GaussianBlur(vessels, (0, 0), max(0.6, 0.0018 * size))
    texture = _bandpass_noise(rng, size, scale_px=0.01 * size)
    markings_canon = 0.08 * vessels + 0.022 * texture  # density units

    # Per-image pose: a few degrees of rotation, scale and shift, applied to all layers at once.
    angle = float(rng.uniform(-4.0, 4.0))
    scale = float(rng.uniform(0.93, 1.07))
    shift = rng.uniform(-0.035, 0.035, size=2) * size
    affine = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    affine[:, 2] += shift
    layers = np.dstack([density, markings_canon * lung_soft[0], markings_canon * lung_soft[1], lung_soft[0]])
    layers = cv2.warpAffine(layers, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    lung1 = cv2.warpAffine(lung_soft[1], affine, (size, size), flags=cv2.INTER_LINEAR)
    density = layers[..., 0]
    markings = np.stack([layers[..., 1], layers[..., 2]])
    lung_soft = np.stack([layers[..., 3], lung1]).clip(0.0, 1.0)

    # Contrast: a random window and gamma on the smooth base; markings and grain are added in
    # grey levels afterwards, so a pneumothorax can later remove exactly what was added.
    lo = float(rng.uniform(0.0, 0.06))
    hi = float(rng.uniform(0.92, 1.02))
    gamma = float(rng.uniform(0.8, 1.25))
    gain = 255.0 / (hi - lo)
    base = 255.0 * np.clip((density - lo) / (hi - lo), 0.0, 1.0) ** gamma
    markings = markings * gain * float(rng.uniform(0.85, 1.2))
    # Film grain in grey levels at 1024 px; a smaller film averages it like a downscaled one would.
    grain_sigma = float(rng.uniform(1.5, 3.0)) * min(1.0, size / 1024) ** 0.5
    grain = rng.standard_normal((size, size), dtype=np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 0.7) * (grain_sigma / 0.4)  # blur(σ=0.7) leaves ~0.4 std

    view = "PA" if rng.random() < 0.55 else "AP"
    image = np.clip(np.round(base + markings.sum(axis=0) + grain), 0, 255).astype(np.uint8)
    if rng.random() < 0.6:  # a side marker, as on most films
        right = rng.random() < 0.5
        corner = (int((0.88 if right else 0.06) * size), int(0.08 * size))
        cv2.putText(image, "L" if right else "R", corner, cv2.FONT_HERSHEY_SIMPLEX,
                    size / 600, 250, max(1, size // 300), cv2.LINE_AA)
    geometry = {
        "lungs": (lung_soft > 0.5).astype(np.uint8),
        "lung_soft": lung_soft.astype(np.float32),
        "markings": markings.astype(np.float32),
        "affine": affine,
        "build": b,
        "view": view,
    }
    return image, geometry


def add_pneumothorax(
    image: np.ndarray,
    geometry: dict[str, Any],
    rng: np.random.Generator,
    size: int,
    pieces: int | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Collapse one lung of `image` (from `make_radiograph`) and return the new image and its
    annotation masks: `pieces` (1 to 3; None = 1 with p=0.7, 2 or 3 otherwise) overlapping
    uint8 {0,1} (size, size) masks whose union is the lesion.
    """
    if image.shape != (size, size):
        raise ValueError(f"add_pneumothorax: image shape {image.shape} does not match size={size}")
    if pieces is not None and pieces not in (1, 2, 3):
        raise ValueError(f"add_pneumothorax: pieces must be 1, 2 or 3, got {pieces!r}")
    side = int(rng.integers(0, 2))
    ys, xs = np.nonzero(geometry["lungs"][side])
    if len(xs) < 50:
        raise ValueError(f"add_pneumothorax: lung field {side} has only {len(xs)} px")
    # Work in the lung's bounding box (plus a margin for the blurs): a fifth of the pixels.
    m = max(4, size // 50)
    r0, r1 = max(0, ys.min() - m), min(size, ys.max() + m + 1)
    c0, c1 = max(0, xs.min() - m), min(size, xs.max() + m + 1)
    lung = np.ascontiguousarray(geometry["lungs"][side][r0:r1, c0:c1])  # (h, w)
    markings = np.ascontiguousarray(geometry["markings"][side][r0:r1, c0:c1])
    field = geometry["lung_soft"][side][r0:r1, c0:c1]  # (h, w) soft lung field
    y0, y1 = float(ys.min() - r0), float(ys.max() - r0)
    h, w = lung.shape

    # The lung stays tethered at the hilum and the base, so the air collects at the apex and
    # along the lateral wall: shrink the lung towards its medial base, fully at the top and
    # not at all at the bottom, which gives a crescent tapering into the costophrenic angle.
    ax_ = float((xs.max() if side == 0 else xs.min()) - c0)
    ay_ = y1
    severity = float(rng.uniform(0.0, 1.0)) ** 2  # many small, some large
    s_top = 0.96 - 0.46 * severity
    lateral = float(rng.uniform(0.3, 1.0))  # how far the collapse reaches down the lateral wall
    xx, yy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    up = _smoothstep(y1, y1 - lateral * (y1 - y0) - 1e-3, yy)  # 1 high up, 0 at the base
    shrink_y = 1.0 - (1.0 - s_top) * up
    shrink_x = 1.0 - (1.0 - s_top) * up * float(rng.uniform(0.6, 1.0))
    # Output pixel p shows the lung point anchor + (p - anchor) / shrink.  (h, w) maps
    map_x = (ax_ + (xx - ax_) / shrink_x).astype(np.float32)
    map_y = (ay_ + (yy - ay_) / shrink_y).astype(np.float32)
    collapsed = cv2.remap(lung, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT) & lung
    lesion = (lung & (1 - collapsed)).astype(np.uint8)
    # Keep the one crescent: drop slivers where the shrunk outline grazes the original one.
    lesion = cv2.morphologyEx(lesion, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(lesion, connectivity=8)
    if count < 2:
        raise ValueError(f"add_pneumothorax: collapse (top scale {s_top:.2f}) left no lesion at size={size}")
    lesion = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    collapsed = (lung & (1 - lesion)).astype(np.uint8)

    soft = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), max(0.5, 0.0015 * size))
    # The collapsed lung keeps its markings, squeezed into its smaller outline; the air gap
    # has none, is more lucent, and the collapsed lung a little denser.
    # (Masked by the field: where the medial border is concave, at the heart, the map would
    # otherwise pull markings out of the lung onto the mediastinum.)
    squeezed = cv2.remap(markings, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT) * field
    out = image[r0:r1, c0:c1].astype(np.float32) - markings + squeezed * (1.0 - soft)
    out -= float(rng.uniform(6.0, 16.0)) * soft
    out += float(rng.uniform(2.0, 6.0)) * cv2.GaussianBlur(collapsed.astype(np.float32), (0, 0), 2.0) * field
    # Visceral pleural line: the edge of the collapsed lung where it faces the air, not where
    # the lung still touches the chest wall.
    r = max(1, int(round(0.0025 * size)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    rim = (cv2.dilate(lesion, k) & collapsed & cv2.erode(lung, k, iterations=2)).astype(np.float32)
    rim = cv2.GaussianBlur(rim, (0, 0), max(0.5, 0.001 * size))
    out += float(rng.uniform(30.0, 50.0)) * rim

    result = image.copy()
    result[r0:r1, c0:c1] = np.clip(np.round(out), 0, 255).astype(np.uint8)
    full = np.zeros((size, size), np.uint8)
    full[r0:r1, c0:c1] = lesion
    if pieces is None:
        pieces = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    return result, _split(full, (ax_ + c0, ay_ + r0), pieces, rng)


def _split(lesion: np.ndarray, anchor: tuple[float, float], k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split a lesion into k overlapping angular sectors around the anchor (their union is the lesion)."""
    if k == 1:
        return [lesion]
    ys, xs = np.nonzero(lesion)
    # Angle from "straight up" as seen from the anchor (the lung's medial base): the lesion lies
    # above and lateral of it, so the angles never wrap around +-pi.  (P,)
    ang = np.arctan2(xs - anchor[0], anchor[1] - ys)
    cuts = np.quantile(ang, np.sort(rng.uniform(0.25, 0.75, k - 1)) if k == 2 else [1 / 3, 2 / 3])
    span = float(ang.max() - ang.min())
    overlap = 0.04 * span
    bounds = [ang.min() - 1.0, *cuts, ang.max() + 1.0]
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = (ang >= lo - overlap) & (ang <= hi + overlap)
        piece = np.zeros_like(lesion)
        piece[ys[sel], xs[sel]] = 1
        pieces.append(piece)
    return pieces


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

# Pixel spacings (mm) that occur in the SIIM files; the synthetic films draw from them.
_SPACINGS_MM = (0.139, 0.143, 0.168, 0.171, 0.194311)
_MULTI_ROW_FRACTION = 0.3  # positives annotated as 2-3 overlapping pieces, as in the real CSV


@dataclass(frozen=True)
class PlannedImage:
    """One image of the dataset: everything a worker needs to render, encode and write it."""

    index: int
    patient_index: int
    seed: int
    size: int
    pieces: int  # 0 = negative
    image_id: str
    study_uid: str
    series_uid: str
    patient_id: str
    sex: str
    age: int
    spacing_mm: float
    path: str  # full path or URI of the .dcm


def plan(
    out: str, n: int, size: int, positive_rate: float, seed: int, images_per_patient: tuple[int, int]
) -> list[PlannedImage]:
    """Patients, labels and identifiers of the whole dataset, drawn from one generator; the
    pixels come later, per image (`render`), so planning 10,000 images is instant."""
    if n < 1:
        raise ValueError(f"synth: n must be >= 1, got {n}")
    if size < 64:
        raise ValueError(f"synth: size must be >= 64 px, got {size}")
    if not 0.0 <= positive_rate <= 1.0:
        raise ValueError(f"synth: positive_rate must be in [0, 1], got {positive_rate}")
    if seed < 0:
        raise ValueError(f"synth: seed must be >= 0, got {seed}")
    lo, hi = images_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(
            f"synth: images_per_patient must be (lo, hi) with 1 <= lo <= hi, got {images_per_patient}"
        )
    rng = np.random.default_rng([seed, 0])
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(int(rng.integers(lo, hi + 1)))
    counts[-1] -= sum(counts) - n
    patient_of = np.repeat(np.arange(len(counts)), counts)  # (n,)
    # Patient's images are not consecutive in SIIM (ids are per image), so shuffle the order.
    patient_of = patient_of[rng.permutation(n)]

    n_pos = int(round(n * positive_rate))
    positive = rng.permutation(n)[:n_pos]
    pieces = np.zeros(n, dtype=np.int64)
    pieces[positive] = 1
    n_multi = int(round(n_pos * _MULTI_ROW_FRACTION))
    pieces[positive[:n_multi]] = rng.choice([2, 3], size=n_multi, p=[0.7, 0.3])

    patients = []
    for _ in counts:
        patients.append({
            "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            "sex": "M" if rng.random() < 0.5 else "F",
            "age": int(rng.integers(18, 88)),
        })
    # SIIM UIDs: 1.2.276.0.7230010.3.1.<kind>.<X>.<Y>.<T>.<F>, kind 4 = SOP instance, 2 = study
    # (last part - 1), 3 = series (last part - 2). X is the dataset's, Y the image number.
    x = int(rng.integers(1_000_000, 10_000_000))
    t0 = int(rng.integers(1_500_000_000, 1_600_000_000))
    tasks = []
    for i in range(n):
        p = int(patient_of[i])
        stem = f"{x}.{1000 + i}.{t0 + i // 3}"
        last = int(rng.integers(100_002, 1_000_000))
        sop = f"{_UID_ROOT}.4.{stem}.{last}"
        study = f"{_UID_ROOT}.2.{stem}.{last - 1}"
        series = f"{_UID_ROOT}.3.{stem}.{last - 2}"
        tasks.append(PlannedImage(
            index=i, patient_index=p, seed=seed, size=size, pieces=int(pieces[i]),
            image_id=sop, study_uid=study, series_uid=series,
            patient_id=patients[p]["id"], sex=patients[p]["sex"],
            age=min(90, patients[p]["age"] + int(rng.integers(0, 3))),  # follow-ups, years apart
            spacing_mm=float(rng.choice(_SPACINGS_MM)),
            path=_join(out, IMAGES_DIR, study, series, f"{sop}.dcm"),
        ))
    return tasks


def render(task: PlannedImage) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """(image, view, annotation masks) of one planned image; the same bytes on every machine."""
    build = draw_build(np.random.default_rng([task.seed, 1, task.patient_index]))
    rng = np.random.default_rng([task.seed, 2, task.index])
    for attempt in range(5):  # a degenerate collapse (tiny lesion) is redrawn, deterministically
        image, geometry = make_radiograph(rng, task.size, build)
        if not task.pieces:
            return image, geometry["view"], []
        try:
            image, masks = add_pneumothorax(image, geometry, rng, task.size, pieces=task.pieces)
            return image, geometry["view"], masks
        except ValueError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _write_one(task: PlannedImage) -> list[str]:
    """Render, encode and write one DICOM; returns its CSV rows."""
    from . import dicom, masks, storage

    image, view, annotations = render(task)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # SIIM stores PatientAge as bare years ('38'), which pydicom flags as an invalid AS
        # value on every file; the files copy SIIM on purpose, so the warning is noise here.
        warnings.filterwarnings("ignore", message="Invalid value for VR AS")
        dicom.write_jpeg_dicom(
            buffer, image, image_id=task.image_id, patient_id=task.patient_id, study_uid=task.study_uid,
            series_uid=task.series_uid, sex=task.sex, age=task.age, view=view,
            spacing_mm=task.spacing_mm, quality=95,
        )
    _write_bytes(task.path, buffer.getvalue(), storage)
    if not annotations:
        return [f"{task.image_id},{masks.EMPTY_RLE}"]
    # The real train-rle.csv writes positive rows with a space after the comma.
    return [f"{task.image_id}, {masks.encode_rle(m)}" for m in annotations]


def _join(out: str, *parts: str) -> str:
    return "/".join([out.rstrip("/"), *parts]) if "://" in out else os.path.join(out, *parts)


def _write_bytes(path: str, data: bytes, storage: Any) -> None:
    if storage.is_uri(path):
        filesystem, inner = storage.filesystem_and_path(path)
        if filesystem.type_name == "local":  # file:// URIs: object stores need no folders
            filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(inner) as stream:
            stream.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def generate(
    out: str,
    n: int = 200,
    size: int = 1024,
    positive_rate: float = 0.22,
    seed: int = 0,
    images_per_patient: tuple[int, int] = (1, 4),
    workers: int = 1,
) -> SynthSummary:
    """Write a synthetic SIIM-layout dataset to `out` (a folder or s3://bucket/prefix).

    `out/dicom-images-train/<Study>/<Series>/<SOP>.dcm` are JPEG Baseline MONOCHROME2 files and
    `out/train-rle.csv` has one row per annotation (`-1` for negatives). Exactly
    round(n * positive_rate) images are positive, about 30% of them with 2-3 rows. The same
    arguments give byte-identical files, whatever `workers` (processes) is. Existing files with
    the same names are overwritten; nothing else in `out` is touched. `workers` > 1 starts
    processes with "spawn", so a calling script needs the `if __name__ == "__main__":` guard.
    """
    if workers < 1:
        raise ValueError(f"generate: workers must be >= 1, got {workers}")
    from . import storage

    tasks = plan(str(out), n, size, positive_rate, seed, tuple(images_per_patient))
    if workers == 1:
        rows = [_write_one(t) for t in tasks]
    else:
        # spawn, not fork: the parent may hold threads (torch, pyarrow) that fork would copy mid-lock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_write_one, tasks, chunksize=max(1, n // (4 * workers))))
    lines = [line for image_rows in rows for line in image_rows]
    text = "ImageId, EncodedPixels\n" + "".join(f"{line}\n" for line in lines)
    # Last and atomic: a dataset whose CSV exists is complete.
    storage.write_bytes_atomic(_join(str(out), LABELS_FILE), text.encode("ascii"))
    return SynthSummary(
        out=str(out),
        images=n,
        positive=sum(1 for t in tasks if t.pieces),
        patients=len({t.patient_index for t in tasks}),
        rows=len(lines),
    )
