"""Face code: landmarks and the pretrained 128-D face descriptor that the age model is built on.

The descriptor is dlib's ResNet face-recognition network (`dlib_face_recognition_resnet_model_v1`),
fed a face aligned by dlib's 5-point landmark model (`shape_predictor_5_face_landmarks`). Both model
files ship inside the PyPI package `face-recognition-models` (nothing is downloaded at run time); dlib
itself comes from `dlib-bin`. The package's 68-point landmark model is non-commercial and never used.

`FaceDescriber` describes one RGB image; `describe_files` describes many files in parallel, caching
each result by the file's content hash in a resumable journal, so an image is described once however
many stages, runs or copies of it there are.
"""
from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from image_reader import UnreadableImage, content_digest, read_image
from utils import Journal, UserError, config_fingerprint, parallel_map, progress_bar

log = logging.getLogger("agepipe.faces")

DESCRIPTOR_BACKBONE = "dlib_face_descriptor"  # the name of this backbone in the training config
DESCRIPTOR_SIZE = 128
CHIP_SIZE = 150  # dlib's face-recognition network reads 150x150 aligned face chips
LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"  # public domain (CC0 training data)
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"  # public domain
# Decoding guards of the model stages: anything exploration accepts.
MAX_PIXELS, MAX_FILE_BYTES = 100_000_000, 200_000_000


@dataclass(frozen=True)
class DescriptorSettings:
    """How a face is found, checked and described (the `model.descriptor` config section).

    face_box : "whole_image" (aligned crops such as UTKFace: the crop is the face box) or
        "detector" (dlib's HOG frontal-face detector; its largest face).
    on_no_landmarks : "whole_image" describes the unaligned image when no plausible landmarks are
        found, "skip" leaves the image without a descriptor.
    min_eye_distance : landmarks whose eye centres are closer than this share of the face box's width
        are implausible (the predictor always answers, even on a blank image).
    max_roll_degrees : landmarks whose eye line tilts more than this are implausible.
    padding : margin around the aligned face chip, as a share of the face (dlib's default 0.25).
    mirrored : also describe the mirror image; the age model averages both views.
    """

    face_box: str
    on_no_landmarks: str
    min_eye_distance: float
    max_roll_degrees: float
    padding: float
    mirrored: bool


def require_dlib():
    """dlib and the face models, or a one-line UserError naming the pip package to install."""
    try:
        import dlib
    except ImportError:
        raise UserError("the face descriptor needs dlib: pip install dlib-bin") from None
    try:
        import face_recognition_models
    except ImportError:
        raise UserError("the face descriptor needs its model files: pip install face-recognition-models") from None
    folder = Path(face_recognition_models.__file__).parent / "models"
    paths = {name: folder / name for name in (LANDMARK_MODEL, DESCRIPTOR_MODEL)}
    for path in paths.values():
        if not path.is_file():
            raise UserError(f"model file {path} is missing: pip install --force-reinstall face-recognition-models")
    return dlib, paths


def landmark_problem(points: np.ndarray, box_width: float, settings: DescriptorSettings) -> str | None:
    """Why five landmarks (x, y rows: two corners of each eye, then the base of the nose) are not a
    plausible face, or None when they are."""
    eye_a, eye_b = points[0:2].mean(axis=0), points[2:4].mean(axis=0)
    dx, dy = eye_b - eye_a
    distance = math.hypot(dx, dy)
    if distance < settings.min_eye_distance * box_width:
        return f"landmarks implausible: eyes {distance / box_width:.2f} of the face width apart"
    roll = abs(math.degrees(math.atan2(dy, dx)))
    roll = min(roll, 180 - roll)  # the model may order the eyes either way
    if roll > settings.max_roll_degrees:
        return f"landmarks implausible: eye line tilted {roll:.0f} degrees"
    return None


