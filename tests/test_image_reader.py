"""Metric oracles on generated images, and every kind of bad input recorded with its reason."""

import os
import struct
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agepipe.config.data_stages import Duplicates
from agepipe.data.datasets import parse_utkface_name
from agepipe.data.image_files import read_image
from agepipe.quality.duplicates import find_duplicates
from agepipe.quality.image_metrics import METRICS, ImageView
from conftest import read_csv, run


def face_like(seed=0, size=200) -> np.ndarray:
    """A colour test scene of overlapping discs; the same seed draws the same scene at any size."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 120, np.uint8)
    scale = size / 200
    for _ in range(12):
        centre = tuple(int(v * scale) for v in rng.integers(0, 200, 2))
        colour = tuple(int(v) for v in rng.integers(30, 230, 3))
        cv2.circle(img, centre, int(rng.integers(8, 50) * scale), colour, -1, cv2.LINE_AA)
    return img


def measure(name, bgr, **params):
    return METRICS[name].function(ImageView(bgr, 200), **params)


def test_blurriness_falls_as_blur_grows():
    img = face_like()
    values = [measure("blurriness", cv2.GaussianBlur(img, (0, 0), s) if s else img) for s in (0, 1, 2, 4)]
    assert values == sorted(values, reverse=True) and values[-1] < values[0] / 20


def test_blurriness_is_comparable_across_resolutions():
    small, big = face_like(size=200), face_like(size=800)  # one scene, photographed at two resolutions
    raw = [cv2.Laplacian(cv2.cvtColor(i, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var() for i in (small, big)]
    assert raw[0] > 3 * raw[1]  # measured at native size, the sharp 800 px image would look blurry
    assert measure("blurriness", big) == pytest.approx(measure("blurriness", small), rel=0.25)


@pytest.mark.parametrize("sigma", [2, 5, 10, 20])
def test_noise_estimate_matches_planted_gray_noise(sigma):
    rng = np.random.default_rng(sigma)
    gray = np.clip(face_like(1)[..., 1] + rng.normal(0, sigma, (200, 200)), 0, 255).astype(np.uint8)
    estimate = measure("noise", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), flat_fraction=0.5)
    assert estimate == pytest.approx(sigma, rel=0.2)


def test_exposure_metrics():
    img = face_like()
    dark, bright = (img * 0.2).astype(np.uint8), np.full_like(img, 250)
    assert measure("brightness", dark) < 35 < measure("brightness", img) < 200 < measure("brightness", bright)
    assert measure("underexposed_fraction", np.zeros_like(img), dark_level=10) == 1.0
    assert measure("overexposed_fraction", bright, bright_level=245) == 1.0
    assert measure("overexposed_fraction", img, bright_level=245) == 0.0


def test_contrast_entropy_and_colour():
    img = face_like()
    flat = np.full_like(img, 128)
    low = ((img.astype(float) - img.mean()) * 0.1 + img.mean()).astype(np.uint8)
    assert measure("contrast", flat) == 0 and measure("contrast", low) < measure("contrast", img) / 5
    assert measure("entropy", flat) == 0 and measure("entropy", img) > 2
    gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    assert measure("colourfulness", gray) == 0 and measure("colourfulness", img) > 20


def test_phash_survives_reencoding_but_tells_images_apart():
    params = {"hash_side": 16, "dct_side": 64}
    img = face_like(3)
    reencoded = cv2.imdecode(cv2.imencode(".jpg", cv2.add(img, 5), [cv2.IMWRITE_JPEG_QUALITY, 70])[1], cv2.IMREAD_COLOR)
    distance = lambda a, b: bin(int(a, 16) ^ int(b, 16)).count("1")  # noqa: E731
    same = distance(measure("phash", img, **params), measure("phash", reencoded, **params))
    other = distance(measure("phash", img, **params), measure("phash", face_like(4), **params))
    assert same <= 12 < other


def test_find_duplicates_groups_exact_and_near_copies_and_age_conflicts():
    frame = pd.DataFrame(
        {
            "file": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.png", "g.png"],
            "age": [30, 30, 50, 7, None, 9, 9],
            "content_hash": ["h1", "h1", "h2", "h3", None, "h4", "h4"],  # f and g: the same unreadable bytes
            "phash": ["ff00", "ff00", "ff01", "00ff", None, None, None],
        }
    )
    result = find_duplicates(frame, Duplicates(enabled=True, max_hash_distance=2, max_age_difference=0))
    assert result["duplicate_group"].tolist()[:3] == [1, 1, 1] and result["duplicate_group"].isna().tolist()[3:5] == [
        True,
        True,
    ]
    assert result["duplicate_group"].tolist()[5:] == [2, 2]
    assert result["duplicate_of"].fillna("").tolist() == ["", "a.jpg", "a.jpg", "", "", "", "f.png"]
    assert result["age_conflict"].tolist() == [True, True, True, False, False, False, False]


def test_duplicates_after_files_without_a_perceptual_hash_are_still_found():
    """Files without a perceptual hash shift the hashes' rows against the files' positions: the
    search must still tell which files it has already grouped."""
    frame = pd.DataFrame(
        {
            "file": ["a.png", "b.png", "c.jpg", "d.jpg"],
            "age": [5, 5, 40, 40],
            "content_hash": ["h1", "h1", "h2", "h3"],
            "phash": [None, None, "ff00", "ff00"],
        }
    )
    result = find_duplicates(frame, Duplicates(enabled=True, max_hash_distance=2, max_age_difference=0))
    assert result["duplicate_group"].tolist() == [1, 1, 2, 2]
    assert result["duplicate_of"].fillna("").tolist() == ["", "a.png", "", "c.jpg"]


def exhaustive_distances(codes):
    words = codes.view(np.uint64)
    return np.bitwise_count(words[:, None, :] ^ words[None, :, :]).sum(axis=2)  # every pair, the slow way


def test_near_pairs_by_multi_index_hashing_are_exactly_those_of_an_exhaustive_search():
    from agepipe.quality.duplicates import near_pairs

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (2000, 32), dtype=np.uint8)  # 256-bit hashes, as hash_side 16 gives
    for k, distance in enumerate(
        list(range(0, 13)) * 4 + [13, 14, 20]
    ):  # planted pairs, the last three beyond the radius
        a, b = 2 * k, 2 * k + 1
        codes[b] = codes[a]
        bits = np.unpackbits(codes[b])
        bits[rng.choice(256, distance, replace=False)] ^= 1
        codes[b] = np.packbits(bits)
    distances = exhaustive_distances(codes)
    expected = {(i, j) for i, j in zip(*np.nonzero(distances <= 12)) if i < j}
    for window in (16_384, 7):  # the sorted codes at once, or a few runs at a time
        found = {tuple(p) for batch in near_pairs(codes, 12, window=window) for p in batch.tolist()}
        assert found == expected and len(expected) >= 52
    short = {
        tuple(p) for batch in near_pairs(codes[:300, :2], 3) for p in batch.tolist()
    }  # 16-bit codes, 4-bit substrings
    assert short == {
        (i, j)
        for i, j in zip(*np.nonzero(np.bitwise_count(codes[:300, None, :2] ^ codes[None, :300, :2]).sum(axis=2) <= 3))
        if i < j
    }


def test_groups_of_clustered_hashes_are_the_components_of_the_exhaustive_pair_graph():
    """Clusters of near-identical hashes: the pruned search (which skips pairs already connected)
    still finds exactly the components of the graph of every pair within the radius."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    from agepipe.quality.duplicates import Components, near_pairs

    rng = np.random.default_rng(1)
    centres = rng.integers(0, 256, (15, 32), dtype=np.uint8)
    bits = np.unpackbits(centres[rng.integers(0, 15, 2500)], axis=1)
    bits ^= rng.random(bits.shape) < rng.choice(
        [0.005, 0.02, 0.04], (len(bits), 1)
    )  # tight, loose and scattered members
    codes = np.packbits(bits, axis=1)
    _, expected = connected_components(csr_matrix(exhaustive_distances(codes) <= 12), directed=False)
    for window in (16_384, 50):  # with 50, runs of a cluster's many members come alone, larger than the window
        graph = Components(len(codes))
        for pairs in near_pairs(codes, 12, graph, window=window):
            graph.add(pairs)
        graph.merge()
        assert (
            len(set(zip(expected.tolist(), graph.root.tolist())))
            == len(set(expected.tolist()))
            == len(set(graph.root.tolist()))
        )
    assert 15 < len(set(expected.tolist())) < 2000  # neither all apart nor one blob


