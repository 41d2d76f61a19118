"""RLE codec and labels CSV, checked against hand-made cases and the real SIIM label files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ptxray.masks import Labels, RleError, decode_rle, encode_rle, parse_labels, read_labels

DATA = Path(__file__).parent / "data" / "siim-sample"
SAMPLE_CSV = DATA / "train-rle-sample.csv"
FULL_CSV = DATA / "torchxrayvision" / "siim-pneumothorax-train-rle.csv.gz"


@pytest.fixture(scope="module")
def full_labels() -> Labels:
    return read_labels(str(FULL_CSV))


@pytest.fixture(scope="module")
def sample_labels() -> Labels:
    return read_labels(str(SAMPLE_CSV))


# Independent, deliberately naive oracles (one Python step per run) for the vectorised codec.
def naive_siim_decode(rle: str, height: int, width: int) -> np.ndarray:
    values = [int(v) for v in rle.split()]
    flat = np.zeros(height * width, dtype=np.uint8)
    position = 0
    for gap, length in zip(values[0::2], values[1::2]):
        position += gap
        flat[position : position + length] = 1
        position += length
    return flat.reshape(width, height).T  # column-major


def naive_standard_encode(mask: np.ndarray) -> str:
    pixels = np.concatenate([[0], mask.T.flatten(), [0]])
    edges = np.where(pixels[1:] != pixels[:-1])[0] + 1  # 1-based
    edges[1::2] -= edges[0::2]
    return " ".join(str(v) for v in edges) or "-1"


# ---------------------------------------------------------------- hand cases


def test_decode_is_column_major_with_relative_gaps():
    # H=3, W=2: flat p -> (p % 3, p // 3). Runs: p 1..2 (gap 1), then gap 2 -> p 5.
    mask = decode_rle("1 2 2 1", height=3, width=2)
    expected = np.array([[0, 0], [1, 0], [1, 1]], dtype=np.uint8)
    assert mask.dtype == np.uint8
    assert mask.shape == (3, 2)
    np.testing.assert_array_equal(mask, expected)


def test_decode_non_square_distinguishes_height_from_width():
    # H=2, W=3: p=2 is row 0, column 1 (row-major would put it at row 0, column 2).
    mask = decode_rle("2 1", height=2, width=3)
    expected = np.zeros((2, 3), dtype=np.uint8)
    expected[0, 1] = 1
    np.testing.assert_array_equal(mask, expected)


def test_decode_run_across_a_column_boundary():
    mask = decode_rle("2 3", height=3, width=3)  # p = 2, 3, 4
    expected = np.zeros((3, 3), dtype=np.uint8)
    expected[2, 0] = expected[0, 1] = expected[1, 1] = 1
    np.testing.assert_array_equal(mask, expected)


def test_standard_scheme_uses_absolute_one_based_starts():
    # The same pixels as test_decode_is_column_major_with_relative_gaps: p 1, 2, 5 (0-based).
    mask = decode_rle("2 2 6 1", height=3, width=2, scheme="standard")
    np.testing.assert_array_equal(mask, decode_rle("1 2 2 1", height=3, width=2))
    assert encode_rle(mask, scheme="standard") == "2 2 6 1"
    assert encode_rle(mask, scheme="siim") == "1 2 2 1"


def test_whole_image_and_last_pixel():
    full = np.ones((4, 5), dtype=np.uint8)
    assert encode_rle(full) == "0 20"
    assert encode_rle(full, "standard") == "1 20"
    last = np.zeros((4, 5), dtype=np.uint8)
    last[3, 4] = 1
    assert encode_rle(last) == "19 1"
    np.testing.assert_array_equal(decode_rle("19 1", 4, 5), last)


@pytest.mark.parametrize("empty", ["-1", "", " -1 ", "  "])
def test_empty_rle_decodes_to_zeros(empty):
    mask = decode_rle(empty, height=4, width=3)
    assert mask.shape == (4, 3) and not mask.any()


def test_encode_empty_and_nonbinary_masks():
    assert encode_rle(np.zeros((5, 5), dtype=np.uint8)) == "-1"
    assert encode_rle(np.zeros((5, 5), dtype=bool), "standard") == "-1"
    # Any nonzero value is foreground (masks saved as 0/255 PNGs).
    assert encode_rle(np.array([[0, 255], [7, 0]], dtype=np.uint8)) == "1 2"


def test_encoder_emits_maximal_runs():
    touching = decode_rle("0 1 0 2", height=2, width=2)  # two runs with a zero gap
    assert encode_rle(touching) == "0 3"


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 2, 2)))


def test_random_masks_round_trip_against_the_oracles():
    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 12, size=2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        siim = encode_rle(mask)
        assert encode_rle(mask, "standard") == naive_standard_encode(mask)
        if siim != "-1":
            np.testing.assert_array_equal(naive_siim_decode(siim, height, width), mask)
        np.testing.assert_array_equal(decode_rle(siim, height, width), mask)
        standard = encode_rle(mask, "standard")
        np.testing.assert_array_equal(decode_rle(standard, height, width, "standard"), mask)


MALFORMED = [
    ("12 x7", "siim", "not an integer"),
    ("12 1.5", "siim", "not an integer"),
    ("12 99999999999999999999999", "siim", "not an integer"),
    ("1 2 3", "siim", "odd number"),
    ("1 0", "siim", "length 0"),
    ("1 -3", "siim", "length -3"),
    ("-2 3", "siim", "negative gap"),
    ("1 2 3 -1", "siim", "length -1"),
    ("5 5", "siim", "past the image"),  # pixels 5..9 of 3x3 = 9
    ("0 4 1 5", "siim", "past the image"),
    ("0 2", "standard", "1-based"),
    ("8 3", "standard", "past the image"),
]


@pytest.mark.parametrize("rle, scheme, reason", MALFORMED)
def test_malformed_rle_raises_naming_the_image(rle, scheme, reason):
    with pytest.raises(RleError, match=reason) as info:
        decode_rle(rle, height=3, width=3, scheme=scheme, image_id="img-42")
    assert "img-42" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="scheme"):
        decode_rle("1 2", 3, 3, scheme="rowmajor")


# ---------------------------------------------------------------- the real label files


def test_full_csv_index_counts(full_labels):
    assert len(full_labels) == 12_047
    assert full_labels.n_positive == 2_669
    assert full_labels.n_rows == 3_576
    negatives = [i for i in full_labels.image_ids if not full_labels.positive(i)]
    assert len(negatives) == 12_047 - 2_669
    assert full_labels.image_ids == sorted(full_labels.image_ids)


def test_full_csv_row_count_including_negative_rows():
    # Cross-check the parser's inputs: 12,954 data rows, 9,378 of them "-1".
    lines = gzip.decompress(FULL_CSV.read_bytes()).decode().splitlines()[1:]
    assert len(lines) == 12_954
    assert sum(1 for line in lines if line.split(",")[1].strip() == "-1") == 9_378


def test_every_positive_row_of_the_full_csv_round_trips(full_labels):
    rows = [(i, rle) for i in full_labels.image_ids for rle in full_labels.rles[i]]
    assert len(rows) == 3_576
    failures = [i for i, rle in rows if encode_rle(decode_rle(rle, image_id=i)) != rle]
    assert failures == []


def test_vectorised_decoder_matches_the_naive_oracle_on_real_rows(full_labels):
    rows = [rle for i in full_labels.image_ids for rle in full_labels.rles[i]][::97]
    for rle in rows:
        np.testing.assert_array_equal(decode_rle(rle), naive_siim_decode(rle, 1024, 1024))


def test_standard_re_encoding_gives_the_same_masks(full_labels):
    rows = [rle for i in full_labels.image_ids for rle in full_labels.rles[i]][::41]
    for rle in rows:
        mask = decode_rle(rle)
        standard = encode_rle(mask, scheme="standard")
        assert standard == naive_standard_encode(mask)
        assert int(standard.split()[0]) == int(rle.split()[0]) + 1  # first start: 1-based
        np.testing.assert_array_equal(decode_rle(standard, scheme="standard"), mask)


def test_sample_csv_matches_full_csv(sample_labels, full_labels):
    assert len(sample_labels) == 10
    assert sample_labels.n_positive == 5
    raw = SAMPLE_CSV.read_bytes().decode("utf-8-sig").splitlines()
    for line in raw:
        image_id, value = (part.strip() for part in line.split(","))
        assert image_id in full_labels
        assert sample_labels.rles[image_id] == full_labels.rles[image_id]
        expected = () if value == "-1" else (value,)
        assert sample_labels.rles[image_id] == expected


def test_real_multi_annotation_image_mask_is_the_union(full_labels):
    # The real data holds images whose annotations overlap: the mask must be their union.
    overlapping = None
    for image_id in full_labels.image_ids:
        rows = full_labels.rles[image_id]
        if len(rows) < 2:
            continue
        parts = [decode_rle(r) for r in rows]
        if sum(int(p.sum()) for p in parts) > int(np.logical_or.reduce(parts).sum()):
            overlapping = image_id, parts
            break
    assert overlapping is not None, "expected at least one image with overlapping annotations"
    image_id, parts = overlapping
    mask = full_labels.mask(image_id)
    assert mask.dtype == np.uint8 and mask.max() == 1
    np.testing.assert_array_equal(mask, np.logical_or.reduce(parts).astype(np.uint8))


# ---------------------------------------------------------------- CSV parsing


def test_union_of_overlapping_rows_and_mixed_negative_rows():
    text = "a,0 3\na,2 2\nb,-1\nb,4 1\nc,-1\nc,-1\n"
    labels = parse_labels(text)
    assert labels.rles["a"] == ("0 3", "2 2")
    # Rows cover p 0..2 and p 2..3 (overlap at p 2): the union is p 0..3, each pixel 1 once.
    np.testing.assert_array_equal(
        labels.mask("a", 3, 2), np.array([[1, 1], [1, 0], [1, 0]], dtype=np.uint8)
    )
    # A "-1" row beside a positive row adds nothing: the image is positive.
    assert labels.positive("b") and labels.rles["b"] == ("4 1",)
    assert not labels.positive("c") and not labels.mask("c", 3, 2).any()
    assert labels.n_positive == 2 and len(labels) == 3
    assert "a" in labels and "z" not in labels


def test_header_variants_parse_identically():
    body = ["img1,-1", "img2, 1 2 3 4", "img2,0 1", "img3 , 7 1 "]
    variants = {
        "none": "\n".join(body),
        "kaggle": "\n".join(["ImageId, EncodedPixels", *body]),
        "kaggle-no-space": "\n".join(["ImageId,EncodedPixels", *body]) + "\n",
        "fname": "\n".join(["fname,mask", *body]),
        "bom-crlf": "\ufeff" + "\r\n".join(["ImageId, EncodedPixels", *body]) + "\r\n",
        "bom-no-header-blank-lines": "\ufeff" + "\n\n".join(body) + "\n\n",
    }
    parsed = {name: parse_labels(text, source=name) for name, text in variants.items()}
    reference = parsed["none"]
    assert reference.rles == {"img1": (), "img2": ("1 2 3 4", "0 1"), "img3": ("7 1",)}
    for name, labels in parsed.items():
        assert labels.rles == reference.rles, name


def test_read_labels_local_gzip_and_content_sniffing(tmp_path, sample_labels):
    raw = SAMPLE_CSV.read_bytes()
    (tmp_path / "plain.csv").write_bytes(raw)
    (tmp_path / "labels.csv.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "misnamed.csv").write_bytes(gzip.compress(raw))  # gzip found by magic bytes
    for name in ("plain.csv", "labels.csv.gz", "misnamed.csv"):
        assert read_labels(str(tmp_path / name)).rles == sample_labels.rles, name


def test_read_labels_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_labels(str(missing))


def test_bad_csv_rows_name_the_file_and_line():
    # A row of the wrong shape is a broken file: an error.
    with pytest.raises(RleError, match=r"labels\.csv:2: expected 2 columns"):
        parse_labels("a,-1\nb,1 2,3 4\n", source="labels.csv")
    # A value that is not an RLE quarantines its row and image, naming the file, line and image.
    labels = parse_labels("ImageId,EncodedPixels\na,-1\nb,1 2 x\nb,0 1\nc,5 2\n", source="labels.csv")
    assert labels.bad_rows == (("b", "labels.csv:3: image b: value '1 2 x' is not an RLE"),)
    with pytest.raises(RleError, match=r"labels\.csv:3: image b: .*not an RLE"):
        labels.mask("b", 3, 3)
    assert "b" in labels and labels.mask("c", 3, 3).sum() == 2 and not labels.mask("a", 3, 3).any()
    # A broken first row with digits is reported, not mistaken for a header.
    labels = parse_labels("a,1 2 3x\n", source="labels.csv")
    assert [r for _, r in labels.bad_rows] == ["labels.csv:1: image a: value '1 2 3x' is not an RLE"]


def test_negative_rle_value_quarantines_its_row_not_the_file():
    text = "a,-1\nb,3 -2 4 1\nb,-7\nc,0 2\n"
    labels = parse_labels(text, source="s3://bucket/train-rle.csv")
    assert [i for i, _ in labels.bad_rows] == ["b", "b"]
    assert labels.bad_rows[0][1] == "s3://bucket/train-rle.csv:2: image b: RLE value -2 is negative (only a lone -1, an empty mask, may be)"
    assert "RLE value -7 is negative" in labels.bad_rows[1][1]
    # The image is quarantined with its first row's reason; the other images are unaffected.
    with pytest.raises(RleError, match=r"train-rle\.csv:2: image b: RLE value -2"):
        labels.mask("b", 4, 4)
    assert labels.mask("c", 4, 4).sum() == 2 and not labels.mask("a", 4, 4).any()


def test_images_listed_as_empty_and_with_an_rle_are_counted():
    labels = parse_labels("a,-1\na,0 2\nb,-1\nb,-1\nc,1 1\nd,4 1\nd,-1\n")
    assert labels.empty_and_rle_ids == ("a", "d")
    assert labels.positive("a") and labels.mask("a", 2, 2).sum() == 2  # still the union: positive
    assert parse_labels("a,-1\nc,1 1\n").empty_and_rle_ids == ()


def test_labels_mask_validates_rows_and_unknown_ids():
    labels = parse_labels("a,1 2 3\nb,5 5\n")
    with pytest.raises(RleError, match="image a: .*odd number"):
        labels.mask("a", 3, 3)
    with pytest.raises(RleError, match="image b: .*past the image"):
        labels.mask("b", 3, 3)
    with pytest.raises(KeyError, match="zzz"):
        labels.mask("zzz")


def test_labels_remember_their_scheme():
    labels = parse_labels("a,2 2\n", scheme="standard")
    np.testing.assert_array_equal(labels.mask("a", 2, 2), decode_rle("1 2", 2, 2))
    # An explicit scheme overrides the stored one.
    np.testing.assert_array_equal(labels.mask("a", 2, 2, scheme="siim"), decode_rle("2 2", 2, 2))


# ---------------------------------------------------------------- storage helpers (local; S3 is tested elsewhere)


def test_storage_local_paths(tmp_path):
    from pyarrow import fs

    from ptxray.storage import filesystem_and_path, is_uri, open_input_stream

    target = tmp_path / "x.bin"
    target.write_bytes(b"\x1f\x8bnot really gzip")
    filesystem, path = filesystem_and_path(str(target))
    assert isinstance(filesystem, fs.LocalFileSystem) and path == str(target)
    with open_input_stream(str(target)) as stream:
        assert stream.read() == b"\x1f\x8bnot really gzip"
    with open_input_stream(target.as_uri()) as stream:  # file:// URI
        assert stream.read() == b"\x1f\x8bnot really gzip"
    assert is_uri("s3://bucket/key") and is_uri("file:///tmp/x")
    assert not is_uri("/tmp/x") and not is_uri("C://data/x")


def test_s3_filesystem_reads_endpoint_and_region_from_env(monkeypatch):
    from ptxray.storage import filesystem_and_path, s3_filesystem_from_env

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    filesystem = s3_filesystem_from_env()  # constructing it does not touch the network
    assert filesystem.region == "eu-west-3"
    # pyarrow exposes its constructor arguments through pickling support.
    kwargs = filesystem.__reduce__()[1][0]
    assert kwargs["endpoint_override"] == "127.0.0.1:5999"
    assert kwargs["scheme"] == "http"
    _, path = filesystem_and_path("s3://bucket/dir/train-rle.csv")
    assert path == "bucket/dir/train-rle.csv"
    with pytest.raises(ValueError, match="bucket"):
        filesystem_and_path("s3://")