class FaceDescriber:
    """The 128-D descriptor of the face in an RGB uint8 image. Models load on first use."""

    def __init__(self, settings: DescriptorSettings):
        self.settings = settings
        self._models = None

    def _load(self):
        if self._models is None:
            dlib, paths = require_dlib()
            detector = dlib.get_frontal_face_detector() if self.settings.face_box == "detector" else None
            self._models = (dlib, detector, dlib.shape_predictor(str(paths[LANDMARK_MODEL])),
                            dlib.face_recognition_model_v1(str(paths[DESCRIPTOR_MODEL])))
        return self._models

    def describe(self, rgb: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(descriptor or None, problem or None). With `mirrored`, the descriptor holds two rows:
        the image's and its mirror image's.

        Examples
        --------
        >>> describer = FaceDescriber(DescriptorSettings("whole_image", "whole_image", 0.2, 40, 0.25, False))
        >>> vector, problem = describer.describe(np.full((120, 100, 3), 128, np.uint8))
        >>> vector.shape
        (1, 128)
        """
        views = [rgb, np.ascontiguousarray(rgb[:, ::-1])] if self.settings.mirrored else [rgb]
        described = [self._describe_view(view) for view in views]
        problems = [p for _, p in described if p]
        if any(v is None for v, _ in described):
            return None, problems[0]
        return np.stack([v for v, _ in described]).astype(np.float32), (problems[0] if problems else None)

    def _describe_view(self, rgb: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        dlib, detector, predictor, network = self._load()
        height, width = rgb.shape[:2]
        problem = None
        box = dlib.rectangle(0, 0, width - 1, height - 1)
        if detector is not None:
            faces = detector(rgb, 1)
            if len(faces):
                box = max(faces, key=lambda r: r.area())
            else:
                problem = "no face found by the detector"
        if problem is None:
            shape = predictor(rgb, box)
            points = np.array([(p.x, p.y) for p in shape.parts()], float)
            problem = landmark_problem(points, box.width(), self.settings)
            if problem is None:
                return np.array(network.compute_face_descriptor(rgb, shape, 0, self.settings.padding)), None
        if self.settings.on_no_landmarks == "skip":
            return None, problem
        chip = cv2.resize(rgb, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_AREA)
        return np.array(network.compute_face_descriptor(chip)), problem + "; described the whole image unaligned"


# --------------------------------------------------------------------------------------------------
# Many files, cached by content
# --------------------------------------------------------------------------------------------------
def content_hash(path: str, max_bytes: int) -> str | None:
    """BLAKE2 of a regular file's bytes (the exploration stage's content_hash), or None for anything
    that is not a readable regular file of at most `max_bytes` (a FIFO or /dev/zero would never end)."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode) or status.st_size > max_bytes:
            return None
        with open(path, "rb") as f:
            return content_digest(f.read(max_bytes + 1))
    except (OSError, UnicodeEncodeError):
        return None


_describer: FaceDescriber | None = None
_read_limits: tuple[int, int] = (0, 0)


def _init_worker(settings: DescriptorSettings, max_pixels: int, max_file_bytes: int) -> None:
    global _describer, _read_limits
    _describer, _read_limits = FaceDescriber(settings), (max_pixels, max_file_bytes)
    cv2.setNumThreads(1)


def _describe_task(task: tuple[str, str]) -> tuple[str, dict]:
    key, path = task
    try:
        bgr, _ = read_image(path, *_read_limits)
    except UnreadableImage as exc:
        return key, {"descriptor": None, "face_problem": f"unreadable: {exc}"}
    vector, problem = _describer.describe(np.ascontiguousarray(bgr[..., ::-1]))
    return key, {"descriptor": None if vector is None else np.round(vector, 6).tolist(), "face_problem": problem}


def describe_files(paths: list[str], settings: DescriptorSettings, cache_path: str | os.PathLike, num_workers: int,
                   max_pixels: int, max_file_bytes: int, timeout_seconds: float | None = None) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Descriptors (None where the face could not be described) and problems of `paths`, in order.

    Each file is identified by its content hash: a result in the cache at `cache_path` is reused, so
    copies and re-runs cost nothing, and an interrupted run continues where it stopped. The cache is
    discarded when the settings change.
    """
    require_dlib()  # fail with one line before starting workers
    hashes = [content_hash(p, max_file_bytes) for p in paths]
    cache = Journal(cache_path, config_fingerprint(asdict(settings), LANDMARK_MODEL, DESCRIPTOR_MODEL))
    todo = {}
    for digest, path in zip(hashes, paths):
        if digest and digest not in cache.done:
            todo.setdefault(digest, path)
    if todo:
        log.info("describing %d faces (%d found in %s)", len(todo), len(set(hashes)) - len(todo), cache_path)
    with cache:
        for key, row in parallel_map(_describe_task, list(todo.items()), num_workers, initializer=_init_worker,
                                     initargs=(settings, max_pixels, max_file_bytes), chunksize=8,
                                     progress=progress_bar(len(todo), "describing faces"), timeout=timeout_seconds,
                                     on_failure=lambda task, reason: (task[0], {"descriptor": None, "face_problem": f"failed: {reason}"})):
            cache.record(key, row)
    unique = sorted({h for h in hashes if h})
    # compact=False: the cache is shared by many datasets; no hash at all (every file unreadable) reads nothing
    rows = cache.rows(unique, compact=False).to_dict("records") if unique else []
    by_hash = dict(zip(unique, rows))
    descriptors, problems = [], []
    for digest in hashes:
        row = by_hash.get(digest, {"descriptor": None, "face_problem": "unreadable: not a readable regular file, or over the size limit"})
        vector, problem = row["descriptor"], row["face_problem"]
        descriptors.append(np.asarray(vector, np.float32) if isinstance(vector, list) else None)
        problems.append(problem if isinstance(problem, str) else None)
    return descriptors, problems
