"""DICOM bytes -> `Scan` (a uint8 MONOCHROME2 image plus the header fields the pipeline needs).

The SIIM-ACR files are JPEG Baseline 8-bit Secondary Captures. Their single encapsulated frame is
handed straight to OpenCV (libjpeg-turbo), several times faster than pydicom's plugin chain; every
other transfer syntax goes through pydicom's own decoders. Whatever goes wrong, the caller gets a
`DicomError` whose message is "<path>: <reason>", so the data pipeline can put the file on its
quarantine list and go on.

A caller that will shrink the image anyway (the cache stores `image_size_px`) passes `min_size_px`:
a JPEG Baseline frame is then decoded by libjpeg-turbo at 1/2, 1/4 or 1/8 scale (DCT-domain scaling,
the largest factor that keeps both sides >= min_size_px). That skips most of the inverse DCT and the
later resize; how far its pixels are from a full decode + INTER_AREA is measured by every run of
benchmarks/ingest.py (numbers in the README's ingest benchmark).

Files from the wild: a data set without the 128-byte preamble and 'DICM' prefix (old archives
write them) is read when it starts like one (pydicom's `force=True`); without file meta information
its transfer syntax is the encoding pydicom detected, which can only be a native one. A colour image
(RGB, YBR_*, PALETTE COLOR) is rejected unless `colour="luminance"` (config `data.colour`) asks for
its BT.601 luminance, which is how a colour Secondary Capture of a radiograph comes back grey. A
transfer syntax without an installed decoder is rejected naming the package that would decode it.

`write_jpeg_dicom` writes the same kind of file (real JPEG Baseline, SIIM-like tags) for the
synthetic-data generator and for tests.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    RE_VALID_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import AMBIGUOUS_VR, VR, DSfloat

from ptxray.config import COLOUR_POLICIES

__all__ = ["DicomError", "Scan", "parse_age", "read_dicom", "read_dicom_file", "write_jpeg_dicom"]

_PIXEL_DATA_TAG_BYTES = struct.pack("<HH", 0x7FE0, 0x0010)  # little-endian
_PREAMBLE_BYTES = 128
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour photometric interpretations pydicom turns into RGB (YBR_* through its colour conversion
# or the JPEG 2000 decoder's inverse transform, PALETTE COLOR through its LUT); the retired ARGB,
# CMYK and HSV are not among them.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "PALETTE COLOR")
# A data set without preamble starts with its lowest group: file meta (0002) or identifying (0008).
# (Little endian only: without file meta pydicom assumes little endian.)
_DATA_SET_FIRST_GROUPS = (0x0002, 0x0008)
# Without file meta information pydicom still detects the encoding (implicit VR?, little endian?).
_NATIVE_SYNTAX = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian}
# Percentiles of the robust window for >8-bit images that carry no window of their own.
_LOW_PERCENTILE = 0.5
_HIGH_PERCENTILE = 99.5


class DicomError(ValueError):
    """A file that cannot become a `Scan`; `str(err)` is always "<path>: <reason>"."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path or '<bytes>'}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call DicomError(message) on unpickling; Ray ships errors
        # between processes, so rebuild from the two fields instead.
        return (type(self), (self.path, self.reason))


# eq=False: the generated __eq__/__hash__ would compare/hash the ndarray, which raises.
@dataclass(frozen=True, eq=False)
class Scan:
    image: np.ndarray  # (H, W) uint8, MONOCHROME2 orientation (bright = dense)
    image_id: str  # SOPInstanceUID, or the file name without .dcm when absent
    patient_id: str
    sex: str  # "M", "F", "O" or ""
    age: int | None  # whole years
    view_position: str  # "PA", "AP" or ""
    pixel_spacing_mm: tuple[float, float] | None  # (row spacing, column spacing)
    study_uid: str
    series_uid: str
    transfer_syntax: str  # UID
    photometric: str  # PhotometricInterpretation as stored (MONOCHROME1 images come out inverted)
    path: str
    rows: int  # stored Rows; `image` has fewer when read_dicom decoded at a reduced scale
    columns: int  # stored Columns


