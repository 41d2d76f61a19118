"""ptxray.dicom on the real SIIM files (tests/data/siim-sample, see its PROVENANCE.md) and on
datasets written here with pydicom for every kind of bad or unusual input."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    HTJ2K,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

import odd_dicoms
from odd_dicoms import ODD_CASES, reference, sop_instance_uid, write_odd_folder
from ptxray import dicom
from ptxray.dicom import DicomError, Scan, parse_age, read_dicom, read_dicom_file, write_jpeg_dicom

DATA = Path(__file__).parent / "data" / "siim-sample"
TXV = DATA / "torchxrayvision"
SCAN_6904 = TXV / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
REAL_FILES = sorted((DATA / "sample-images").glob("*.dcm")) + [SCAN_6904]


def _pydicom_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def _native(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
            bits_stored: int | None = None, **tags) -> Path:
    """Write an uncompressed (Explicit VR Little Endian) Secondary Capture file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encapsulated(path: Path, syntax: str, frame: bytes, *, rows: int = 8, columns: int = 8) -> Path:
    """Write a greyscale 8-bit file whose pixel data is one encapsulated frame of `frame` bytes."""
    _native(path, np.zeros((rows, columns), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    private = not UID(syntax).is_transfer_syntax
    extra = {"implicit_vr": False, "little_endian": True} if private else {}
    ds.save_as(path, enforce_file_format=True, **extra)
    return path


# ------------------------------------------------------------------------------- real SIIM files


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name.split(".")[9])
def test_real_siim_file_decodes_like_pydicom(path: Path) -> None:
    scan = read_dicom(path.read_bytes(), str(path))

    assert scan.image.dtype == np.uint8 and scan.image.shape == (1024, 1024)
    reference = _pydicom_pixels(path)
    assert np.abs(scan.image.astype(np.int16) - reference.astype(np.int16)).max() <= 1
    assert scan.image_id == path.stem
    assert scan.patient_id
    assert scan.sex in ("M", "F")
    assert isinstance(scan.age, int) and 0 < scan.age < 120
    assert scan.view_position in ("PA", "AP")
    assert scan.pixel_spacing_mm is not None and all(s > 0 for s in scan.pixel_spacing_mm)
    assert scan.transfer_syntax == JPEGBaseline8Bit
    assert scan.photometric == "MONOCHROME2"
    assert scan.path == str(path)
    # PROVENANCE.md: the study UID swaps .4. for .2. and subtracts 1 from the last component,
    # the series UID swaps in .3. and subtracts 2; checks that the right tags were read.
    head, last = scan.image_id.rsplit(".", 1)
    assert scan.study_uid == head.replace(".3.1.4.", ".3.1.2.", 1) + f".{int(last) - 1}"
    assert scan.series_uid == head.replace(".3.1.4.", ".3.1.3.", 1) + f".{int(last) - 2}"


def test_siim_pixels_are_exactly_the_libjpeg_turbo_decode() -> None:
    # 8-bit images without window or rescale must pass through untouched (no re-scaling).
    path = REAL_FILES[0]
    frame = get_frame(pydicom.dcmread(path).PixelData, 0, number_of_frames=1)
    expected = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
    scan = read_dicom_file(path)
    np.testing.assert_array_equal(scan.image, expected)
    assert scan.image.min() < 20 and scan.image.max() > 235  # a real radiograph, not a blank


def test_read_dicom_file_accepts_str_and_path() -> None:
    a = read_dicom_file(SCAN_6904)
    b = read_dicom_file(str(SCAN_6904))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.path == b.path == str(SCAN_6904)


def test_monochrome1_comes_out_inverted() -> None:
    fake = read_dicom_file(TXV / "Fake_MONOHR1.dcm")
    original = read_dicom_file(SCAN_6904)
    assert fake.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(fake.image, 255 - original.image)
    expected = 255 - _pydicom_pixels(SCAN_6904).astype(np.int16)
    assert np.abs(fake.image.astype(np.int16) - expected).max() <= 1


# ------------------------------------------------------------------------- reduced-scale decode


def _header_fields(scan: Scan) -> tuple:
    return (scan.image_id, scan.patient_id, scan.sex, scan.age, scan.view_position, scan.pixel_spacing_mm,
            scan.study_uid, scan.series_uid, scan.transfer_syntax, scan.photometric, scan.path,
            scan.rows, scan.columns)


@pytest.mark.parametrize("path", REAL_FILES[:3], ids=lambda p: p.name.split(".")[9])
def test_half_scale_decode_matches_full_decode_then_area_resize(path: Path) -> None:
    full = read_dicom_file(path)
    half = read_dicom_file(path, min_size_px=512)

    assert half.image.shape == (512, 512) and half.image.dtype == np.uint8
    assert (half.rows, half.columns) == (full.rows, full.columns) == (1024, 1024)
    assert _header_fields(half) == _header_fields(full)
    area = cv2.resize(full.image, (512, 512), interpolation=cv2.INTER_AREA)
    diff = np.abs(half.image.astype(np.int16) - area.astype(np.int16))
    # libjpeg-turbo's 1/2-scale IDCT vs decode + 2x2 box mean: measured 0.14 mean, 3 max on SIIM.
    assert diff.mean() < 0.3 and diff.max() <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize(("min_size_px", "shape"), [(1, (128, 128)), (128, (128, 128)), (129, (256, 256)),
                                                    (256, (256, 256)), (300, (512, 512)), (513, (1024, 1024)),
                                                    (5000, (1024, 1024))])
def test_min_size_px_picks_the_largest_dct_scale_that_keeps_the_size(min_size_px: int, shape: tuple) -> None:
    scan = read_dicom_file(SCAN_6904, min_size_px=min_size_px)
    assert scan.image.shape == shape
    if shape == (1024, 1024):  # no scaling possible: exactly the full decode
        np.testing.assert_array_equal(scan.image, read_dicom_file(SCAN_6904).image)


def test_reduced_decode_rounds_odd_sizes_up_and_keeps_monochrome1_inversion(tmp_path: Path) -> None:
    path = tmp_path / f"{WRITE_ARGS['image_id']}.dcm"
    write_jpeg_dicom(path, _smooth_image(101, 203), **WRITE_ARGS)
    assert read_dicom_file(path, min_size_px=50).image.shape == (51, 102)  # ceil(101/2), ceil(203/2)
    assert read_dicom_file(path, min_size_px=26).image.shape == (26, 51)  # 1/4
    assert read_dicom_file(path, min_size_px=51).image.shape == (51, 102)  # the short side just fits
    assert read_dicom_file(path, min_size_px=52).image.shape == (101, 203)  # 1/2 would leave 51 rows
    fake = read_dicom_file(TXV / "Fake_MONOHR1.dcm", min_size_px=512)
    np.testing.assert_array_equal(fake.image, 255 - read_dicom_file(SCAN_6904, min_size_px=512).image)


def test_min_size_px_leaves_other_transfer_syntaxes_at_full_size(tmp_path: Path) -> None:
    raw = (np.arange(64 * 64) % 191 + 10).astype(np.uint8).reshape(64, 64)
    path = _native(tmp_path / "8.dcm", raw)
    scan = read_dicom_file(path, min_size_px=8)
    np.testing.assert_array_equal(scan.image, raw)
    assert (scan.rows, scan.columns) == (64, 64)


def test_reduced_decode_still_checks_the_frame_size(tmp_path: Path) -> None:
    # A frame one row taller than Rows: at 1/2 scale both round to 8 rows, so only the frame header
    # can tell; the full-size path sees it in the decoded pixels.
    ok, jpeg = cv2.imencode(".jpg", np.full((16, 16), 100, np.uint8))
    assert ok
    path = _encapsulated(tmp_path / "taller.dcm", JPEGBaseline8Bit, jpeg.tobytes(), rows=15, columns=16)
    with pytest.raises(DicomError, match=r"JPEG frame header says \(16, 16\).*\(15, 16\)") as caught:
        read_dicom_file(path, min_size_px=8)
    assert caught.value.path == str(path)
    with pytest.raises(DicomError, match=r"decoded shape \(16, 16\)"):
        read_dicom_file(path)


def test_reduced_decode_rejects_a_colour_jpeg_frame(tmp_path: Path) -> None:
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 2] = 200
    ok, jpeg = cv2.imencode(".jpg", colour)
    assert ok
    path = _encapsulated(tmp_path / "colour.dcm", JPEGBaseline8Bit, jpeg.tobytes(), rows=16, columns=16)
    for min_size_px in (None, 8):
        with pytest.raises(DicomError, match="not 8-bit greyscale"):
            read_dicom_file(path, min_size_px=min_size_px)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "512"])
