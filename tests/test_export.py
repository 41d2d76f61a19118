"""ptxray.export: ONNX / TorchScript exports match PyTorch; DICOM SEG files read back and reference
their source. Run folders are real: fold models trained one epoch by ptxray.engine.fit on tiny
random 64 px batches (a trained-looking checkpoint with the exact keys fit writes)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import pytest
import torch

from ptxray.config import load_config
from ptxray.dicom import DicomError, read_dicom
from ptxray.checkpoint import save_checkpoint
from ptxray.engine import CHECKPOINT_FORMAT, batch_from_numpy, fit
from ptxray.export import (
    SEGMENTATION_STORAGE,
    ExportError,
    FoldEnsemble,
    default_export_name,
    export_run,
    write_dicom_seg,
)
from ptxray.models import build_model
from ptxray.preprocess import channels_from_config
from ptxray.runs import load_fold_models, open_run

SAMPLES = Path(__file__).parent / "data" / "siim-sample" / "sample-images"
POSITIVE_ID = "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709"  # a positive row of the sample CSV
SOURCE = SAMPLES / f"{POSITIVE_ID}.dcm"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

VANILLA = ["model.arch=unet_vanilla", "model.vanilla.depth=2", "model.vanilla.base_filters=4"]
SMP_UNET = ["model.arch=unet", "model.encoder=resnet18", "model.encoder_weights=none"]


def _train_fold(run_dir: Path, overrides: list[str], fold: int) -> Path:
    cfg = load_config("smoke", [*overrides, f"train.fold={fold}", "train.early_stop_patience=0"])
    rng = np.random.default_rng(fold)
    images = rng.integers(0, 256, (4, cfg.model.in_channels, 64, 64), dtype=np.uint8)
    masks = (rng.random((4, 64, 64)) > 0.8).astype(np.uint8)
    batch = batch_from_numpy(images, masks)
    torch.manual_seed(fold)
    fit(build_model(cfg.model), cfg, lambda epoch, rng: [batch], lambda: [batch], run_dir=run_dir, device="cpu")
    assert (run_dir / "checkpoints" / "best.pt").exists()
    return run_dir


@pytest.fixture(scope="module")
def kfold_run(tmp_path_factory) -> Path:
    """A 2-fold K-fold run folder (summary.json naming one checkpoint folder per fold)."""
    root = tmp_path_factory.mktemp("kfold-run")
    folds = {f: str(_train_fold(root / f"trial_f{f}" / "checkpoint_epoch_0000", VANILLA, f)) for f in (0, 1)}
    summary = {"best": {"params": {}, "fold_checkpoints": folds}}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture(scope="module")
def smp_run(tmp_path_factory) -> Path:
    """A single-fold `ptxray train` run folder of smp's U-Net on a resnet18 encoder.

    Untrained, written with the keys fit gives best.pt: fit's last.pt of resnet18 with AdamW state
    (~170 MB) would cost more than the exports under test, and no output comparison needs training.
    """
    run_dir = tmp_path_factory.mktemp("smp-run")
    cfg = load_config("smoke", SMP_UNET)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = {"format": CHECKPOINT_FORMAT, "kind": "best", "model": model.state_dict(), "epoch": 0,
             "metrics": {"epoch": 0, "val_dice": 0.5}, "config": cfg.to_dict()}
    save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
    return run_dir


def _manual_ensemble(models, images_uint8: np.ndarray, flip: bool):
    """The averaging written out by hand, straight on the fold models."""
    x = torch.from_numpy(images_uint8).float() / 255.0
    masks, probs = [], []
    with torch.no_grad():
        for m in models:
            seg, cls = m(x)
            masks.append(torch.sigmoid(seg))
            probs.append(torch.sigmoid(cls)[:, 0])
            if flip:
                seg, cls = m(x.flip(3))
                masks.append(torch.sigmoid(seg).flip(3))
                probs.append(torch.sigmoid(cls)[:, 0])
    return torch.stack(masks).mean(0).numpy(), torch.stack(probs).mean(0).numpy()


def test_fold_ensemble_is_the_mean_of_fold_probabilities_with_flip(kfold_run):
    models = [m for _, m in load_fold_models(open_run(str(kfold_run)))]
    images = np.random.default_rng(5).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        mask, prob = FoldEnsemble(models, tta_flip=True)(torch.from_numpy(images))
    want_mask, want_prob = _manual_ensemble(models, images, flip=True)
    assert mask.shape == (2, 1, 64, 64) and prob.shape == (2,)
    np.testing.assert_allclose(mask.numpy(), want_mask, atol=1e-6)
    np.testing.assert_allclose(prob.numpy(), want_prob, atol=1e-6)
    # The flip view really changes something (else TTA would be untested).
    plain_mask, _ = _manual_ensemble(models, images, flip=False)
    assert np.abs(plain_mask - want_mask).max() > 1e-4


def test_onnx_ensemble_with_flip_matches_pytorch(kfold_run, tmp_path):
    out = tmp_path / "ensemble.onnx"
    result = export_run(str(kfold_run), str(out), fmt="onnx", tta_flip=True, check_dicom=str(SOURCE))
    assert result.folds == (0, 1) and result.tta_flip
    assert result.max_abs_diff_random <= 1e-4 and result.max_abs_diff_real is not None and result.max_abs_diff_real <= 1e-4

    # Independently of export_run's own check: load the file and run it on a real preprocessed image.
    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["mask_prob", "ptx_prob"]
    cfg = open_run(str(kfold_run)).config
    real = channels_from_config(read_dicom(SOURCE.read_bytes(), str(SOURCE)).image, cfg.preprocess)[None]
    batch = np.concatenate([real, real[:, :, ::-1].copy()])  # (2, 3, 64, 64)
    mask, prob = session.run(None, {"image": batch})
    models = [m for _, m in load_fold_models(open_run(str(kfold_run)))]
    want_mask, want_prob = _manual_ensemble(models, batch, flip=True)
    assert mask.shape == (2, 1, 64, 64) and prob.shape == (2,)
    np.testing.assert_allclose(mask, want_mask, atol=1e-4)
    np.testing.assert_allclose(prob, want_prob, atol=1e-4)

    manifest = json.loads((tmp_path / "ensemble.onnx.json").read_text())
    assert manifest == result.manifest
    assert manifest["input"] == {
        "name": "image", "shape": ["batch", 3, 64, 64], "dtype": "uint8",
        "description": manifest["input"]["description"],
    }
    assert manifest["preprocessing"]["channels"] == ["raw", "clahe", "beasf"]
    assert [o["name"] for o in manifest["outputs"]] == ["mask_prob", "ptx_prob"]
    assert manifest["folds"] == [0, 1] and manifest["tta_flip"] is True
    assert manifest["torch_version"] == torch.__version__ and manifest["ptxray_version"]
    assert manifest["check"]["real_image"] == str(SOURCE)


def test_following_the_manifest_gives_predicts_probabilities(kfold_run, tmp_path, caplog, monkeypatch):
    """A server that follows the manifest (its preprocessing function and settings, then the graph)
    gets the probabilities `ptxray predict` gets, to 1e-4, on real SIIM DICOMs; export shows its
    progress on the way."""
    import importlib

    import pyarrow as pa

    from ptxray.config import PreprocessConfig
    from ptxray.postprocess import default_thresholds
    from ptxray.predict import Ensemble, Predictor, preprocess_dicom

    import ptxray.export

    out = tmp_path / "ensemble-flip.onnx"
    monkeypatch.setattr(ptxray.export, "HEARTBEAT_S", 0.01)  # a line every 10 ms while the exporter runs
    with caplog.at_level(logging.INFO, logger="ptxray.export"):
        export_run(str(kfold_run), str(out), fmt="onnx", tta_flip=True, check_dicom=str(SOURCE))
    messages = [r.getMessage() for r in caplog.records if r.name == "ptxray.export"]
    stages = ["export: loaded 2 fold model(s) [0, 1]", "export: writing the onnx graph", "export: still writing the onnx graph (",
              "export: graph written in", "exported onnx"]  # fmt: skip
    at = [next(i for i, m in enumerate(messages) if m.startswith(stage)) for stage in stages]
    assert at == sorted(at), messages

    manifest = json.loads(Path(str(out) + ".json").read_text())
    module_name, function_name = manifest["preprocessing_function"].rsplit(".", 1)
    preprocess = getattr(importlib.import_module(module_name), function_name)
    pre = PreprocessConfig(**manifest["preprocessing"])
    sources = sorted(SAMPLES.glob("*.dcm"))[:4]
    batch = np.stack([preprocess(p.read_bytes(), str(p), pre)[1] for p in sources])  # (4, 3, 64, 64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    mask, ptx = session.run(None, {"image": batch})

    thresholds = default_thresholds(64).to_dict()
    table = pa.table({"bytes": [p.read_bytes() for p in sources], "path": [str(p) for p in sources]})
    rows = Predictor(str(kfold_run), str(tmp_path / "pred"), thresholds, device="cpu", write_images=False)(table).to_pylist()
    assert [r["error"] for r in rows] == [None] * 4
    np.testing.assert_allclose(ptx, [r["pneumothorax_probability"] for r in rows], atol=1e-4, rtol=0)
    predicted = np.stack([preprocess_dicom(p.read_bytes(), str(p), pre)[1] for p in sources])
    want_mask, _ = Ensemble.from_run(open_run(str(kfold_run)), "cpu").predict(predicted)
    np.testing.assert_allclose(mask[:, 0], want_mask, atol=1e-4, rtol=0)

    # The manifest records the decode that happened: SIIM's 1024 px JPEG at 1/8 scale for 64 px.
    assert manifest["decode"]["min_size_px"] == 64 and "1/k" in manifest["decode"]["jpeg_baseline"]
    assert read_dicom(SOURCE.read_bytes(), str(SOURCE), min_size_px=64).image.shape == (128, 128)
    # ... and it matters: a full-size decode (what the manifest used to imply) gives other pixels.
    full = np.stack([channels_from_config(read_dicom(p.read_bytes(), str(p)).image, pre) for p in sources])
    assert np.abs(full.astype(np.int16) - batch).max() > 2


def test_torchscript_one_fold_matches_pytorch(kfold_run, tmp_path):
    out = tmp_path / default_export_name("torchscript", 1)
    result = export_run(str(kfold_run), str(out), fmt="torchscript", fold=1, check_dicom=str(SOURCE))
    assert result.folds == (1,) and result.max_abs_diff_random <= 1e-4 and result.max_abs_diff_real <= 1e-4
    loaded = torch.jit.load(str(out))
    images = np.random.default_rng(9).integers(0, 256, (5, 3, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        mask, prob = loaded(torch.from_numpy(images))
    fold1 = dict(load_fold_models(open_run(str(kfold_run))))[1]
    want_mask, want_prob = _manual_ensemble([fold1], images, flip=False)
    np.testing.assert_allclose(mask.numpy(), want_mask, atol=1e-5)
    np.testing.assert_allclose(prob.numpy(), want_prob, atol=1e-5)
    assert json.loads(Path(result.manifest_path).read_text())["folds"] == [1]


def test_smp_unet_exports_to_onnx_and_torchscript(smp_run, tmp_path):
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / default_export_name(fmt, None)
        result = export_run(str(smp_run), str(out), fmt=fmt, check_dicom=str(SOURCE))
        assert result.folds == (0,) and result.manifest["model"]["arch"] == "unet"
        assert result.max_abs_diff_random <= 1e-4 and result.max_abs_diff_real <= 1e-4
        assert out.stat().st_size > 1_000_000  # resnet18's weights are in the file


def test_export_to_s3(kfold_run, moto_s3, tmp_path):
    moto_s3.client().create_bucket(Bucket="models")
    uri = "s3://models/ptx/fold0.onnx"
    result = export_run(str(kfold_run), uri, fmt="onnx", fold=0, check_dicom=str(SOURCE))
    s3 = moto_s3.client()
    body = s3.get_object(Bucket="models", Key="ptx/fold0.onnx")["Body"].read()
    session = ort.InferenceSession(body, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(2).integers(0, 256, (1, 3, 64, 64), dtype=np.uint8)
    fold0 = dict(load_fold_models(open_run(str(kfold_run))))[0]
    np.testing.assert_allclose(session.run(None, {"image": images})[0], _manual_ensemble([fold0], images, False)[0], atol=1e-4)
    manifest = json.loads(s3.get_object(Bucket="models", Key="ptx/fold0.onnx.json")["Body"].read())
    assert manifest["file"] == "fold0.onnx" and result.manifest_path == uri + ".json"


def test_export_errors_name_the_problem(kfold_run, tmp_path):
    with pytest.raises(ExportError, match=r"no fold 7; the run has folds \[0, 1\]"):
        export_run(str(kfold_run), str(tmp_path / "x.onnx"), fold=7)
    with pytest.raises(ExportError, match="choose from"):
        export_run(str(kfold_run), str(tmp_path / "x.tflite"), fmt="tflite")
    with pytest.raises(ValueError, match="not a ptxray run"):
        export_run(str(tmp_path), str(tmp_path / "x.onnx"))
    # An op the installed ONNX opset lacks: the error names the architecture and the exporter's reason.
    with pytest.raises(ExportError, match=r"model.arch=unet_vanilla: cannot be exported to ONNX \(opset 1\): .*wrote opset"):
        export_run(str(kfold_run), str(tmp_path / "x.onnx"), fold=0, opset=1, check_dicom=str(SOURCE))
    assert not (tmp_path / "x.onnx").exists()


# ---- DICOM SEG -------------------------------------------------------------------------------
def _read_seg(path: Path) -> pydicom.Dataset:
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    return seg


def test_seg_references_source_and_decodes_to_the_mask(tmp_path, validate_dicom):
    data = SOURCE.read_bytes()
    src = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    mask = np.zeros((1024, 1024), np.uint8)
    mask[300:520, 610:700] = 1  # an off-centre, non-symmetric box: orientation errors would show
    mask[100:110, 50:60] = 255
    out = tmp_path / "seg.dcm"
    write_dicom_seg(data, mask, str(out), source_path=str(SOURCE), algorithm_parameters={"threshold": "0.5"})

    validate_dicom(out)
    seg = _read_seg(out)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SOPInstanceUID != src.SOPInstanceUID
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    (ref_instance,) = ref_series.ReferencedInstanceSequence
    assert ref_instance.ReferencedSOPInstanceUID == src.SOPInstanceUID == POSITIVE_ID
    assert ref_instance.ReferencedSOPClassUID == src.SOPClassUID
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == POSITIVE_ID
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "Pneumothorax" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"  # SNOMED CT Pneumothorax
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ptxray" and "threshold=0.5" in algorithm.AlgorithmParameters
    assert (seg.Rows, seg.Columns) == (1024, 1024)
    np.testing.assert_array_equal(seg.pixel_array, mask > 0)


def test_seg_resizes_a_model_size_mask_with_nearest(tmp_path, validate_dicom):
    data = SOURCE.read_bytes()
    mask = np.zeros((64, 64), bool)
    mask[10:30, 5:20] = True
    mask[40, 50] = True
    out = tmp_path / "seg.dcm"
    write_dicom_seg(data, mask, str(out), source_path=str(SOURCE))
    validate_dicom(out)
    want = cv2.resize(mask.astype(np.uint8), (1024, 1024), interpolation=cv2.INTER_NEAREST)
    pixels = _read_seg(out).pixel_array
    np.testing.assert_array_equal(pixels, want)
    assert pixels.sum() == mask.sum() * 16 * 16


def test_empty_mask_is_a_valid_all_zero_seg(tmp_path, validate_dicom):
    out = tmp_path / "empty.dcm"
    write_dicom_seg(SOURCE.read_bytes(), np.zeros((64, 64), np.uint8), str(out), source_path=str(SOURCE))
    validate_dicom(out)
    seg = _read_seg(out)
    assert int(seg.NumberOfFrames) == 1 and seg.pixel_array.shape == (1024, 1024) and not seg.pixel_array.any()


def test_seg_for_a_source_missing_patient_and_study_attributes(tmp_path, validate_dicom):
    # Minimal exports drop Type 2 attributes; the SEG still needs the UIDs, which stay.
    src = pydicom.dcmread(SOURCE)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName", "Modality"):
        delattr(src, keyword)
    buffer = io.BytesIO()
    src.save_as(buffer)
    mask = np.zeros((1024, 1024), bool)
    mask[:4, :8] = True
    out = tmp_path / "seg.dcm"
    write_dicom_seg(buffer.getvalue(), mask, str(out), source_path="stripped.dcm")
    validate_dicom(out)
    seg = _read_seg(out)
    assert seg.PatientID == "" and seg.StudyInstanceUID == src.StudyInstanceUID
    np.testing.assert_array_equal(seg.pixel_array, mask)

    del src.StudyInstanceUID
    buffer = io.BytesIO()
    src.save_as(buffer)
    with pytest.raises(DicomError, match=r"^nostudy\.dcm: cannot reference the source image in a SEG: no StudyInstanceUID"):
        write_dicom_seg(buffer.getvalue(), mask, str(tmp_path / "x.dcm"), source_path="nostudy.dcm")


def test_seg_bad_inputs_give_clear_errors(tmp_path):
    data = SOURCE.read_bytes()
    with pytest.raises(DicomError, match=r"^cut\.dcm: truncated"):
        write_dicom_seg(data[: len(data) // 2], np.zeros((64, 64), bool), str(tmp_path / "x.dcm"), source_path="cut.dcm")
    with pytest.raises(DicomError, match=r"^junk\.dcm: "):
        write_dicom_seg(b"not a dicom file at all" * 10, np.zeros((64, 64), bool), str(tmp_path / "x.dcm"), source_path="junk.dcm")
    with pytest.raises(ValueError, match="threshold it"):
        write_dicom_seg(data, np.full((64, 64), 0.7, np.float32), str(tmp_path / "x.dcm"), source_path="a.dcm")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_dicom_seg(data, np.zeros((2, 64, 64), bool), str(tmp_path / "x.dcm"), source_path="a.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_seg_to_s3(moto_s3, tmp_path, validate_dicom):
    moto_s3.client().create_bucket(Bucket="segs")
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:30] = True
    write_dicom_seg(SOURCE.read_bytes(), mask, f"s3://segs/out/{POSITIVE_ID}.seg.dcm", source_path=str(SOURCE))
    body = moto_s3.client().get_object(Bucket="segs", Key=f"out/{POSITIVE_ID}.seg.dcm")["Body"].read()
    (tmp_path / "from-s3.dcm").write_bytes(body)
    validate_dicom(tmp_path / "from-s3.dcm")
    seg = pydicom.dcmread(io.BytesIO(body))
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == POSITIVE_ID
    assert int(seg.pixel_array.sum()) == int(mask.sum()) * 256


# The 11 real SIIM DICOMs (the competition's 10 sample images and torchxrayvision's test image) and
# the MONOCHROME1 variant of the last one: the SEG of each must pass the standard's validator.
TXRV = SAMPLES.parent / "torchxrayvision"
REAL_SIIM = [*sorted(SAMPLES.glob("*.dcm")), TXRV / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]
MONOCHROME1 = TXRV / "Fake_MONOHR1.dcm"
# What dciodvfy still warns about on a SEG of a SIIM image, both inherited from the source on purpose
# (README, "Export"): the study has no Study ID, and the anonymised Patient's Name (a UUID, no '^')
# looks like the retired ACR-NEMA form. Matched on their words, which dicom3tools versions keep.
SIIM_WARNINGS = (
    re.compile(r"needed to build DICOMDIR - Study ID$"),
    re.compile(r"Patient'?s ?Name.*Retired Person Name form$"),
)


def _other_warnings(report) -> list[str]:
    return [w for w in report.warnings if not any(p.search(w) for p in SIIM_WARNINGS)]


def _with(source: Path, **values: str | list[str]) -> bytes:
    """The source's bytes with top-level attributes replaced, each written as raw bytes (no pydicom
    conversion or check), so that invalid values reach the SEG writer as a real file carries them."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(source)
    for keyword, value in values.items():
        tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
        raw = ("\\".join(value) if isinstance(value, list) else value).encode("latin-1")
        raw += b" " * (len(raw) % 2)  # DICOM values have even lengths
        ds[tag] = RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(raw), raw, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dciodvfy_output_is_parsed_and_a_broken_seg_fails(tmp_path, validate_dicom):
    from conftest import in_ci, parse_dciodvfy

    # dciodvfy's own output on the SEG ptxray wrote for a SIIM image before issue 16 was fixed.
    report = parse_dciodvfy(
        "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID\n"
        "Error - Value invalid for this VR - (0x0010,0x1010) AS Patient's Age  AS [1] = <69> - Length invalid for this VR = 2, expected == 4\n"
        "Segmentation\n"
        "Error - Missing attribute Type 2C Conditional Element=<PatientOrientation> Module=<GeneralImage>\n"
    )
    assert len(report.errors) == 2 and len(report.warnings) == 1
    assert report.errors[1].endswith("Module=<GeneralImage>")
    assert parse_dciodvfy('Abort - File open for read failed - "x.dcm"\n').errors == ['Abort - File open for read failed - "x.dcm"']

    out = tmp_path / "seg.dcm"
    write_dicom_seg(SOURCE.read_bytes(), np.zeros((64, 64), bool), str(out), source_path=str(SOURCE))
    validate_dicom(out)
    # The same file with the source's raw age put back, and the Type 2C attribute removed: the
    # validator must see both (else the checks in every SEG test prove nothing).
    broken = pydicom.dcmread(out)
    broken.add(pydicom.DataElement(0x00101010, "AS", "69", validation_mode=pydicom.config.IGNORE))
    del broken.PatientOrientation
    with pydicom.config.disable_value_validation():
        broken.save_as(tmp_path / "broken.dcm")
    if shutil.which("dciodvfy") or in_ci():  # else validate_dicom only warns (see conftest)
        with pytest.raises(pytest.fail.Exception, match=r"(?s)Patient's Age.*PatientOrientation"):
            validate_dicom(tmp_path / "broken.dcm")
        with pytest.raises(pytest.fail.Exception, match="Abort - "):  # a file it cannot open
            validate_dicom(tmp_path / "missing.dcm")