def read_dicom_file(path: str | Path, *, min_size_px: int | None = None, colour: str = "reject") -> Scan:
    """Read and decode one DICOM file; I/O errors (missing file, permissions) propagate as OSError."""
    return read_dicom(Path(path).read_bytes(), str(path), min_size_px=min_size_px, colour=colour)


def read_dicom(
    data: bytes | bytearray | memoryview, path: str = "", *, min_size_px: int | None = None, colour: str = "reject"
) -> Scan:
    """Decode the bytes of one single-frame greyscale DICOM file.

    `path` is only used to name the input in errors and as the fallback image id.
    `min_size_px`: None decodes at the stored size (Rows x Columns). An integer allows a JPEG Baseline
    frame to be decoded at a libjpeg-turbo DCT scale of 1/2, 1/4 or 1/8, the largest that leaves both
    sides >= min_size_px; `Scan.image` is then ceil(Rows / k) x ceil(Columns / k), `Scan.rows` and
    `Scan.columns` keep the stored size. Other transfer syntaxes always decode at the stored size.
    `colour`: "reject" raises `DicomError` for a colour image; "luminance" reads it as its BT.601
    luminance (uint8, no windowing: colour images carry none).
    Raises `DicomError` for anything that is not a decodable greyscale image.
    """
    path = str(path)
    if min_size_px is not None and (int(min_size_px) != min_size_px or min_size_px < 1):
        raise ValueError(f"min_size_px must be a positive integer or None, got {min_size_px!r}")
    if colour not in COLOUR_POLICIES:
        raise ValueError(f"colour must be one of {COLOUR_POLICIES}, got {colour!r}")
    data = bytes(data)  # a memoryview/bytearray from a reader would break the offset checks
    try:
        ds = _parse(data, path)
        header = _Header(ds)
        pixels = _decode_pixels(header, path, min_size_px, colour)  # (H, W) as stored, or (ceil(H/k), ceil(W/k))
        photometric = str(header.get("PhotometricInterpretation")).strip().upper()
        # A colour image comes back as its luminance, already uint8.
        image = pixels if photometric not in _MONOCHROME else _to_uint8(pixels, header)  # (H, W) uint8
        if photometric == "MONOCHROME1":
            image = 255 - image
        return Scan(
            image=np.ascontiguousarray(image),
            image_id=_text(header, "SOPInstanceUID") or _stem(path),
            patient_id=_text(header, "PatientID"),
            sex=_sex(header),
            age=parse_age(_text(header, "PatientAge")),
            view_position=_view(header),
            pixel_spacing_mm=_spacing(header),
            study_uid=_text(header, "StudyInstanceUID"),
            series_uid=_text(header, "SeriesInstanceUID"),
            transfer_syntax=str(header.transfer_syntax),
            photometric=photometric,
            path=path,
            rows=int(header.get("Rows")),
            columns=int(header.get("Columns")),
        )
    except DicomError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom/OpenCV/numpy raise many types; name the file
        raise DicomError(path, f"cannot decode ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------------------- parsing


def _parse(data: bytes, path: str) -> Dataset:
    if data[_PREAMBLE_BYTES : _PREAMBLE_BYTES + 4] == b"DICM":
        meta_start = _PREAMBLE_BYTES + 4
    elif data[:4] == b"DICM":  # the prefix without its preamble: put the preamble back
        data = bytes(_PREAMBLE_BYTES) + data
        meta_start = _PREAMBLE_BYTES + 4
    elif len(data) >= 8 and struct.unpack_from("<H", data)[0] in _DATA_SET_FIRST_GROUPS:
        meta_start = 0  # no preamble: a bare data set, with or without file meta (force=True reads it)
    else:
        raise DicomError(path, "not DICOM (no 'DICM' prefix after a 128-byte preamble, nor a data set at the start)")
    try:
        ds = pydicom.dcmread(BytesIO(data), force=meta_start == 0)
    except InvalidDicomError as exc:
        raise DicomError(path, f"not DICOM ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - 'DICM' is there but the file meta is cut or mangled
        raise DicomError(path, f"truncated or corrupt file meta information "
                               f"({type(exc).__name__}: {exc})") from exc
    _check_not_truncated(ds, data, path, meta_start)
    if "TransferSyntaxUID" not in ds.file_meta:
        if len(ds.file_meta) or meta_start:
            raise DicomError(path, "no Transfer Syntax UID in the file meta information")
        # No file meta at all: pydicom parsed the data set in the encoding it detected, which is
        # the transfer syntax, unless the pixel data is encapsulated (the compression is unknown).
        pixel_data = ds.get_item(0x7FE00010, keep_deferred=True)
        if pixel_data is not None and pixel_data.length == 0xFFFFFFFF:
            raise DicomError(path, "encapsulated (compressed) pixel data but no file meta information "
                                   "naming its transfer syntax")
        ds.file_meta.TransferSyntaxUID = _NATIVE_SYNTAX[ds.original_encoding]
    return ds


def _check_not_truncated(ds: Dataset, data: bytes, path: str, meta_start: int) -> None:
    """pydicom reads a cut file without raising: a defined-length value comes back short, a cut
    inside an undefined-length element (encapsulated pixel data) leaves an empty data set, and a
    cut inside an element header just ends the data set. Find all three from the byte offsets
    pydicom keeps on the elements it did read. `meta_start`: where the file meta information
    starts (after preamble and 'DICM'; 0 for a data set without them)."""
    meta_keys = list(ds.file_meta.keys())
    if not meta_keys and meta_start:
        raise DicomError(path, f"truncated file meta information: nothing after 'DICM' ({len(data)} bytes)")
    # max over plain ints: pydicom's tags compare in Python, ints in C.
    start = _element_end(ds.file_meta.get_item(max(map(int, meta_keys)), keep_deferred=True)) if meta_keys else meta_start
    group_length = ds.file_meta.get("FileMetaInformationGroupLength")
    try:
        # The group length counts the bytes after its own 12-byte element.
        declared = (start or 0) if group_length is None else meta_start + 12 + int(group_length)
    except (TypeError, ValueError) as exc:
        raise DicomError(path, f"truncated or corrupt file meta information: group length "
                               f"{group_length!r} ({len(data)} bytes)") from exc
    if len(data) < max(declared, start or 0):
        raise DicomError(path, f"truncated file meta information: {len(data)} bytes, "
                               f"the header alone declares {max(declared, start or 0)}")
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets refer to the inflated stream, not to `data`
    if len(ds) == 0:
        if start is not None and len(data) > start:
            at = data.find(_PIXEL_DATA_TAG_BYTES, start)
            if at >= 0:
                raise DicomError(path, f"truncated pixel data: element (7FE0,0010) at byte {at} "
                                       f"runs past the end of the file ({len(data)} bytes)")
            raise DicomError(path, f"truncated or corrupt data set: no element could be read "
                                   f"from the {len(data) - start} bytes after the file meta")
        return
    last = ds.get_item(max(map(int, ds.keys())), keep_deferred=True)
    end = _element_end(last)
    if end is None:
        return  # a complete undefined-length element (or already converted): nothing to check
    if end > len(data):
        raise DicomError(
            path,
            f"truncated file: element {last.tag} needs {last.length} bytes, "
            f"only {len(data) - last.value_tell} present",
        )
    if "PixelData" not in ds and end < len(data):
        # pydicom stops silently when fewer than 8 bytes of an element header are left.
        raise DicomError(path, f"truncated file: it ends inside the element header at byte {end}")


def _element_end(element: Any) -> int | None:
    if not isinstance(element, RawDataElement) or element.length == 0xFFFFFFFF:
        return None
    return element.value_tell + element.length


class _Header:
    """The values of a parsed data set's elements by keyword, each converted at most once.

    Why not `ds.get(keyword)`: it converts through Dataset.__getitem__, which looks the character set
    up again and reads the element back twice per conversion; for the ~20 elements read per file that
    cost about as much as parsing the file. pydicom's public `convert_raw_data_element` is called
    directly instead, so values follow pydicom's rules; sequences and ambiguous VRs, which need the
    data set's context, still go through `ds`. Nothing is written back into `ds`.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.transfer_syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        self._encoding = ds.original_character_set
        self._values: dict[str, Any] = {}

    def get(self, keyword: str) -> Any:
        """The element's value (pydicom's type), or None when the element is absent."""
        try:
            return self._values[keyword]
        except KeyError:
            pass
        tag = tag_for_keyword(keyword)
        elem = self.ds.get_item(tag, keep_deferred=True)
        if elem is None:
            value = None
        elif isinstance(elem, RawDataElement) and elem.value is not None and self._encoding:
            converted = convert_raw_data_element(elem, encoding=self._encoding, ds=self.ds)
            value = converted.value if converted.VR not in AMBIGUOUS_VR and converted.VR != VR.SQ else self.ds[tag].value
        else:
            value = self.ds[tag].value
        self._values[keyword] = value
        return value


# ---------------------------------------------------------------------------------------- decoding


def _decode_pixels(header: _Header, path: str, min_size_px: int | None = None, colour: str = "reject") -> np.ndarray:
    """The stored values (H, W) of a greyscale image, or the uint8 luminance (H, W) of a colour one."""
    ds = header.ds
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    frames = int(header.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(path, f"multi-frame ({frames} frames); ptxray reads single-frame radiographs")
    photometric = str(header.get("PhotometricInterpretation") or "").strip().upper()
    samples = int(header.get("SamplesPerPixel") or 1)
    is_colour = samples > 1 or photometric not in _MONOCHROME
    if is_colour:
        what = f"colour image ({photometric or 'no PhotometricInterpretation'}, {samples} samples per pixel)"
        if colour == "reject":
            raise DicomError(path, f"{what}; data.colour: luminance reads it as greyscale")
        if photometric not in _COLOUR:
            raise DicomError(path, f"{what}: no luminance conversion for {photometric or 'it'}")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if not header.get(keyword):
            raise DicomError(path, f"missing or zero {keyword}")
    rows, columns = int(header.get("Rows")), int(header.get("Columns"))

    syntax = header.transfer_syntax
    scale = 1
    if syntax == JPEGBaseline8Bit:
        if min_size_px is not None:
            scale = _dct_scale(rows, columns, min_size_px)
        # libjpeg-turbo hands over a colour frame's luminance itself (Y of YCbCr, BT.601 of RGB).
        pixels = _decode_jpeg_baseline(header, path, (rows, columns), scale, grey=is_colour)
    else:
        _require_decoder(syntax, path)
        if not syntax.is_compressed:
            _check_native_length(ds, path)
        pixels = ds.pixel_array  # (H, W), or (H, W, 3) RGB for RGB and YBR_*
        if is_colour:
            pixels = _luminance(pixels, header, photometric, path)
    if scale == 1 and pixels.shape != (rows, columns):
        raise DicomError(path, f"decoded shape {pixels.shape} != Rows x Columns ({rows}, {columns})")
    expected = (-(-rows // scale), -(-columns // scale))  # libjpeg rounds a scaled size up
    if pixels.shape != expected:
        raise DicomError(path, f"decoded shape {pixels.shape} at 1/{scale} scale != {expected} "
                               f"for Rows x Columns ({rows}, {columns})")
    return pixels


# libjpeg-turbo's DCT scaling through OpenCV. ANYCOLOR|ANYDEPTH keep a 3-component or 12-bit frame as it
# is (so the greyscale check below still sees it), IGNORE_ORIENTATION matches IMREAD_UNCHANGED.
_REDUCED_FLAGS = {
    k: flag | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    for k, flag in ((2, cv2.IMREAD_REDUCED_GRAYSCALE_2), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4), (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))
}


_REDUCED_GREY_FLAGS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def _dct_scale(rows: int, columns: int, min_size_px: int) -> int:
    """The largest JPEG DCT scale denominator (8, 4, 2; else 1) that leaves both sides >= min_size_px."""
    for k in (8, 4, 2):
        if -(-rows // k) >= min_size_px and -(-columns // k) >= min_size_px:
            return k
    return 1


# Start Of Frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame_shape(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from the frame's Start Of Frame segment, or None when there is none before SOS.

    Hand-written because OpenCV's Python API has no header-only read; it walks the few marker
    segments ahead of the entropy-coded data (ITU T.81 B.1.1).
    """
    i = 2  # after SOI
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xDA:  # Start Of Scan: no frame header before the data
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > len(frame):
                return None
            height, width = struct.unpack_from(">HH", frame, i + 5)  # after length (2) and precision (1)
            return (height, width)
        (length,) = struct.unpack_from(">H", frame, i + 2)
        i += 2 + length
    return None


def _decode_jpeg_baseline(
    header: _Header, path: str, stored_shape: tuple[int, int], scale: int = 1, *, grey: bool = False
) -> np.ndarray:
    """The frame decoded at 1/scale of its size; the caller checks the result against that size.
    `grey`: a colour frame is wanted as its luminance (libjpeg-turbo's greyscale output)."""
    try:
        frame = get_frame(header.get("PixelData"), 0, number_of_frames=1)
    except Exception as exc:  # noqa: BLE001 - pydicom raises ValueError/struct.error on bad items
        raise DicomError(path, f"corrupt encapsulated pixel data ({exc})") from exc
    # libjpeg-turbo decodes a cut stream without error (grey fill, a warning on stderr), so a
    # missing End Of Image marker is the only reliable sign. It cannot occur by chance inside
    # entropy-coded data (0xFF is stuffed there); the slack allows even-length and writer padding.
    if b"\xff\xd9" not in frame[-16:]:
        raise DicomError(path, f"truncated JPEG frame (no end-of-image marker in {len(frame)} bytes)")
    if scale > 1:
        # A k-times smaller decode hides a size mismatch of under k pixels; compare the frame's own
        # header with Rows x Columns instead, as the full-size path compares the decoded pixels.
        header_shape = _jpeg_frame_shape(frame)
        if header_shape is not None and header_shape != stored_shape:
            raise DicomError(path, f"JPEG frame header says {header_shape} (height, width) "
                                   f"!= Rows x Columns {stored_shape}")
    if grey:
        flags = cv2.IMREAD_GRAYSCALE if scale == 1 else _REDUCED_GREY_FLAGS[scale]
    else:
        flags = cv2.IMREAD_UNCHANGED if scale == 1 else _REDUCED_FLAGS[scale]
    image = cv2.imdecode(np.frombuffer(frame, np.uint8), flags)
    if image is None:
        raise DicomError(path, f"corrupt JPEG frame ({len(frame)} bytes; OpenCV cannot decode it)")
    if image.dtype != np.uint8 or image.ndim != 2:
        raise DicomError(path, f"JPEG frame decodes to {image.dtype} {image.shape}, not 8-bit greyscale")
    return image


def _require_decoder(syntax: UID, path: str) -> None:
    name = syntax.name if syntax.name != str(syntax) else "unknown"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomError(path, f"unsupported transfer syntax {name} ({syntax}); "
                               "no decoder exists for it") from exc
    if not decoder.is_available:
        # pydicom keeps the list of plugins per syntax, e.g. "pylibjpeg - requires pylibjpeg>=2.0
        # and pylibjpeg-openjpeg>=2.0"; naming those beats a hand-kept table that goes stale.
        options = [m.split(" - requires ", 1)[-1] for m in decoder.missing_dependencies]
        raise DicomError(path, f"unsupported transfer syntax {name} ({syntax}); "
                               f"install {' or '.join(options) or 'a decoder plugin'} to decode it")


def _luminance(pixels: np.ndarray, header: _Header, photometric: str, path: str) -> np.ndarray:
    """A colour image's BT.601 luminance as (H, W) uint8, from pydicom's RGB (or palette indices)."""
    ds = header.ds
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)  # (H, W, 3), 8- or 16-bit entries
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = int(header.get("BitsStored") or pixels.dtype.itemsize * 8)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise DicomError(path, f"colour image ({photometric}) decodes to shape {pixels.shape}, not (rows, columns, 3)")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise DicomError(path, f"colour image ({photometric}) decodes to {pixels.dtype}, not 8 or 16 bits unsigned")
    grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)  # (H, W) with BT.601 weights
    return grey if grey.dtype == np.uint8 else _scale(grey, 0.0, float((1 << bits) - 1))


