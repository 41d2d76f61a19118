"""Turn a run's fold models into answers: `ptxray predict`, and the out-of-fold predictions.

Prediction (`run_predict`): every DICOM is read and preprocessed exactly as the cache did it
(`read_dicom`, then the run's channel stack at `preprocess.image_size_px`), the fold models of the
best configuration are ensembled (mean of probabilities) with a horizontal-flip TTA, the decision
rule of `ptxray.postprocess` (thresholds from the run's `thresholds.json`, else defaults) decides
empty or not at the training size, and a kept mask is the probability map resized bilinearly to
the image's own size and binarised there. Outputs under `--out` (folder or s3://):

    submission.csv     ImageId,EncodedPixels (SIIM relative RLE, -1 for empty), one row per image
    probabilities.csv  ImageId,path,pneumothorax_probability (classification head),
                       max_pixel_probability, mask_area_px, non_empty
    errors.csv         path,reason for every input that could not be predicted (no other row)
    masks/<ImageId>.png, overlays/<ImageId>.png, seg/<ImageId>.dcm (--dicom-seg, non-empty only)
    predict.json       counts, thresholds used and where they came from, timings

`Predictor` does one batch (decode -> ensemble -> rule -> write PNGs -> light rows); the local path
calls it in a loop, the Ray path (`ptxray.ray_data.predict_files`) hands the same class to
`map_batches` as an actor pool (one per GPU when the cluster has GPUs), so both paths produce the
same rows.

Out-of-fold (`load_or_compute_oof`): each fold model predicts its own validation split from the
run's Parquet cache (same TTA), reduced to the per-image histograms `postprocess.OofStats` keeps;
stored once as `<run>/oof/oof.npz` and reused by `ptxray thresholds` and `ptxray evaluate`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from typing import Any, Sequence

import cv2
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ptxray import storage
from ptxray.cache import Cache, CacheError, labels_sha256, list_dicoms, read_for_training, read_listed_files, read_manifest
from ptxray.config import Config, PreprocessConfig
from ptxray.dicom import DicomError, Scan
from ptxray.engine import autocast
from ptxray.masks import decode_rle, encode_rle
from ptxray.postprocess import (
    OOF_FILE,
    THRESHOLDS_FILE,
    OofStats,
    SearchResult,
    Thresholds,
    default_thresholds,
    first_level_above,
    quantize,
    read_thresholds_doc,
    save_search,
    search_thresholds,
    stats_from_probs,
    thresholds_from_doc,
)
from ptxray.preprocess import channels_from_config
from ptxray.runs import FoldEnsemble, Run, RunError, load_fold_model, open_run

log = logging.getLogger("ptxray")

PRED_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_id", pa.string()),
        ("error", pa.string()),  # null when predicted; the reason otherwise
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("pneumothorax_probability", pa.float32()),
        ("max_pixel_probability", pa.float32()),
        ("mask_area_px", pa.int64()),
        ("rle", pa.string()),
        ("seg_error", pa.string()),  # --dicom-seg: why this image's SEG could not be written
    ]
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# The ensemble


class Ensemble:
    """Fold models averaged in probability space, each with a horizontal-flip TTA: numpy in and
    out, on a device, around `ptxray.runs.FoldEnsemble` (the module export writes out)."""

    def __init__(self, models: Sequence[nn.Module], device: str | torch.device | None = None, *, tta: bool = True, amp: bool = False):
        if not models:
            raise ValueError("Ensemble: no models")
        self.device = torch.device(device or default_device())
        self.module = FoldEnsemble(list(models), tta_flip=tta).to(self.device)
        self.tta = tta
        self.amp = amp and self.device.type == "cuda"

    @classmethod
    def from_run(cls, run: Run, device: str | torch.device | None = None, *, tta: bool = True) -> "Ensemble":
        models = [load_fold_model(ref)[0] for ref in run.folds]
        return cls(models, device, tta=tta, amp=run.config.compute.amp)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, C, S, S) -> (pixel probabilities float32 (B, S, S), classification prob float32 (B,))."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"Ensemble.predict: expected uint8 (B, C, S, S), got {images.dtype} {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)  # (B, C, S, S) uint8
        with autocast(self.device, self.amp):
            mask_prob, cls_prob = self.module(x)  # (B, 1, S, S), (B,)
        return mask_prob[:, 0].float().cpu().numpy(), cls_prob.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Pictures


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"encode_png: OpenCV could not encode an array of shape {image.shape}")
    return buf.tobytes()


def overlay(image: np.ndarray, pred: np.ndarray | None, true: np.ndarray | None = None) -> np.ndarray:
    """A grey radiograph (H, W) uint8 with the predicted mask tinted red and outlined, the true mask
    outlined green: BGR uint8 (H, W, 3)."""
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    thickness = max(1, image.shape[0] // 256)
    if pred is not None and pred.any():
        sel = pred.astype(bool)
        out[sel] = (0.6 * out[sel] + 0.4 * np.array([0, 0, 255])).astype(np.uint8)
        contours, _ = cv2.findContours(sel.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 0, 255), thickness)
    if true is not None and true.any():
        contours, _ = cv2.findContours((true != 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 200, 0), thickness)
    return out


def full_size_mask(prob_u8: np.ndarray, keep: bool, th: Thresholds, height: int, width: int) -> np.ndarray:
    """A kept image's mask at its own size: the (S, S) uint8 levels resized bilinearly, then binarised."""
    if not keep:
        return np.zeros((height, width), bool)
    if prob_u8.shape != (height, width):
        prob_u8 = cv2.resize(prob_u8, (width, height), interpolation=cv2.INTER_LINEAR)
    return prob_u8 >= first_level_above(th.bin_threshold)


