"""The decode-once Parquet cache: its layout, how rows are built, and how it is read without Ray.

A K-fold x grid sweep must read and decode every DICOM exactly once. `ptxray prepare` (the Ray
Data wiring lives in `ray_data.py`) turns each DICOM into one Parquet row with the preprocessed
channel stack and the mask at training resolution; every trial then streams this cache.

Layout under the cache root (a folder or an s3:// prefix):

    <root>/<key>/manifest.json          written LAST; the only thing a reader trusts
    <root>/<key>/<parts>/data/*.parquet  one row per listed file (quarantined files: error set, no image)
    <root>/<key>/<parts>/index.parquet   light columns of the usable images, with their fold
    <root>/<key>/<parts>/summary.json

`key` hashes the preprocessing and fold settings, the DICOM listing (relative path + size) and
the label file's bytes, so a second prepare over the same inputs finds the manifest and decodes
nothing. `parts` is unique per attempt: an interrupted attempt leaves a folder that no manifest
names, which readers never look at and the next attempt removes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ptxray import storage
from ptxray.config import Config, PreprocessConfig, section_hash
from ptxray.dicom import DicomError, Scan, read_dicom
from ptxray.folds import assign_folds
from ptxray.masks import Labels, RleError
from ptxray.preprocess import channels_from_config, resize_mask

CACHE_FORMAT_VERSION = 3  # 2: JPEG frames decoded at a reduced DCT scale (read_for_training); 3: masks area-resized (resize_mask)
DICOM_SUFFIXES = (".dcm", ".dicom")

# Image and mask are stored as raw uint8 bytes with their shape beside them: Arrow's fixed-shape
# tensor type would do too, but raw binary reads back with np.frombuffer (zero-copy) in any pyarrow.
ROW_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("patient_id", pa.string()),
        ("path", pa.string()),
        ("error", pa.string()),  # null for a usable image; the quarantine reason otherwise
        ("labelled", pa.bool_()),
        ("label", pa.int8()),  # 1 = pneumothorax present
        ("n_annotations", pa.int16()),
        ("channels", pa.int16()),
        ("size", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("sex", pa.string()),
        ("age", pa.int16()),
        ("view_position", pa.string()),
        ("pixel_spacing_mm", pa.float32()),
        ("image", pa.binary()),  # uint8 (C, size, size), C order
        ("mask", pa.binary()),  # uint8 (size, size) in {0, 1}
    ]
)
LIGHT_COLUMNS = [f.name for f in ROW_SCHEMA if f.name not in ("image", "mask")]
# How the data files are written (pyarrow's Parquet write options). The image column is stored
# uncompressed: zstd shrank the 3 x 512^2 stacks by only ~20 % (preprocessed X-rays are dense) for
# 1.5 ms of CPU per image when writing and 0.9 ms per image on every epoch's read, a third of the
# image's own decode + preprocessing. The mask (mostly zeros) and the light columns compress to
# almost nothing with zstd. Dictionaries and min/max statistics only help the light columns:
# for the pixel columns they cost a hash and a scan of every value for nothing.
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": {name: "none" if name == "image" else "zstd" for name in ROW_SCHEMA.names},
    "use_dictionary": LIGHT_COLUMNS,
    "write_statistics": LIGHT_COLUMNS,
}


class CacheError(ValueError):
    pass


def settings_fingerprint(cfg: Config) -> dict[str, Any]:
    """Everything besides the inputs that changes what the cache holds."""
    d = cfg.data
    return {
        "format": CACHE_FORMAT_VERSION,
        "preprocess": cfg.preprocess,
        "rle_scheme": d.rle_scheme,
        "num_folds": d.num_folds,
        "fold_seed": d.fold_seed,
        "holdout_fraction": d.holdout_fraction,
        "unlabeled": d.unlabeled,
        "colour": d.colour,
    }


def cache_key(cfg: Config, listing: Sequence[tuple[str, int]], labels_sha256: str) -> str:
    s = settings_fingerprint(cfg)
    return section_hash(s.pop("preprocess"), extra=[s, sorted(listing), labels_sha256])


def list_dicoms(images_uri: str) -> tuple[Any, list[str], list[tuple[str, int]]]:
    """(filesystem, paths for that filesystem, [(path relative to the root, size)]), sorted by path."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem_and_path(images_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{images_uri}: no such folder or prefix")
    if info.type == pafs.FileType.File:
        entries = [info]
    else:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        (e for e in entries if e.type == pafs.FileType.File and e.path.lower().endswith(DICOM_SUFFIXES)),
        key=lambda e: e.path,
    )
    root_prefix = root.rstrip("/") + "/"
    listing = [(e.path[len(root_prefix):] if e.path.startswith(root_prefix) else e.path, e.size) for e in files]
    return fs, [e.path for e in files], listing


