"""`ptxray thresholds` and `ptxray predict` on a briefly trained real run (fixture `trained_run`),
predicting the real SIIM sample DICOMs plus corrupt files; local, Ray Data and S3 paths."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch

from ptxray.cache import Cache, read_for_training
from ptxray.checkpoint import load_checkpoint
from ptxray.cli import main
from ptxray.dicom import read_dicom_file
from ptxray.masks import decode_rle
from ptxray.postprocess import Thresholds, per_image_dice, search_thresholds
from ptxray.predict import Ensemble, compute_oof, load_or_compute_oof, resolve_cache, run_predict
from ptxray.runs import load_fold_models, open_run

SAMPLE = Path(__file__).parent / "data" / "siim-sample" / "sample-images"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The 10 real sample DICOMs, a truncated copy of one and a text file named .dcm."""
    d = tmp_path_factory.mktemp("inputs")
    for p in sorted(SAMPLE.glob("*.dcm")):
        shutil.copy(p, d / p.name)
    first = sorted(SAMPLE.glob("*.dcm"))[0].read_bytes()
    (d / "sub").mkdir()
    (d / "sub" / "truncated.dcm").write_bytes(first[: len(first) // 2])
    (d / "not-dicom.dcm").write_text("ImageId,EncodedPixels\n")
    return d


def _check_outputs(out: Path, inputs: Path) -> list[dict[str, str]]:
    """One submission row per good image, its RLE decodes to the PNG mask, overlays exist."""
    expected = {read_dicom_file(p).image_id: p for p in SAMPLE.glob("*.dcm")}
    sub = _read_csv(out / "submission.csv")
    assert list(sub[0]) == ["ImageId", "EncodedPixels"]
    assert sorted(r["ImageId"] for r in sub) == sorted(expected)
    probs = {r["ImageId"]: r for r in _read_csv(out / "probabilities.csv")}
    assert set(probs) == set(expected)
    for r in sub:
        png = cv2.imread(str(out / "masks" / f"{r['ImageId']}.png"), cv2.IMREAD_UNCHANGED)
        assert png.shape == (1024, 1024) and set(np.unique(png)) <= {0, 255}
        assert np.array_equal(decode_rle(r["EncodedPixels"], 1024, 1024), (png > 0).astype(np.uint8))
        assert (r["EncodedPixels"] == "-1") == (png.max() == 0)
        assert int(probs[r["ImageId"]]["mask_area_px"]) == int((png > 0).sum())
        assert 0.0 <= float(probs[r["ImageId"]]["pneumothorax_probability"]) <= 1.0
        ov = cv2.imread(str(out / "overlays" / f"{r['ImageId']}.png"))
        assert ov.shape == (1024, 1024, 3)
    errors = {Path(r["path"]).name: r["reason"] for r in _read_csv(out / "errors.csv")}
    assert set(errors) == {"truncated.dcm", "not-dicom.dcm"}
    assert "not DICOM" in errors["not-dicom.dcm"] and str(inputs / "not-dicom.dcm") in errors["not-dicom.dcm"]
    assert str(inputs / "sub" / "truncated.dcm") in errors["truncated.dcm"]
    return sub


def test_oof_matches_the_validation_metrics_of_training(trained_run):
    run = open_run(str(trained_run))
    cache = resolve_cache(run)  # found from the run's data.cache + the cache key of data.images / labels
    assert Cache.open(run.config.data.cache).uri == cache.uri
    stats = compute_oof(run, cache, tta=False)
    plain = Thresholds(0.5, 0, 0.5, 0.0, 64, rule="plain")
    for ref in run.folds:
        best = load_checkpoint(ref.best)["metrics"]  # what engine.evaluate measured for these weights
        fold = stats.subset(stats.folds == ref.fold)
        assert len(fold) == best["val_n_images"] == len(cache.split_ids(ref.fold)[1])
        assert per_image_dice(fold, plain)[0].mean() == pytest.approx(best["val_dice"], abs=1e-9)
        assert float((~fold.positive).mean()) == pytest.approx(best["val_empty_dice"])


def test_thresholds_command_searches_and_stores_once(trained_run, capsys):
    assert main(["thresholds", "--run", str(trained_run)]) == 0
    assert "chosen" in capsys.readouterr().out
    doc = json.loads((trained_run / "thresholds.json").read_text())
    index = Cache.open(json.loads((trained_run / "thresholds.json").read_text())["oof"]["cache"]).index()
    labels = np.asarray(index.column("label").to_pylist())
    assert doc["n_images"] == len(labels) and doc["empty_dice"] == pytest.approx(float((labels == 0).mean()))
    grid = doc["grid"]
    assert np.shape(doc["dice"]) == tuple(len(grid[k]) for k in doc["dice_axes"])
    assert doc["thresholds"]["oof_dice"] == pytest.approx(np.max(doc["dice"]), abs=1e-6)
    assert doc["thresholds"]["oof_dice"] >= doc["empty_dice"] - 1e-9  # predicting empty is on the grid
    # Computed once: the stored OOF statistics are reused and give the same search.
    run = open_run(str(trained_run))
    stats, computed = load_or_compute_oof(run)
    assert not computed and search_thresholds(stats).thresholds.to_dict() == {**doc["thresholds"], "source": "out-of-fold search"}


def test_predict_local_on_real_dicoms_with_corrupt_files(trained_run, inputs, tmp_path, capsys, validate_dicom):
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(trained_run), "--images", str(inputs), "--out", str(out), "--local", "--dicom-seg"]) == 0
    printed = capsys.readouterr().out
    assert "submission" in printed and "not predicted" in printed
    summary = json.loads((out / "predict.json").read_text())
    assert summary["predicted"] == 10 and summary["errors"] == 2 and summary["listed"] == 12
    stored = trained_run / "thresholds.json"
    if stored.exists():  # `ptxray thresholds` ran first (this module's order)
        assert summary["thresholds"]["source"] == str(stored)
    else:
        assert "defaults" in summary["thresholds"]["source"]
    sub = _check_outputs(out, inputs)
    # One DICOM SEG per non-empty prediction, none for the empty ones.
    segs = {p.stem for p in (out / "seg").glob("*.dcm")} if (out / "seg").exists() else set()
    assert segs == {r["ImageId"] for r in sub if r["EncodedPixels"] != "-1"}
    for seg_path in (out / "seg").glob("*.dcm"):
        validate_dicom(seg_path)

    # Thresholds that keep masks: binarise a few levels below the weakest image's highest pixel, so
    # every image has a (partial) mask at the model size, and the RLEs are not all "-1".
    probs = _read_csv(out / "probabilities.csv")
    lowest_max = min(round(float(r["max_pixel_probability"]) * 255) for r in probs)
    th = Thresholds(0.0, 0, max(lowest_max - 3, 0) / 255, 0.0, 64, rule="plain", source="test")
    out2 = tmp_path / "pred-masks"
    s2 = run_predict(str(trained_run), str(inputs), str(out2), thresholds=th, dicom_seg=True)
    assert s2["non_empty"] > 0 and s2["thresholds"]["source"] == "test" and not s2["seg_errors"]
    sub = _check_outputs(out2, inputs)
    assert any(r["EncodedPixels"] != "-1" for r in sub)
    written = sorted((out2 / "seg").glob("*.dcm"))  # real SIIM sources, non-empty masks
    assert len(written) == s2["non_empty"]
    for seg_path in written:
        validate_dicom(seg_path)


