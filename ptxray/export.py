"""Export a run's fold models for serving (ONNX, TorchScript), and predicted masks as DICOM SEG.

Exported graph (one fold, or the ensemble of every fold of the run):
- input `image`: uint8 (B, C, S, S), what `ptxray.predict.preprocess_dicom` makes of a DICOM for
  the run's `preprocess` settings (S = `preprocess.image_size_px`; B is dynamic): `read_dicom`
  with a JPEG frame decoded at a reduced DCT scale (`min_size_px=S`), then the channel stack of
  `ptxray.preprocess.channels_from_config`. The manifest names that function and records the
  decode, since a full-size decode gives slightly different pixels. The graph divides by 255
  itself, exactly what the engine does to uint8 batches, so a server feeds the preprocessed bytes
  as they are (the TorchScript module also accepts float32 in 0..255).
- outputs `mask_prob` float32 (B, 1, S, S) and `ptx_prob` float32 (B,): probabilities, the mean of
  the sigmoids over the folds (and over the horizontal flip with `tta_flip`), the same averaging
  prediction uses. Thresholds and the empty-mask decision stay with the caller.
A manifest (`<model file>.json`) beside the model says all of the above in machine-readable form.

Every export is checked before it is written: the exported model is run (onnxruntime on CPU, or
the reloaded TorchScript module) on a random batch of a different batch size than the export
example, and on a real DICOM preprocessed like training did, and must match PyTorch within `atol`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import math
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ptxray import __version__, storage
from ptxray.cache import list_dicoms
from ptxray.dicom import DicomError
from ptxray.models import describe_architecture
from ptxray.runs import FoldEnsemble

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAMES = ("mask_prob", "ptx_prob")
DEFAULT_OPSET = 18  # onnxruntime >= 1.14 and most serving runtimes run opset 18
DEFAULT_ATOL = 1e-4  # on probabilities; float32 re-ordering differences are ~1e-6

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class ExportError(ValueError):
    """A run that cannot be exported, or an export whose outputs do not match PyTorch's."""


# ---- the exported module --------------------------------------------------------------------
# ---- export ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    path: str  # the model file (local path or s3:// URI)
    manifest_path: str  # <path>.json
    format: str
    folds: tuple[int, ...]
    tta_flip: bool
    max_abs_diff_random: float  # exported vs PyTorch, on a random uint8 batch
    max_abs_diff_real: float | None  # ... on a real DICOM (None when none was found)
    real_image: str | None
    atol: float
    seconds: float
    manifest: dict[str, Any]