def test_min_size_px_must_be_a_positive_integer(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        read_dicom(SCAN_6904.read_bytes(), min_size_px=bad)


def test_implicit_vr_file_reads_the_same_fields(tmp_path: Path) -> None:
    # Implicit VR stores no VRs: the header reader converts raw elements whose VR pydicom looks up
    # in its dictionary, and must read the same values as from the explicit-VR file.
    raw = (np.arange(32 * 32) % 200 + 20).astype(np.uint8).reshape(32, 32)
    explicit = _native(tmp_path / "explicit.dcm", raw, PatientID="p1", PatientSex="F", PatientAge="041Y",
                       ViewPosition="PA", PixelSpacing=[0.2, 0.3])
    ds = pydicom.dcmread(explicit)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    ds.save_as(implicit, enforce_file_format=True)
    a, b = read_dicom_file(explicit), read_dicom_file(implicit)
    np.testing.assert_array_equal(a.image, raw)
    np.testing.assert_array_equal(b.image, raw)
    assert _header_fields(a)[:8] == _header_fields(b)[:8]
    assert (b.patient_id, b.sex, b.age, b.view_position, b.pixel_spacing_mm) == ("p1", "F", 41, "PA", (0.2, 0.3))


# ------------------------------------------------------------------------------------ bad inputs


def _random_bytes(tmp: Path) -> Path:
    path = tmp / "random.dcm"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _png(tmp: Path) -> Path:
    path = tmp / "image.dcm"
    ok, png = cv2.imencode(".png", np.full((16, 16), 7, np.uint8))
    assert ok
    path.write_bytes(png.tobytes())
    return path


def _real_cut_in_half(tmp: Path) -> Path:
    path = tmp / "half.dcm"
    data = SCAN_6904.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _native_cut(tmp: Path) -> Path:
    path = _native(tmp / "native-cut.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    return path


def _native_short_pixel_data(tmp: Path) -> Path:
    # The element is complete but holds fewer bytes than Rows x Columns needs.
    path = _native(tmp / "short.dcm", np.zeros((32, 32), np.uint16))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:1024]
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_without_end(tmp: Path) -> Path:
    ok, jpeg = cv2.imencode(".jpg", np.full((8, 8), 100, np.uint8))
    assert ok
    return _encapsulated(tmp / "cut-jpeg.dcm", JPEGBaseline8Bit, jpeg.tobytes()[:-40])


def _jpeg_junk(tmp: Path) -> Path:
    return _encapsulated(tmp / "junk-jpeg.dcm", JPEGBaseline8Bit, b"\x00\x11" * 50 + b"\xff\xd9")


def _jpeg_wrong_size(tmp: Path) -> Path:
    ok, jpeg = cv2.imencode(".jpg", np.full((8, 12), 100, np.uint8))
    assert ok
    return _encapsulated(tmp / "wrong-size.dcm", JPEGBaseline8Bit, jpeg.tobytes(), rows=8, columns=8)


def _no_pixel_data(tmp: Path) -> Path:
    return _native(tmp / "nopixels.dcm", np.zeros((8, 8), np.uint8), PixelData=None)


def _undecodable_syntax() -> UID:
    # Whichever HTJ2K syntax has no decoder here (none does without pylibjpeg-openjpeg).
    for syntax in (HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL):
        if not get_decoder(syntax).is_available:
            return syntax
    raise AssertionError("every HTJ2K syntax has a decoder: pick another syntax for this test")


def _unsupported_syntax(tmp: Path) -> Path:
    return _encapsulated(tmp / "htj2k.dcm", _undecodable_syntax(), b"\xff\x4f\xff\x51" + b"\x00" * 60)


def _private_syntax(tmp: Path) -> Path:
    return _encapsulated(tmp / "private.dcm", "1.2.826.0.1.3680043.9.9999.1", b"\x00" * 64)


def _multi_frame(tmp: Path) -> Path:
    return _native(tmp / "frames.dcm", np.zeros((3, 8, 8), np.uint8))


def _rgb(tmp: Path) -> Path:
    return _native(tmp / "rgb.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB")


def _palette(tmp: Path) -> Path:
    return _native(tmp / "palette.dcm", np.zeros((8, 8), np.uint8), photometric="PALETTE COLOR")


BAD_INPUTS = {
    "random-bytes": (_random_bytes, ["not DICOM"]),
    "png": (_png, ["not DICOM"]),
    "real-cut-in-half": (_real_cut_in_half, ["truncated pixel data", f"({len(SCAN_6904.read_bytes()) // 2} bytes)"]),
    "native-cut": (_native_cut, ["truncated", "needs 8192 bytes, only 7192 present"]),
    "short-pixel-data": (_native_short_pixel_data, ["truncated pixel data (expected 2048 bytes, got 1024)"]),
    "jpeg-no-eoi": (_jpeg_without_end, ["truncated JPEG frame"]),
    "jpeg-junk": (_jpeg_junk, ["corrupt JPEG frame"]),
    "jpeg-wrong-size": (_jpeg_wrong_size, ["decoded shape (8, 12)"]),
    "no-pixel-data": (_no_pixel_data, ["no pixel data"]),
    "unsupported-syntax": (_unsupported_syntax, ["unsupported transfer syntax High-Throughput JPEG 2000",
                                                 "install pylibjpeg", "pylibjpeg-openjpeg"]),
    "private-syntax": (_private_syntax, ["unsupported transfer syntax unknown (1.2.826.0.1.3680043.9.9999.1)",
                                         "no decoder"]),
    "multi-frame": (_multi_frame, ["multi-frame (3 frames)"]),
    "rgb": (_rgb, ["colour image (RGB, 3 samples per pixel)"]),
    "palette": (_palette, ["colour image (PALETTE COLOR"]),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the cut sequence
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_dicom_error_naming_path_and_reason(case: str, tmp_path: Path) -> None:
    make, keywords = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(DicomError) as caught:
        read_dicom(path.read_bytes(), str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert caught.value.path == str(path)
    for keyword in keywords:
        assert keyword in caught.value.reason, message
    assert isinstance(caught.value, ValueError)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_cut_of_a_real_file_is_an_error_not_a_bad_image() -> None:
    # A cut anywhere inside the pixel data must not yield a grey-filled image.
    data = SCAN_6904.read_bytes()
    for cut in range(1000, len(data) - 8, 4999):
        with pytest.raises(DicomError, match="truncated"):
            read_dicom(data[:cut], "cut.dcm")


def test_unexpected_exception_becomes_dicom_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_decoder(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(dicom.cv2, "imdecode", broken_decoder)
    with pytest.raises(DicomError, match=r"^x/y\.dcm: cannot decode \(RuntimeError: decoder exploded\)"):
        read_dicom(SCAN_6904.read_bytes(), "x/y.dcm")


def test_error_without_path_and_pickling() -> None:
    with pytest.raises(DicomError, match="^<bytes>: not DICOM"):
        read_dicom(b"hello")
    err = DicomError("s3://bucket/a.dcm", "no pixel data")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.path, clone.reason, str(clone)) == (err.path, err.reason, "s3://bucket/a.dcm: no pixel data")


# --------------------------------------------------------------------------- windowing and LUTs


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), written out independently, to 0..255."""
    fraction = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.rint(np.clip(fraction, 0.0, 1.0) * 255)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("signed", [False, True], ids=["uint12", "int16"])
def test_rescale_and_window_are_applied(tmp_path: Path, photometric: str, signed: bool) -> None:
    if signed:
        raw = np.linspace(-3000, 3000, 64 * 64).round().astype(np.int16).reshape(64, 64)
        bits, slope, intercept, center, width = 16, 1.0, -24.0, 40.0, 400.0  # a CT soft-tissue window
    else:
        raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0..4095
        bits, slope, intercept, center, width = 12, 2.0, -1000.0, 1500.0, 2000.0
    path = _native(tmp_path / "w.dcm", raw, photometric=photometric, bits_stored=bits,
                   RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=center, WindowWidth=width)

    scan = read_dicom_file(path)

    expected = _linear_window(raw.astype(np.float64) * slope + intercept, center, width)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    assert scan.image.dtype == np.uint8 and scan.image.shape == raw.shape
    assert np.abs(scan.image.astype(np.int16) - expected).max() <= 1
    assert scan.image.min() == 0 and scan.image.max() == 255  # the window is inside the data range


def test_no_window_uses_robust_percentile_window(tmp_path: Path) -> None:
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0..4095: 12 bits of signal in 16
    raw.flat[1::512] = 65535  # 8 hot pixels (0.2 %): a min/max window would squash the signal
    path = _native(tmp_path / "p.dcm", raw, bits_stored=16)

    image = read_dicom_file(path).image

    assert image.min() == 0 and image.max() == 255
    order = np.argsort(raw, axis=None, kind="stable")
    assert np.all(np.diff(image.flat[order].astype(np.int16)) >= 0)  # monotonic in the input
    middle = np.abs(raw.astype(np.int64) - 2048).argmin()
    assert abs(int(image.flat[middle]) - 128) <= 3  # the signal spans the range, not 1/16 of it


def test_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0..4095
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    path = _native(tmp_path / "lut.dcm", raw, bits_stored=12, VOILUTSequence=Sequence([item]))

    image = read_dicom_file(path).image

    expected = np.rint(lut[raw].astype(np.float64) / 65535 * 255)
    assert np.abs(image.astype(np.int16) - expected).max() <= 1


def test_plain_8bit_image_passes_through(tmp_path: Path) -> None:
    raw = (np.arange(64 * 64) % 191 + 10).astype(np.uint8).reshape(64, 64)  # 10..200: not stretched
    path = _native(tmp_path / "8.dcm", raw)
    np.testing.assert_array_equal(read_dicom_file(path).image, raw)


# --------------------------------------------------------------------------------- header fields


@pytest.mark.parametrize(
    ("text", "years"),
    [("38", 38), ("038Y", 38), ("6M", 0), ("018M", 1), ("10W", 0), ("400D", 1), ("", None),
     ("abc", None), ("38X", None), ("-3", None)],
)
def test_parse_age(text: str, years: int | None) -> None:
    assert parse_age(text) == years


def test_header_fallbacks(tmp_path: Path) -> None:
    raw = np.zeros((8, 8), np.uint8)
    path = _native(tmp_path / "1.2.3.4.dcm", raw, SOPInstanceUID=None, PatientSex="X", PatientAge="006M",
                   SeriesDescription="view: AP", ImagerPixelSpacing=[0.2, 0.25])
    scan = read_dicom(path.read_bytes(), str(path))
    assert scan.image_id == "1.2.3.4"  # the file name, only the .dcm dropped
    assert (scan.sex, scan.age, scan.view_position) == ("", 0, "AP")
    assert scan.pixel_spacing_mm == (0.2, 0.25)
    assert (scan.patient_id, scan.study_uid, scan.series_uid) == ("", "", "")

    no_extension = tmp_path / "1.2.3.5"
    no_extension.write_bytes(path.read_bytes())
    assert read_dicom_file(no_extension).image_id == "1.2.3.5"

    lateral = _native(tmp_path / "ll.dcm", raw, ViewPosition="LL", PatientAge="038Y")
    scan = read_dicom_file(lateral)
    assert (scan.view_position, scan.age, scan.pixel_spacing_mm) == ("", 38, None)


def test_scan_is_frozen_and_comparable_by_identity() -> None:
    scan = read_dicom_file(SCAN_6904)
    with pytest.raises(AttributeError):
        scan.image_id = "x"  # type: ignore[misc]
    assert scan == scan and scan != read_dicom_file(SCAN_6904)
    assert isinstance(scan, Scan) and len({scan}) == 1


# ------------------------------------------------------------------------------ write_jpeg_dicom


def _smooth_image(rows: int = 192, columns: int = 256) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    image = 120 + 80 * np.sin(x / 23.0) * np.cos(y / 31.0) + 0.2 * (x - y)
    return np.clip(image, 0, 255).astype(np.uint8)  # (H, W), non-square to catch a transpose


WRITE_ARGS = dict(
    image_id="1.2.276.0.7230010.3.1.4.8323329.99.1517875201.850819",
    patient_id="6b3f2c1e-0000-4000-8000-000000000001",
    study_uid="1.2.276.0.7230010.3.1.2.8323329.99.1517875201.850818",
    series_uid="1.2.276.0.7230010.3.1.3.8323329.99.1517875201.850817",
    sex="F",
    age=38,
    view="AP",
    spacing_mm=0.194311,
)


def test_write_jpeg_dicom_round_trips(tmp_path: Path) -> None:
    source = _smooth_image()
    path = tmp_path / f"{WRITE_ARGS['image_id']}.dcm"
    write_jpeg_dicom(path, source, **WRITE_ARGS)

    scan = read_dicom_file(path)
    diff = np.abs(scan.image.astype(np.int16) - source.astype(np.int16))
    assert scan.image.shape == source.shape
    assert diff.mean() < 1.5 and diff.max() <= 12  # JPEG quality 95 on a smooth image
    assert np.abs(scan.image.astype(np.int16) - _pydicom_pixels(path).astype(np.int16)).max() <= 1
    assert scan.image_id == WRITE_ARGS["image_id"] == path.stem
    assert (scan.patient_id, scan.study_uid, scan.series_uid) == (
        WRITE_ARGS["patient_id"], WRITE_ARGS["study_uid"], WRITE_ARGS["series_uid"])
    assert (scan.sex, scan.age, scan.view_position) == ("F", 38, "AP")
    assert scan.pixel_spacing_mm == (0.194311, 0.194311)
    assert scan.transfer_syntax == JPEGBaseline8Bit and scan.photometric == "MONOCHROME2"


def test_write_jpeg_dicom_has_the_siim_tag_set() -> None:
    buffer = io.BytesIO()
    write_jpeg_dicom(buffer, _smooth_image(), **WRITE_ARGS)
    ours = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    real = pydicom.dcmread(SCAN_6904)
    assert set(ours.dir()) == set(real.dir())
    for keyword in ("Modality", "ConversionType", "BodyPartExamined", "BitsStored", "HighBit",
                    "LossyImageCompression", "LossyImageCompressionMethod", "SOPClassUID", "StudyDate"):
        assert ours[keyword].value == real[keyword].value, keyword
    assert ours.file_meta.TransferSyntaxUID == real.file_meta.TransferSyntaxUID
    assert (ours.PatientAge, ours.SeriesDescription, ours.PatientName) == ("38", "view: AP", WRITE_ARGS["patient_id"])
    assert buffer.getvalue()[128:132] == b"DICM"


def test_write_jpeg_dicom_quality_and_validation(tmp_path: Path) -> None:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    sizes = {}
    for quality in (30, 95):
        path = tmp_path / f"q{quality}.dcm"
        write_jpeg_dicom(path, noisy, **WRITE_ARGS, quality=quality)
        sizes[quality] = os.path.getsize(path)
    assert sizes[30] < sizes[95]

    with pytest.raises(ValueError, match="uint8"):
        write_jpeg_dicom(tmp_path / "f.dcm", noisy.astype(np.float32), **WRITE_ARGS)
    with pytest.raises(ValueError, match="image_id"):
        write_jpeg_dicom(tmp_path / "u.dcm", noisy, **{**WRITE_ARGS, "image_id": "not-a-uid"})
    with pytest.raises(ValueError, match="sex"):
        write_jpeg_dicom(tmp_path / "s.dcm", noisy, **{**WRITE_ARGS, "sex": "male"})


# ------------------------------------------------------------------------ odd files from the wild


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> dict[str, Path]:
    return write_odd_folder(tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("name", sorted(ODD_CASES))
def test_odd_file_is_read_or_quarantined_with_its_reason(odd_files, name: str) -> None:
    _, outcome, kind, tolerance = ODD_CASES[name]
    path = odd_files[name]
    data = path.read_bytes()
    if outcome in ("read", "colour"):
        if outcome == "colour":
            with pytest.raises(DicomError, match="colour image .*data.colour: luminance reads it as greyscale"):
                read_dicom(data, str(path))
        scan = read_dicom(data, str(path), colour="luminance") if outcome == "colour" else read_dicom(data, str(path))
        assert scan.image.dtype == np.uint8 and (scan.rows, scan.columns) == (odd_dicoms.ROWS, odd_dicoms.COLUMNS)
        diff = np.abs(scan.image.astype(int) - reference(kind))
        assert diff.max() <= tolerance[0] and diff.mean() <= tolerance[1], f"{name}: {diff.max()} / {diff.mean():.3f} grey levels off"
        assert scan.image_id == sop_instance_uid(path)
        return
    with pytest.raises(DicomError) as caught:
        read_dicom(data, str(path))
    assert str(caught.value).startswith(f"{path}: ")
    for word in outcome:
        assert word in caught.value.reason


def test_colour_jpeg_reduced_decode_is_the_reduced_luminance(odd_files) -> None:
    # The fast path hands a colour JPEG's luminance over at the reduced DCT scale too.
    data = odd_files["ybr-jpeg"].read_bytes()
    full = read_dicom(data, colour="luminance").image
    half = read_dicom(data, min_size_px=40, colour="luminance").image
    assert half.shape == (48, 40)
    area = cv2.resize(full, (40, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - area).mean() < 2


def test_colour_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="colour must be one of"):
        read_dicom(SCAN_6904.read_bytes(), colour="grey")


def test_a_data_set_without_preamble_reads_like_the_whole_file(odd_files) -> None:
    whole = odd_files["implicit-vr"].read_bytes()
    assert whole[128:132] == b"DICM"
    # The prefix without its preamble, and the data set alone, read as the complete file does.
    for cut in (whole[128:], whole[132:]):
        np.testing.assert_array_equal(read_dicom(cut).image, read_dicom(whole).image)
    # Junk is still not DICOM, and a cut bare data set is still truncated.
    bare = odd_files["bare-data-set"].read_bytes()
    with pytest.raises(DicomError, match="truncated"):
        read_dicom(bare[:-100], "cut.dcm")