def test_predict_on_ray_data_matches_local(trained_run, inputs, ray_local, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(SAMPLE.glob("*.dcm"))[:3] + [inputs / "not-dicom.dcm"]:
        shutil.copy(p, few / p.name)
    th = Thresholds(0.0, 0, 0.5, 0.0, 64, rule="plain", source="test")
    s_ray = run_predict(str(trained_run), str(few), str(tmp_path / "ray"), local=False, thresholds=th, workers=1, batch_size=2)
    s_local = run_predict(str(trained_run), str(few), str(tmp_path / "local"), local=True, thresholds=th)
    assert s_ray["mode"] == "ray" and s_ray["predicted"] == 3 and s_ray["errors"] == 1
    ray_probs = {r["ImageId"]: r for r in _read_csv(tmp_path / "ray" / "probabilities.csv")}
    local_probs = {r["ImageId"]: r for r in _read_csv(tmp_path / "local" / "probabilities.csv")}
    assert set(ray_probs) == set(local_probs) and len(ray_probs) == 3
    for k, r in ray_probs.items():
        assert float(r["pneumothorax_probability"]) == pytest.approx(float(local_probs[k]["pneumothorax_probability"]), abs=1e-5)
    assert (tmp_path / "ray" / "submission.csv").read_text() == (tmp_path / "local" / "submission.csv").read_text()
    assert _read_csv(tmp_path / "ray" / "errors.csv") == _read_csv(tmp_path / "local" / "errors.csv")
    for k in ray_probs:
        assert (tmp_path / "ray" / "overlays" / f"{k}.png").exists()
    assert s_local["predicted"] == 3


def test_predict_reads_and_writes_s3(trained_run, moto_s3, tmp_path, validate_dicom):
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="ptxray-predict")
    files = sorted(SAMPLE.glob("*.dcm"))[:2]
    for p in files:
        s3.upload_file(str(p), "ptxray-predict", f"in/{p.name}")
    s3.put_object(Bucket="ptxray-predict", Key="in/broken.dcm", Body=b"DICM but not really")
    keep_all = Thresholds(0.0, 0, 0.0, 0.0, 64, rule="plain", source="test")  # every pixel above level 0
    s = run_predict(str(trained_run), "s3://ptxray-predict/in", "s3://ptxray-predict/out", thresholds=keep_all, dicom_seg=True)
    assert s["predicted"] == 2 and s["errors"] == 1 and s["non_empty"] == 2 and not s["seg_errors"]
    assert s["error_list"][0]["path"] == "s3://ptxray-predict/in/broken.dcm"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ptxray-predict", Prefix="out/")["Contents"]}
    ids = [read_dicom_file(p).image_id for p in files]
    assert {"out/submission.csv", "out/probabilities.csv", "out/errors.csv", "out/predict.json"} <= keys
    assert {f"out/masks/{i}.png" for i in ids} | {f"out/overlays/{i}.png" for i in ids} <= keys
    assert {f"out/seg/{i}.dcm" for i in ids} <= keys
    for i in ids:
        (tmp_path / f"{i}.dcm").write_bytes(s3.get_object(Bucket="ptxray-predict", Key=f"out/seg/{i}.dcm")["Body"].read())
        validate_dicom(tmp_path / f"{i}.dcm")
    seg = pydicom.dcmread(tmp_path / f"{ids[0]}.dcm")
    assert seg.Modality == "SEG" and seg.SourceImageSequence[0].ReferencedSOPInstanceUID == ids[0]
    sub = s3.get_object(Bucket="ptxray-predict", Key="out/submission.csv")["Body"].read().decode().splitlines()
    assert sub[0] == "ImageId,EncodedPixels" and sorted(line.split(",")[0] for line in sub[1:]) == sorted(ids)