def _reason(exc: BaseException) -> str:
    """The innermost cause's first line: torch's exporter wraps the useful message in pages of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _same_model_settings(cfgs: list[Any], run_dir: str, folds: list[int]) -> None:
    # One graph holds every fold: they must take the same input and be the same kind of model.
    first = cfgs[0]
    for fold, cfg in zip(folds[1:], cfgs[1:]):
        for section in ("preprocess", "model"):
            a = dataclasses.asdict(getattr(first, section))
            b = dataclasses.asdict(getattr(cfg, section))
            diff = sorted(k for k in a if a[k] != b.get(k))
            if diff:
                raise ExportError(
                    f"{run_dir}: fold {fold} differs from fold {folds[0]} in {section}."
                    f"{', '.join(diff)}; export the folds one at a time (--fold)"
                )


def _first_dicom(root: str) -> str | None:
    """The first DICOM (in the ingest listing's order) under a local folder or s3:// prefix; None
    if there is none or the root cannot be listed."""
    if not root:
        return None
    try:
        _, paths, _ = list_dicoms(root)
    except OSError as e:
        logger.warning("cannot list %s for a check image (%s)", root, e)
        return None
    if not paths:
        return None
    return f"{root.split('://', 1)[0]}://{paths[0]}" if storage.is_uri(root) else paths[0]


# The function that turns a DICOM into the exported graph's input, exactly as `ptxray predict` does;
# the manifest names it (PREPROCESSING_FUNCTION) so a server can call it, or follow DECODE_TEXT.
PREPROCESSING_FUNCTION = "ptxray.predict.preprocess_dicom"


def _real_batch(check_dicom: str, cfg: Any) -> np.ndarray:
    """uint8 (1, C, S, S): one real DICOM through the run's own preprocessing (predict's)."""
    from ptxray.predict import preprocess_dicom

    with storage.open_input_stream(check_dicom) as f:
        _, stack = preprocess_dicom(f.read(), check_dicom, cfg.preprocess)
    return stack[None]


HEARTBEAT_S = 15.0  # seconds between "still writing" lines while the exporter runs


@contextlib.contextmanager
def _heartbeat(message: str):
    """Log `message (N s)` every HEARTBEAT_S seconds until the block ends: the exporter itself is
    one call that runs for a minute or more on larger models, with no progress of its own."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            logger.info("%s (%.0f s)", message, time.perf_counter() - start)

    thread = threading.Thread(target=beat, daemon=True, name="ptxray-export-heartbeat")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _max_abs_diff(got: list[np.ndarray], want: tuple[Tensor, Tensor]) -> float:
    diffs = []
    for name, g, w in zip(OUTPUT_NAMES, got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            raise ExportError(f"exported output {name} has shape {g.shape}, PyTorch's has {w.shape}")
        diffs.append(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0)
    return max(diffs)


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter's passes log every rewrite at INFO; under the CLI's INFO logging that is noise."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_onnx(module: FoldEnsemble, example: Tensor, path: Path, opset: int, arch: str):
    import onnx
    import onnxruntime as ort

    try:
        with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not ours to act on
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
            )
            program.save(str(path), external_data=False)
    except Exception as e:  # torch.export / onnxscript raise many types; all mean "this arch does not export"
        raise ExportError(f"model.arch={arch}: cannot be exported to ONNX (opset {opset}): {_reason(e)}") from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"model.arch={arch}: the exported ONNX graph fails onnx.checker: {_reason(e)}") from e
    # When converting to the requested opset fails, the exporter only logs it and saves its own
    # opset: a runtime pinned to `opset` would then refuse the file, so that is an error here.
    saved = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}.get("", None)
    if saved != opset:
        raise ExportError(
            f"model.arch={arch}: cannot be exported to ONNX (opset {opset}): the exporter could not convert "
            f"the graph to opset {opset} and wrote opset {saved} (the exporter's own); choose another --opset"
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})


def _export_torchscript(module: FoldEnsemble, example: Tensor, path: Path, arch: str):
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, but TorchScript is what many
            # serving stacks (TorchServe, libtorch C++) still load; and shape-check TracerWarnings
            # are expected (input sizes are fixed by the manifest).
            warnings.simplefilter("ignore")
            # Trace, not script: the models' Python (smp's, timm's) is not TorchScript-compatible.
            traced = torch.jit.trace(module, (example,), check_trace=False)
            torch.jit.save(traced, str(path))
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ExportError(f"model.arch={arch}: cannot be exported to TorchScript: {_reason(e)}") from e
    loaded.eval()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in loaded(torch.from_numpy(batch))]

    return run


def default_export_name(fmt: str, fold: int | None, tta_flip: bool = False) -> str:
    """`ensemble.onnx`, `fold2-flip.torchscript.pt`, ... (what the CLI writes under <run>/export/)."""
    stem = ("ensemble" if fold is None else f"fold{fold}") + ("-flip" if tta_flip else "")
    return f"{stem}.onnx" if fmt == "onnx" else f"{stem}.torchscript.pt"