def preprocess_dicom(data: bytes, path: str, pre: PreprocessConfig, colour: str = "reject") -> tuple[Scan, np.ndarray]:
    """What the cache stores for a DICOM: (Scan, uint8 (C, S, S) channel stack). DicomError names the file.
    `colour`: the run's data.colour, so colour files are read as the cache read them."""
    scan = read_for_training(data, path, pre, colour)
    try:
        return scan, channels_from_config(scan.image, pre)
    except ValueError as e:
        raise DicomError(path, f"cannot preprocess ({e})") from None


# ---------------------------------------------------------------------------------------------
# One batch


class Predictor:
    """Callable on a batch of DICOM files (pyarrow table with `bytes`, `path`): a table of PRED_SCHEMA.

    Writes the mask and overlay PNGs (and DICOM SEGs) of its images itself, so a Ray actor pool
    spreads the encoding and uploading too; the driver only gathers the light rows.
    """

    def __init__(
        self,
        run_dir: str,
        out: str,
        thresholds: dict[str, Any],
        *,
        device: str | None = None,
        tta: bool = True,
        write_images: bool = True,
        dicom_seg: bool = False,
        display_prefix: str = "",
    ):
        run = open_run(run_dir)
        self.pre = run.config.preprocess
        self.colour = run.config.data.colour
        self.ensemble = Ensemble.from_run(run, device, tta=tta)
        self.th = Thresholds.from_dict(thresholds)
        self.display_prefix = display_prefix
        self.pictures = Pictures(out, self.th, write_images=write_images, dicom_seg=dicom_seg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        good: list[tuple[int, bytes, Scan, np.ndarray]] = []
        read_errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * batch.num_rows
        for data, path, read_error in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), read_errors):
            path = self.display_prefix + path
            if read_error is not None:
                rows.append({"path": path, "error": read_error})
                continue
            try:
                scan, stack = preprocess_dicom(data, path, self.pre, self.colour)
            except DicomError as e:
                rows.append({"path": path, "error": str(e)})
                continue
            rows.append({})
            good.append((len(rows) - 1, data, scan, stack))
        if good:
            prob, cls_prob = self.ensemble.predict(np.stack([g[3] for g in good]))  # (B, S, S), (B,)
            prob_u8 = quantize(prob)
            keep = self.th.keep(prob_u8, cls_prob)
            for j, (i, data, scan, _) in enumerate(good):
                rows[i] = self._finish(scan, data, prob_u8[j], bool(keep[j]), float(cls_prob[j]))
        return pa.Table.from_pylist([{n: r.get(n) for n in PRED_SCHEMA.names} for r in rows], schema=PRED_SCHEMA)

    def _finish(self, scan: Scan, data: bytes, prob_u8: np.ndarray, keep: bool, cls_prob: float) -> dict[str, Any]:
        h, w = scan.rows, scan.columns  # the stored size (scan.image may be a reduced-scale decode)
        mask = full_size_mask(prob_u8, keep, self.th, h, w)  # bool (H, W)
        seg_error = self.pictures.write(scan, data, mask, scan.image_id)
        return {
            "seg_error": seg_error,
            "path": scan.path,
            "image_id": scan.image_id,
            "height": h,
            "width": w,
            "pneumothorax_probability": cls_prob,
            "max_pixel_probability": float(prob_u8.max()) / 255.0,
            "mask_area_px": int(mask.sum()),
            "rle": encode_rle(mask, "siim"),
        }


