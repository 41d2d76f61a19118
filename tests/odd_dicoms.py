"""Odd DICOMs from the wild, written here for tests/test_dicom.py and tests/test_prepare.py.

Every file is a real encoding of a real pixel array: pydicom writes the data sets, the native
transfer syntaxes (implicit / explicit VR, big endian, deflated) and compresses RLE Lossless itself
and JPEG-LS through pyjpegls. pydicom has no encoder for JPEG Lossless, JPEG 12-bit, JPEG 2000
(its encoder needs pylibjpeg-openjpeg, not installed) or HTJ2K, so those frames come from
imagecodecs (libjpeg-turbo 3, OpenJPEG, OpenJPH) and are encapsulated with pydicom. Nothing is a
byte pattern made to look like a codec stream.

`ODD_CASES` maps a name to (builder, outcome). A builder writes `<dir>/<name>.dcm` and returns it.
Its outcome says whether ptxray must read it (and to what image) or quarantine it (and why).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

ROWS, COLUMNS = 96, 80
# How far (grey levels, largest and mean) a lossy encoding may decode from its reference: JPEG and
# JPEG 2000 ring around the bright square's and the annotation's sharp edges.
EXACT = (0, 0.0)
LOSSY = (16, 1.0)


def grey12() -> np.ndarray:
    """A smooth 12-bit radiograph-like ramp with a bright square: uint16 (ROWS, COLUMNS) in 0..4095."""
    rows, cols = np.mgrid[0:ROWS, 0:COLUMNS]
    image = 600 + 25 * rows + 10 * cols + 300 * np.sin(rows / 9.0) * np.cos(cols / 7.0)
    image[30:60, 20:50] += 900
    return np.clip(image, 0, 4095).astype(np.uint16)


def colour_rgb() -> np.ndarray:
    """uint8 (ROWS, COLUMNS, 3): a grey radiograph with a colour annotation, as screenshots have."""
    grey = (grey12() >> 4).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[5:15, 5:40] = (255, 40, 0)
    return rgb


def dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> Dataset:
    """A Secondary Capture data set with SIIM-like identifiers (new UIDs) holding `pixels` natively."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "odd-" + ds.SOPInstanceUID[-8:]
    ds.Modality = "CR"
    return ds


def encapsulated(ds: Dataset, syntax: UID, frame: bytes) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def save(ds: Dataset, path: Path, **kwargs) -> Path:
    ds.save_as(path, enforce_file_format=kwargs.pop("enforce_file_format", True), **kwargs)
    return path


def reference(kind: str) -> np.ndarray:
    """The uint8 (ROWS, COLUMNS) image a readable case must decode to.

    "grey": grey12() stored uncompressed and read by ptxray (the 16-bit and signed cases hold a
    linear transform of it, which the robust window maps to the same grey levels); "rgb": the
    BT.601 luminance of colour_rgb(); "palette": the luminance of the palette case's LUT colours.
    """
    from ptxray.dicom import read_dicom

    if kind == "grey":
        buffer = io.BytesIO()
        dataset(grey12(), bits_stored=12).save_as(buffer, enforce_file_format=True)
        return read_dicom(buffer.getvalue()).image
    if kind == "rgb":
        return cv2.cvtColor(colour_rgb(), cv2.COLOR_RGB2GRAY)
    if kind == "palette":
        indices = (grey12() >> 4).astype(np.intp)
        ramp = np.arange(256, dtype=np.uint16) * 257
        rgb16 = np.stack([ramp[indices], ramp[::-1][indices], ramp[indices]], axis=-1)  # (H, W, 3) 16-bit
        return np.rint(cv2.cvtColor(rgb16, cv2.COLOR_RGB2GRAY) / 257.0).astype(np.uint8)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------- builders