@pytest.mark.parametrize("source", [*REAL_SIIM, MONOCHROME1], ids=lambda p: p.name.split(".")[-2] if p.name[0] == "1" else p.stem)
def test_seg_of_every_real_siim_dicom_passes_dciodvfy(source, tmp_path, validate_dicom, caplog):
    """Empty and non-empty predictions over every real SIIM file (all carry SIIM's bare-years age)."""
    src = pydicom.dcmread(source, stop_before_pixels=True)
    raw_age = src.PatientAge
    mask = np.zeros((256, 256), bool)
    mask[40:90, 150:200] = True
    for name, m in (("empty", np.zeros_like(mask)), ("found", mask)):
        out = tmp_path / f"{name}.dcm"
        with caplog.at_level(logging.INFO, logger="ptxray.export"):
            write_dicom_seg(source.read_bytes(), m, str(out), source_path=str(source))
        report = validate_dicom(out)
        if report is not None:
            assert len(report.warnings) == 2 and _other_warnings(report) == [], report.output
        seg = _read_seg(out)
        # '38' is SIIM's bare years: the SEG carries the standard's form, and the log says so.
        assert raw_age.isdigit() and seg.PatientAge == f"{int(raw_age):03d}Y"
        assert f"PatientAge '{raw_age}' -> '{seg.PatientAge}'" in caplog.text
        # Type 2C: no plane orientation, so Patient Orientation is present (empty: SIIM's is empty).
        assert "PatientOrientation" in seg and seg.PatientOrientation in ("", None)
        assert "FrameOfReferenceUID" not in seg
        assert seg.PatientName == src.PatientName and seg.PatientID == src.PatientID  # the identity, unchanged
        assert seg.PhotometricInterpretation == "MONOCHROME2"  # a BINARY SEG's, whatever the source's
        np.testing.assert_array_equal(seg.pixel_array > 0, cv2.resize(m.view(np.uint8), (1024, 1024), interpolation=cv2.INTER_NEAREST) > 0)
        caplog.clear()