def read_listed_files(fs: Any, paths: Iterable[str], display_prefix: str = "") -> Iterator[tuple[str, bytes | None, str | None]]:
    """(path as shown to the user, bytes, None) for each listed file, or (path, None, reason) when
    it cannot be read (removed since the listing, archived in S3 Glacier, no permission): one bad
    file becomes a quarantine or errors.csv row instead of stopping the job. An S3 endpoint that
    cannot be reached is no file's fault: that error is raised."""
    for path in paths:
        shown = display_prefix + path
        try:
            with fs.open_input_file(path) as f:
                data = f.readall()
        except OSError as e:
            if "AWS Error NETWORK_CONNECTION" in str(e):
                raise  # the caller's storage.s3_errors makes it one line (also through a Ray task error)
            yield shown, None, f"{shown}: cannot read ({e})"
            continue
        yield shown, data, None


def _row(**values: Any) -> dict[str, Any]:
    row = {name: None for name in ROW_SCHEMA.names}
    row.update(values)
    return row


def quarantine_row(path: str, reason: str) -> dict[str, Any]:
    """The row of a file that yields no image (unreadable, not a DICOM we can decode): `reason` names it."""
    return _row(path=path, error=reason, image_id="", patient_id="", labelled=False)


def read_for_training(data: bytes, path: str, pre: PreprocessConfig, colour: str = "reject") -> Scan:
    """The one way a DICOM is read for training and prediction: a JPEG frame decodes at the
    smallest libjpeg-turbo DCT scale (1/2, 1/4, 1/8) that still covers `image_size_px` (the
    resize to the training size follows anyway; see benchmarks/ingest.py for the cost and the
    pixel differences). `scan.rows` / `scan.columns` keep the stored size for masks. `colour`:
    data.colour."""
    return read_dicom(data, path, min_size_px=pre.image_size_px, colour=colour)


def build_row(
    data: bytes, path: str, labels: Labels, pre: PreprocessConfig, rle_scheme: str = "siim", unlabeled: str = "skip",
    colour: str = "reject", out: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One DICOM's bytes -> one cache row (`image` and `mask` as uint8 arrays, or None; see
    `rows_to_table`). Never raises for bad input: the reason goes in `error`. `out`: this row's
    slots (image uint8 (C, S, S), mask uint8 (S, S) already zeroed) in `PixelBuffers`, which the
    pixels are written into and the row's arrays then are."""
    try:
        scan = read_for_training(data, path, pre, colour)
    except DicomError as e:
        return quarantine_row(path, str(e))
    h, w = scan.rows, scan.columns
    labelled = scan.image_id in labels
    base = dict(
        image_id=scan.image_id,
        patient_id=scan.patient_id,
        path=path,
        labelled=labelled,
        orig_height=h,
        orig_width=w,
        sex=scan.sex,
        age=scan.age,
        view_position=scan.view_position,
        pixel_spacing_mm=scan.pixel_spacing_mm[0] if scan.pixel_spacing_mm else None,
    )
    if not labelled and unlabeled == "skip":
        # Counted in the summary and kept out of the index; no pixels are worth storing.
        return _row(**base)
    size = pre.image_size_px
    if labelled and (labels.positive(scan.image_id) or labels.quarantined(scan.image_id)):
        try:
            mask = labels.mask(scan.image_id, h, w, rle_scheme)  # (H, W)
        except RleError as e:
            return _row(**{**base, "error": f"{path}: label: {e}"})
        small_mask = resize_mask(mask, size)  # (S, S)
        if out is not None:
            out[1][...] = small_mask
            small_mask = out[1]
        label = int(mask.any())
    else:
        # A negative or unlabelled image: its mask is empty at any size, so no full-size mask is
        # drawn and resized (0.8 ms of CPU per image, a seventh of the row's cost).
        small_mask, label = (np.zeros((size, size), np.uint8) if out is None else out[1]), 0
    stack = channels_from_config(scan.image, pre, out=None if out is None else out[0])  # (C, S, S)
    return _row(
        **base,
        label=label,
        n_annotations=len(labels.rles.get(scan.image_id, ())),
        channels=stack.shape[0],
        size=size,
        image=stack,
        mask=small_mask,
    )


