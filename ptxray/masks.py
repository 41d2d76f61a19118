"""Run-length encoded masks (SIIM relative and standard absolute) and the labels CSV.

Both schemes number pixels column-major ("top to bottom, then left to right"): flat index p is at
row p % H, column p // H, i.e. the mask flattened in Fortran order.

- scheme="siim" (stage 1 of the competition, `train-rle.csv`): pairs (gap, length). The first gap
  is the 0-based index of the first run's first pixel; every later gap counts the background pixels
  between the end of the previous run and the start of this one.
- scheme="standard" (stage 2, Kaggle's common `rle_encode`): pairs (start, length) with absolute,
  1-based starts.

"-1" (or an empty string) is an empty mask. An image may have several label rows, one per
annotation: its mask is the union of all of them. If an image has both "-1" rows and positive rows
(the real CSV has none, but hand-made files might), it is positive: the "-1" rows add nothing; such
images are listed (`Labels.empty_and_rle_ids`) so `ptxray prepare` can report them.

A row whose value is not an RLE (a negative or non-integer value) does not stop the file: the row
is quarantined (`Labels.bad_rows`, the reason names the CSV, its line and the image), and so is
its image: `Labels.mask` raises RleError with that reason, which `ptxray prepare` records in its
quarantine list. Its other rows cannot be trusted to describe the whole mask.

SIIM RLE has no library, so the codec is hand-written; it is vectorised over runs (no per-pixel
Python) because the labels of ~12k images are decoded on every cache build.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass, field

import numpy as np

SCHEMES = ("siim", "standard")
EMPTY_RLE = "-1"


class RleError(ValueError):
    """A malformed RLE string or labels file; the message names the image (or file) and the reason."""


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown RLE scheme {scheme!r}; expected one of {SCHEMES}")


def _where(image_id: str) -> str:
    return f"image {image_id}" if image_id else "RLE"


def _parse_values(text: str, image_id: str) -> np.ndarray:
    tokens = text.split()
    try:
        # Only ASCII digits are RLE; int() would also accept other scripts' digits.
        if not text.isascii():
            raise ValueError
        values = np.array(tokens, dtype=np.int64)  # (2 * runs,)
    except (ValueError, OverflowError):
        bad = next(
            (t for t in tokens if not (t.isascii() and t.lstrip("+-").isdigit()) or len(t) > 18),
            tokens[0],
        )
        raise RleError(f"{_where(image_id)}: RLE token {bad!r} is not an integer") from None
    if values.size % 2:
        raise RleError(
            f"{_where(image_id)}: RLE has an odd number of values ({values.size}); "
            "expected (start, length) pairs"
        )
    return values


def _run_bounds(
    text: str, height: int, width: int, scheme: str, image_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """0-based column-major (starts, lengths) of the runs in an RLE string, validated."""
    pairs = _parse_values(text, image_id).reshape(-1, 2)  # (runs, 2)
    firsts, lengths = pairs[:, 0], pairs[:, 1]
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise RleError(f"{_where(image_id)}: run {i} has length {int(lengths[i])}; lengths must be > 0")
    if scheme == "siim":
        bad = np.flatnonzero(firsts < 0)
        if bad.size:
            i = int(bad[0])
            raise RleError(f"{_where(image_id)}: run {i} has a negative gap {int(firsts[i])}")
        # start_i = sum of gaps up to i + sum of lengths before i
        starts = np.cumsum(firsts) + np.cumsum(lengths) - lengths
    else:
        bad = np.flatnonzero(firsts < 1)
        if bad.size:
            i = int(bad[0])
            raise RleError(
                f"{_where(image_id)}: run {i} starts at {int(firsts[i])}; standard RLE starts are 1-based"
            )
        starts = firsts - 1
    n_pixels = height * width
    ends = starts + lengths
    bad = np.flatnonzero(ends > n_pixels)
    if bad.size:
        i = int(bad[0])
        raise RleError(
            f"{_where(image_id)}: run {i} (pixels {int(starts[i])}..{int(ends[i]) - 1}) ends past "
            f"the image ({height}x{width} = {n_pixels} pixels)"
        )
    return starts, lengths


def decode_rle(
    rle: str,
    height: int = 1024,
    width: int = 1024,
    scheme: str = "siim",
    image_id: str = "",
) -> np.ndarray:
    """Decode one RLE string into a uint8 {0, 1} mask of shape (H, W)."""
    _check_scheme(scheme)
    if height <= 0 or width <= 0:
        raise ValueError(f"{_where(image_id)}: mask size must be positive, got {height}x{width}")
    mask = np.zeros((height, width), dtype=np.uint8)  # (H, W)
    text = (rle or "").strip()
    if text in ("", EMPTY_RLE):
        return mask
    starts, lengths = _run_bounds(text, height, width, scheme, image_id)
    # Column-major index of every foreground pixel, built from the runs without a Python loop:
    # offsets shift arange(total) so that run i's pixels count up from starts[i].
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    flat_f = offsets + np.arange(offsets.size)  # (pixels,) Fortran-order indices
    rows, cols = np.divmod(flat_f, height)[::-1]
    mask.reshape(-1)[rows * width + cols] = 1
    return mask


def _fortran_edges(fg: np.ndarray) -> np.ndarray:
    """Sorted column-major indices where the foreground turns on or off, ends exclusive.

    The obvious `fg.ravel(order="F")` copy costs ~2 ms for 1024x1024 (a byte transpose), ten times
    the rest of the encoder; finding the edges on the C-order array and sorting the few edge
    positions gives the same answer without it.
    """
    height, width = fg.shape  # (H, W) bool
    # Inside a column: pixel (r, c) differs from (r - 1, c) -> edge at p = c * H + r.
    inner = np.flatnonzero(fg[1:, :] != fg[:-1, :])  # indices into (H - 1, W)
    inner = (inner % width) * height + inner // width + 1
    # Across a column boundary: (0, c) differs from (H - 1, c - 1); before the first column the
    # image is background.
    prev_bottom = np.concatenate(([False], fg[-1, :-1]))  # (W,)
    across = np.flatnonzero(fg[0, :] != prev_bottom) * height
    tail = np.array([height * width] if fg[-1, -1] else [], dtype=np.int64)
    return np.sort(np.concatenate((inner, across, tail)))


def encode_rle(mask: np.ndarray, scheme: str = "siim") -> str:
    """Encode a 2-D mask (nonzero = foreground) into maximal runs; "-1" for an empty mask."""
    _check_scheme(scheme)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_rle: expected a 2-D (H, W) mask, got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"encode_rle: mask has no pixels (shape {mask.shape})")
    edges = _fortran_edges(mask != 0)  # alternating run starts and run ends
    if edges.size == 0:
        return EMPTY_RLE
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    if scheme == "siim":
        firsts = starts.copy()
        firsts[1:] -= ends[:-1]  # gaps since the previous run ended
    else:
        firsts = starts + 1
    return " ".join(map(str, np.column_stack((firsts, lengths)).ravel().tolist()))


@dataclass(frozen=True)
class Labels:
    """The labels CSV indexed by image: every non-empty RLE row of each image.

    An image with an empty tuple is a labelled negative; an image that is absent has no label.
    """

    rles: dict[str, tuple[str, ...]]
    scheme: str = "siim"
    bad_rows: tuple[tuple[str, str], ...] = ()  # (image id, reason) of every quarantined row
    empty_and_rle_ids: tuple[str, ...] = ()  # images listed both as "-1" and with an RLE
    _sorted_ids: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _bad: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        object.__setattr__(self, "_sorted_ids", tuple(sorted(self.rles)))
        for image_id, reason in reversed(self.bad_rows):  # reversed: the first reason wins
            self._bad[image_id] = reason

    def positive(self, image_id: str) -> bool:
        return bool(self._rows(image_id))

    def quarantined(self, image_id: str) -> str | None:
        """Why the image's label rows are quarantined (`mask` raises it), or None."""
        return self._bad.get(image_id)

    def mask(
        self, image_id: str, height: int = 1024, width: int = 1024, scheme: str | None = None
    ) -> np.ndarray:
        """The union of all the image's rows as a uint8 {0, 1} (H, W) mask; RleError for an image
        with a quarantined row (its reason)."""
        scheme = scheme or self.scheme
        rows = self._rows(image_id)
        if image_id in self._bad:
            raise RleError(self._bad[image_id])
        if len(rows) == 1:
            return decode_rle(rows[0], height, width, scheme, image_id)
        out = np.zeros((height, width), dtype=np.uint8)  # (H, W)
        for rle in rows:
            np.maximum(out, decode_rle(rle, height, width, scheme, image_id), out=out)
        return out

    def _rows(self, image_id: str) -> tuple[str, ...]:
        try:
            return self.rles[image_id]
        except KeyError:
            raise KeyError(f"image {image_id}: not in the labels") from None

    def __len__(self) -> int:
        return len(self.rles)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.rles

    @property
    def image_ids(self) -> list[str]:
        return list(self._sorted_ids)

    @property
    def n_positive(self) -> int:
        return sum(1 for rows in self.rles.values() if rows)

    @property
    def n_rows(self) -> int:
        """Non-empty RLE rows (annotations) over all images."""
        return sum(len(rows) for rows in self.rles.values())


