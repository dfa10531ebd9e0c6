"""The photo path: faces are found, not assumed. Sample faces are planted into scenes (benchmarks/scenes.py)
at known places and sizes; the oracle is where they were planted, and that a scene without a face gets
no description, never a guess. Awkward photos (a crowd, a tiny face, a face cut by the border, grayscale,
CMYK, a 6000x4000 phone photo turned by EXIF, a panorama) each get an answer or a reason."""

import dataclasses
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT

sys.path.insert(0, str(PROJECT / "benchmarks"))
from agepipe.data.image_files import read_image  # noqa: E402
from agepipe.faces.alignment import FaceSettings  # noqa: E402
from agepipe.faces.describer import DescriptorSettings, FaceDescriber  # noqa: E402
from agepipe.faces.detector import DetectorSettings, FinderSettings  # noqa: E402
from scenes import paste, scene, scene_pictures  # noqa: E402

SEARCH = FinderSettings(DetectorSettings(0.7, 0.3, 0.15), tile_levels=1, retry_border_fraction=0.5)
AUTO = DescriptorSettings(
    FaceSettings(SEARCH, 1.0, 0.2, 40, "square", 24), 0.25, ("image", "mirror"), "every_view", True, 1e-6
)
DESCRIBER = FaceDescriber(AUTO)


@pytest.fixture(scope="module")
def faces(sample, manifest):
    files = manifest.loc[manifest["defect"] == "none", "file"][:12]
    return [cv2.imread(str(sample / f)) for f in files]


@pytest.fixture(scope="module")
def pictures():
    return scene_pictures()


def described(bgr):
    return DESCRIBER.describe(np.ascontiguousarray(bgr[..., ::-1]))


def centre_inside(box, planted):
    x, y, w, h = box
    px, py, ps, _ = planted
    return px <= x + w / 2 <= px + ps and py <= y + h / 2 <= py + ps


def test_a_planted_face_is_found_where_it_was_planted_and_described(faces, pictures):
    rng = np.random.default_rng(3)
    for face in faces[:8]:
        side = int(rng.integers(120, 240))
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
        planted = paste(face, scene(pictures, rng), side, float(rng.uniform(-10, 10)), x, y)
        result = described(planted.photo)
        assert result.found >= 1 and centre_inside(result.first.box, planted.box), (result.first.box, planted.box)
        assert result.first.vector is not None and result.first.vector.shape == (2, 209)


def test_a_scene_without_a_face_gets_no_description(pictures):
    rng = np.random.default_rng(4)
    for _ in range(10):
        result = described(scene(pictures, rng))
        assert result.found == 0 and result.faces == [] and result.problem == "no face found"


def test_a_face_in_a_portrait_is_described_as_the_same_face_cropped_by_hand(faces, pictures):
    """One face path: the face pasted into a portrait-sized frame (head and shoulders, background) is found,
    aligned from its box and cut as the crop of it alone is: the same description within a tolerance."""
    rng = np.random.default_rng(9)
    for face in faces[:4]:
        portrait = paste(face, scene(pictures, rng, 360, 450), 230, 0.0, 65, 60).photo  # the face covers ~30% of it
        alone, framed = (described(image).first.vector for image in (face, portrait))
        assert np.linalg.norm(alone[0, :128] - framed[0, :128]) < 0.2  # dlib: under 0.6 is the same person
        ages = [np.exp(vector[0, 128:]) @ np.arange(81) for vector in (alone, framed)]
        assert abs(ages[0] - ages[1]) < 5, (
            ages
        )  # the age chip reaches past the crop: black there, background in the portrait


def test_a_face_that_fills_its_frame_is_found_and_answered(faces):
    """A crop cut so tight that the face fills the frame is missed at first, and found by the second look
    with a wider margin."""
    for face in faces[:6]:
        h, w = face.shape[:2]
        tight = np.ascontiguousarray(face[h // 5 : h - h // 12, w // 6 : w - w // 6])
        result = described(tight)
        assert result.found >= 1 and result.first.vector is not None, result.problem


def test_a_crowd_gives_its_largest_face_or_every_face(faces, pictures):
    rng = np.random.default_rng(5)
    photo = scene(pictures, rng, 1600, 1000)
    for index in range(29):  # 29 small faces, most too small for the search to find ...
        photo = paste(
            faces[index % len(faces)], photo, 90, 0.0, 20 + (index % 10) * 155, 30 + (index // 10) * 320
        ).photo
    largest = paste(faces[5], photo, 420, 0.0, 600, 560)  # ... and one large: the row is about it
    result = described(largest.photo)
    assert result.found >= 1 and centre_inside(result.first.box, largest.box) and result.first.vector is not None
    every = FaceDescriber(dataclasses.replace(AUTO, all_faces=True)).describe(
        np.ascontiguousarray(largest.photo[..., ::-1])
    )
    assert len(every.faces) == every.found and every.faces[0].box == result.first.box


def test_a_tiny_face_and_a_face_cut_by_the_border_get_a_reason_or_an_answer(faces, pictures):
    rng = np.random.default_rng(6)
    tiny = paste(faces[0], scene(pictures, rng), 10, 0.0, 300, 200).photo
    result = described(tiny)
    assert result.first is None or result.first.vector is None
    assert result.problem in ("no face found",) or result.problem.startswith("face too small to judge")
    cut = paste(faces[1], scene(pictures, rng), 200, 0.0, 520, 150).photo  # 80 of its 200 px beyond the right edge
    result = described(cut)
    assert result.problem is not None or result.first.vector is not None


def test_grayscale_cmyk_and_a_turned_phone_photo_are_read_as_shown(faces, pictures, tmp_path):
    rng = np.random.default_rng(7)
    planted = paste(faces[2], scene(pictures, rng, 1200, 900), 400, 0.0, 500, 300)
    rgb = Image.fromarray(planted.photo[..., ::-1])
    rgb.convert("L").save(tmp_path / "gray.jpg")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    big = rgb.resize((6000, 4500)).rotate(90, expand=True)  # stored on its side, 4500 x 6000 ...
    exif = big.getexif()
    exif[0x0112] = 6  # ... and shown turned back upright
    big.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=85)
    for name in ("gray.jpg", "cmyk.jpg", "phone.jpg"):
        bgr, info = read_image(str(tmp_path / name), 10**9, 10**9)
        result = described(bgr)
        scale = bgr.shape[1] / 1200
        expected = tuple(v * scale for v in planted.box)
        assert result.found >= 1 and centre_inside(result.first.box, expected), (
            name,
            result.first and result.first.box,
            expected,
        )
        assert result.first.vector is not None


def test_a_face_in_a_panorama_is_found_in_its_tiles(faces, pictures):
    rng = np.random.default_rng(8)
    panorama = scene(pictures, rng, 4800, 600)
    planted = paste(faces[3], panorama, 240, 0.0, 3100, 300)  # 5 px wide if the whole panorama were searched at once
    result = described(planted.photo)
    assert result.found >= 1 and centre_inside(result.first.box, planted.box)