@pytest.mark.parametrize(
    "name, expected",
    [
        ("25_1_3_20170116174525125.jpg.chip.jpg", {"age": 25, "gender": 1, "race": 3}),
        ("8_0_20170109203412345.jpg", {"age": 8, "gender": 0, "race": None}),
        ("sub/101_1_2_x.jpg", {"age": 101, "gender": 1, "race": 2}),
        ("portrait.jpg", {"age": None, "gender": None, "race": None}),
    ],
)
def test_utkface_names(name, expected):
    assert parse_utkface_name(name) == expected


# --------------------------------------------------------------------------------------------------
# Bad input: each file gets a row and a reason, and the run goes on
# --------------------------------------------------------------------------------------------------
def png_header_only(width, height) -> bytes:
    """A PNG that claims huge dimensions but holds almost no data: a decompression bomb's header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A folder holding one file of each awkward kind, and the exploration CSV made from it."""
    folder = tmp_path_factory.mktemp("zoo") / "data"
    folder.mkdir()
    img = face_like(5)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    files = {
        "20_0_0_good.jpg": jpeg,
        "21_0_0_truncated.jpg": jpeg[: len(jpeg) // 2],
        "22_0_0_empty.jpg": b"",
        "23_0_0_text.jpg": b"just some text\n",
        "24_0_0_corrupt.jpg": jpeg[:200]
        + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
        + b"\xff\xd9",
        "25_0_0_bomb.png": png_header_only(60000, 60000),
        "26_0_0_zero.png": png_header_only(0, 10),
        "150_0_0_too_old.jpg": jpeg,
        "27_0_0_with spaces in name.JPG": jpeg,
        "nested/28_1_1_deep.jpeg": jpeg,
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    cv2.imwrite(str(folder / "30_0_0_gray.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "31_0_0_rgba.png"), cv2.cvtColor(img, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(folder / "32_0_0_sixteen.png"), img.astype(np.uint16) * 257)
    Image.fromarray(rgb).convert("CMYK").save(folder / "33_0_0_cmyk.jpg")
    cv2.imwrite(str(folder / "34_0_0_large.jpg"), cv2.resize(img, (6000, 4000)))
    cv2.imwrite(str(folder / "35_0_0_tiny.webp"), cv2.resize(img, (24, 24)))
    os.close(os.open(os.fsencode(folder) + b"/36_0_0_\xff\xfe_latin1.jpg", os.O_WRONLY | os.O_CREAT))
    with open(os.fsencode(folder) + b"/36_0_0_\xff\xfe_latin1.jpg", "wb") as f:
        f.write(jpeg)
    (folder / "notes.txt").write_text("not an image extension: ignored")
    out = tmp_path_factory.mktemp("zoo_out")
    run(
        "explore_images.py",
        f"dataset_dir={folder}",
        f"output_csv={out}/meta.csv",
        f"summary_csv={out}/sum.csv",
        "num_workers=2",
    )
    return read_csv(out / "meta.csv").set_index("file")


@pytest.mark.parametrize(
    "file, status, reason",
    [
        ("20_0_0_good.jpg", ("ok", "low_quality"), ""),
        ("21_0_0_truncated.jpg", "unreadable", "truncated JPEG"),
        ("22_0_0_empty.jpg", "unreadable", "empty file"),
        ("23_0_0_text.jpg", "unreadable", "not an image"),
        ("24_0_0_corrupt.jpg", "unreadable", ""),
        ("25_0_0_bomb.png", "unreadable", "decompression bomb"),
        ("26_0_0_zero.png", "unreadable", ""),
        ("150_0_0_too_old.jpg", "unlabelled", "age 150 outside 0-120"),
        ("27_0_0_with spaces in name.JPG", ("ok", "low_quality"), ""),
        ("nested/28_1_1_deep.jpeg", ("ok", "low_quality"), ""),
        ("30_0_0_gray.png", ("ok", "low_quality"), ""),  # grayscale is informational: flagged, still usable
        ("31_0_0_rgba.png", ("ok", "low_quality"), ""),
        ("32_0_0_sixteen.png", ("ok", "low_quality"), ""),
        ("33_0_0_cmyk.jpg", ("ok", "low_quality"), ""),
        ("34_0_0_large.jpg", ("ok", "low_quality"), ""),
        ("35_0_0_tiny.webp", "low_quality", "low_resolution"),
        ("36_0_0_\\xff\\xfe_latin1.jpg", "unreadable", "rename the file"),
    ],
)
def test_every_bad_file_has_a_row_with_its_reason(zoo, file, status, reason):
    row = zoo.loc[file]
    assert row["status"] in ((status,) if isinstance(status, str) else status), row.to_dict()
    assert reason in str(row["reason"]), row.to_dict()
    if row["status"] == "unreadable":
        assert len(str(row["error"])) > 5


def test_image_kinds_are_described(zoo):
    assert (zoo.loc["30_0_0_gray.png", "channels"], zoo.loc["31_0_0_rgba.png", "channels"]) == (1, 4)
    assert zoo.loc["30_0_0_gray.png", "flag_grayscale"] and "grayscale" not in str(
        zoo.loc["30_0_0_gray.png", "failed_checks"]
    )
    assert zoo.loc["32_0_0_sixteen.png", "bit_depth"] == 16 and zoo.loc["33_0_0_cmyk.jpg", "color_mode"] == "CMYK"
    assert (zoo.loc["34_0_0_large.jpg", "width"], zoo.loc["34_0_0_large.jpg", "height"]) == (6000, 4000)
    assert zoo.loc["25_0_0_bomb.png", "width"] == 60000  # the header was read, the pixels were not
    # the same picture decoded from 8-bit, 16-bit and CMYK files measures (almost) the same
    for other in ("32_0_0_sixteen.png", "33_0_0_cmyk.jpg"):
        assert zoo.loc[other, "brightness"] == pytest.approx(zoo.loc["20_0_0_good.jpg", "brightness"], abs=3)


def test_zoo_rows_cover_every_image_file_and_nothing_else(zoo):
    assert len(zoo) == 17 and "notes.txt" not in zoo.index


def test_read_image_refuses_oversized_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(Exception, match="decompression bomb"):
        read_image(str(path), max_pixels=10_000_000, max_file_bytes=10**9)