_RLE_TEXT = re.compile(r"-1|[0-9 \t]*")


def _looks_like_rle(value: str) -> bool:
    return _RLE_TEXT.fullmatch(value) is not None


def _is_header(value: str) -> bool:
    # Header names (`EncodedPixels`, `mask`, ...) hold no digits; a broken data row almost always
    # does, so it is reported instead of being silently skipped as a header.
    return not _looks_like_rle(value) and not any(c.isdigit() for c in value)


def _value_problem(value: str) -> str:
    """Why a label value that is not RLE-shaped was refused (negative values named)."""
    negative = next((t for t in value.split() if t.startswith("-") and t[1:].isdigit()), None)
    if negative is not None:
        return f"RLE value {negative} is negative (only a lone -1, an empty mask, may be)"
    return f"value {value[:40]!r} is not an RLE"


def parse_labels(text: str, source: str = "", scheme: str = "siim") -> Labels:
    """Parse the labels CSV: `image_id,rle` rows, with or without a header line.

    Accepts what real copies of the file contain: a UTF-8 BOM, headers `ImageId, EncodedPixels` or
    `fname,mask` (or none), spaces around values, Windows line endings, no final newline, several
    rows per image and `-1` rows. RLE strings are only checked for shape here (non-negative
    integers); they are fully validated when decoded. A row of the wrong shape (not two columns,
    no image id) is an error for the file; a value that is not an RLE quarantines its row and image
    (module doc).
    """
    _check_scheme(scheme)
    where = source or "labels CSV"
    text = text.lstrip("\ufeff")
    rows: dict[str, list[str]] = {}
    has_empty_row: set[str] = set()
    bad_rows: list[tuple[str, str]] = []
    first = True
    for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise RleError(f"{where}:{line_no}: expected 2 columns (image id, RLE), got {len(row)}: {row!r}")
        image_id, value = row[0].strip(), row[1].strip()
        if first:
            first = False
            if _is_header(value):
                continue
        if not image_id:
            raise RleError(f"{where}:{line_no}: empty image id")
        entry = rows.setdefault(image_id, [])
        if not _looks_like_rle(value):
            bad_rows.append((image_id, f"{where}:{line_no}: image {image_id}: {_value_problem(value)}"))
        elif value in ("", EMPTY_RLE):
            has_empty_row.add(image_id)
        else:
            entry.append(value)
    empty_and_rle = tuple(sorted(i for i in has_empty_row if rows[i]))
    return Labels({k: tuple(v) for k, v in rows.items()}, scheme=scheme, bad_rows=tuple(bad_rows), empty_and_rle_ids=empty_and_rle)


def read_labels(path_or_uri: str, scheme: str = "siim") -> Labels:
    """Read the labels CSV from a local path or URI (s3://...); gzip is detected by content."""
    from .storage import open_input_stream  # pyarrow only when a file is actually read

    with open_input_stream(str(path_or_uri)) as stream:
        data = stream.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise RleError(f"{path_or_uri}: corrupt gzip data ({e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RleError(f"{path_or_uri}: not UTF-8 text ({e})") from None
    return parse_labels(text, source=str(path_or_uri), scheme=scheme)


__all__ = [
    "EMPTY_RLE",
    "Labels",
    "RleError",
    "SCHEMES",
    "decode_rle",
    "encode_rle",
    "parse_labels",
    "read_labels",
]