def test_seg_of_every_synthetic_dicom_passes_dciodvfy(synth_dataset, tmp_path, validate_dicom):
    sources = sorted((synth_dataset / "dicom-images-train").rglob("*.dcm"))
    assert len(sources) >= 20
    for i, source in enumerate(sources):
        mask = np.zeros((32, 32), bool)
        if i % 2:  # every other one empty
            mask[4 + i % 8 : 20, 10:25] = True
        out = tmp_path / f"{i}.dcm"
        write_dicom_seg(source.read_bytes(), mask, str(out), source_path=str(source))
        validate_dicom(out)
        seg = _read_seg(out)
        assert seg.PatientAge[-1] == "Y" and len(seg.PatientAge) == 4 and int(seg.pixel_array.sum()) == int(mask.sum()) * 64


def test_seg_copies_valid_source_values_unchanged(tmp_path, validate_dicom, caplog):
    # A source in the standard's forms: nothing is rewritten, nothing logged, nothing warned about.
    data = _with(SOURCE, PatientName="DOE^JANE", PatientAge="038Y", StudyID="S-17", PatientOrientation=["L", "F"],
                 PatientBirthDate="19800229", PatientWeight="70.5", PixelSpacing=["0.143", "0.143"])
    out = tmp_path / "seg.dcm"
    with caplog.at_level(logging.INFO, logger="ptxray.export"):
        write_dicom_seg(data, np.ones((8, 8), bool), str(out), source_path="good.dcm")
    report = validate_dicom(out)
    if report is not None:
        assert report.warnings == [], report.output
    seg = _read_seg(out)
    assert (seg.PatientName, seg.PatientAge, seg.StudyID, seg.PatientBirthDate) == ("DOE^JANE", "038Y", "S-17", "19800229")
    assert list(seg.PatientOrientation) == ["L", "F"] and float(seg.PatientWeight) == 70.5
    assert "invalid" not in caplog.text and "->" not in caplog.text