class PixelBuffers:
    """The pixel columns of `n` rows as two buffers that `build_row` writes into (`slots(i)`), so
    that `binary_column` wraps them as Arrow data without a copy: images uint8 (n, C, S, S),
    masks uint8 (n, S, S) zeroed (an empty mask is then not written at all). A row without pixels
    (quarantined, unlabelled) leaves its slot unused: its value is null, which Parquet does not store."""

    def __init__(self, n: int, pre: PreprocessConfig):
        size = pre.image_size_px
        self.images = np.empty((n, len(pre.channels), size, size), np.uint8)
        self.masks = np.zeros((n, size, size), np.uint8)

    def slots(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.masks[i]


PIXEL_COLUMNS = ("image", "mask")
MAX_BINARY_CHUNK_BYTES = 2**31 - 1  # int32 offsets
_LIGHT_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in LIGHT_COLUMNS])


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (as `build_row` makes them) -> a ROW_SCHEMA table. The pixel columns take uint8 arrays
    (or bytes, or None) and are built by `binary_column`; the light columns by pyarrow."""
    rows = list(rows)
    table = pa.Table.from_pylist([{k: r[k] for k in LIGHT_COLUMNS} for r in rows], schema=_LIGHT_SCHEMA)
    for name in PIXEL_COLUMNS:
        table = table.append_column(ROW_SCHEMA.field(name), binary_column([r[name] for r in rows]))
    return table.select(ROW_SCHEMA.names)


def binary_column(values: Sequence[np.ndarray | bytes | None]) -> pa.ChunkedArray:
    """A binary column holding each array's bytes (None: null), with one copy into one buffer per
    chunk. Hand-written because pyarrow only builds binary arrays from Python bytes: `tobytes()`
    copies each image, the builder copies it again into a buffer that it grows by reallocation,
    and the fresh memory's page faults come on top (measured: 1.6-1.8 ms of CPU per 3 x 512^2
    row against 0.25 ms here). Chunks stay under Arrow's 2 GiB limit for int32 offsets."""
    whole = _rows_of_one_buffer(values)
    if whole is not None:
        return pa.chunked_array([whole], type=pa.binary())
    arrays = [
        None if v is None else np.frombuffer(v, np.uint8) if isinstance(v, bytes) else np.ascontiguousarray(v).view(np.uint8).reshape(-1)
        for v in values
    ]
    chunks, start, chunk_bytes = [], 0, 0
    for i, a in enumerate(arrays):
        n = 0 if a is None else a.size
        if chunk_bytes + n > MAX_BINARY_CHUNK_BYTES and i > start:
            chunks.append(_binary_chunk(arrays[start:i]))
            start, chunk_bytes = i, 0
        chunk_bytes += n
    chunks.append(_binary_chunk(arrays[start:]))
    return pa.chunked_array(chunks, type=pa.binary())


