"""One face path through the data stages: exploration judges the face, not the frame, and processing
writes each kept face as its aligned crop, the same cut the networks' chips come from."""

import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import PROJECT, read_csv, run

sys.path.insert(0, str(PROJECT / "benchmarks"))
from scenes import paste, scene, scene_pictures  # noqa: E402


@pytest.fixture(scope="module")
def photos(sample, manifest, tmp_path_factory):
    """Ordinary photos: clean sample faces of 110-260 px pasted into 640x480 scenes, with a labels CSV;
    and four planted cases: a sharp face on a blurred background, a blurred face on a sharp one, a dark
    face in a bright room, a small face."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    rng = np.random.default_rng(11)
    pictures = scene_pictures()
    clean = manifest.loc[(manifest["defect"] == "none") & manifest["broken"].isna(), ["file", "age"]].head(30)
    rows = []
    for index, (name, age) in enumerate(zip(clean["file"], clean["age"])):
        face = cv2.imread(str(sample / name))
        side = int(rng.integers(110, 260))
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
        background = scene(pictures, rng)
        if index == 0:  # a portrait with its background out of focus
            background = cv2.GaussianBlur(background, (0, 0), 6)
        photo = paste(face, background, side, 0.0, x, y).photo
        if index == 1:  # a blurred face in a sharp scene: the face and what is around it out of focus
            top, left = max(0, y - side // 4), max(0, x - side // 4)
            region = photo[top : y + side + side // 4, left : x + side + side // 4]
            photo[top : y + side + side // 4, left : x + side + side // 4] = cv2.GaussianBlur(region, (0, 0), 4)
        if index == 2:  # a dark face in front of a bright window
            face_pixels = photo[y : y + side, x : x + side].copy()
            photo = np.clip(photo.astype(np.float32) * 0.2 + 200, 0, 255).astype(np.uint8)
            photo[y : y + side, x : x + side] = (face_pixels * 0.2).astype(np.uint8)
        cv2.imwrite(str(folder / f"photo_{index:02d}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows.append({"file": f"photo_{index:02d}.jpg", "age": int(age)})
    small = paste(cv2.imread(str(sample / clean["file"].iloc[3])), scene(pictures, rng), 36, 0.0, 300, 200).photo
    cv2.imwrite(str(folder / "small_face.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 92])
    rows.append({"file": "small_face.jpg", "age": 30})
    pd.DataFrame(rows).to_csv(folder.parent / "labels.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def explored_photos(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("photos_explored")
    run(
        "explore_images.py",
        f"dataset_dir={photos}",
        f"labels.csv_path={photos.parent}/labels.csv",
        f"output_csv={out}/m.csv",
        f"summary_csv={out}/s.csv",
    )
    return out, read_csv(out / "m.csv").set_index("file")


def test_quality_of_photos_is_judged_on_the_face_not_the_frame(explored_photos):
    _, rows = explored_photos
    ordinary = rows.drop(["photo_00.jpg", "photo_01.jpg", "photo_02.jpg", "small_face.jpg"])
    assert (ordinary["faces"] >= 1).all()  # a face found in every photo: none flagged no_face
    assert not ordinary["flag_face_too_small"].any()  # judged in its own pixels, not as a share of the frame
    assert (ordinary["status"] == "ok").mean() >= 0.9, ordinary.loc[ordinary["status"] != "ok", "reason"]
    assert rows.loc["photo_00.jpg", "status"] == "ok"  # a sharp face before a blurred background is not blurry
    assert rows.loc["photo_01.jpg", "flag_blurry"]  # a blurred face in a sharp scene is
    assert rows.loc["photo_02.jpg", "flag_dark"]  # a dark face in a bright room is dark
    assert rows.loc["small_face.jpg", "flag_face_too_small"] or rows.loc["small_face.jpg", "flag_no_face"]


def test_processing_writes_each_kept_face_as_the_cut_the_face_path_gives(explored_photos, photos, tmp_path):
    from agepipe.config.loading import load_config
    from agepipe.config.schema import Common
    from agepipe.faces.alignment import FacePath, FaceSettings

    explored, rows = explored_photos
    run(
        "process_images.py",
        f"input_csv={explored}/m.csv",
        f"output_dir={tmp_path}/faces",
        f"output_csv={tmp_path}/p.csv",
    )
    processed = read_csv(tmp_path / "p.csv").set_index("file")
    kept = processed[processed["status"] == "kept"]
    assert len(kept) >= 0.9 * (rows["status"] == "ok").sum()
    path = FacePath(FaceSettings.from_config(load_config(Common, PROJECT / "configs/common.yaml").faces))
    for name in kept.index[:5]:
        crop = cv2.imread(kept.loc[name, "path"])
        assert crop.shape[0] == crop.shape[1] <= 256 and path.find(crop).scores.size >= 1  # a face, square, found again
        bgr = cv2.imread(str(photos / name))
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        x0, y0, x1, y1 = path.find(bgr).boxes[0]
        face = path.align(rgb, (x0, y0, x1 - x0, y1 - y0))
        by_hand = path.cut(rgb, face, path.native_side(face, 256, 0.25), 0.25, extend_edges=True)[..., ::-1]
        assert crop.shape == by_hand.shape and np.abs(crop.astype(int) - by_hand).mean() < 3  # the same cut, JPEG aside
    assert processed.loc["small_face.jpg", "status"] != "kept"