def _check_native_length(ds: Dataset, path: str) -> None:
    # pydicom's count knows the layouts (bit-packed 1-bit pixels, YBR_FULL_422's 2 bytes a pixel).
    expected = get_expected_length(ds, unit="bytes")
    actual = len(ds.PixelData)
    if actual < expected:
        raise DicomError(path, f"truncated pixel data (expected {expected} bytes, got {actual})")


# --------------------------------------------------------------------------------------- windowing


def _to_uint8(pixels: np.ndarray, header: _Header) -> np.ndarray:
    """Stored values -> (H, W) uint8 in the stored polarity: Modality LUT, then VOI, then scaling."""
    voi = _voi_kind(header)
    ds = header.ds
    if voi is None and pixels.dtype == np.uint8 and int(header.get("BitsStored") or 8) == 8:
        # A linear rescale with a positive slope does not change what an unwindowed image shows;
        # passing the bytes through keeps the SIIM case bit-exact with its JPEG decode.
        slope = float(header.get("RescaleSlope") or 1.0)
        if not header.get("ModalityLUTSequence") and slope > 0:
            return pixels
    values = apply_modality_lut(pixels, ds)  # (H, W) in output units (e.g. HU)
    if voi is not None:
        if voi == "lut":
            # A LUT is indexed by integers; the rescale hands over floats that hold integers.
            values = np.rint(values).astype(np.int64)
        low, high = _voi_output_range(ds, voi)
        values = apply_voi_lut(values, ds)
    else:
        values = np.asarray(values, dtype=np.float64)
        low, high = np.percentile(values, [_LOW_PERCENTILE, _HIGH_PERCENTILE])
        if high <= low:  # most pixels equal: fall back to the full range
            low, high = float(values.min()), float(values.max())
    return _scale(values, float(low), float(high))


