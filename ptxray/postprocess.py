"""From probability maps to empty / non-empty masks: the decision rules and their threshold search.

One rule family covers every decision the project uses (all on the model's probability map at the
training size, quantised to uint8 levels 0..255, so the search and `ptxray predict` see the same
numbers):

    keep  = (#pixels with prob > top_score) >= min_area_px     # the "triplet" gate of the winning
            and cls_prob >= cls_threshold                      # SIIM solution, and/or the cls head
    mask  = prob > bin_threshold if keep else empty

`min_area_px = 0` switches the triplet gate off, `cls_threshold = 0` the classification gate. The
named rules are the corners of that family: `plain` (neither gate), `triplet`, `cls`, `both`.

Why histograms: every quantity a rule needs, for every threshold at once, is a cumulative sum of
two 256-bin histograms per image (all pixels, ground-truth pixels): `#(prob > t)` and
`#(prob > t and GT)`. The out-of-fold store keeps just those (2 KB an image, exact at the training
size), and the search over a whole grid is a few matrix products (`dice_table`).

The score is the competition's: per image 1 if both masks are empty, 0 if exactly one is, else
Dice; the mean over images.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ptxray import storage

N_LEVELS = 256  # uint8 probability levels: level = round(prob * 255)
RULES = ("plain", "triplet", "cls", "both")  # simplest first: ties go to the simpler rule
THRESHOLDS_FILE = "thresholds.json"
OOF_FILE = "oof/oof.npz"
THRESHOLDS_FORMAT = 1

# The winning SIIM solution's triplet (top score 0.75, min area 2000 px at 1024 px, binarise at 0.4);
# the area is scaled to the training size.
DEFAULT_TOP_SCORE = 0.75
DEFAULT_MIN_AREA_FRACTION = 2000 / 1024**2
DEFAULT_BIN_THRESHOLD = 0.4


def quantize(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (any shape, float) -> uint8 levels round(prob * 255), halves down.

    Halves round down so that `level >= first_level_above(t)` means `prob > t` at t = 0.5 exactly
    as the training metric's `logit > 0`: float32 sigmoid rounds logits within ~3e-8 of 0 to 0.5,
    which must not count as above it (round-half-to-even made 0.5 level 128, 'above'). Other
    thresholds decide at the midpoint between two levels, as before."""
    scaled = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0) * 255.0
    return np.ceil(scaled - 0.5).astype(np.uint8)


def first_level_above(threshold: float | np.ndarray) -> np.ndarray:
    """The lowest uint8 level counted as `prob > threshold`: floor(threshold * 255) + 1 (256 = none)."""
    t = np.asarray(threshold, dtype=np.float64)
    if np.any((t < 0) | (t > 1)) or np.any(np.isnan(t)):
        raise ValueError(f"thresholds must lie in [0, 1], got {threshold!r}")
    # The epsilon keeps 0.4 * 255 = 101.99999... from flooring to 101.
    return (np.floor(t * 255.0 + 1e-6) + 1).astype(np.int64)


def competition_dice(inter: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> np.ndarray:
    """Per-image Dice from pixel counts: 1 when both masks are empty, else 2|A∩B| / (|A| + |B|)."""
    inter, n_pred, n_true = (np.asarray(a, dtype=np.float64) for a in (inter, n_pred, n_true))
    denom = n_pred + n_true
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1.0), 1.0)