def _rows_of_one_buffer(values: Sequence[np.ndarray | bytes | None]) -> pa.Array | None:
    """The binary array of `values` without a copy when they are the rows of one C-contiguous
    array in order (row i is parent[i], or None: a null), as `PixelBuffers` makes them; else None.
    Prepare's pixel columns are ~1 MB a row: the copy into a fresh buffer cost ~0.2 ms of CPU per
    row, with its page faults, a twentieth of the row's whole decode and preprocessing."""
    present = [v for v in values if v is not None]
    if not present or not all(isinstance(v, np.ndarray) for v in present):
        return None
    parent = present[0].base
    if not isinstance(parent, np.ndarray) or parent.base is not None or not parent.flags.c_contiguous or len(parent) != len(values):
        return None
    row_bytes = parent[0].nbytes
    if parent.dtype != np.uint8 or parent.nbytes > MAX_BINARY_CHUNK_BYTES:
        return None
    start = parent.__array_interface__["data"][0]
    for i, v in enumerate(values):
        if v is not None and (v.base is not parent or v.__array_interface__["data"][0] != start + i * row_bytes or v.nbytes != row_bytes):
            return None
    offsets = np.arange(len(values) + 1, dtype=np.int32) * np.int32(row_bytes)
    nulls = np.array([v is None for v in values])
    validity = pa.array(~nulls).buffers()[1] if nulls.any() else None
    return pa.Array.from_buffers(
        pa.binary(), len(values), [validity, pa.py_buffer(offsets), pa.py_buffer(parent.reshape(-1))], null_count=int(nulls.sum())
    )


def _binary_chunk(arrays: Sequence[np.ndarray | None]) -> pa.Array:
    sizes = np.array([0 if a is None else a.size for a in arrays], np.int64)
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for a, begin, end in zip(arrays, offsets[:-1], offsets[1:]):
        if a is not None:
            data[begin:end] = a
    nulls = np.array([a is None for a in arrays])
    validity = pa.array(~nulls).buffers()[1] if nulls.any() else None
    return pa.Array.from_buffers(
        pa.binary(), len(arrays), [validity, pa.py_buffer(offsets), pa.py_buffer(data)], null_count=int(nulls.sum())
    )


@dataclass
class PreparedIndex:
    index: pa.Table  # usable images: LIGHT_COLUMNS + fold
    summary: dict[str, Any]


def build_index(light: pa.Table, labels: Labels, cfg: Config) -> PreparedIndex:
    """From the light columns of all rows: quarantine, duplicates, label coverage and folds."""
    rows = light.to_pylist()
    quarantined = [{"path": r["path"], "reason": r["error"]} for r in rows if r["error"]]
    good = [r for r in rows if not r["error"]]
    seen: dict[str, str] = {}
    usable, unlabeled = [], []
    for r in sorted(good, key=lambda r: r["path"]):
        if r["image_id"] in seen:
            quarantined.append(
                {"path": r["path"], "reason": f"{r['path']}: duplicate SOPInstanceUID {r['image_id']} (first in {seen[r['image_id']]})"}
            )
            continue
        seen[r["image_id"]] = r["path"]
        if not r["labelled"]:
            unlabeled.append(r["path"])
            if cfg.data.unlabeled == "skip":
                continue
        usable.append(r)
    labels_without_dicoms = sorted(set(labels.image_ids) - set(seen))
    if usable:
        folds = assign_folds(
            [r["image_id"] for r in usable],
            [r["patient_id"] or r["image_id"] for r in usable],
            [bool(r["label"]) for r in usable],
            num_folds=cfg.data.num_folds,
            seed=cfg.data.fold_seed,
            holdout_fraction=cfg.data.holdout_fraction,
        )
    else:
        folds = np.zeros(0, np.int64)
    index = pa.Table.from_pylist(usable, schema=pa.schema([ROW_SCHEMA.field(c) for c in LIGHT_COLUMNS]))
    index = index.append_column("fold", pa.array(np.asarray(folds, np.int16)))
    n_pos = sum(1 for r in usable if r["label"])
    positive = np.array([bool(r["label"]) for r in usable], dtype=bool)
    patients = np.array([r["patient_id"] or r["image_id"] for r in usable], dtype=object)  # as assign_folds groups
    per_fold = [
        {"fold": int(k), "images": int((folds == k).sum()), "positive": int(((folds == k) & positive).sum()),
         "patients": len(set(patients[folds == k].tolist()))}
        for k in sorted(set(folds.tolist()))
    ]  # fmt: skip
    summary = {
        "dicoms_listed": len(rows),
        "images": len(usable),
        "positive": n_pos,
        "negative": len(usable) - n_pos,
        "patients": len(set(patients.tolist())),
        "quarantined": len(quarantined),
        "quarantine": sorted(quarantined, key=lambda q: q["path"]),
        "dicoms_without_labels": len(unlabeled),
        "dicoms_without_labels_paths": unlabeled,
        "labels_without_dicoms": len(labels_without_dicoms),
        "labels_without_dicoms_ids": labels_without_dicoms[:100],
        # Label rows that are not RLE (their images are quarantined above), and images listed both
        # as "-1" and with an RLE (taken as positive): see ptxray.masks.
        "label_rows_quarantined": len(labels.bad_rows),
        "label_rows_quarantine": [reason for _, reason in labels.bad_rows[:100]],
        "labels_empty_and_rle": len(labels.empty_and_rle_ids),
        "labels_empty_and_rle_ids": list(labels.empty_and_rle_ids[:100]),
        "folds": per_fold,
    }
    return PreparedIndex(index=index, summary=summary)


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(cache_dir: str) -> dict[str, Any] | None:
    """The manifest of a cache directory (URI), or None when there is no complete cache there.

    A manifest that is not a JSON object is a ValueError naming it (a damaged cache is not a
    missing one: preparing over it would hide the damage)."""
    try:
        return storage.read_json_object(storage.join(cache_dir, "manifest.json"))
    except (FileNotFoundError, OSError):
        return None