def _voi_kind(header: _Header) -> str | None:
    """Which VOI step pydicom's apply_voi_lut will take (it prefers the LUT), mirroring its test."""
    sequence = header.get("VOILUTSequence")
    if sequence:
        item = sequence[0]
        if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
            return "lut"
    if header.get("WindowCenter") is not None and header.get("WindowWidth") is not None:
        return "window"
    return None


def _voi_output_range(ds: Dataset, voi: str) -> tuple[float, float]:
    """The range pydicom's VOI step maps into, found by running the step on its own input limits.

    Windowing maps into a range pydicom derives from BitsStored and the rescale; pushing the two
    extreme inputs through gives exactly that range without re-deriving it here. For a VOI LUT it is
    the range of its entries (the descriptor's bit depth is wrong in some real files).
    """
    if voi == "lut":
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries = int(descriptor[0]) or 2**16
        probe = np.arange(int(descriptor[1]), int(descriptor[1]) + entries, dtype=np.int64)
    else:
        probe = np.array([-1e300, 1e300])
    with np.errstate(over="ignore"):  # SIGMOID at the probes overflows to its asymptotes
        out = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
    return float(out.min()), float(out.max())


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ header fields


def _text(header: _Header, keyword: str) -> str:
    try:
        value = header.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed optional tag must not lose the image
        return ""
    return "" if value is None else str(value).strip()


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    # Only a DICOM extension is dropped: "1.2.3.4" (no extension) is an id, not "1.2.3" + ".4".
    return re.sub(r"\.(dcm|dicom)$", "", name, flags=re.IGNORECASE)