class Pictures:
    """Writes one prediction's `masks/<name>.png`, `overlays/<name>.png` and (--dicom-seg, non-empty
    masks) `seg/<name>.dcm` under `out`; `name` is the ImageId, or a suffixed one for a repeat."""

    def __init__(self, out: str, th: Thresholds, *, write_images: bool = True, dicom_seg: bool = False):
        self.out = out
        self.th = th
        self.write_images = write_images
        self.write_seg = None
        if dicom_seg:
            try:
                from ptxray.export import write_dicom_seg
            except ImportError as e:
                raise ValueError(f"--dicom-seg needs ptxray.export.write_dicom_seg ({e})") from None
            self.write_seg = write_dicom_seg

    def write(self, scan: Scan, data: bytes, mask: np.ndarray, name: str, *, rewrite: bool = False) -> str | None:
        """Write the pictures of `mask` (bool (H, W) at the stored size); returns the SEG error, if any.
        `rewrite`: another file's pictures may be under `name` (repeats): remove its SEG if this has none."""
        h, w = mask.shape
        if self.write_images:
            storage.write_bytes_atomic(storage.join(self.out, "masks", f"{name}.png"), encode_png(mask.astype(np.uint8) * 255))
            # The radiograph was decoded at a reduced DCT scale when the model is small: scale it
            # back up to the stored size so the overlay lines up with the full-size mask.
            image = scan.image if scan.image.shape == (h, w) else cv2.resize(scan.image, (w, h), interpolation=cv2.INTER_LINEAR)
            storage.write_bytes_atomic(storage.join(self.out, "overlays", f"{name}.png"), encode_png(overlay(image, mask)))
        seg_uri = storage.join(self.out, "seg", f"{name}.dcm")
        if self.write_seg is None:
            return None
        if not mask.any():
            if rewrite:
                _delete_if_present(seg_uri)
            return None
        params = {k: str(v) for k, v in self.th.to_dict().items() if k in ("rule", "top_score", "min_area_px", "bin_threshold", "cls_threshold")}
        try:
            self.write_seg(data, mask.astype(np.uint8), seg_uri, source_path=scan.path, algorithm_parameters=params)
        except DicomError as e:  # a source the SEG cannot reference: the prediction itself stands
            return str(e)
        return None


