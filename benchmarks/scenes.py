"""Ordinary photographs made offline from face crops: a crop pasted, scaled and turned, into a scene, and
scenes with no face at all. The scenes are pictures shipped inside scikit-image (no people in them), so
nothing is downloaded; the same seed gives the same photos.

Used by benchmarks/bench_photos.py and bench_faces.py, and by the tests of the photo path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# scikit-image's bundled photographs without a person in them
NON_FACE_PICTURES = [
    "brick",
    "cell",
    "chelsea",
    "coffee",
    "coins",
    "color",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "ihc",
    "logo",
    "microaneurysms",
    "moon",
    "motorcycle_left",
    "page",
    "retina",
    "rocket",
    "text",
    "clock_motion",
]


def scene_pictures() -> list[np.ndarray]:
    """The bundled pictures without faces, as BGR arrays."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    pictures = []
    for name in NON_FACE_PICTURES:
        path = next(folder.glob(name + ".*"), None)
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR) if path else None
        if picture is not None:
            pictures.append(picture)
    return pictures


def scene(pictures: list[np.ndarray], rng: np.random.Generator, width: int = 640, height: int = 480) -> np.ndarray:
    """A width x height background: a random part of a random picture, scaled to fill it."""
    picture = pictures[rng.integers(len(pictures))]
    ph, pw = picture.shape[:2]
    scale = max(width / pw, height / ph) * rng.uniform(1.0, 1.6)
    big = cv2.resize(
        picture, (max(width, round(pw * scale)), max(height, round(ph * scale))), interpolation=cv2.INTER_LINEAR
    )
    y, x = rng.integers(0, big.shape[0] - height + 1), rng.integers(0, big.shape[1] - width + 1)
    return np.ascontiguousarray(big[y : y + height, x : x + width])


@dataclass
class Pasted:
    photo: np.ndarray
    box: tuple[float, float, float, float]  # x, y, width, height of the pasted crop (before turning) in the photo
    degrees: float  # how far the crop was turned, counter-clockwise


def paste(face: np.ndarray, background: np.ndarray, side: int, degrees: float, x: int, y: int) -> Pasted:
    """`face` scaled to `side` pixels square, turned by `degrees` about its centre, pasted with its top
    left corner at (x, y); the turned crop's corners show the background, not black."""
    crop = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA if side < face.shape[0] else cv2.INTER_CUBIC)
    turn = cv2.getRotationMatrix2D((side / 2, side / 2), degrees, 1.0)
    turned = cv2.warpAffine(crop, turn, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mask = cv2.warpAffine(np.full((side, side), 255, np.uint8), turn, (side, side), flags=cv2.INTER_LINEAR)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.0)[..., None].astype(np.float32) / 255
    photo = background.copy()
    height, width = photo.shape[:2]
    top, left = max(0, -y), max(0, -x)  # a crop past the photo's edges is cut there
    bottom, right = min(side, height - y), min(side, width - x)
    region = photo[y + top : y + bottom, x + left : x + right].astype(np.float32)
    visible = mask[top:bottom, left:right]
    photo[y + top : y + bottom, x + left : x + right] = np.round(
        turned[top:bottom, left:right] * visible + region * (1 - visible)
    ).astype(np.uint8)
    return Pasted(photo, (float(x), float(y), float(side), float(side)), degrees)


def photo_of(
    face: np.ndarray,
    pictures: list[np.ndarray],
    rng: np.random.Generator,
    sides=(110, 260),
    max_degrees: float = 12.0,
    width: int = 640,
    height: int = 480,
) -> Pasted:
    """An ordinary photo of one face: the crop at a random size, turn and place in a random scene."""
    side = int(rng.integers(sides[0], sides[1] + 1))
    x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    return paste(face, scene(pictures, rng, width, height), side, float(rng.uniform(-max_degrees, max_degrees)), x, y)


def non_face_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` 200x200 BGR images without faces: the non-face patches of scikit-image's LFW subset, then
    random square crops of its photographs without people (coffee, rocket, coins, a cat...)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    rng = np.random.default_rng(seed)
    lfw = np.load(folder / "lfw_subset.npy")[100:]  # the subset's second half: patches that are not faces
    images = [cv2.cvtColor(cv2.resize((patch * 255).astype(np.uint8), (200, 200)), cv2.COLOR_GRAY2BGR) for patch in lfw]
    pictures = scene_pictures()
    while len(images) < count:
        picture = pictures[rng.integers(len(pictures))]
        height, width = picture.shape[:2]
        side = int(rng.uniform(0.3, 1.0) * min(height, width))
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        images.append(cv2.resize(picture[y : y + side, x : x + side], (200, 200), interpolation=cv2.INTER_AREA))
    return images[:count]