def write_json(uri: str, obj: Any) -> None:
    """Write JSON atomically: temp + rename locally; a single PUT (atomic by nature) on S3."""
    storage.write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def new_parts_id() -> str:
    return time.strftime("parts-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:8]


@dataclass
class Cache:
    """A complete cache directory, read with plain pyarrow (no Ray)."""

    uri: str  # <root>/<key>
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str) -> "Cache":
        manifest = read_manifest(uri)
        if manifest is None:
            # A cache root holding exactly one complete cache is accepted for convenience.
            fs, path = storage.filesystem_and_path(uri)
            import pyarrow.fs as pafs

            try:
                subdirs = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]
            except (FileNotFoundError, OSError):
                subdirs = []
            scheme = uri[: uri.index("://") + 3] if "://" in uri else ""
            complete = [d for d in subdirs if read_manifest(scheme + d)]
            if len(complete) != 1:
                raise CacheError(
                    f"{uri}: not a complete ptxray cache (no manifest.json"
                    + (f"; {len(complete)} complete caches below it, name one" if complete else "")
                    + ")"
                )
            uri = scheme + complete[0]
            manifest = read_manifest(uri)
        return cls(uri=uri, manifest=manifest)

    @property
    def parts_uri(self) -> str:
        return storage.join(self.uri, self.manifest["parts"])

    @property
    def data_uri(self) -> str:
        return storage.join(self.parts_uri, "data")

    def index(self) -> pa.Table:
        fs, path = storage.filesystem_and_path(storage.join(self.parts_uri, "index.parquet"))
        return pq.read_table(path, filesystem=fs)

    def _split(self, fold: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """(index, train row mask, val row mask) for fold k: train = folds != k (hold-out excluded)."""
        idx = self.index()
        folds = idx.column("fold").to_numpy()
        if fold not in set(folds.tolist()):
            raise CacheError(f"{self.uri}: no fold {fold} (folds: {sorted(set(folds.tolist()) - {-1})})")
        return idx, (folds != fold) & (folds >= 0), folds == fold

    def split_ids(self, fold: int) -> tuple[list[str], list[str]]:
        """(train image ids, val image ids) for fold k."""
        idx, train, val = self._split(fold)
        ids = np.asarray(idx.column("image_id").to_pylist(), dtype=object)
        return ids[train].tolist(), ids[val].tolist()

    def train_labels(self, fold: int) -> np.ndarray:
        """bool (N_train,): which of fold k's training images are positive (index order)."""
        idx, train, _ = self._split(fold)
        return idx.column("label").to_numpy(zero_copy_only=False).astype(bool)[train]

    def _scan_args(self, image_ids: Sequence[str]) -> tuple[Any, dict[str, Any]]:
        """(Parquet dataset of the image rows, the column/filter arguments that select `image_ids`)."""
        import pyarrow.dataset as pads  # here, not at the top: it imports pandas (0.3 s in every prepare worker)

        fs, path = storage.filesystem_and_path(self.data_uri)
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        wanted = pc.field("image_id").isin(pa.array(list(image_ids), pa.string()))
        return dataset, {"columns": ["image_id", "channels", "size", "image", "mask"], "filter": wanted & pc.field("error").is_null()}

    def load_arrays(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """images uint8 (N, C, S, S), masks uint8 (N, S, S), ids — in the order given."""
        dataset, args = self._scan_args(image_ids)
        return table_to_arrays(dataset.to_table(**args), order=image_ids)

    def iter_arrays(self, image_ids: Sequence[str], batch_size: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """`load_arrays` as a stream: (images, masks, ids) of `batch_size` rows at a time (the
        last one may be smaller), in the cache's row order, from one scan holding about one
        Parquet record batch in memory (not the whole set); chunks span the cache's files.
        Raises CacheError at the end when some of `image_ids` were not found."""
        if batch_size < 1:
            raise ValueError(f"iter_arrays: batch_size must be >= 1, got {batch_size}")
        wanted = set(image_ids)
        dataset, args = self._scan_args(wanted)
        seen = 0
        pending: list[pa.RecordBatch] = []  # rows scanned, not yet yielded: fewer than batch_size
        for record_batch in dataset.scanner(batch_size=max(batch_size, 64), **args).to_batches():
            pending.append(record_batch)
            rows = pa.Table.from_batches(pending, schema=record_batch.schema)
            start = 0
            while rows.num_rows - start >= batch_size:
                seen += batch_size
                yield table_to_arrays(rows.slice(start, batch_size))
                start += batch_size
            pending = rows.slice(start).to_batches()
        rest = sum(b.num_rows for b in pending)
        if rest:
            seen += rest
            yield table_to_arrays(pa.Table.from_batches(pending))
        if seen != len(wanted):
            raise CacheError(f"{self.uri}: found {seen} of {len(wanted)} images of the split")


def table_to_arrays(table: pa.Table, order: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ids = table.column("image_id").to_pylist()
    if order is not None:
        pos = {i: n for n, i in enumerate(ids)}
        missing = [i for i in order if i not in pos]
        if missing:
            raise CacheError(f"{len(missing)} image(s) not in the cache, e.g. {missing[:3]}")
        take = [pos[i] for i in order]
        ids = list(order)
    else:
        take = list(range(len(ids)))
    if not take:
        return np.zeros((0, 0, 0, 0), np.uint8), np.zeros((0, 0, 0), np.uint8), []
    c = table.column("channels").to_numpy()
    s = table.column("size").to_numpy()
    images = table.column("image")
    masks = table.column("mask")
    n = len(take)
    out_img = np.empty((n, int(c[take[0]]), int(s[take[0]]), int(s[take[0]])), np.uint8)
    out_mask = np.empty((n, int(s[take[0]]), int(s[take[0]])), np.uint8)
    for j, i in enumerate(take):
        out_img[j] = np.frombuffer(images[i].as_py(), np.uint8).reshape(out_img.shape[1:])
        out_mask[j] = np.frombuffer(masks[i].as_py(), np.uint8).reshape(out_mask.shape[1:])
    return out_img, out_mask, ids


def labels_sha256(labels_uri: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with storage.open_input_stream(labels_uri) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = [
    "CACHE_FORMAT_VERSION",
    "read_for_training",
    "Cache",
    "CacheError",
    "LIGHT_COLUMNS",
    "PARQUET_WRITE_OPTIONS",
    "PIXEL_COLUMNS",
    "PreparedIndex",
    "ROW_SCHEMA",
    "build_index",
    "binary_column",
    "build_row",
    "cache_key",
    "labels_sha256",
    "list_dicoms",
    "new_parts_id",
    "read_manifest",
    "rows_to_table",
    "table_to_arrays",
    "quarantine_row",
    "read_listed_files",
    "write_json",
]
