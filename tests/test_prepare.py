"""`ptxray prepare`: DICOMs (folder or S3) -> the decode-once cache, on a real local Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import odd_dicoms
from conftest import SIIM_SAMPLE
from odd_dicoms import ODD_CASES, reference, sop_instance_uid, write_odd_folder
from ptxray import cache as cache_mod
from ptxray.config import load_config
from ptxray.dicom import read_dicom_file
from ptxray.masks import encode_rle, read_labels
from ptxray.preprocess import channels_from_config, resize_mask

CFG = load_config("smoke")


def _mixed_folder(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """The real sample DICOMs plus one bad file of each kind; returns (images, labels, bad name -> reason word)."""
    images = root / "images"
    shutil.copytree(SIIM_SAMPLE / "sample-images", images / "study-a")
    good = sorted((images / "study-a").glob("*.dcm"))
    (images / "zz-bad").mkdir()
    (images / "zz-bad" / "not-dicom.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 500)
    blob = good[0].read_bytes()
    (images / "zz-bad" / "truncated.dcm").write_bytes(blob[: len(blob) // 2])
    (images / "zz-bad" / "empty.dcm").write_bytes(b"")
    # The same image twice (a copy in another folder): the second is quarantined as a duplicate.
    shutil.copy(good[1], images / "zz-bad" / "duplicate.dcm")
    # An extra real DICOM with no label row.
    shutil.copy(SIIM_SAMPLE / "torchxrayvision" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", images / "unlabelled.dcm")
    (images / "notes.txt").write_text("not listed: not a .dcm")
    labels = SIIM_SAMPLE / "train-rle-sample.csv"
    return images, labels, {"not-dicom.dcm": "not DICOM", "truncated.dcm": "truncated", "empty.dcm": "", "duplicate.dcm": "duplicate"}


def test_prepare_mixed_folder_counts_and_contents(ray_local, tmp_path):
    from ptxray import ray_data

    images, labels, bad = _mixed_folder(tmp_path)
    summary = ray_data.prepare(CFG, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))

    assert summary["reused"] is False
    assert summary["dicoms_listed"] == 10 + 4 + 1
    assert summary["images"] == 10
    assert summary["positive"] == 5 and summary["negative"] == 5
    assert summary["quarantined"] == 4
    reasons = {Path(q["path"]).name: q["reason"] for q in summary["quarantine"]}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert name in reasons[name], "the reason names the file"
        assert word.lower() in reasons[name].lower()
    assert summary["dicoms_without_labels"] == 1
    assert summary["dicoms_without_labels_paths"][0].endswith("unlabelled.dcm")
    assert summary["labels_without_dicoms"] == 0
    assert sum(f["images"] for f in summary["folds"]) == 10

    # The cache holds exactly what the plain functions compute from the DICOM and the labels.
    c = cache_mod.Cache.open(summary["cache"])
    saved = json.loads(Path(c.parts_uri, "summary.json").read_text())
    assert saved["quarantined"] == 4
    idx = c.index().to_pylist()
    assert len(idx) == 10 and all(r["fold"] in (0, 1) for r in idx)
    truth = read_labels(str(labels))
    some = [r["image_id"] for r in idx[:3]] + [next(r["image_id"] for r in idx if r["label"])]
    imgs, masks, ids = c.load_arrays(some)
    assert imgs.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64)
    for img, mask, image_id in zip(imgs, masks, ids):
        scan = read_dicom_file(images / "study-a" / f"{image_id}.dcm", min_size_px=CFG.preprocess.image_size_px)
        np.testing.assert_array_equal(img, channels_from_config(scan.image, CFG.preprocess))
        np.testing.assert_array_equal(mask, resize_mask(truth.mask(image_id), 64))
    assert any(m.any() for m in masks)

    # Fold splits are disjoint and cover every image.
    train, val = c.split_ids(0)
    assert not set(train) & set(val) and len(train) + len(val) == 10

    # The streamed reader gives the same rows as load_arrays, in chunks of at most batch_size.
    chunks = list(c.iter_arrays(train, batch_size=3))
    assert [len(ch[2]) for ch in chunks[:-1]] == [3] * (len(chunks) - 1) and 1 <= len(chunks[-1][2]) <= 3
    streamed_ids = [i for ch in chunks for i in ch[2]]
    assert sorted(streamed_ids) == sorted(train)
    all_imgs, all_masks, _ = c.load_arrays(streamed_ids)
    np.testing.assert_array_equal(np.concatenate([ch[0] for ch in chunks]), all_imgs)
    np.testing.assert_array_equal(np.concatenate([ch[1] for ch in chunks]), all_masks)
    assert list(c.iter_arrays([], batch_size=4)) == []
    with pytest.raises(cache_mod.CacheError, match="found 1 of 2 images"):
        list(c.iter_arrays([train[0], "no-such-image"], batch_size=4))
    with pytest.raises(ValueError, match="batch_size"):
        next(iter(c.iter_arrays(train, batch_size=0)))


def test_second_run_reuses_the_cache_and_decodes_nothing(ray_local, tmp_path):
    from ptxray import ray_data

    images, labels, _ = _mixed_folder(tmp_path)
    first = ray_data.prepare(CFG, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))
    parts_before = sorted(p.name for p in Path(first["cache"]).iterdir())

    # Different preprocessing settings -> a different cache.
    other = CFG.with_overrides({"preprocess.channels": ["raw"]})
    third = ray_data.prepare(other, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))
    assert third["reused"] is False and third["cache"] != first["cache"]

    # Same listing (paths and sizes) but unreadable contents: decoding anything would now
    # quarantine every file and write a new attempt folder.
    for p in (images / "study-a").glob("*.dcm"):
        p.write_bytes(b"\0" * p.stat().st_size)
    second = ray_data.prepare(CFG, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))
    assert second["reused"] is True
    assert second["cache"] == first["cache"]
    assert second["quarantined"] == first["quarantined"] == 4
    assert sorted(p.name for p in Path(first["cache"]).iterdir()) == parts_before


def test_interrupted_run_leaves_nothing_trusted(ray_local, tmp_path, monkeypatch):
    from ptxray import ray_data

    images, labels, _ = _mixed_folder(tmp_path)
    real_write_json = cache_mod.write_json

    def crash_on_manifest(uri, obj):
        if uri.endswith("manifest.json"):
            raise KeyboardInterrupt("killed before the manifest")
        real_write_json(uri, obj)

    monkeypatch.setattr(cache_mod, "write_json", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        ray_data.prepare(CFG, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))
    (key_dir,) = (tmp_path / "cache").iterdir()
    assert any(p.name.startswith("parts-") for p in key_dir.iterdir()), "data was written"
    with pytest.raises(cache_mod.CacheError):
        cache_mod.Cache.open(str(key_dir))

    monkeypatch.setattr(cache_mod, "write_json", real_write_json)
    summary = ray_data.prepare(CFG, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))
    assert summary["reused"] is False
    attempts = [p for p in key_dir.iterdir() if p.name.startswith("parts-")]
    assert len(attempts) == 1, "the unfinished attempt was removed"
    assert cache_mod.Cache.open(str(key_dir)).manifest["parts"] == attempts[0].name


def _upload(client, bucket: str, root: Path, prefix: str) -> int:
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root).as_posix()}")
            n += 1
    return n


def test_prepare_from_s3_to_s3_then_reuse_without_reading_dicoms(ray_local, moto_s3, synth_dataset, tmp_path):
    from ptxray import ray_data

    s3 = moto_s3.client()
    s3.create_bucket(Bucket="ptx-in")
    s3.create_bucket(Bucket="ptx-cache")
    _upload(s3, "ptx-in", synth_dataset, "siim")
    s3.put_object(Bucket="ptx-in", Key="siim/dicom-images-train/x/y/corrupt.dcm", Body=b"DICM but not really")

    kwargs = dict(images="s3://ptx-in/siim/dicom-images-train", labels="s3://ptx-in/siim/train-rle.csv", cache="s3://ptx-cache/caches")
    first = ray_data.prepare(CFG, **kwargs)
    truth = read_labels(str(synth_dataset / "train-rle.csv"))
    assert first["images"] == len(truth) == 24
    assert first["positive"] == truth.n_positive
    assert first["quarantined"] == 1 and first["quarantine"][0]["path"] == "s3://ptx-in/siim/dicom-images-train/x/y/corrupt.dcm"
    assert first["cache"].startswith("s3://ptx-cache/caches/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ptx-cache")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith(".parquet") for k in keys)

    c = cache_mod.Cache.open(first["cache"])
    ids = [r["image_id"] for r in c.index().to_pylist()][:2]
    imgs, masks, _ = c.load_arrays(ids)
    assert imgs.shape == (2, 3, 64, 64)

    moto_s3.start_recording()
    second = ray_data.prepare(CFG, **kwargs)
    requests = moto_s3.stop_recording()
    assert second["reused"] is True and second["cache"] == first["cache"]
    dicom_reads = [r for r in requests if r["method"] == "GET" and ".dcm" in r["url"]]
    assert requests, "the recorder saw the listing"
    assert dicom_reads == [], "no DICOM was read on the second run"


def test_prepare_over_odd_dicoms_reads_or_quarantines_each_with_its_reason(ray_local, tmp_path):
    # One file of every odd kind (tests/odd_dicoms.py): JPEG Lossless, JPEG-LS, JPEG 2000, RLE,
    # deflated, big endian, 16-bit, signed, no preamble, colour, palette, multi-frame, HTJ2K without
    # its decoder, no pixel data, truncated. The job finishes and counts every one.
    from ptxray import ray_data

    files = write_odd_folder(tmp_path / "odd")
    ids = {name: sop_instance_uid(path) for name, path in files.items()}
    square = np.zeros((odd_dicoms.ROWS, odd_dicoms.COLUMNS), np.uint8)
    square[30:60, 20:50] = 1
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageId,EncodedPixels\n" + "".join(
        f"{image_id},{encode_rle(square) if name == 'jpeg-lossless' else '-1'}\n" for name, image_id in ids.items()
    ))
    readable = sorted(n for n, case in ODD_CASES.items() if case[1] == "read")
    colour = sorted(n for n, case in ODD_CASES.items() if case[1] == "colour")
    broken = sorted(set(ODD_CASES) - set(readable) - set(colour))

    summary = ray_data.prepare(CFG, images=str(files["rgb"].parent), labels=str(labels), cache=str(tmp_path / "cache"))
    assert summary["dicoms_listed"] == len(ODD_CASES)
    assert summary["images"] == len(readable) and summary["positive"] == 1
    assert summary["quarantined"] == len(colour) + len(broken)
    reasons = {Path(q["path"]).stem: q["reason"] for q in summary["quarantine"]}
    assert sorted(reasons) == sorted(colour + broken)
    for name in colour:
        assert "colour image" in reasons[name] and "data.colour: luminance" in reasons[name], reasons[name]
    for name in broken:
        assert all(word in reasons[name] for word in ODD_CASES[name][1]), reasons[name]
    assert summary["labels_without_dicoms"] == len(colour) + len(broken)

    # What is cached is the file's own pixels through the usual preprocessing.
    c = cache_mod.Cache.open(summary["cache"])
    images, masks, got = c.load_arrays([ids[n] for n in readable])
    for name, image, mask in zip(readable, images, masks):
        if ODD_CASES[name][3] == odd_dicoms.EXACT:
            np.testing.assert_array_equal(image, channels_from_config(reference("grey"), CFG.preprocess), err_msg=name)
        assert mask.any() == (name == "jpeg-lossless")

    # data.colour: luminance reads the colour ones too, into a cache of its own.
    luminance = ray_data.prepare(CFG.with_overrides({"data.colour": "luminance"}), images=str(files["rgb"].parent),
                                 labels=str(labels), cache=str(tmp_path / "cache"))
    assert luminance["cache"] != summary["cache"]
    assert luminance["images"] == len(readable) + len(colour) and luminance["quarantined"] == len(broken)