def export_run(
    run_dir: str,
    out: str,
    *,
    fmt: str = "onnx",
    fold: int | None = None,
    tta_flip: bool = False,
    opset: int = DEFAULT_OPSET,
    which: str = "best",
    check_dicom: str | None = None,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> ExportResult:
    """Export one fold (`fold`) or the ensemble of every fold (`fold=None`) of a finished run.

    `out` is the model file, local or s3://; the manifest goes to `out + ".json"`. `check_dicom`
    is a real DICOM for the check (default: the first *.dcm under the run's `data.images`; without
    one only the random batch is checked, and the manifest says so). Raises ExportError when the
    run cannot be exported or the exported outputs differ from PyTorch's by more than `atol`.
    """
    from ptxray.runs import load_fold_model, open_run

    start = time.perf_counter()
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: choose from {list(FORMATS)}")
    run = open_run(run_dir)
    refs = list(run.folds)
    if fold is not None:
        refs = [r for r in refs if r.fold == fold]
        if not refs:
            raise ExportError(f"{run.run_dir}: no fold {fold}; the run has folds {run.fold_ids}")
    loaded = [load_fold_model(r, which) for r in refs]
    models, cfgs = [m for m, _ in loaded], [c for _, c in loaded]
    folds = [r.fold for r in refs]
    _same_model_settings(cfgs, run.run_dir, folds)
    cfg = cfgs[0]
    arch = describe_architecture(cfg.model)
    channels, size_px = cfg.model.in_channels, cfg.preprocess.image_size_px
    module = FoldEnsemble(models, tta_flip=tta_flip)
    # Progress: the export itself runs for a minute or more on larger models, with nothing else to show.
    logger.info("export: loaded %d fold model(s) %s of %s (%s, %d px) in %.1f s",
                len(models), folds, run.run_dir, arch, size_px, time.perf_counter() - start)  # fmt: skip

    rng = np.random.default_rng(seed)
    example = torch.from_numpy(rng.integers(0, 256, (2, channels, size_px, size_px), dtype=np.uint8))
    # A different batch size than the example's: proves the batch axis is really dynamic.
    random_batch = rng.integers(0, 256, (3, channels, size_px, size_px), dtype=np.uint8)
    real_image, real_batch = check_dicom, None
    if check_dicom:
        real_batch = _real_batch(check_dicom, cfg)
    else:
        real_image = _first_dicom(cfg.data.images)
        try:
            real_batch = _real_batch(real_image, cfg) if real_image else None
        except (DicomError, OSError) as e:  # a found file that is bad must not stop the export
            logger.warning("skipping the real-image check: %s", e)
            real_image = None
    if real_batch is None:
        logger.warning("no real DICOM to check on (pass check_dicom / --check-dicom); random batch only")

    with tempfile.TemporaryDirectory(prefix="ptxray-export-") as tmp:
        local = Path(tmp) / Path(out.split("://", 1)[-1]).name
        with torch.no_grad():
            want_random = module(torch.from_numpy(random_batch))
            want_real = module(torch.from_numpy(real_batch)) if real_batch is not None else None
        how = f"torch.onnx dynamo exporter, opset {opset}" if fmt == "onnx" else "torch.jit.trace"
        logger.info("export: writing the %s graph (%s); the slow step", fmt, how)
        t_export = time.perf_counter()
        with _heartbeat(f"export: still writing the {fmt} graph"):
            if fmt == "onnx":
                run_exported = _export_onnx(module, example, local, opset, arch)
            else:
                run_exported = _export_torchscript(module, example, local, arch)
        logger.info("export: graph written in %.1f s; checking it against PyTorch (a random batch%s)",
                    time.perf_counter() - t_export, ", a real DICOM" if real_batch is not None else "")  # fmt: skip
        diff_random = _max_abs_diff(run_exported(random_batch), want_random)
        diff_real = _max_abs_diff(run_exported(real_batch), want_real) if real_batch is not None else None
        worst = max(diff_random, diff_real or 0.0)
        if not worst <= atol:  # also catches NaN
            raise ExportError(
                f"model.arch={arch}: the exported {fmt} model differs from PyTorch by {worst:.3g} "
                f"(random batch {diff_random:.3g}, real image {diff_real}); tolerance {atol:g}"
            )
        manifest = _manifest(
            run, refs, cfg, fmt=fmt, file_name=local.name, tta_flip=tta_flip, opset=opset, which=which,
            atol=atol, diff_random=diff_random, diff_real=diff_real, real_image=real_image,
        )
        manifest_path = out + ".json"
        storage.write_bytes_atomic(out, local.read_bytes())
        storage.write_bytes_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    seconds = time.perf_counter() - start
    logger.info(
        "exported %s folds %s (%s) to %s: max |diff| %.2g random, %s real, in %.1f s",
        fmt, folds, arch, out, diff_random, "n/a" if diff_real is None else f"{diff_real:.2g}", seconds,
    )
    return ExportResult(
        path=out, manifest_path=manifest_path, format=fmt, folds=tuple(folds), tta_flip=tta_flip,
        max_abs_diff_random=diff_random, max_abs_diff_real=diff_real, real_image=real_image, atol=atol,
        seconds=seconds, manifest=manifest,
    )


def _manifest(run, refs, cfg, *, fmt, file_name, tta_flip, opset, which, atol, diff_random, diff_real, real_image):
    size, channels = cfg.preprocess.image_size_px, cfg.model.in_channels
    manifest: dict[str, Any] = {
        "file": file_name,
        "format": fmt,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", channels, size, size],
            "dtype": "uint8",
            "description": f"{PREPROCESSING_FUNCTION}(dicom_bytes, path, PreprocessConfig(**preprocessing))[1], "
            "one (C, S, S) channel stack per image, stacked along the batch axis",
        },
        "preprocessing": cfg.to_dict()["preprocess"],
        "preprocessing_function": PREPROCESSING_FUNCTION,
        "decode": {
            "min_size_px": size,
            "jpeg_baseline": (
                "libjpeg-turbo (OpenCV imdecode) at a reduced DCT scale 1/k: the largest k of 8, 4, 2 with "
                f"ceil(Rows / k) >= {size} and ceil(Columns / k) >= {size} (cv2.IMREAD_REDUCED_GRAYSCALE_k), "
                "else the full size; a full-size decode followed by the resize gives pixels a few grey levels "
                "apart, and probabilities up to ~0.02 apart"
            ),
            "other_transfer_syntaxes": "pydicom's pixel handlers, full size",
            "then": "MONOCHROME1 inverted, rescale and VOI LUT / window applied (ptxray.dicom.read_dicom), "
            "then ptxray.preprocess.channels_from_config: INTER_AREA resize to S x S and the channel stack",
        },
        "normalisation": "inside the graph: float32(image) / 255 (no mean/std), as ptxray.engine does",
        "outputs": [
            {"name": OUTPUT_NAMES[0], "shape": ["batch", 1, size, size], "dtype": "float32",
             "description": "pneumothorax probability per pixel"},
            {"name": OUTPUT_NAMES[1], "shape": ["batch"], "dtype": "float32",
             "description": "pneumothorax probability per image (classification head)"},
        ],
        "ensemble": "mean of sigmoid probabilities over folds" + (" and horizontal flip" if tta_flip else ""),
        "tta_flip": tta_flip,
        "folds": [r.fold for r in refs],
        "checkpoints": [r.best if which == "best" else r.last for r in refs],
        "run_dir": run.run_dir,
        "run_kind": run.kind,
        "model": cfg.to_dict()["model"],
        "check": {
            "atol": atol,
            "max_abs_diff_random": diff_random,
            "max_abs_diff_real": diff_real,
            "real_image": real_image,
            "runtime": "onnxruntime CPUExecutionProvider" if fmt == "onnx" else "torch.jit.load",
        },
        "ptxray_version": __version__,
        "torch_version": torch.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if fmt == "onnx":
        import onnx
        import onnxruntime

        manifest["onnx_opset"] = opset
        manifest["onnx_version"] = onnx.__version__
        manifest["onnxruntime_version"] = onnxruntime.__version__
    return manifest


# ---- DICOM Segmentation ---------------------------------------------------------------------
# DICOM Type 2 attributes of the Patient and General Study modules: they must be present but may
# be empty. highdicom copies them from the source and fails on an absent one; anonymised exports
# (SIIM's among them: no birth date value) often drop or blank them, so a missing one becomes empty.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
# Pneumothorax in CIELab (approximately sRGB red), so viewers draw it in a colour that stands out.
_DISPLAY_LAB = (53.2, 80.1, 67.2)
# Copied attributes the SEG must carry with a value (Type 1), so an invalid one cannot be emptied:
# the UIDs that place the SEG in its source's study and frame of reference (a made-up one would put
# it elsewhere), and Lossy Image Compression (Segmentation Image module). Invalid, they are an error.
_TYPE1_COPIED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "LossyImageCompression",
)
# Copied attributes with enumerated values (PS3.3 C.7.1.1, C.7.6.1): a value outside them is invalid
# even where the VR accepts it.
_ENUMERATED = {"PatientSex": ("M", "F", "O"), "LossyImageCompression": ("00", "01")}
# Patient Orientation (PS3.3 C.7.6.1.1.1): one direction per axis, each 1-3 of these letters.
_ORIENTATION = re.compile(r"^[APRLHF]{1,3}$")