def _delete_if_present(uri: str) -> None:
    fs, path = storage.filesystem_and_path(uri)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def read_files(fs: Any, paths: Sequence[str], display_prefix: str = "") -> pa.Table:
    """The listed files' bytes as a table of `path`, `bytes` and `error`, the input of `Predictor`.

    A file that cannot be read (removed since the listing, archived in S3 Glacier, no permission)
    gets its reason in `error` and no bytes, so it becomes a row of errors.csv instead of stopping
    the job; Ray Data's read_binary_files would fail the whole dataset on it.
    """
    read = list(read_listed_files(fs, paths, display_prefix))
    blobs = [data for _, data, _ in read]
    errors = [reason for _, _, reason in read]
    return pa.table(
        {"path": pa.array(list(paths), pa.string()), "bytes": pa.array(blobs, pa.binary()), "error": pa.array(errors, pa.string())}
    )


def read_batch(batch: pa.Table, fs: Any, display_prefix: str = "") -> pa.Table:
    """`read_files` on a batch that holds the paths (the Ray Data read step of `ptxray predict`)."""
    return read_files(fs, batch.column("path").to_pylist(), display_prefix)


# ---------------------------------------------------------------------------------------------
# The job


def run_thresholds(run: Run, rule: str = "chosen", thresholds: Thresholds | None = None) -> Thresholds:
    """Explicit thresholds, else the run's stored ones, else the defaults (logged)."""
    size = run.config.preprocess.image_size_px
    if thresholds is None:
        uri = storage.join(run.run_dir, THRESHOLDS_FILE)
        doc = read_thresholds_doc(uri)
        if doc is not None:
            thresholds = thresholds_from_doc(doc, uri, rule)
            searched_on = doc.get("oof", {}).get("checkpoints")
            if searched_on is not None and searched_on != run.checkpoint_record():
                log.warning("%s was searched on other fold checkpoints than the run's; rerun `ptxray thresholds --run %s`", uri, run.run_dir)
    if thresholds is None:
        thresholds = default_thresholds(size)
        log.warning("%s has no %s: using %s; run `ptxray thresholds --run %s` first", run.run_dir, THRESHOLDS_FILE, thresholds.source, run.run_dir)
    if thresholds.size_px != size:
        raise ValueError(f"thresholds counted at {thresholds.size_px} px, but the run's models work at {size} px")
    return thresholds


def run_predict(
    run_dir: str,
    images: str,
    out: str,
    *,
    local: bool = True,
    thresholds: Thresholds | None = None,
    rule: str = "chosen",
    batch_size: int = 8,
    workers: int = 0,
    device: str | None = None,
    tta: bool = True,
    write_images: bool = True,
    dicom_seg: bool = False,
    address: str = "",
) -> dict[str, Any]:
    """Predict every DICOM under `images` (folder, file or s3:// prefix); returns the summary (also predict.json)."""
    t0 = time.perf_counter()
    run = open_run(run_dir)
    th = run_thresholds(run, rule, thresholds)
    fs, paths, _ = list_dicoms(images)
    kwargs = dict(
        run_dir=run.run_dir,
        out=out,
        thresholds=th.to_dict(),
        device=device,
        tta=tta,
        write_images=write_images,
        dicom_seg=dicom_seg,
        display_prefix="s3://" if str(images).startswith(("s3://", "s3a://")) else "",
    )
    if local:
        tables = _predict_local(fs, paths, kwargs, batch_size)
    else:
        from ptxray.ray_data import predict_files  # Ray stays in the ray_* modules

        tables = predict_files(Predictor, read_batch, fs, paths, kwargs, batch_size, workers, device, address)
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    if write_images or dicom_seg:
        separate_repeats(rows, fs, Pictures(out, th, write_images=write_images, dicom_seg=dicom_seg), run.config,
                         kwargs["display_prefix"])
    summary = write_outputs(rows, out)
    if dicom_seg:
        summary["files"]["seg"] = storage.join(out, "seg")
    summary.update(
        run=run.run_dir,
        folds=run.fold_ids,
        images=images,
        out=out,
        thresholds=th.to_dict(),
        tta=tta,
        mode="local" if local else "ray",
        seconds=round(time.perf_counter() - t0, 2),
    )
    storage.write_bytes_atomic(storage.join(out, "predict.json"), json.dumps(summary, indent=2, default=str).encode())
    return summary