def _native(path: Path, syntax: UID, **save_kwargs) -> Path:
    ds = dataset(grey12(), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        # pydicom writes the bytes it is given: big-endian pixel data must be stored big-endian.
        ds.PixelData = grey12().astype(">u2").tobytes()
    return save(ds, path, **save_kwargs)


def _jpeg_lossless_process14(path: Path) -> Path:
    # Process 14 with predictor 6 (not the SV1 first-order predictor): the general JPEG Lossless syntax.
    frame = imagecodecs.jpeg8_encode(grey12(), lossless=True, predictor=6, bitspersample=12)
    return save(encapsulated(dataset(grey12(), bits_stored=12), JPEGLossless, frame), path)


def _jpeg_lossless_sv1(path: Path) -> Path:
    frame = imagecodecs.jpeg8_encode(grey12(), lossless=True, predictor=1, bitspersample=12)
    return save(encapsulated(dataset(grey12(), bits_stored=12), JPEGLosslessSV1, frame), path)


def _jpeg_extended_12bit(path: Path) -> Path:
    frame = imagecodecs.jpeg8_encode(grey12(), level=95, bitspersample=12)
    return save(encapsulated(dataset(grey12(), bits_stored=12), JPEGExtended12Bit, frame), path)


def _jpeg_ls(path: Path) -> Path:
    ds = dataset(grey12(), bits_stored=12)
    ds.compress(JPEGLSLossless)  # pydicom's encoder, through pyjpegls
    return save(ds, path)


def _jpeg_ls_near_lossless(path: Path) -> Path:
    ds = dataset(grey12(), bits_stored=12)
    ds.compress(JPEGLSNearLossless, jls_error=2)
    return save(ds, path)


def _jpeg2000_lossless(path: Path) -> Path:
    frame = imagecodecs.jpeg2k_encode(grey12(), level=0, codecformat="J2K", reversible=True, bitspersample=12)
    return save(encapsulated(dataset(grey12(), bits_stored=12), JPEG2000Lossless, frame), path)


def _jpeg2000(path: Path) -> Path:
    frame = imagecodecs.jpeg2k_encode(grey12(), level=50, codecformat="J2K", reversible=False, bitspersample=12)
    return save(encapsulated(dataset(grey12(), bits_stored=12), JPEG2000, frame), path)


def _htj2k(path: Path) -> Path:
    # A real HTJ2K codestream (OpenJPH); decoding it needs pylibjpeg-openjpeg, not installed here.
    frame = imagecodecs.htj2k_encode(grey12(), level=0)
    return save(encapsulated(dataset(grey12(), bits_stored=12), HTJ2KLossless, frame), path)


def _rle(path: Path) -> Path:
    ds = dataset(grey12(), bits_stored=12)
    ds.compress(RLELossless)  # pydicom's own encoder
    return save(ds, path)


def _full_16bit(path: Path) -> Path:
    return save(dataset((grey12().astype(np.uint32) * 16).astype(np.uint16), bits_stored=16), path)


def _signed(path: Path) -> Path:
    ds = dataset((grey12().astype(np.int32) - 2048).astype(np.int16), bits_stored=16)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024  # CT-like stored values, read through the Modality LUT
    return save(ds, path)


def _no_preamble(path: Path) -> Path:
    # File meta information but no 128-byte preamble and no 'DICM': what some old archives write.
    _native(path, ExplicitVRLittleEndian)
    path.write_bytes(path.read_bytes()[132:])
    return path


def _bare_data_set(path: Path) -> Path:
    # No preamble and no file meta at all: an implicit VR little endian data set, as sent over DIMSE.
    ds = dataset(grey12(), bits_stored=12)
    ds.file_meta = FileMetaDataset()
    return save(ds, path, enforce_file_format=False, implicit_vr=True, little_endian=True)


def _multi_frame(path: Path) -> Path:
    return save(dataset(np.stack([grey12()] * 3), bits_stored=12), path)


def _rgb(path: Path) -> Path:
    return save(dataset(colour_rgb(), "RGB"), path)


def _ybr_jpeg(path: Path) -> Path:
    # A colour Secondary Capture as most screenshots are: JPEG Baseline YCbCr 4:2:0, YBR_FULL_422.
    ok, frame = cv2.imencode(".jpg", cv2.cvtColor(colour_rgb(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    ds = dataset(colour_rgb(), "RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    return save(encapsulated(ds, JPEGBaseline8Bit, frame.tobytes()), path)


def _palette(path: Path) -> Path:
    indices = (grey12() >> 4).astype(np.uint8)
    ds = dataset(indices, "PALETTE COLOR")
    ramp = np.arange(256, dtype=np.uint16) * 257  # 16-bit entries
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", ramp)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    return save(ds, path)


def _no_pixel_data(path: Path) -> Path:
    ds = dataset(grey12(), bits_stored=12)
    del ds.PixelData
    return save(ds, path)


def _truncated(path: Path) -> Path:
    _jpeg_lossless_sv1(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    return path


Builder = Callable[[Path], Path]

# name -> (builder, outcome, reference, (largest, mean) grey levels allowed off the reference). Outcome "read":
# decodes to `reference` (see there); "colour": quarantined by default, read as its luminance with
# data.colour: luminance; a list: the words the quarantine reason must hold.
ODD_CASES: dict[str, tuple[Builder, str | list[str], str, tuple[int, float]]] = {
    "implicit-vr": (lambda p: _native(p, ImplicitVRLittleEndian), "read", "grey", EXACT),
    "big-endian": (lambda p: _native(p, ExplicitVRBigEndian), "read", "grey", EXACT),
    "deflated": (lambda p: _native(p, DeflatedExplicitVRLittleEndian), "read", "grey", EXACT),
    "jpeg-lossless": (_jpeg_lossless_process14, "read", "grey", EXACT),
    "jpeg-lossless-sv1": (_jpeg_lossless_sv1, "read", "grey", EXACT),
    "jpeg-12bit": (_jpeg_extended_12bit, "read", "grey", LOSSY),
    "jpeg-ls": (_jpeg_ls, "read", "grey", EXACT),
    "jpeg-ls-near-lossless": (_jpeg_ls_near_lossless, "read", "grey", LOSSY),
    "jpeg2000-lossless": (_jpeg2000_lossless, "read", "grey", EXACT),
    "jpeg2000": (_jpeg2000, "read", "grey", LOSSY),
    "rle-lossless": (_rle, "read", "grey", EXACT),
    "16-bit": (_full_16bit, "read", "grey", EXACT),
    "signed": (_signed, "read", "grey", EXACT),
    "no-preamble": (_no_preamble, "read", "grey", EXACT),
    "bare-data-set": (_bare_data_set, "read", "grey", EXACT),
    "rgb": (_rgb, "colour", "rgb", EXACT),
    "ybr-jpeg": (_ybr_jpeg, "colour", "rgb", LOSSY),
    "palette": (_palette, "colour", "palette", EXACT),
    "htj2k": (_htj2k, ["unsupported transfer syntax High-Throughput JPEG 2000", "pylibjpeg-openjpeg"], "", EXACT),
    "multi-frame": (_multi_frame, ["multi-frame (3 frames)"], "", EXACT),
    "no-pixel-data": (_no_pixel_data, ["no pixel data"], "", EXACT),
    "truncated": (_truncated, ["truncated"], "", EXACT),
}


def write_odd_folder(folder: Path) -> dict[str, Path]:
    """Every case of ODD_CASES written under `folder`; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: case[0](folder / f"{name}.dcm") for name, case in ODD_CASES.items()}


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID)


__all__ = ["EXACT", "LOSSY", "ODD_CASES", "colour_rgb", "grey12", "reference", "sop_instance_uid", "write_odd_folder"]