def test_seg_fixes_or_empties_invalid_source_values(tmp_path, validate_dicom, caplog):
    data = _with(
        SOURCE,
        PatientAge="7 m",  # unambiguous: 7 months
        StudyDate="2019-01-31",  # the ISO form, unambiguous
        StudyTime="12:30:05",  # the ACR-NEMA form, unambiguous
        PatientSize="1.75000000000000001",  # too many digits for a DS
        PatientSex="male",  # not an enumerated value (M, F, O)
        PatientBirthDate="1980-02-30",  # no such day
        PatientWeight="70,5",  # a comma: one value or two?
        AccessionNumber="A" * 20,  # SH holds 16 characters
        ReferringPhysicianName="X" * 70,  # a PN component holds 64
        PatientOrientation=["L", "X"],  # X is no direction
        OtherPatientNames="ROE^JANE\\" + "Y" * 70,  # one bad value of two
        LossyImageCompression="1",  # the enumerated '01'
    )
    out = tmp_path / "seg.dcm"
    with caplog.at_level(logging.INFO, logger="ptxray.export"):
        write_dicom_seg(data, np.ones((8, 8), bool), str(out), source_path="odd.dcm")
    validate_dicom(out)
    seg = _read_seg(out)
    assert (seg.PatientAge, seg.StudyDate, seg.StudyTime, seg.PatientSize) == ("007M", "20190131", "123005", 1.75)
    assert seg.LossyImageCompression == "01"
    for keyword in ("PatientSex", "PatientBirthDate", "PatientWeight", "AccessionNumber", "ReferringPhysicianName",
                    "PatientOrientation", "OtherPatientNames"):
        assert keyword in seg and seg[keyword].is_empty, keyword  # Type 2 (or 3): present and empty
    log = caplog.text
    assert "odd.dcm: " in log
    for fixed in ("PatientAge '7 m' -> '007M'", "StudyDate '2019-01-31' -> '20190131'", "StudyTime '12:30:05' -> '123005'",
                  "PatientSize '1.75000000000000001' -> '1.75'", "LossyImageCompression '1' -> '01'"):
        assert fixed in log, fixed
    for emptied in ("PatientSex 'male'", "PatientBirthDate '1980-02-30'", "PatientWeight '70,5'", "AccessionNumber",
                    "ReferringPhysicianName", "PatientOrientation 'L\\X'", "OtherPatientNames"):
        assert emptied in log.split("emptied", 1)[-1], emptied