@dataclass(frozen=True)
class Thresholds:
    """One decision rule (see the module doc); `size_px` is the side the areas are counted at."""

    top_score: float
    min_area_px: int
    bin_threshold: float
    cls_threshold: float
    size_px: int
    rule: str = "triplet"
    source: str = "defaults"
    oof_dice: float | None = None  # the out-of-fold competition Dice this rule scored, if searched

    def __post_init__(self) -> None:
        for name in ("top_score", "bin_threshold", "cls_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Thresholds.{name}: must lie in [0, 1], got {v}")
        if self.min_area_px < 0 or self.size_px < 1:
            raise ValueError(f"Thresholds: min_area_px >= 0 and size_px >= 1, got {self.min_area_px}, {self.size_px}")

    def keep(self, prob_u8: np.ndarray, cls_prob: np.ndarray) -> np.ndarray:
        """Which images get a mask: prob_u8 uint8 (B, S, S), cls_prob (B,) -> bool (B,)."""
        self._check_size(prob_u8)
        n_top = (prob_u8 >= first_level_above(self.top_score)).reshape(len(prob_u8), -1).sum(axis=1)
        return (n_top >= self.min_area_px) & (np.asarray(cls_prob).reshape(-1) >= self.cls_threshold)

    def masks(self, prob_u8: np.ndarray, cls_prob: np.ndarray) -> np.ndarray:
        """The predicted masks at the model size: bool (B, S, S)."""
        keep = self.keep(prob_u8, cls_prob)
        return (prob_u8 >= first_level_above(self.bin_threshold)) & keep[:, None, None]

    def _check_size(self, prob_u8: np.ndarray) -> None:
        if prob_u8.dtype != np.uint8 or prob_u8.ndim != 3:
            raise ValueError(f"Thresholds: expected uint8 (B, S, S) probability levels, got {prob_u8.dtype} {prob_u8.shape}")
        if prob_u8.shape[1:] != (self.size_px, self.size_px):
            raise ValueError(
                f"Thresholds: min_area_px is counted at {self.size_px} px but the maps are {prob_u8.shape[1:]}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Thresholds":
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})


def default_thresholds(size_px: int) -> Thresholds:
    return Thresholds(
        top_score=DEFAULT_TOP_SCORE,
        min_area_px=int(round(DEFAULT_MIN_AREA_FRACTION * size_px * size_px)),
        bin_threshold=DEFAULT_BIN_THRESHOLD,
        cls_threshold=0.0,
        size_px=size_px,
        rule="triplet",
        source="defaults (the winning solution's triplet 0.75 / 2000 px at 1024 px / 0.4; no thresholds.json in the run)",
    )


# ---------------------------------------------------------------------------------------------
# Out-of-fold statistics


@dataclass
class OofStats:
    """Per image of the out-of-fold predictions: what the rules need, exactly, at the model size."""

    image_ids: np.ndarray  # str (N,)
    folds: np.ndarray  # int (N,) the fold whose model predicted the image (it was that fold's val split)
    cls_prob: np.ndarray  # float32 (N,) classification-head probability
    hist_all: np.ndarray  # int32 (N, 256) pixels per probability level
    hist_gt: np.ndarray  # int32 (N, 256) ground-truth pixels per probability level
    size_px: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def n_true(self) -> np.ndarray:  # (N,) ground-truth pixels
        return self.hist_gt.sum(axis=1)

    @property
    def positive(self) -> np.ndarray:  # bool (N,)
        return self.n_true > 0

    def counts_above(self) -> tuple[np.ndarray, np.ndarray]:
        """(#pixels, #GT pixels) with level >= k, for k = 0..256: int64 (N, 257) each."""

        def tail(h: np.ndarray) -> np.ndarray:
            c = np.cumsum(h[:, ::-1], axis=1, dtype=np.int64)[:, ::-1]
            return np.concatenate([c, np.zeros((len(h), 1), np.int64)], axis=1)

        return tail(self.hist_all), tail(self.hist_gt)

    def subset(self, sel: np.ndarray) -> "OofStats":
        return OofStats(
            self.image_ids[sel], self.folds[sel], self.cls_prob[sel], self.hist_all[sel], self.hist_gt[sel], self.size_px, dict(self.meta)
        )

    def save(self, uri: str) -> None:
        """One .npz (no pickles), written atomically (local rename or one S3 upload)."""
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            image_ids=self.image_ids.astype(str),
            folds=self.folds.astype(np.int16),
            cls_prob=self.cls_prob.astype(np.float32),
            hist_all=self.hist_all.astype(np.int32),
            hist_gt=self.hist_gt.astype(np.int32),
            size_px=np.int64(self.size_px),
            meta=np.array(json.dumps(self.meta, default=str)),
        )
        storage.write_bytes_atomic(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str) -> "OofStats":
        with storage.open_input_stream(uri) as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
            return cls(
                image_ids=data["image_ids"],
                folds=data["folds"].astype(np.int64),
                cls_prob=data["cls_prob"],
                hist_all=data["hist_all"],
                hist_gt=data["hist_gt"],
                size_px=int(data["size_px"]),
                meta=json.loads(str(data["meta"])),
            )

    @classmethod
    def concat(cls, parts: Sequence["OofStats"], meta: dict[str, Any] | None = None) -> "OofStats":
        if not parts:
            raise ValueError("OofStats.concat: nothing to concatenate")
        sizes = {p.size_px for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"OofStats.concat: parts at different sizes {sorted(sizes)}")
        return cls(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.folds for p in parts]),
            np.concatenate([p.cls_prob for p in parts]),
            np.concatenate([p.hist_all for p in parts]),
            np.concatenate([p.hist_gt for p in parts]),
            sizes.pop(),
            meta or {},
        )


