"""`ptxray prepare`: DICOMs (folder or S3) -> the decode-once cache, on a real local Ray."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import odd_dicoms
from odd_dicoms import ODD_CASES, reference, sop_instance_uid, write_odd_folder
from conftest import SIIM_SAMPLE, free_port, start_moto_server, stop_moto_server
from ptxray import cache as cache_mod
from ptxray.cli import main
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


def test_prepare_mixed_folder_counts_and_contents(ray_local, tmp_path, monkeypatch):
    from ray.data._internal.execution import streaming_executor

    from ptxray import ray_data

    # Whether a Ray Data streaming executor runs (a spy on the real function that makes its CPU budget).
    budgets: list[str] = []
    create = streaming_executor.create_cluster_autoscaler
    monkeypatch.setattr(
        streaming_executor, "create_cluster_autoscaler",
        lambda *a, **k: budgets.append(type(made := create(*a, **k)).__name__) or made,
    )  # fmt: skip
    images, labels, bad = _mixed_folder(tmp_path)
    summary = ray_data.prepare(CFG, images=str(images), labels=str(labels), cache=str(tmp_path / "cache"))
    # No Ray Data executor: its budget comes from a coordinator actor, and until that actor is up
    # it sees "0/0 CPU" and runs nothing (the demo's 55 s stall; ray_data._write_cache_rows).
    assert budgets == []

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

    # One Parquet file per prepare task (read, decode and write fused in one task); the pixels
    # stored uncompressed without dictionaries or statistics, everything else zstd.
    import pyarrow.parquet as pq

    files = sorted(Path(c.data_uri).glob("*.parquet"))
    assert len(files) == ray_data.prepare_tasks(15, CFG.compute.prepare_batch_size, 4)  # ray_local: 4 CPUs
    meta = pq.ParquetFile(files[0]).metadata.row_group(0)
    chunks = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert chunks["image"].compression == "UNCOMPRESSED" and not chunks["image"].is_stats_set
    assert not any("DICTIONARY" in e for e in chunks["image"].encodings + chunks["mask"].encodings)
    assert {chunks[k].compression for k in ("mask", "image_id", "path", "label")} == {"ZSTD"}
    assert chunks["image_id"].is_stats_set

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


def test_rows_to_table_builds_the_pixel_columns_pyarrow_would(monkeypatch):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    image, mask = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), rng.integers(0, 2, (8, 8), dtype=np.uint8)

    def row(i: int, image, mask, error=None) -> dict:
        light = dict.fromkeys(cache_mod.LIGHT_COLUMNS)
        return dict(light, image_id=f"id{i}", path=f"p{i}.dcm", error=error, labelled=error is None, image=image, mask=mask)

    rows = [row(0, image, mask), row(1, None, None, "p1.dcm: truncated"), row(2, image[::-1].copy().tobytes(), b"")]
    as_bytes = [dict(r, **{k: r[k].tobytes() if isinstance(r[k], np.ndarray) else r[k] for k in ("image", "mask")}) for r in rows]
    expected = pa.Table.from_pylist(as_bytes, schema=cache_mod.ROW_SCHEMA)
    assert cache_mod.rows_to_table(rows).equals(expected)
    assert cache_mod.rows_to_table([]).equals(pa.Table.from_pylist([], schema=cache_mod.ROW_SCHEMA))
    # Columns over the int32 offsets' limit are split into chunks (the limit made small here).
    monkeypatch.setattr(cache_mod, "MAX_BINARY_CHUNK_BYTES", 200)
    table = cache_mod.rows_to_table(rows)
    assert table.column("image").num_chunks == 2 and table.equals(expected)


def test_rows_written_into_pixel_buffers_become_columns_without_a_copy(monkeypatch):
    """prepare's rows hold views of one PixelBuffers pair: the table wraps those buffers (no copy
    of ~1 MB a row) and equals the table of the same rows as separate arrays; anything else (rows
    out of order, a column over the offsets' limit) takes the copying path to the same table."""
    from dataclasses import replace

    rng = np.random.default_rng(1)
    pre = replace(CFG.preprocess, image_size_px=8)
    buffers = cache_mod.PixelBuffers(4, pre)
    assert buffers.images.shape == (4, len(pre.channels), 8, 8) and not buffers.masks.any()
    rows = []
    for i in range(4):
        light = dict.fromkeys(cache_mod.LIGHT_COLUMNS)
        if i == 2:  # quarantined: its slot is left as it was, and the value is null
            rows.append(dict(light, path=f"p{i}.dcm", error="p2.dcm: truncated", image=None, mask=None))
            continue
        image, mask = buffers.slots(i)
        image[...] = rng.integers(0, 256, image.shape, dtype=np.uint8)
        mask[...] = rng.integers(0, 2, mask.shape, dtype=np.uint8)
        rows.append(dict(light, image_id=f"id{i}", path=f"p{i}.dcm", labelled=True, image=image, mask=mask))

    table = cache_mod.rows_to_table(rows)
    copies = [dict(r, image=None if r["image"] is None else r["image"].copy(), mask=None if r["mask"] is None else r["mask"].copy()) for r in rows]
    assert table.equals(cache_mod.rows_to_table(copies))
    for name, buffer in (("image", buffers.images), ("mask", buffers.masks)):
        (chunk,) = table.column(name).chunks
        assert chunk.buffers()[2].address == buffer.ctypes.data, f"{name}: copied"
        assert chunk.is_null().to_pylist() == [False, False, True, False]
    assert table.column("image")[3].as_py() == buffers.images[3].tobytes()

    shuffled = [rows[1], rows[0], rows[2], rows[3]]
    assert cache_mod.rows_to_table(shuffled).equals(cache_mod.rows_to_table([copies[1], copies[0], copies[2], copies[3]]))
    monkeypatch.setattr(cache_mod, "MAX_BINARY_CHUNK_BYTES", 400)  # the image buffer (768 bytes) is over it
    assert cache_mod.rows_to_table(rows).equals(table)


def test_prepare_tasks_cover_the_files_in_whole_rounds_over_the_cpus():
    from ptxray.ray_data import prepare_tasks

    assert prepare_tasks(2000, 64, 2) == 32
    assert prepare_tasks(400, 64, 4) == 8  # 7 tasks of 64 would leave 3 CPUs idle in the last round
    assert prepare_tasks(15, 64, 4) == 4 and prepare_tasks(3, 64, 4) == 3 and prepare_tasks(0, 64, 4) == 0
    assert prepare_tasks(10, 64, 0.5) == 1


def test_prepare_decodes_with_one_opencv_thread(ray_local, tmp_path):
    """OpenCV's default pool (a thread per core) in every Ray worker would only make the workers'
    threads fight for the cores: the prepare tasks run OpenCV single-threaded."""
    import cv2
    import pyarrow as pa

    from ptxray import ray_data

    path = sorted((SIIM_SAMPLE / "sample-images").glob("*.dcm"))[0]
    batch = pa.table({"path": [str(path)]})
    labels = read_labels(str(SIIM_SAMPLE / "train-rle-sample.csv"))

    @ray_local.remote
    def decode_in_a_worker(batch: pa.Table) -> tuple[int, int]:
        import pyarrow.fs as pafs

        cv2.setNumThreads(4)  # what a worker has by default on a 4-core machine
        table = ray_data._decode_batch(batch, pafs.LocalFileSystem(), labels, CFG.preprocess, "siim", "skip", "")
        return table.num_rows, cv2.getNumThreads()

    assert ray_local.get(decode_in_a_worker.remote(batch)) == (1, 1)


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
def _prepare_cli(capsys, images: str, labels: str, cache: str, *extra: str) -> tuple[int, str, str]:
    """`ptxray prepare` in this process (it reuses the test's Ray): (exit code, stdout, stderr)."""
    rc = main(["prepare", "--config", "smoke", "--images", images, "--labels", labels, "--cache", cache, *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_label_rows_that_are_not_rle_are_quarantined_and_mixed_labels_counted(ray_local, tmp_path, capsys):
    """A negative RLE value quarantines its row and image (not the run); an image listed as -1 and
    with an RLE is counted in the summary."""
    rows = (SIIM_SAMPLE / "train-rle-sample.csv").read_text(encoding="utf-8-sig").splitlines()
    negative_id = rows[5].split(",")[0]  # a positive image
    mixed_id = rows[6].split(",")[0]  # another positive image, also listed as -1 below
    rows[5] = f"{negative_id}, 175349 7 -1013 12"
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join([*rows, f"{mixed_id},-1"]) + "\n")

    rc, out, err = _prepare_cli(capsys, str(SIIM_SAMPLE / "sample-images"), str(labels), str(tmp_path / "cache"),
                                "--summary-json", str(tmp_path / "summary.json"))
    assert rc == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    reason = f"{labels}:6: image {negative_id}: RLE value -1013 is negative (only a lone -1, an empty mask, may be)"
    assert summary["label_rows_quarantined"] == 1 and summary["label_rows_quarantine"] == [reason]
    (q,) = summary["quarantine"]
    assert q["path"].endswith(f"{negative_id}.dcm") and q["reason"].endswith(f"label: {reason}")
    assert summary["images"] == 9 and summary["positive"] == 4, "the quarantined image is left out; the mixed one is positive"
    assert summary["labels_empty_and_rle"] == 1 and summary["labels_empty_and_rle_ids"] == [mixed_id]
    assert "label rows that are not RLE" in out and "labelled both -1 and RLE" in out


def test_prepare_of_a_folder_without_dicoms_is_a_one_line_error(ray_local, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "empty-subfolder").mkdir(parents=True)
    (images / "notes.txt").write_text("not a DICOM")
    rc, _, err = _prepare_cli(capsys, str(images), str(SIIM_SAMPLE / "train-rle-sample.csv"), str(tmp_path / "cache"))
    assert rc == 2 and err == f"ptxray prepare: error: {images}: no DICOM files (*.dcm, *.dicom) in this folder or prefix"
    assert not (tmp_path / "cache").exists()


def test_s3_failures_at_the_start_of_prepare_are_one_line_errors(ray_local, moto_s3, tmp_path, monkeypatch, capsys):
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="ptx-start")
    s3.upload_file(str(SIIM_SAMPLE / "train-rle-sample.csv"), "ptx-start", "train-rle.csv")
    images, labels = str(SIIM_SAMPLE / "sample-images"), "s3://ptx-start/train-rle.csv"

    # A cache bucket that does not exist: refused before anything is decoded.
    rc, _, err = _prepare_cli(capsys, images, labels, "s3://ptx-no-such-bucket/cache")
    assert (rc, err) == (2, "ptxray prepare: error: s3://ptx-no-such-bucket/cache: bucket 'ptx-no-such-bucket' does not exist (create it first)")

    # Nothing listens at the endpoint.
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    rc, _, err = _prepare_cli(capsys, "s3://ptx-start/images", labels, "s3://ptx-start/cache")
    assert rc == 2 and err == (
        f"ptxray prepare: error: s3://ptx-start/images: cannot reach the S3 endpoint {dead} after 3 tries "
        "(curlCode: 7, Could not connect to server)"
    )

    # An endpoint that checks credentials, and none in the environment or in credential files.
    proc, checking = start_moto_server(tmp_path / "requests.jsonl", INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", checking.endpoint)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        rc, _, err = _prepare_cli(capsys, "s3://ptx-private/images", "s3://ptx-private/train-rle.csv", "s3://ptx-private/cache")
        assert rc == 2 and len(err.splitlines()) == 1
        assert err.startswith(
            "ptxray prepare: error: s3://ptx-private/images: no AWS credentials found "
            "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        ), err
        # Credentials the endpoint does not know.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        rc, _, err = _prepare_cli(capsys, "s3://ptx-private/images", "s3://ptx-private/train-rle.csv", "s3://ptx-private/cache")
        assert rc == 2 and err == (
            "ptxray prepare: error: s3://ptx-private/images: access denied: check the AWS credentials and their "
            "permissions (AWS Error ACCESS_DENIED during HeadObject)"
        )
    finally:
        stop_moto_server(proc)


def _dicom_fetched(recording: Path) -> bool:
    if not recording.exists():
        return False
    for line in recording.read_text().splitlines():
        try:
            request = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if request["method"] == "GET" and ".dcm" in request["url"]:
            return True
    return False


def test_s3_endpoint_killed_during_prepare_fails_with_one_line_instead_of_hanging(
    ray_local, moto_s3, synth_dataset, tmp_path, monkeypatch, capsys
):
    """Before: Ray Data retried the read for hours at "0/?" with no message."""
    proc, doomed = start_moto_server(tmp_path / "requests.jsonl")
    try:
        s3 = doomed.client()
        s3.create_bucket(Bucket="ptx-doomed")
        _upload(s3, "ptx-doomed", synth_dataset, "siim")
        monkeypatch.setenv("AWS_ENDPOINT_URL", doomed.endpoint)  # the driver's filesystems travel to the tasks
        doomed.start_recording()
        result: dict[str, int] = {}
        args = ("s3://ptx-doomed/siim/dicom-images-train", "s3://ptx-doomed/siim/train-rle.csv", "s3://ptx-doomed/cache")
        prepare = threading.Thread(target=lambda: result.update(rc=main(["prepare", "--config", "smoke", "--images", args[0],
                                                                         "--labels", args[1], "--cache", args[2]])), daemon=True)  # fmt: skip
        prepare.start()
        # Kill the endpoint once a read task fetches a DICOM: decoding, the cache write and the
        # manifest all still need it, so prepare cannot finish.
        deadline = time.time() + 120
        while time.time() < deadline and not _dicom_fetched(doomed.recording):
            time.sleep(0.05)
        assert _dicom_fetched(doomed.recording), "prepare never read a DICOM"
        proc.kill()
        prepare.join(timeout=300)
        assert not prepare.is_alive(), "prepare still runs 300 s after its S3 endpoint died"
    finally:
        stop_moto_server(proc)
    assert result["rc"] == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"ptxray prepare: error: s3://ptx-doomed/\S+: cannot reach the S3 endpoint {re.escape(doomed.endpoint)} after 3 tries \(.+\)", last
    ), last


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
def test_a_garbage_cache_manifest_is_named(tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "manifest.json"))):
        cache_mod.Cache.open(str(tmp_path))
    assert cache_mod.read_manifest(str(tmp_path / "elsewhere")) is None  # a missing one is no cache
