"""The synthetic SIIM-layout dataset: layout, labels, DICOM tags, lesions, determinism, S3."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from ptxray import synth
from ptxray.dicom import read_dicom, read_dicom_file
from ptxray.masks import decode_rle, read_labels

N, SIZE, RATE, SEED = 12, 256, 0.4, 5
UID_RE = re.compile(r"^1\.2\.276\.0\.7230010\.3\.1\.([234])\.(\d+\.\d+\.\d+)\.(\d+)$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth")
    return out, synth.generate(str(out), n=N, size=SIZE, positive_rate=RATE, seed=SEED)


def dicom_files(root: Path) -> list[Path]:
    return sorted((root / synth.IMAGES_DIR).glob("*/*/*.dcm"))


def local_std(image: np.ndarray, k: int = 5) -> np.ndarray:
    """Standard deviation in a k x k window: high where lung markings are. (H, W)"""
    f = image.astype(np.float32)
    mean = cv2.blur(f, (k, k))
    return np.sqrt(np.maximum(cv2.blur(f * f, (k, k)) - mean * mean, 0.0))


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=px)


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=px)


# -------------------------------------------------------------------------------- files and labels


def test_layout_is_study_series_sop(dataset):
    root, summary = dataset
    files = dicom_files(root)
    assert len(files) == N == summary.images
    assert (root / synth.LABELS_FILE).is_file()
    for f in files:
        study, series, sop = f.parent.parent.name, f.parent.name, f.stem
        kinds = {UID_RE.fullmatch(u).group(1) for u in (study, series, sop)}
        assert kinds == {"2", "3", "4"}, f
        assert UID_RE.fullmatch(sop).group(1) == "4"
        sop_m, study_m, series_m = (UID_RE.fullmatch(u) for u in (sop, study, series))
        # SIIM: study and series share the SOP's middle and count down in the last component.
        assert study_m.group(2) == series_m.group(2) == sop_m.group(2)
        assert int(study_m.group(3)) == int(sop_m.group(3)) - 1
        assert int(series_m.group(3)) == int(sop_m.group(3)) - 2
        assert len(sop) <= 64
    assert len({f.stem for f in files}) == N


def test_labels_csv_is_like_the_real_one(dataset):
    root, summary = dataset
    text = (root / synth.LABELS_FILE).read_text()
    lines = text.splitlines()
    assert lines[0] == "ImageId, EncodedPixels"
    body = lines[1:]
    assert len(body) == summary.rows
    for line in body:
        image_id, value = line.split(",", 1)
        assert value == "-1" or re.fullmatch(r" \d+( \d+)+", value), line  # space after the comma

    labels = read_labels(str(root / synth.LABELS_FILE))
    assert len(labels) == N
    assert labels.n_positive == summary.positive == round(N * RATE)
    rows_per_positive = [len(labels.rles[i]) for i in labels.image_ids if labels.positive(i)]
    assert any(r > 1 for r in rows_per_positive), "some positives must have several rows"
    assert max(rows_per_positive) <= 3
    assert {f.stem for f in dicom_files(root)} == set(labels.image_ids)
    for image_id in labels.image_ids:
        if labels.positive(image_id):
            assert labels.mask(image_id, SIZE, SIZE).sum() > 0


def test_dicoms_are_jpeg_baseline_monochrome2_with_siim_tags(dataset):
    root, _ = dataset
    for f in dicom_files(root):
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.SOPInstanceUID == f.stem
        assert ds.StudyInstanceUID == f.parent.parent.name
        assert ds.SeriesInstanceUID == f.parent.name
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (8, 8, 1)
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST"
        assert str(uuid.UUID(ds.PatientID)) == ds.PatientID
        assert ds.PatientSex in ("M", "F")
        assert 18 <= int(ds.PatientAge) <= 90
        assert ds.ViewPosition in ("PA", "AP")
        assert all(0.139 <= float(s) <= 0.1944 for s in ds.PixelSpacing)
        scan = read_dicom(f.read_bytes(), str(f))
        assert scan.image.shape == (SIZE, SIZE) and scan.image.dtype == np.uint8
        assert scan.image_id == f.stem and scan.patient_id == ds.PatientID
        # pydicom's own JPEG decoder agrees with ptxray's (libjpeg-turbo) up to one grey level.
        diff = np.abs(ds.pixel_array.astype(np.int16) - scan.image.astype(np.int16))
        assert diff.max() <= 1


def test_files_hold_the_rendered_images_and_masks(dataset):
    root, _ = dataset
    labels = read_labels(str(root / synth.LABELS_FILE))
    tasks = synth.plan(str(root), N, SIZE, RATE, SEED, (1, 4))
    csv_ids = [row.split(",")[0] for row in (root / synth.LABELS_FILE).read_text().splitlines()[1:]]
    assert [t.image_id for t in tasks] == list(dict.fromkeys(csv_ids))  # CSV in plan order
    for task in tasks:
        image, view, masks = synth.render(task)
        scan = read_dicom_file(task.path)
        assert scan.view_position == view
        # JPEG at quality 95: small differences only.
        assert np.abs(scan.image.astype(np.int16) - image.astype(np.int16)).mean() < 1.5
        rows = labels.rles[task.image_id]
        assert len(rows) == len(masks) == task.pieces
        for rle, mask in zip(rows, masks):
            assert np.array_equal(decode_rle(rle, SIZE, SIZE), mask)


def test_several_images_per_patient_with_a_shared_identity(dataset):
    root, summary = dataset
    by_patient = defaultdict(list)
    for f in dicom_files(root):
        scan = read_dicom_file(f)
        by_patient[scan.patient_id].append(scan)
    assert len(by_patient) == summary.patients < N
    assert max(len(v) for v in by_patient.values()) >= 2
    assert all(1 <= len(v) <= 4 for v in by_patient.values())
    for scans in by_patient.values():
        assert len({s.sex for s in scans}) == 1
        assert max(s.age for s in scans) - min(s.age for s in scans) <= 2


# ------------------------------------------------------------------------------------- drawing


# 512 px, so that even the thinnest crescents have an interior a 5 x 5 window can measure.
@pytest.mark.parametrize("seed", range(6))
def test_pneumothorax_is_where_the_mask_says(seed):
    size = 512
    rng = np.random.default_rng(seed)
    before, geometry = synth.make_radiograph(rng, size)
    after, pieces = synth.add_pneumothorax(before, geometry, rng, size)
    lesion = np.maximum.reduce(pieces)
    assert lesion.dtype == np.uint8 and set(np.unique(lesion)) <= {0, 1}
    side = int(np.argmax([(lesion & lung).sum() for lung in geometry["lungs"]]))
    lung = geometry["lungs"][side]
    assert (lesion & (1 - lung)).sum() == 0, "the lesion lies inside one lung field"
    assert lesion.sum() >= 0.03 * lung.sum()

    # Nothing changes away from the affected lung (its soft border spans a few px).
    changed = before != after
    assert not (changed & (dilate(lung, size // 25) == 0)).any()
    inside = erode(lesion, 3).astype(bool)  # away from the pleural line and the chest wall
    assert inside.sum() > 100
    # The air gap is darker and has lost its markings (lower local variation than before).
    delta = after.astype(np.float32) - before.astype(np.float32)
    assert delta[inside].mean() < -6
    assert np.median(local_std(after)[inside]) < 0.85 * np.median(local_std(before)[inside])
    # ... and, where the gap is wide, less variation than in the rest of the same lung.
    rest = (erode(lung, 3) & (1 - dilate(lesion, 6))).astype(bool)
    if inside.sum() >= 2000:
        assert np.median(local_std(after)[inside]) < 0.8 * np.median(local_std(after)[rest])


@pytest.mark.parametrize("seed", range(4))
def test_pleural_line_bounds_the_air_gap(seed):
    size = 512
    rng = np.random.default_rng(seed)
    before, geometry = synth.make_radiograph(rng, size)
    after, pieces = synth.add_pneumothorax(before, geometry, rng, size)
    lesion = np.maximum.reduce(pieces)
    side = int(np.argmax([(lesion & lung).sum() for lung in geometry["lungs"]]))
    inner_lung = erode(geometry["lungs"][side], 8)  # not the chest wall
    # The 1 px band of lung bordering the gap brightened by much more than the lung a little further on.
    line = (dilate(lesion, 1) & (1 - lesion) & inner_lung).astype(bool)
    beyond = (dilate(lesion, 12) & (1 - dilate(lesion, 6)) & inner_lung).astype(bool)
    assert line.sum() > 30 and beyond.sum() > 100
    delta = after.astype(np.float32) - before.astype(np.float32)
    assert delta[line].mean() > delta[beyond].mean() + 6


def test_lesion_sizes_range_from_small_to_large():
    size = 128
    fractions = []
    for seed in range(24):
        rng = np.random.default_rng(seed)
        image, geometry = synth.make_radiograph(rng, size)
        _, pieces = synth.add_pneumothorax(image, geometry, rng, size)
        fractions.append(np.maximum.reduce(pieces).sum() / size**2)
    assert min(fractions) < 0.015 and max(fractions) > 0.05  # of the film


def test_pieces_overlap_and_their_union_is_the_lesion():
    size = 256
    for seed in range(4):
        unions = {}
        for k in (1, 2, 3):
            rng = np.random.default_rng(seed)
            image, geometry = synth.make_radiograph(rng, size)
            _, pieces = synth.add_pneumothorax(image, geometry, rng, size, pieces=k)
            assert len(pieces) == k
            assert all(p.sum() > 0 and p.dtype == np.uint8 for p in pieces)
            if k > 1:
                overlaps = [(a & b).sum() for i, a in enumerate(pieces) for b in pieces[i + 1 :]]
                assert max(overlaps) > 0, "pieces overlap, as annotators' do"
                assert all(p.sum() < np.maximum.reduce(pieces).sum() for p in pieces)
            unions[k] = np.maximum.reduce(pieces)
        assert np.array_equal(unions[1], unions[2]) and np.array_equal(unions[1], unions[3])
        count, _ = cv2.connectedComponents(unions[1])
        assert count == 2, "one lesion"


def test_radiograph_looks_like_a_chest_film():
    size = 256
    image, geometry = synth.make_radiograph(np.random.default_rng(4), size)
    assert image.shape == (size, size) and image.dtype == np.uint8
    left, right = geometry["lungs"]
    assert left.sum() > 0.04 * size * size and right.sum() > 0.04 * size * size
    assert np.nonzero(left)[1].max() < size // 2 < np.nonzero(right)[1].min()
    for lung in (left, right):
        assert cv2.connectedComponents(lung)[0] == 2
    lungs = (left | right).astype(bool)
    far_from_lungs = dilate((left | right), size // 25) == 0
    mediastinum = np.zeros_like(lungs)
    mediastinum[size // 3 : 2 * size // 3, size // 2 - size // 40 : size // 2 + size // 40] = True
    soft = far_from_lungs & (image > 40)  # body outside the lungs, not the air around it
    assert image[lungs].mean() + 50 < image[mediastinum].mean()
    assert image[lungs].mean() + 30 < image[soft].mean()
    # Markings: the lungs have texture, not a flat fill.
    assert np.median(local_std(image)[erode(left | right, 3).astype(bool)]) > 2.0


def test_one_build_per_patient_varies_only_the_pose():
    size = 128

    def canonical_lungs(build, seed):
        _, g = synth.make_radiograph(np.random.default_rng(seed), size, build)
        inverse = cv2.invertAffineTransform(g["affine"])
        return np.stack([cv2.warpAffine(m, inverse, (size, size), flags=cv2.INTER_NEAREST) for m in g["lungs"]])

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    a = synth.draw_build(np.random.default_rng(1))
    b = synth.draw_build(np.random.default_rng(2))
    first, second, other = canonical_lungs(a, 10), canonical_lungs(a, 11), canonical_lungs(b, 12)
    assert iou(first, second) > 0.9
    assert iou(first, other) < iou(first, second) - 0.05


# ------------------------------------------------------------------------ plan and determinism


@pytest.mark.parametrize(("n", "rate"), [(1, 0.22), (7, 0.5), (50, 0.22), (200, 0.22), (10, 0.0), (10, 1.0)])
def test_plan_has_exact_positives_and_unique_ids(n, rate):
    tasks = synth.plan("out", n, 256, rate, 0, (1, 4))
    assert len(tasks) == n
    positives = [t for t in tasks if t.pieces]
    assert len(positives) == round(n * rate)
    multi = [t for t in positives if t.pieces > 1]
    assert len(multi) == round(len(positives) * 0.3)
    assert len({t.image_id for t in tasks}) == n
    assert all(18 <= t.age <= 90 and 0.139 <= t.spacing_mm <= 0.1944 for t in tasks)
    per_patient = Counter(t.patient_id for t in tasks)
    assert all(1 <= c <= 4 for c in per_patient.values())
    assert len({t.patient_index for t in tasks}) == len(per_patient)


def test_plan_one_image_per_patient():
    tasks = synth.plan("out", 20, 256, 0.2, 3, (1, 1))
    assert len({t.patient_id for t in tasks}) == 20


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_any_workers(tmp_path):
    args = dict(n=5, size=96, positive_rate=0.4, seed=1)
    synth.generate(str(tmp_path / "a"), **args)
    synth.generate(str(tmp_path / "b"), **args)
    synth.generate(str(tmp_path / "c"), **args, workers=2)
    a, b, c = (sha256_tree(tmp_path / x) for x in "abc")
    assert len(a) == 6 and a == b == c
    synth.generate(str(tmp_path / "d"), **{**args, "seed": 2})
    d = sha256_tree(tmp_path / "d")
    assert not set(a.values()) & set(d.values())


def test_s3_output_matches_local(moto_s3, tmp_path):
    moto_s3.client().create_bucket(Bucket="synth")
    args = dict(n=3, size=64, positive_rate=0.34, seed=7)
    summary = synth.generate("s3://synth/siim", **args)
    synth.generate(str(tmp_path), **args)
    assert summary.images == 3 and summary.positive == 1
    local = sha256_tree(tmp_path)
    s3 = moto_s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="synth", Prefix="siim/")["Contents"]]
    remote = {
        k.removeprefix("siim/"): hashlib.sha256(s3.get_object(Bucket="synth", Key=k)["Body"].read()).hexdigest()
        for k in keys
    }
    assert remote == local


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=0), "n must be"),
        (dict(size=16), "size must be"),
        (dict(positive_rate=1.5), "positive_rate"),
        (dict(seed=-1), "seed"),
        (dict(images_per_patient=(3, 2)), "images_per_patient"),
        (dict(workers=0), "workers"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth.generate(str(tmp_path), **{"n": 2, "size": 64, **kwargs})
    assert not any(tmp_path.iterdir())