def stats_from_probs(
    prob_u8: np.ndarray,  # uint8 (N, S, S)
    true_masks: np.ndarray,  # (N, S, S), non-zero = pneumothorax
    cls_prob: np.ndarray,  # (N,)
    image_ids: Sequence[str],
    folds: Sequence[int] | int,
) -> OofStats:
    """The per-image histograms of probability maps (and of their ground-truth pixels)."""
    prob_u8 = np.asarray(prob_u8)
    if prob_u8.dtype != np.uint8 or prob_u8.ndim != 3 or prob_u8.shape[1] != prob_u8.shape[2]:
        raise ValueError(f"stats_from_probs: expected uint8 (N, S, S) levels, got {prob_u8.dtype} {prob_u8.shape}")
    if np.shape(true_masks) != prob_u8.shape:
        raise ValueError(f"stats_from_probs: masks {np.shape(true_masks)} do not match maps {prob_u8.shape}")
    n = len(prob_u8)
    # One bincount for the whole batch: image i's levels are shifted into bins [256 i, 256 i + 256).
    idx = (prob_u8.reshape(n, -1).astype(np.int64) + N_LEVELS * np.arange(n)[:, None]).ravel()
    hist_all = np.bincount(idx, minlength=N_LEVELS * n).reshape(n, N_LEVELS)
    gt = (np.asarray(true_masks).reshape(n, -1) != 0).ravel()
    hist_gt = np.bincount(idx[gt], minlength=N_LEVELS * n).reshape(n, N_LEVELS)
    folds_arr = np.full(n, folds, np.int64) if np.isscalar(folds) else np.asarray(folds, np.int64)
    return OofStats(
        np.asarray(list(image_ids), dtype=str),
        folds_arr,
        np.asarray(cls_prob, np.float32).reshape(-1),
        hist_all.astype(np.int32),
        hist_gt.astype(np.int32),
        int(prob_u8.shape[1]),
    )