def _sex(header: _Header) -> str:
    sex = _text(header, "PatientSex").upper()
    return sex if sex in ("M", "F", "O") else ""


_AGE_RE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1, "W": 7, "M": 365.25 / 12, "Y": 365.25, "": 365.25}


def parse_age(text: str) -> int | None:
    """DICOM Age String ('038Y', '6M', '10W', '20D') or SIIM's bare '38' -> whole years."""
    match = _AGE_RE.match(text.strip())
    if match is None:
        return None
    days = int(match.group(1)) * _DAYS_PER_UNIT[match.group(2).upper()]
    return int(days // 365.25)


def _view(header: _Header) -> str:
    view = _text(header, "ViewPosition").upper()
    if view in ("PA", "AP"):
        return view
    # Some exports carry the view only in the description, as SIIM's "view: PA" does as well.
    match = re.search(r"\bview:\s*(PA|AP)\b", _text(header, "SeriesDescription"), re.IGNORECASE)
    return match.group(1).upper() if match else ""


def _spacing(header: _Header) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = header.get(keyword)
            if value is None or len(value) != 2:
                continue
            row, column = float(value[0]), float(value[1])
        except Exception:  # noqa: BLE001 - malformed DS: treat as absent
            continue
        if row > 0 and column > 0 and np.isfinite(row) and np.isfinite(column):
            return (row, column)
    return None


# ----------------------------------------------------------------------------------------- writing


def write_jpeg_dicom(
    path_or_buffer: str | Path | BinaryIO,
    image_uint8: np.ndarray,
    *,
    image_id: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sex: str,
    age: int | None,
    view: str,
    spacing_mm: float | tuple[float, float],
    quality: int = 95,
) -> None:
    """Write a JPEG Baseline 8-bit MONOCHROME2 Secondary Capture file with SIIM-like tags.

    `image_uint8` is (H, W) uint8; `image_id`, `study_uid` and `series_uid` must be valid UIDs
    (`image_id` becomes the SOPInstanceUID, as in SIIM where it is also the file name).
    """
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 2 or image.size == 0:
        raise ValueError(f"image_uint8 must be a non-empty (H, W) uint8 array, got {image.dtype} {image.shape}")
    if max(image.shape) > 65535:
        raise ValueError(f"image {image.shape} is too large for JPEG Baseline (65535 px per side)")
    for name, uid in (("image_id", image_id), ("study_uid", study_uid), ("series_uid", series_uid)):
        # The regex rather than UID(uid).is_valid: constructing a UID warns on a bad value.
        if not (isinstance(uid, str) and len(uid) <= 64 and RE_VALID_UID.match(uid)):
            raise ValueError(f"{name} {uid!r} is not a valid DICOM UID")
    if sex not in ("M", "F", "O", ""):
        raise ValueError(f"sex must be 'M', 'F', 'O' or '', got {sex!r}")
    if view not in ("PA", "AP", ""):
        raise ValueError(f"view must be 'PA', 'AP' or '', got {view!r}")
    if age is not None and not 0 <= int(age) <= 999:
        raise ValueError(f"age must be 0..999 years or None, got {age!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be 1..100, got {quality!r}")
    row_mm, col_mm = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else spacing_mm
    if not (float(row_mm) > 0 and float(col_mm) > 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}")

    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode image {image.shape} for {image_id}")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = image_id
    meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = image_id
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}" if view else ""
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    # SIIM writes bare years ('38', not the standard '038Y'); skip the validation that warns on it.
    age_text = "" if age is None else str(int(age))
    ds.add(DataElement(0x00101010, "AS", age_text, validation_mode=pydicom_config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = [DSfloat(float(row_mm), auto_format=True), DSfloat(float(col_mm), auto_format=True)]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    # SIIM's files have an empty Basic Offset Table; with one frame it carries nothing anyway.
    ds.PixelData = encapsulate([encoded.tobytes()], has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path_or_buffer, enforce_file_format=True)