def _s3_bytes(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _overlay_without_mask(data: bytes, pre) -> np.ndarray:
    """What overlays/<name>.png holds for an empty prediction: the radiograph as predict read it
    (reduced-scale decode for the run's size), scaled back to its stored size, in BGR."""
    scan = read_for_training(data, "x.dcm", pre)
    image = cv2.resize(scan.image, (scan.columns, scan.rows), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_predict_goes_on_past_an_unreadable_file_and_keeps_repeats_apart(trained_run, moto_s3, ray_local, local):
    # An object in S3 Glacier is listed with its size but cannot be read (an I/O error, not bad
    # content): it gets a row in errors.csv and the job goes on, on Ray as in --local. A second file
    # with the first one's SOPInstanceUID but other pixels gets pictures of its own.
    s3 = moto_s3.client()
    bucket = "ptxray-unreadable-" + ("local" if local else "ray")
    s3.create_bucket(Bucket=bucket)
    files = sorted(SAMPLE.glob("*.dcm"))[:3]
    for p in files[:2]:
        s3.upload_file(str(p), bucket, f"in/{p.name}")
    s3.put_object(Bucket=bucket, Key="in/archived.dcm", Body=files[2].read_bytes(), StorageClass="GLACIER")
    first_id = read_dicom_file(files[0]).image_id
    repeat = pydicom.dcmread(files[2])
    repeat.SOPInstanceUID = repeat.file_meta.MediaStorageSOPInstanceUID = first_id
    buffer = io.BytesIO()
    repeat.save_as(buffer, enforce_file_format=True)
    s3.put_object(Bucket=bucket, Key="in/zz-repeat.dcm", Body=buffer.getvalue())

    nothing_kept = Thresholds(0.0, 64 * 64 + 1, 0.5, 0.0, 64, rule="plain", source="test")
    s = run_predict(str(trained_run), f"s3://{bucket}/in", f"s3://{bucket}/out", local=local, thresholds=nothing_kept,
                    workers=1, batch_size=2)
    assert s["listed"] == 4 and s["predicted"] == 2 and s["errors"] == 2 and s["duplicates"] == 1
    errors = dict(csv.reader(io.StringIO(_s3_bytes(s3, bucket, "out/errors.csv").decode())))
    archived = f"s3://{bucket}/in/archived.dcm"
    assert errors.pop("path") == "reason" and set(errors) == {archived, f"s3://{bucket}/in/zz-repeat.dcm"}
    assert errors[archived].startswith(f"{archived}: cannot read")
    dup = errors[f"s3://{bucket}/in/zz-repeat.dcm"]
    assert f"duplicate SOPInstanceUID {first_id} (first in s3://{bucket}/in/{files[0].name})" in dup
    assert f"masks/{first_id}_dup1.png" in dup
    sub = _s3_bytes(s3, bucket, "out/submission.csv").decode().splitlines()
    assert sorted(line.split(",")[0] for line in sub[1:]) == sorted(read_dicom_file(p).image_id for p in files[:2])

    # Each file's overlay shows its own radiograph, whichever worker wrote last.
    pre = open_run(str(trained_run)).config.preprocess
    for name, source in ((first_id, files[0].read_bytes()), (f"{first_id}_dup1", buffer.getvalue())):
        png = cv2.imdecode(np.frombuffer(_s3_bytes(s3, bucket, f"out/overlays/{name}.png"), np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(png, _overlay_without_mask(source, pre), err_msg=name)
        mask = cv2.imdecode(np.frombuffer(_s3_bytes(s3, bucket, f"out/masks/{name}.png"), np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (1024, 1024) and not mask.any()


def test_predict_errors_are_named(tmp_path, capsys):
    assert main(["predict", "--run", str(tmp_path / "nope"), "--images", str(SAMPLE), "--out", str(tmp_path / "o"), "--local"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not a ptxray run" in err


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got a JSON list"),
        ('{"best": {"fold_checkpoints": {"zero": "/x"}}}', "must map fold numbers"),
        ('{"best": [1]}', "no best configuration"),
    ],
)
def test_a_garbage_summary_json_is_named_in_one_line(tmp_path, capsys, content, reason):
    run = tmp_path / "exp"
    run.mkdir()
    (run / "summary.json").write_text(content)
    for argv in (["evaluate", "--run", str(run)], ["predict", "--run", str(run), "--images", str(SAMPLE), "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(run / "summary.json") in err and reason in err, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ensemble_on_cuda_matches_cpu(trained_run):
    run = open_run(str(trained_run))
    cache = resolve_cache(run)
    images, _, _ = next(cache.iter_arrays(cache.split_ids(0)[1], 8))
    models = [m for _, m in load_fold_models(run)]
    prob_cpu, cls_cpu = Ensemble(models, "cpu").predict(images)
    prob_gpu, cls_gpu = Ensemble([m for _, m in load_fold_models(run)], "cuda", amp=False).predict(images)
    assert np.abs(prob_cpu - prob_gpu).max() < 1e-4 and np.abs(cls_cpu - cls_gpu).max() < 1e-4