def per_image_dice(stats: OofStats, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(competition Dice (N,), kept = predicted non-empty (N,)) of the rule `th` on the OOF images."""
    if th.size_px != stats.size_px:
        raise ValueError(f"per_image_dice: thresholds counted at {th.size_px} px, OOF maps at {stats.size_px} px")
    ge_all, ge_gt = stats.counts_above()
    rows = np.arange(len(stats))
    n_top = ge_all[rows, int(first_level_above(th.top_score))]
    lv = int(first_level_above(th.bin_threshold))
    keep = (n_top >= th.min_area_px) & (stats.cls_prob >= th.cls_threshold)
    n_pred = np.where(keep, ge_all[:, lv], 0)
    inter = np.where(keep, ge_gt[:, lv], 0)
    return competition_dice(inter, n_pred, stats.n_true), keep & (n_pred > 0)


# ---------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class Grid:
    top_score: tuple[float, ...]
    min_area_px: tuple[int, ...]  # must hold 0 (the triplet gate off)
    bin_threshold: tuple[float, ...]
    cls_threshold: tuple[float, ...]  # must hold 0 (the classification gate off)

    def __post_init__(self) -> None:
        if 0 not in self.min_area_px or 0.0 not in self.cls_threshold:
            raise ValueError("Grid: min_area_px and cls_threshold must include 0 (the gate switched off)")
        for name in ("top_score", "bin_threshold", "cls_threshold"):
            first_level_above(np.asarray(getattr(self, name)))  # range check

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.top_score), len(self.min_area_px), len(self.bin_threshold), len(self.cls_threshold))

    def to_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in asdict(self).items()}


def default_grid(size_px: int) -> Grid:
    """Around the winning triplet; areas as fractions of the image (0.05 % .. 1 %) at `size_px`."""
    fractions = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01)
    areas = sorted({int(round(f * size_px * size_px)) for f in fractions})
    return Grid(
        top_score=tuple(round(0.5 + 0.05 * i, 2) for i in range(10)),  # 0.50 .. 0.95
        min_area_px=tuple(areas),
        bin_threshold=tuple(round(0.2 + 0.05 * i, 2) for i in range(11)),  # 0.20 .. 0.70
        cls_threshold=(0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    )


def dice_table(stats: OofStats, grid: Grid) -> np.ndarray:
    """Mean competition Dice of every grid point: float64 (n_top, n_area, n_bin, n_cls).

    mean_i[keep_i ? dice_i : empty_i] = mean(empty) + mean_i[keep_i * (dice_i - empty_i)], and
    keep = triplet gate (top, area) x cls gate (cls), so each cls value is one (N, top*area)^T @
    (N, bin) product instead of an (N x grid) array.
    """
    n = len(stats)
    if n == 0:
        raise ValueError("dice_table: no out-of-fold images")
    n1, n2, n3, n4 = grid.shape
    ge_all, ge_gt = stats.counts_above()
    n_true = stats.n_true.astype(np.float64)
    empty = (n_true == 0).astype(np.float64)  # (N,) the score of predicting empty
    n_top = ge_all[:, first_level_above(np.asarray(grid.top_score))]  # (N, n1)
    tri = (n_top[:, :, None] >= np.asarray(grid.min_area_px)[None, None, :]).reshape(n, n1 * n2).astype(np.float64)
    lv_bin = first_level_above(np.asarray(grid.bin_threshold))
    delta = competition_dice(ge_gt[:, lv_bin], ge_all[:, lv_bin], n_true[:, None]) - empty[:, None]  # (N, n3)
    cls_pass = (stats.cls_prob[:, None] >= np.asarray(grid.cls_threshold)[None, :]).astype(np.float64)  # (N, n4)
    table = np.empty((n1 * n2, n3, n4))
    for c in range(n4):
        table[:, :, c] = (tri * cls_pass[:, c : c + 1]).T @ delta
    return (empty.mean() + table / n).reshape(n1, n2, n3, n4)


def _rule_mask(grid: Grid, rule: str) -> np.ndarray:
    """bool (n_top, n_area, n_bin, n_cls): the grid points that belong to `rule`."""
    area_off = np.asarray(grid.min_area_px) == 0
    cls_off = np.asarray(grid.cls_threshold) == 0.0
    top_first = np.arange(len(grid.top_score)) == 0  # with the area gate off, top_score is moot
    if rule == "plain":
        m = (top_first[:, None, None, None] & area_off[None, :, None, None]) & cls_off[None, None, None, :]
    elif rule == "triplet":
        m = (~area_off)[None, :, None, None] & cls_off[None, None, None, :]
    elif rule == "cls":
        m = (top_first[:, None, None, None] & area_off[None, :, None, None]) & (~cls_off)[None, None, None, :]
    elif rule == "both":
        m = (~area_off)[None, :, None, None] & (~cls_off)[None, None, None, :]
    else:
        raise ValueError(f"unknown rule {rule!r}; choose from {list(RULES)}")
    return np.broadcast_to(m, grid.shape)


@dataclass
class SearchResult:
    grid: Grid
    table: np.ndarray  # (n_top, n_area, n_bin, n_cls) mean OOF competition Dice
    best: dict[str, Thresholds]  # per rule
    chosen: str  # the rule with the highest Dice (ties: the simpler rule)
    empty_dice: float  # predicting empty everywhere
    n_images: int
    n_positive: int

    @property
    def thresholds(self) -> Thresholds:
        return self.best[self.chosen]


def search_thresholds(stats: OofStats, grid: Grid | None = None, *, source: str = "out-of-fold search") -> SearchResult:
    """The best thresholds of each rule on the OOF predictions, and the rule that scores highest."""
    grid = grid or default_grid(stats.size_px)
    table = dice_table(stats, grid)
    best: dict[str, Thresholds] = {}
    for rule in RULES:
        scores = np.where(_rule_mask(grid, rule), table, -np.inf)
        if not np.isfinite(scores).any():
            continue  # e.g. a grid with only area 0 has no triplet points
        i, j, k, c = np.unravel_index(int(np.argmax(scores)), grid.shape)
        best[rule] = Thresholds(
            top_score=float(grid.top_score[i]),
            min_area_px=int(grid.min_area_px[j]),
            bin_threshold=float(grid.bin_threshold[k]),
            cls_threshold=float(grid.cls_threshold[c]),
            size_px=stats.size_px,
            rule=rule,
            source=source,
            oof_dice=float(table[i, j, k, c]),
        )
    top = max(b.oof_dice for b in best.values())
    chosen = next(r for r in RULES if r in best and best[r].oof_dice >= top - 1e-12)
    n_pos = int(stats.positive.sum())
    return SearchResult(grid, table, best, chosen, float((~stats.positive).mean()), len(stats), n_pos)


def save_search(result: SearchResult, uri: str, extra: dict[str, Any] | None = None) -> None:
    """thresholds.json: the chosen rule, the best of every rule, the grid and the Dice of every point."""
    doc = {
        "format": THRESHOLDS_FORMAT,
        "size_px": result.thresholds.size_px,
        "chosen": result.chosen,
        "thresholds": result.thresholds.to_dict(),
        "rules": {r: t.to_dict() for r, t in result.best.items()},
        "empty_dice": result.empty_dice,
        "n_images": result.n_images,
        "n_positive": result.n_positive,
        "grid": result.grid.to_dict(),
        "dice_axes": ["top_score", "min_area_px", "bin_threshold", "cls_threshold"],
        "dice": np.round(result.table, 6).tolist(),
        **(extra or {}),
    }
    storage.write_bytes_atomic(uri, json.dumps(doc, indent=1).encode())


def read_thresholds_doc(uri: str) -> dict[str, Any] | None:
    """The stored search (`save_search`'s document), or None when the file is absent."""
    try:
        doc = storage.read_json_object(uri)
    except FileNotFoundError:
        return None
    if doc.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"{uri}: unknown thresholds format {doc.get('format')!r}")
    if not isinstance(doc.get("rules"), dict) or doc.get("chosen") not in doc["rules"]:
        raise ValueError(f"{uri}: not a thresholds search (needs 'rules' and a 'chosen' rule among them); rerun `ptxray thresholds`")
    return doc


def thresholds_from_doc(doc: dict[str, Any], uri: str, rule: str = "chosen") -> Thresholds:
    """The thresholds of `rule` ("chosen" = the best rule) in a stored search read from `uri`."""
    if rule == "chosen":
        rule = doc["chosen"]
    if rule not in doc["rules"]:
        raise ValueError(f"{uri}: no thresholds for rule {rule!r} (stored: {sorted(doc['rules'])})")
    try:
        return Thresholds.from_dict({**doc["rules"][rule], "source": uri})
    except TypeError as e:  # a missing or unexpected field: Thresholds(...) names it
        raise ValueError(f"{uri}: rule {rule!r}: not a thresholds record ({e})") from None


def load_thresholds(uri: str, rule: str = "chosen") -> Thresholds | None:
    """The stored thresholds of `rule` ("chosen" = the best rule), or None when the file is absent."""
    doc = read_thresholds_doc(uri)
    return None if doc is None else thresholds_from_doc(doc, uri, rule)


__all__ = [
    "Grid",
    "N_LEVELS",
    "OOF_FILE",
    "OofStats",
    "RULES",
    "SearchResult",
    "THRESHOLDS_FILE",
    "Thresholds",
    "competition_dice",
    "default_grid",
    "default_thresholds",
    "dice_table",
    "first_level_above",
    "load_thresholds",
    "read_thresholds_doc",
    "thresholds_from_doc",
    "per_image_dice",
    "quantize",
    "save_search",
    "search_thresholds",
    "stats_from_probs",
]
