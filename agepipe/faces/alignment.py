"""One face path for every stage: a face is found (BlazeFace over the image and its tiles, and again over a
padded frame when nothing was found), its five landmarks are searched in a square about its detected
box (dlib's 5-point model), and every cut of it, the networks' chips as the processed dataset's crops,
is aligned by them. Exploration, processing, the label check, training and prediction all go through
`FacePath`, set by one config section (`faces` in configs/common.yaml).

The landmark model, `shape_predictor_5_face_landmarks.dat` (public domain, trained on dlib's own CC0
data), ships inside the PyPI package `face-recognition-models`; its 68-point model (non-commercial
training data) is never used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agepipe.errors import UserError
from agepipe.faces.detector import DetectorSettings, FaceDetector, Faces, FinderSettings, find_faces

LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


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


@dataclass(frozen=True)
class FaceSettings:
    """How every stage finds and aligns a face (the `faces` section of configs/common.yaml).

    search : the detector's settings and the tiles it looks at (detector.FinderSettings).
    box_scale : landmarks are searched in a square this many times the detected box's longer side.
    min_eye_distance : landmarks whose eye centres are closer than this share of the box's width are
        implausible (the predictor always answers, even on a blank image).
    max_roll_degrees : landmarks whose eye line tilts more than this are implausible.
    on_no_landmarks : "square" cuts a face without plausible landmarks as its square, unaligned;
        "skip" leaves it uncut, with the reason.
    min_face_pixels : a face whose detected box is narrower than this is too small to judge.
    """

    search: FinderSettings
    box_scale: float
    min_eye_distance: float
    max_roll_degrees: float
    on_no_landmarks: str
    min_face_pixels: int

    @classmethod
    def from_config(cls, section) -> "FaceSettings":
        """From the `faces` config section (or a model's saved copy of it)."""
        values = section.model_dump()
        detector = DetectorSettings(**values.pop("detector"))
        search = FinderSettings(detector, values.pop("tile_levels"), values.pop("retry_border_fraction"))
        return cls(search=search, **values)

    def as_config(self) -> dict:
        """The `faces` config section these settings come from (what a saved model keeps)."""
        values = dataclasses.asdict(self)
        search = values.pop("search")
        return {
            "detector": search["detector"],
            "tile_levels": search["tile_levels"],
            "retry_border_fraction": search["retry_border_fraction"],
            **values,
        }


@dataclass
class AlignedFace:
    """A found face, ready to be cut: its detected box (x, y, width, height), the landmarks' dlib shape
    (None when they were implausible: the face is cut as its square), and what went wrong, if anything."""

    box: tuple[float, float, float, float]
    square: tuple[float, float, float, float]
    shape: object | None
    problem: str | None


def landmark_problem(points: np.ndarray, box_width: float, settings: FaceSettings) -> str | None:
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


class FacePath:
    """Finding, aligning and cutting faces by one FaceSettings. Models load on first use (in the process
    that uses them: a worker, after its pool forked)."""

    def __init__(self, settings: FaceSettings):
        self.settings = settings
        self._models = None

    def _load(self):
        if self._models is None:
            dlib, paths = require_dlib()
            self._models = (
                dlib,
                FaceDetector(self.settings.search.detector),
                dlib.shape_predictor(str(paths[LANDMARK_MODEL])),
            )
        return self._models

    def find(self, bgr: np.ndarray) -> Faces:
        """Every face of an 8-bit BGR image, largest first (detector.find_faces)."""
        return find_faces(self._load()[1], bgr, self.settings.search)

    def too_small(self, box: tuple[float, float, float, float]) -> str | None:
        """Why a detected box (x, y, width, height) is too small to judge, or None."""
        side = max(box[2], box[3])
        if side < self.settings.min_face_pixels:
            return f"face too small to judge: {side:.0f} px (faces.min_face_pixels {self.settings.min_face_pixels})"
        return None

    def align(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> AlignedFace:
        """The face whose detected box is `box`, its landmarks searched in a square of `box_scale` times it."""
        dlib, _, predictor = self._load()
        square = square_about(box, self.settings.box_scale)
        x, y, w, h = square
        shape = predictor(rgb, dlib.rectangle(round(x), round(y), round(x + w) - 1, round(y + h) - 1))
        points = np.array([(p.x, p.y) for p in shape.parts()], float)
        problem = landmark_problem(points, w / self.settings.box_scale, self.settings)
        return AlignedFace(box, square, None if problem else shape, problem)

    def usable(self, face: AlignedFace) -> bool:
        """Whether the face can be cut: aligned, or its square when landmarks failed and that is allowed."""
        return face.shape is not None or self.settings.on_no_landmarks == "square"

    def cut(
        self, rgb: np.ndarray, face: AlignedFace, side: int, padding: float, extend_edges: bool = False
    ) -> np.ndarray:
        """The face, `side` pixels square with a margin of `padding` (a share of the face, dlib's
        convention), aligned by its landmarks; or its square, unaligned, when they were implausible. What
        lies beyond the image's edges is black, as dlib cuts it, or with `extend_edges` the edges'
        pixels continued (a crop that is written: a black band would read as crushed shadows)."""
        if face.shape is None:
            return cv2.resize(square_region(rgb, face.square), (side, side), interpolation=cv2.INTER_AREA)
        dlib = self._load()[0]
        shape = face.shape
        if extend_edges:
            margin = round(max(rgb.shape[:2]) * (1 + padding))
            rgb = cv2.copyMakeBorder(rgb, margin, margin, margin, margin, cv2.BORDER_REPLICATE)
            rect = shape.rect
            shape = dlib.full_object_detection(
                dlib.rectangle(
                    rect.left() + margin, rect.top() + margin, rect.right() + margin, rect.bottom() + margin
                ),
                [dlib.point(point.x + margin, point.y + margin) for point in shape.parts()],
            )
        return np.asarray(dlib.extract_image_chip(rgb, dlib.get_face_chip_details(shape, side, padding)))

    def native_side(self, face: AlignedFace, side: int, padding: float) -> int:
        """The side, at most `side`, at which a cut of this face with `padding` shows it at the image's own
        resolution: a small face is never upscaled into a blurrier crop."""
        dlib = self._load()[0]
        span = dlib.get_face_chip_details(face.shape, side, padding).rect.width() if face.shape else face.square[2]
        return max(1, min(side, round(span)))


def square_about(box: tuple[float, float, float, float], scale: float) -> tuple[float, float, float, float]:
    """The square centred on a box (x, y, width, height), `scale` times its longer side.

    Examples
    --------
    >>> square_about((10.0, 20.0, 40.0, 60.0), 1.5)
    (-15.0, 5.0, 90.0, 90.0)
    """
    x, y, w, h = box
    side = scale * max(w, h)
    return (x + w / 2 - side / 2, y + h / 2 - side / 2, side, side)


def square_region(image: np.ndarray, square: tuple[float, float, float, float]) -> np.ndarray:
    """The pixels of a square (x, y, side, side), the part beyond the image's edges filled by replication."""
    x, y, w, h = (round(v) for v in square)
    height, width = image.shape[:2]
    top, left = max(0, -y), max(0, -x)
    bottom, right = max(0, y + h - height), max(0, x + w - width)
    inside = image[max(0, y) : min(height, y + h), max(0, x) : min(width, x + w)]
    if not inside.size:
        return np.zeros((max(1, h), max(1, w), *image.shape[2:]), np.uint8)
    return cv2.copyMakeBorder(inside, top, bottom, left, right, cv2.BORDER_REPLICATE)