def test_seg_of_a_source_with_patient_geometry_passes_dciodvfy(tmp_path, validate_dicom):
    # pydicom's CT test file has Image Orientation/Position (Patient) and a Frame of Reference: the SEG
    # carries that plane geometry, so Patient Orientation (Type 2C) is not required and not added.
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm"))
    src = pydicom.dcmread(source, stop_before_pixels=True)
    out = tmp_path / "seg.dcm"
    write_dicom_seg(source.read_bytes(), np.eye(16, dtype=bool), str(out), source_path=str(source))
    validate_dicom(out)
    seg = _read_seg(out)
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID and "PatientOrientation" not in seg
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [float(v) for v in src.ImageOrientationPatient]


def test_seg_of_a_source_with_an_invalid_type1_value_is_an_error(tmp_path):
    # What the SEG must carry with a value (Type 1) cannot be emptied, nor made up.
    data = _with(SOURCE, StudyInstanceUID="1.2.3.abc")
    with pytest.raises(DicomError, match=r"^baduid\.dcm: cannot write a valid SEG: StudyInstanceUID '1\.2\.3\.abc' is not a valid UI value"):
        write_dicom_seg(data, np.ones((8, 8), bool), str(tmp_path / "x.dcm"), source_path="baduid.dcm")
    data = _with(SOURCE, LossyImageCompression="YES")
    with pytest.raises(DicomError, match=r"^lossy\.dcm: cannot write a valid SEG: LossyImageCompression 'YES' is not a valid CS value"):
        write_dicom_seg(data, np.ones((8, 8), bool), str(tmp_path / "x.dcm"), source_path="lossy.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_cli_export(kfold_run, tmp_path, capsys):
    from ptxray.cli import main

    rc = main(["export", "--run", str(kfold_run), "--format", "torchscript", "--fold", "0", "--check-dicom", str(SOURCE)])
    assert rc == 0, capsys.readouterr().err
    out = kfold_run / "export" / "fold0.torchscript.pt"
    assert out.exists() and (kfold_run / "export" / "fold0.torchscript.pt.json").exists()
    torch.jit.load(str(out))
    assert "max |diff|" in capsys.readouterr().out
    rc = main(["export", "--run", str(kfold_run), "--fold", "9", "--out", str(tmp_path / "m.onnx")])
    assert rc == 2 and "no fold 9" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.onnx")


def test_first_dicom_uses_the_ingest_listing(tmp_path):
    from ptxray.cache import list_dicoms
    from ptxray.export import _first_dicom

    first = _first_dicom(str(SAMPLES))
    assert first == list_dicoms(str(SAMPLES))[1][0] and first.endswith(".dcm") and Path(first).is_file()
    assert _first_dicom(str(tmp_path)) is None  # an empty folder
    assert _first_dicom(str(tmp_path / "missing")) is None  # logged, not raised
    assert _first_dicom("") is None
