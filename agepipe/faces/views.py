"""The views a face is described in: its aligned chip as cut, and changes of it that real photos carry and
aligned crops such as UTKFace's lack. Prediction describes a face as it is (and mirrored); training may
also describe each face greyscale, sepia, blurred, over-compressed, colour-cast or at low resolution,
each view one more training sample, so that the model learns an age that does not depend on them.

Every view is a pure function of an RGB uint8 chip and a generator seeded by the image's content, so a
face gets the same views in every run.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

# The strengths of the changes, drawn per face: ranges of what scans and phone photos show.
BLUR_SIGMA = (0.8, 2.0)  # Gaussian blur of a 150 px chip, pixels
JPEG_QUALITY = (8, 25)
COLOUR_GAIN = (0.75, 1.25)  # each channel's gain
LOW_RESOLUTION = (0.25, 0.45)  # share of the side kept before scaling back up
SEPIA = np.array([0.78, 0.95, 1.12], np.float32)  # R, G, B of a brown print, from its grey


def mirror(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(chip[:, ::-1])


def grey(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def sepia(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    value = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None]
    return np.clip(value * SEPIA, 0, 255).astype(np.uint8)


def blur(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(chip, (0, 0), rng.uniform(*BLUR_SIGMA))


def jpeg(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    encoded = cv2.imencode(".jpg", chip[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])


def colour_cast(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(chip.astype(np.float32) * rng.uniform(*COLOUR_GAIN, 3).astype(np.float32), 0, 255).astype(np.uint8)


def low_resolution(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = chip.shape[0]
    small = max(8, round(side * rng.uniform(*LOW_RESOLUTION)))
    return cv2.resize(
        cv2.resize(chip, (small, small), interpolation=cv2.INTER_AREA), (side, side), interpolation=cv2.INTER_LINEAR
    )


VIEWS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "mirror": mirror,
    "grey": grey,
    "sepia": sepia,
    "blur": blur,
    "jpeg": jpeg,
    "colour_cast": colour_cast,
    "low_resolution": low_resolution,
}


def view_of(chip: np.ndarray, view: str, seed: int) -> np.ndarray:
    """`chip` in `view` ("image": as it is), drawn with a generator seeded by `seed` and the view's name.

    Examples
    --------
    >>> chip = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    >>> bool((view_of(chip, "mirror", 1) == chip[:, ::-1]).all()), view_of(chip, "jpeg", 1).shape
    (True, (150, 150, 3))
    >>> bool((view_of(chip, "blur", 7) == view_of(chip, "blur", 7)).all())
    True
    """
    if view == "image":
        return chip
    return VIEWS[view](chip, np.random.default_rng([seed, *view.encode()]))