def _binary_mask(mask: np.ndarray, where: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"{where}: mask must be a non-empty (H, W) array, got shape {mask.shape}")
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"{where}: mask dtype {mask.dtype} is not boolean or numeric")
    if mask.dtype.kind == "f" and not np.isin(mask, (0.0, 1.0)).all():
        raise ValueError(f"{where}: mask holds probabilities, not 0/1; threshold it before writing a BINARY SEG")
    return mask != 0  # (H, W) bool


def _pneumothorax_segment(name: str, version: str, parameters: dict[str, str] | None):
    """The SEG's one segment, "Pneumothorax", identified as automatic AI output of `name` `version`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=name,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        parameters=parameters or None,
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Pneumothorax",
        # CID 7150 category / CID 7151-family type, SNOMED CT: 49755003 / 36118008.
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Pneumothorax,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor(*_DISPLAY_LAB),
    )


def write_dicom_seg(
    source_dicom_bytes: bytes,
    mask: np.ndarray,
    out_path_or_uri: str,
    *,
    source_path: str = "",
    algorithm_name: str = "ptxray",
    algorithm_version: str = __version__,
    algorithm_parameters: dict[str, str] | None = None,
    series_number: int = 9001,
    series_description: str = "ptxray pneumothorax segmentation",
) -> None:
    """Write a DICOM Segmentation (BINARY, one segment "Pneumothorax") of `mask` over the source image.

    - `mask`: (H, W) bool or 0/1 (any non-zero counts) at any size: it is resized to the source's
      Rows x Columns with nearest-neighbour sampling when needed (predictions are made at
      `preprocess.image_size_px`), so it lines up with the source pixel grid in a viewer.
    - The SEG joins the source's study (same Study Instance UID and patient), in a new series, and
      references the source image (ReferencedSeriesSequence, SourceImageSequence).
    - An empty mask is written too, as a valid SEG whose one frame is all zero: "the algorithm
      looked and found nothing" is a result a reader should see, not a missing file.
    - The SEG passes the standard's validator (dciodvfy): every value it copies from the source is
      checked against its VR and, where invalid, normalised when the meaning is unambiguous (SIIM's
      age '38' -> '038Y', '2019-01-31' -> '20190131') or emptied; one INFO line per SEG says which.
      Patient Orientation (Type 2C) is the source's, or empty when the source has none.
    - Bad source bytes raise DicomError naming `source_path`; so does a source that lacks the
      UIDs a reference needs, or holds an invalid value the SEG must carry (a UID, Lossy Image
      Compression).
    """
    import highdicom as hd
    import pydicom

    from ptxray.dicom import read_dicom

    where = source_path or "<source bytes>"
    # Decoding validates the file the way the data pipeline does (truncation, colour, multi-frame).
    read_dicom(source_dicom_bytes, source_path)
    try:
        source = pydicom.dcmread(io.BytesIO(bytes(source_dicom_bytes)), stop_before_pixels=True)
    except Exception as e:  # read_dicom accepted it, so this is very unlikely
        raise DicomError(source_path, f"cannot parse the header ({type(e).__name__}: {e})") from e
    # The SEG copies the source's patient, study, equipment and geometry attributes as they are, so
    # any value that breaks its VR is fixed on our in-memory copy first (else the derived object is
    # invalid: SIIM's Patient's Age '38' for '038Y').
    fixes = _conform_to_vrs(source, source_path)
    _complete_source_header(source, source_path)

    rows, columns = int(source.Rows), int(source.Columns)
    binary = _binary_mask(mask, where)
    if binary.shape != (rows, columns):
        import cv2

        logger.debug("%s: mask %s resized to the source's %dx%d (nearest)", where, binary.shape, rows, columns)
        binary = cv2.resize(binary.view(np.uint8), (columns, rows), interpolation=cv2.INTER_NEAREST) > 0

    segment = _pneumothorax_segment(algorithm_name, algorithm_version, algorithm_parameters)
    with warnings.catch_warnings():
        # SIIM's PatientName is a bare UUID, which highdicom flags as an unusual person name.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        try:
            seg = hd.seg.Segmentation(
                source_images=[source],
                pixel_array=binary[None],  # (1, Rows, Columns): one frame
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="ptxray",
                manufacturer_model_name=algorithm_name,
                software_versions=algorithm_version,
                device_serial_number="none",
                series_description=series_description,
                content_label="PNEUMOTHORAX",
                content_description="Pneumothorax predicted by ptxray",
                omit_empty_frames=False,  # keep the (possibly all-zero) frame: see the docstring
            )
        except (ValueError, TypeError, AttributeError) as e:
            raise DicomError(source_path, f"cannot build a DICOM SEG over this image ({type(e).__name__}: {e})") from e
    _add_patient_orientation(seg, source)
    _log_fixes(seg, fixes, where)
    buffer = io.BytesIO()
    seg.save_as(buffer)
    storage.write_bytes_atomic(out_path_or_uri, buffer.getvalue())


@dataclass(frozen=True)
class _Fix:
    tag: int
    keyword: str
    old: str  # the source's value, backslash-joined
    new: str | None  # the conforming value; None: emptied


def _as_text(value: Any) -> list[str]:
    """The values of a string-VR element as the file holds them (DS/IS keep their original text)."""
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(v) for v in values]


def _conform(vr: str, keyword: str, text: str) -> str | None:
    """`text` if valid for `vr` (and for the attribute's enumerated values), the same meaning in the
    valid form where that is unambiguous, else None.

    pydicom's validators check what the VR allows; what they cannot check (a calendar date, the
    enumerated values of a few copied attributes) is checked here. The normalisations are the forms
    seen in real exports: bare ages in years (SIIM), ISO dates, ACR-NEMA times, over-long decimals.
    """
    from pydicom import config
    from pydicom.valuerep import format_number_as_ds, validate_value

    def valid(candidate: str) -> bool:
        try:
            validate_value(vr, candidate, config.RAISE)
        except ValueError:
            return False
        if vr == "DA" and candidate:
            try:
                datetime.datetime.strptime(candidate, "%Y%m%d")
            except ValueError:
                return False
        if keyword in _ENUMERATED and candidate not in _ENUMERATED[keyword]:
            return False
        return not (keyword == "PatientOrientation" and not _ORIENTATION.match(candidate))

    if valid(text):
        return text
    stripped = text.strip()
    candidate: str | None = None
    if vr == "AS":
        # A bare number is years (SIIM writes '38'); a unit letter may follow, after a space.
        m = re.fullmatch(r"(\d{1,3})\s*([DWMYdwmy]?)", stripped)
        candidate = f"{int(m[1]):03d}{(m[2] or 'Y').upper()}" if m else None
    elif vr in ("DS", "IS"):
        try:
            number = float(stripped)
        except ValueError:
            number = math.nan
        if vr == "DS" and math.isfinite(number):
            candidate = format_number_as_ds(number)
        elif vr == "IS" and math.isfinite(number) and number.is_integer():
            candidate = str(int(number))
    elif vr == "DA" and re.fullmatch(r"\d{4}([-./])\d{2}\1\d{2}", stripped):  # ISO, or ACR-NEMA's dots
        candidate = re.sub(r"\D", "", stripped)
    elif vr == "TM" and re.fullmatch(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?", stripped):  # ACR-NEMA's colons
        candidate = stripped.replace(":", "")
    elif vr == "CS":
        candidate = stripped.upper()
        if keyword == "LossyImageCompression" and candidate.isdigit():
            candidate = candidate.zfill(2)  # '1' for the enumerated '01'
    else:
        candidate = stripped
    return candidate if candidate is not None and valid(candidate) else None


# Values pydicom holds as numbers or bytes, checked (or not) when the file is parsed: not text.
_NOT_TEXT_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})


def _conform_to_vrs(ds: Any, source_path: str, nested: bool = False) -> list[_Fix]:
    """Fix or empty, in place, every text value of `ds` (nested sequences included) that breaks its
    VR; returns what changed. An invalid value the SEG must carry (_TYPE1_COPIED) raises DicomError.

    Everything is checked, not only what highdicom copies today: which attributes it copies depends
    on the source's IOD and on highdicom's version, and a fix the SEG does not carry is harmless.
    """
    from pydicom import DataElement

    fixes: list[_Fix] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on each invalid value it parses; we fix them
        for elem in list(ds):
            if elem.VR == "SQ":
                for item in elem.value or ():
                    fixes += _conform_to_vrs(item, source_path, nested=True)
                continue
            if elem.VR in _NOT_TEXT_VRS or elem.is_empty:
                continue
            keyword = elem.keyword or str(elem.tag)
            texts = _as_text(elem.value)
            conformed = [_conform(elem.VR, keyword, t) for t in texts]
            if keyword == "PatientOrientation" and len(texts) != 2:
                conformed = [None]  # one direction per image axis, no more, no less
            if conformed == texts:
                continue
            old = "\\".join(texts)
            if None in conformed:  # one bad value empties the attribute: its values go together
                if keyword in _TYPE1_COPIED and not nested:
                    reason = f"{keyword} '{old}' is not a valid {elem.VR} value, and the SEG needs it (Type 1)"
                    raise DicomError(source_path, f"cannot write a valid SEG: {reason}")
                ds[elem.tag] = DataElement(elem.tag, elem.VR, None)
                fixes.append(_Fix(int(elem.tag), keyword, old, None))
            else:
                ds[elem.tag] = DataElement(elem.tag, elem.VR, conformed if len(conformed) > 1 else conformed[0])
                fixes.append(_Fix(int(elem.tag), keyword, old, "\\".join(conformed)))  # type: ignore[arg-type]
    return fixes


def _add_patient_orientation(seg: Any, source: Any) -> None:
    """Patient Orientation (General Image module) is Type 2C: required when the image has no Image
    Orientation (Patient), as a SEG over a Secondary Capture X-ray has none. The SEG's frame is the
    source's pixel grid, so the source's (already conformed) value holds; empty when unknown."""
    if "PatientOrientation" in seg:
        return
    orientation = source["PatientOrientation"] if "PatientOrientation" in source else None
    if orientation is not None and not orientation.is_empty:
        seg.PatientOrientation = _as_text(orientation.value)
    elif "FrameOfReferenceUID" not in seg:
        seg.PatientOrientation = None  # present and empty: "unknown" (Type 2C)


def _log_fixes(seg: Any, fixes: list[_Fix], where: str) -> None:
    """One line per SEG naming what it carries in a different form than its source: the fixes whose
    result the SEG holds (a fixed value highdicom did not copy, or replaced by its own, changes nothing)."""
    held: set[tuple[int, str]] = set()  # (tag, backslash-joined text; "" when empty)

    def walk(ds: Any) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    walk(item)
            elif elem.VR not in _NOT_TEXT_VRS:
                held.add((int(elem.tag), "" if elem.is_empty else "\\".join(_as_text(elem.value))))

    walk(seg)
    shown = [f for f in fixes if (f.tag, f.new or "") in held]
    normalised = [f"{f.keyword} '{f.old}' -> '{f.new}'" for f in shown if f.new is not None]
    emptied = [f"{f.keyword} '{f.old}'" for f in shown if f.new is None]
    if normalised or emptied:
        parts = ([f"normalised {'; '.join(normalised)}"] if normalised else []) + (
            [f"emptied (no valid form with the same meaning) {'; '.join(emptied)}"] if emptied else []
        )
        logger.info("%s: source values invalid for their DICOM VR, in the SEG: %s", where, "; ".join(parts))


def _complete_source_header(ds: Any, source_path: str) -> None:
    """Fill in what highdicom needs and minimal exports may lack, on our in-memory copy only."""
    meta = getattr(ds, "file_meta", None)
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(ds.get(keyword) or "").strip() and meta is not None and meta.get(meta_keyword):
            setattr(ds, keyword, meta.get(meta_keyword))
    # These place the SEG next to its source; made-up values would put it in another study.
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not str(ds.get(k) or "").strip()]
    if missing:
        raise DicomError(source_path, f"cannot reference the source image in a SEG: no {', '.join(missing)}")
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if not str(ds.get("Modality") or "").strip():
        ds.Modality = "OT"  # "other": the source's modality is unknown; the SEG's own is "SEG"


__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "ExportError",
    "ExportResult",
    "FORMATS",
    "FoldEnsemble",
    "OUTPUT_NAMES",
    "SEGMENTATION_STORAGE",
    "default_export_name",
    "export_run",
    "write_dicom_seg",
]