def _predict_local(fs, paths: Sequence[str], kwargs: dict[str, Any], batch_size: int) -> list[pa.Table]:
    predictor = Predictor(**kwargs)
    return [
        predictor(read_files(fs, paths[start : start + batch_size], kwargs["display_prefix"]))
        for start in range(0, len(paths), batch_size)
    ]


def _repeats(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Predicted rows whose ImageId (SOPInstanceUID) is repeated, by ImageId, each list in path order."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["path"] or ""):
        if not r["error"]:
            by_id.setdefault(r["image_id"], []).append(r)
    return {image_id: group for image_id, group in by_id.items() if len(group) > 1}


def repeat_name(image_id: str, k: int) -> str:
    """The output name of the k-th repeat (k >= 1, in path order) of an ImageId; the first keeps the ImageId.
    A UID has no "_", so the name never meets another file's SOPInstanceUID."""
    return image_id if k == 0 else f"{image_id}_dup{k}"


def separate_repeats(rows: list[dict[str, Any]], fs: Any, pictures: Pictures, cfg: Config, display_prefix: str) -> None:
    """Give every file of a repeated ImageId its own pictures (`repeat_name`), rewritten here.

    The workers name the pictures by ImageId without knowing the other batches, so files that
    share one overwrite each other's, in whatever order the workers finished. Repeats are rare
    and seen only once every row is in: the driver re-reads those few files and writes each one's
    pictures again, the mask from its row's RLE (the same full-size mask the worker had).
    """
    for image_id, group in _repeats(rows).items():
        for k, r in enumerate(group):
            try:
                with fs.open_input_file(r["path"][len(display_prefix):]) as f:
                    data = f.read()
                scan = read_for_training(data, r["path"], cfg.preprocess, cfg.data.colour)
            except (OSError, DicomError) as e:  # changed since the workers read it
                log.warning("%s: cannot re-read it to write its own pictures (%s); %s may show another file", r["path"], e,
                            repeat_name(image_id, k))
                continue
            mask = decode_rle(r["rle"], r["height"], r["width"], "siim").astype(bool)  # (H, W)
            r["seg_error"] = pictures.write(scan, data, mask, repeat_name(image_id, k), rewrite=True)


def write_outputs(rows: list[dict[str, Any]], out: str) -> dict[str, Any]:
    """submission.csv, probabilities.csv, errors.csv from the gathered rows.

    A repeated ImageId (SOPInstanceUID) keeps one submission row, the first file's in path order,
    since SIIM reads several rows of one ImageId as the union of their masks; each later file gets
    a row in errors.csv naming the first and where its own pictures are (`repeat_name`)."""
    rows = sorted(rows, key=lambda r: r["path"] or "")
    seen: dict[str, str] = {}
    repeats: dict[str, int] = {}
    good, errors = [], []
    for r in rows:
        if r["error"]:
            errors.append((r["path"], r["error"]))
        elif r["image_id"] in seen:
            repeats[r["image_id"]] = k = repeats.get(r["image_id"], 0) + 1
            name = repeat_name(r["image_id"], k)
            errors.append((r["path"], f"{r['path']}: duplicate SOPInstanceUID {r['image_id']} (first in {seen[r['image_id']]}); "
                                      f"not in submission.csv, its pictures are masks/{name}.png and overlays/{name}.png"))
        else:
            seen[r["image_id"]] = r["path"]
            good.append(r)

    def csv_bytes(header: Sequence[str], records: Sequence[Sequence[Any]]) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(records)
        return buf.getvalue().encode()

    files = {
        "submission": storage.join(out, "submission.csv"),
        "probabilities": storage.join(out, "probabilities.csv"),
        "errors": storage.join(out, "errors.csv"),
    }
    storage.write_bytes_atomic(files["submission"], csv_bytes(["ImageId", "EncodedPixels"], [(r["image_id"], r["rle"]) for r in good]))
    storage.write_bytes_atomic(
        files["probabilities"],
        csv_bytes(
            ["ImageId", "path", "pneumothorax_probability", "max_pixel_probability", "mask_area_px", "non_empty"],
            [
                (r["image_id"], r["path"], f"{r['pneumothorax_probability']:.6f}", f"{r['max_pixel_probability']:.6f}",
                 r["mask_area_px"], int(r["mask_area_px"] > 0))
                for r in good
            ],
        ),
    )
    storage.write_bytes_atomic(files["errors"], csv_bytes(["path", "reason"], errors))
    seg_errors = [{"path": r["path"], "reason": r["seg_error"]} for r in good if r.get("seg_error")]
    return {
        "seg_errors": seg_errors,
        "listed": len(rows),
        "predicted": len(good),
        "non_empty": sum(1 for r in good if r["mask_area_px"] > 0),
        "errors": len(errors),
        "duplicates": sum(repeats.values()),
        "error_list": [{"path": p, "reason": e} for p, e in errors],
        "files": dict(files, masks=storage.join(out, "masks"), overlays=storage.join(out, "overlays")),
    }


# ---------------------------------------------------------------------------------------------
# Out-of-fold predictions


def resolve_cache(run: Run, cache: str | None = None) -> Cache:
    """The cache the run trained from: `cache` if given, else the run config's data.cache (its key
    recomputed from data.images and data.labels, or the single complete cache under the root)."""
    cfg = run.config
    if cache:
        found = Cache.open(cache)
    elif cfg.data.cache:
        found = None
        if cfg.data.images and cfg.data.labels:
            from ptxray.cache import cache_key

            try:
                _, _, listing = list_dicoms(cfg.data.images)
                uri = storage.join(cfg.data.cache, cache_key(cfg, listing, labels_sha256(cfg.data.labels)))
                manifest = read_manifest(uri)
                found = Cache(uri, manifest) if manifest else None
            except (FileNotFoundError, OSError) as e:
                log.info("cannot recompute the cache key from data.images / data.labels (%s); looking under %s", e, cfg.data.cache)
        found = found or Cache.open(cfg.data.cache)
    else:
        raise RunError(f"{run.run_dir}: the run's config names no data.cache; pass --cache (the cache it trained from)")
    cached = (found.manifest.get("summary") or {}).get("preprocess")
    if cached is not None and cached != cfg.to_dict()["preprocess"]:
        raise CacheError(f"{found.uri}: preprocessed with {cached}, but the run was trained with {cfg.to_dict()['preprocess']}")
    return found


def compute_oof(run: Run, cache: Cache, *, device: str | None = None, tta: bool = True, batch_size: int = 16) -> OofStats:
    """Each fold model on its own validation split, reduced to `OofStats`."""
    parts = []
    for ref in run.folds:
        model, cfg = load_fold_model(ref)
        ensemble = Ensemble([model], device, tta=tta, amp=cfg.compute.amp)
        _, val_ids = cache.split_ids(ref.fold)
        n = 0
        for images, masks, ids in cache.iter_arrays(val_ids, batch_size):
            prob, cls_prob = ensemble.predict(images)
            parts.append(stats_from_probs(quantize(prob), masks, cls_prob, ids, ref.fold))
            n += len(ids)
        log.info("out-of-fold: fold %d predicted %d validation images", ref.fold, n)
    return OofStats.concat(parts, _stats_meta(run, cache, tta, "oof"))


def _stats_meta(run: Run, cache: Cache, tta: bool, split: str) -> dict[str, Any]:
    # checkpoints relative to the run: a copied run reuses its stored predictions.
    return {"run_dir": run.run_dir, "cache": cache.uri, "tta": tta, "split": split,
            "checkpoints": run.checkpoint_record(), "created": time.time()}  # fmt: skip


def compute_holdout(run: Run, cache: Cache, *, device: str | None = None, tta: bool = True, batch_size: int = 16) -> OofStats:
    """The fold ensemble (every fold model averaged, with predict's flip TTA) on the hold-out
    patients (fold -1, `data.holdout_fraction`), reduced to `OofStats` (fold -1 for every image).
    None of the fold models saw these patients, so this is the test-split score."""
    folds = set(cache.index().column("fold").to_pylist())
    if -1 not in folds:
        raise RunError(
            f"{cache.uri}: the cache has no hold-out split (fold -1): it was prepared with data.holdout_fraction 0. "
            "Prepare a cache with --set data.holdout_fraction=0.2 (the paper's test split) and train on it"
        )
    _, holdout_ids = cache.split_ids(-1)
    ensemble = Ensemble.from_run(run, device, tta=tta)
    parts = []
    for images, masks, ids in cache.iter_arrays(holdout_ids, batch_size):
        prob, cls_prob = ensemble.predict(images)
        parts.append(stats_from_probs(quantize(prob), masks, cls_prob, ids, -1))
    log.info("hold-out: the ensemble of folds %s predicted %d images", run.fold_ids, len(holdout_ids))
    return OofStats.concat(parts, _stats_meta(run, cache, tta, "holdout"))


HOLDOUT_FILE = "holdout/holdout.npz"
# Where each split's predictions are stored in a run, and how they are computed.
SPLITS = {"oof": (OOF_FILE, compute_oof), "holdout": (HOLDOUT_FILE, compute_holdout)}


def load_or_compute_oof(
    run: Run, cache: str | None = None, *, recompute: bool = False, device: str | None = None, tta: bool = True,
    split: str = "oof",
) -> tuple[OofStats, bool]:
    """The run's stored statistics of `split` ("oof": each fold model on its own validation fold;
    "holdout": the fold ensemble on the hold-out patients) when they match its fold checkpoints,
    else computed and stored. Returns (stats, computed now)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {sorted(SPLITS)}")
    path, compute = SPLITS[split]
    uri = storage.join(run.run_dir, path)
    if not recompute:
        try:
            stats = OofStats.load(uri)
        except FileNotFoundError:
            stats = None
        if stats is not None:
            if stats.meta.get("checkpoints") == run.checkpoint_record() and stats.meta.get("tta") == tta:
                return stats, False
            log.info("%s was computed from other checkpoints or TTA; recomputing", uri)
    stats = compute(run, resolve_cache(run, cache), device=device, tta=tta)
    stats.save(uri)
    return stats, True


def find_thresholds(run_dir: str, *, cache: str | None = None, recompute: bool = False, device: str | None = None) -> tuple[SearchResult, str, OofStats]:
    """`ptxray thresholds`: search the OOF predictions and store `<run>/thresholds.json`."""
    run = open_run(run_dir)
    stats, _ = load_or_compute_oof(run, cache, recompute=recompute, device=device)
    result = search_thresholds(stats)
    uri = storage.join(run.run_dir, THRESHOLDS_FILE)
    save_search(result, uri, extra={"oof": {"path": storage.join(run.run_dir, OOF_FILE), **stats.meta}})
    return result, uri, stats


__all__ = [
    "Ensemble",
    "PRED_SCHEMA",
    "Pictures",
    "Predictor",
    "compute_holdout",
    "compute_oof",
    "default_device",
    "encode_png",
    "find_thresholds",
    "full_size_mask",
    "load_or_compute_oof",
    "overlay",
    "preprocess_dicom",
    "read_batch",
    "read_files",
    "repeat_name",
    "resolve_cache",
    "run_predict",
    "run_thresholds",
    "separate_repeats",
    "write_outputs",
]
