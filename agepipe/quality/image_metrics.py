"""Measuring one image: every metric is one small function of an `ImageView`, registered with `@metric`
together with its parameters' model, so adding a metric is one function here plus one line in
configs/explore_images.yaml. `measure_file` reads a file safely and measures it; `measure_array`
measures a decoded image (also the processing stage's re-measuring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import cv2
import numpy as np
from pydantic import create_model

from agepipe.config.data_stages import ExploreConfig
from agepipe.config.schema import Bounded, Section
from agepipe.data.image_files import FileLimits, UnreadableImage, read_image
from agepipe.faces.alignment import FacePath, FaceSettings, square_about
from agepipe.faces.detector import FACE_COLUMNS, Faces, face_geometry

FLOAT_DECIMALS = 4  # metric values are rounded so the CSV is readable and diffs are meaningful
MIN_JUDGED_SIDE = 8  # a face region thinner than this (a box off the image) is no region: the image is judged


@dataclass
class Metric:
    function: Callable
    params: type[Section]  # the model of the function's keyword parameters
    columns: tuple[str, ...]  # the CSV columns it fills


METRICS: dict[str, Metric] = {}


def metric(columns: tuple[str, ...] = (), **params: Any):
    """Register `function(view, **params)` as a metric, each parameter given as its type (with its
    bounds: schema.Bounded). It returns one value, whose CSV column is the function's name, or
    a dict of values for the named `columns`."""

    def register(function):
        model = create_model(
            f"{function.__name__}_parameters", __base__=Section, **{name: (kind, ...) for name, kind in params.items()}
        )
        METRICS[function.__name__] = Metric(function, model, columns or (function.__name__,))
        return function

    return register


class ImageView:
    """A decoded image and the derived arrays several metrics share, computed at most once.

    Quality is judged on the face: when `face_path` finds one, pixel metrics look at the face's own
    pixels (`judged_bgr`: a square of `face_region_scale` times its box), else at the whole image; either
    is scaled so its shorter side is at most `analysis_side` pixels (`gray`): sharpness and noise then
    mean the same thing for a 200 px crop and a 4000 px photo, and a small face is never upscaled into
    a blurrier one.
    """

    def __init__(
        self, bgr: np.ndarray, analysis_side: int, face_path: FacePath | None = None, face_region_scale: float = 1.0
    ):
        self.bgr = bgr
        self.analysis_side = analysis_side
        self.face_path, self.face_region_scale = face_path, face_region_scale

    @cached_property
    def found(self) -> Faces | None:
        """The image's faces, largest first (None without a face path)."""
        return None if self.face_path is None else self.face_path.find(self.bgr)

    @cached_property
    def judged_bgr(self) -> np.ndarray:
        """The pixels quality is judged on: the largest face's square, or the whole image without one."""
        if self.found is None or not self.found.scores.size:
            return self.bgr
        x0, y0, x1, y1 = self.found.boxes[0]
        x, y, side, _ = square_about((x0, y0, x1 - x0, y1 - y0), self.face_region_scale)
        height, width = self.bgr.shape[:2]
        # the square's part inside the image: a filled margin would be flat, and read as noise-free
        left, top = max(0, round(x)), max(0, round(y))
        inside = self.bgr[top : min(height, round(y + side)), left : min(width, round(x + side))]
        return inside if min(inside.shape[:2]) >= MIN_JUDGED_SIDE else self.bgr

    @cached_property
    def analysis_scale(self) -> float:
        """Size of the analysis copy relative to the judged pixels (at most 1)."""
        return min(1.0, self.analysis_side / min(self.judged_bgr.shape[:2]))

    @cached_property
    def analysis_bgr(self) -> np.ndarray:
        h, w = self.judged_bgr.shape[:2]
        scale = self.analysis_scale
        if scale == 1:
            return self.judged_bgr
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(self.judged_bgr, size, interpolation=cv2.INTER_AREA)

    @cached_property
    def gray(self) -> np.ndarray:
        return cv2.cvtColor(self.analysis_bgr, cv2.COLOR_BGR2GRAY)

    @cached_property
    def histogram(self) -> np.ndarray:
        """Share of pixels at each grey level 0-255."""
        counts = cv2.calcHist([self.gray], [0], None, [256], [0, 256]).ravel()
        return counts.astype(np.float64) / self.gray.size

    @cached_property
    def gray_mean_std(self) -> tuple[float, float]:
        mean, std = cv2.meanStdDev(self.gray)
        return float(mean[0, 0]), float(std[0, 0])


@metric()
def blurriness(view: ImageView) -> float:
    """Variance of the Laplacian: low values mean few sharp edges, i.e. a blurry image."""
    _, std = cv2.meanStdDev(cv2.Laplacian(view.gray, cv2.CV_16S))
    return float(std[0, 0]) ** 2


# Immerkær's mask: the difference of two Laplacians, which cancels image structure up to second
# order and leaves mostly noise (J. Immerkær, "Fast Noise Variance Estimation", CVIU 1996).
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
_SQUARE_3X3 = np.ones((3, 3), np.uint8)


@metric(flat_fraction=Bounded(float, 0.01, 1.0))
def noise(view: ImageView, flat_fraction: float) -> float:
    """Estimated standard deviation of the noise in the grey image, in grey levels.

    Immerkær's estimator, averaged over the `flat_fraction` of pixels with the weakest gradient so
    that edges and texture are not mistaken for noise (after Tai & Yang, 2008). Integer filters and a
    sampled cut-off keep it near 0.1 ms on a 200 px image.
    """
    gray = view.gray
    if min(gray.shape) < 3:
        return float("nan")
    response = np.abs(cv2.filter2D(gray, cv2.CV_16S, _NOISE_MASK, borderType=cv2.BORDER_REFLECT))
    gradient = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, _SQUARE_3X3)  # local max - min
    sample = gradient[::4, ::4].ravel()  # the cut-off is a quantile: a 1-in-16 sample estimates it well
    cutoff = np.partition(sample, int(flat_fraction * (sample.size - 1)))[int(flat_fraction * (sample.size - 1))]
    flat = (gradient <= cutoff).astype(np.uint8)
    return math.sqrt(math.pi / 2) / 6 * cv2.mean(response, mask=flat)[0]


@metric()
def brightness(view: ImageView) -> float:
    """Mean grey level, 0 (black) to 255 (white)."""
    return view.gray_mean_std[0]


@metric(dark_level=Bounded(int, 0, 255))
def underexposed_fraction(view: ImageView, dark_level: int) -> float:
    """Share of pixels at or below `dark_level`: shadows crushed to black."""
    return float(view.histogram[: dark_level + 1].sum())


@metric(bright_level=Bounded(int, 0, 255))
def overexposed_fraction(view: ImageView, bright_level: int) -> float:
    """Share of pixels at or above `bright_level`: highlights blown to white."""
    return float(view.histogram[bright_level:].sum())


@metric()
def contrast(view: ImageView) -> float:
    """RMS contrast: the standard deviation of the grey levels."""
    return view.gray_mean_std[1]


@metric()
def entropy(view: ImageView) -> float:
    """Shannon entropy of the grey-level histogram, in bits (0 for a flat image, at most 8)."""
    p = view.histogram[view.histogram > 0]
    return float(-(p * np.log2(p)).sum())


@metric()
def colourfulness(view: ImageView) -> float:
    """Hasler and Süsstrunk's colourfulness (2003): 0 for a grey image, ~100 for a vivid one.

    Colour statistics are taken on every other pixel of every other row: a quarter of the work, and
    the same value within 1% on UTKFace crops.
    """
    bgr = view.analysis_bgr[::2, ::2].astype(np.int16)
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    (rg_mean,), (rg_std,) = cv2.meanStdDev(r - g)
    (yb_mean,), (yb_std,) = cv2.meanStdDev(r + g - 2 * b)  # twice the usual (r + g) / 2 - b
    return float(math.hypot(rg_std[0], yb_std[0] / 2) + 0.3 * math.hypot(rg_mean[0], yb_mean[0] / 2))


@metric(columns=(*FACE_COLUMNS, "rival_faces"), rival_size=Bounded(float, 0, 1))
def faces(view: ImageView, rival_size: float) -> dict:
    """Faces found by the one face path (alignment.FacePath) and the geometry of the largest: its box,
    score, share of the image, offset from the centre, roll and keypoints, in image pixels; and how many
    others are at least `rival_size` of its width (whose age would a label give?)."""
    height, width = view.bgr.shape[:2]
    found = view.found
    widths = found.boxes[:, 2] - found.boxes[:, 0]
    rivals = int((widths[1:] >= rival_size * widths[0]).sum()) if widths.size else 0
    return {**face_geometry(found, width, height), "rival_faces": rivals}


@metric(hash_side=Bounded(int, 4, 16), dct_side=Bounded(int, 8, 128))
def phash(view: ImageView, hash_side: int, dct_side: int) -> str:
    """Perceptual hash (hex): signs of the low-frequency DCT of a small grey thumbnail.

    Re-encoding, resizing and small brightness or colour changes leave it (nearly) unchanged, so a
    small Hamming distance between two hashes means the same picture.
    """
    gray = view.gray
    while min(gray.shape) >= 2 * dct_side:  # halving first is much faster than one large area resize
        gray = cv2.pyrDown(gray)
    thumb = cv2.resize(gray, (dct_side, dct_side), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(thumb)[:hash_side, :hash_side].ravel()
    ac = low[1:]  # the DC term is the mean brightness, not structure
    bits = low > np.partition(ac, len(ac) // 2)[len(ac) // 2]
    return np.packbits(bits).tobytes().hex()


BASIC_COLUMNS = [
    "file_size",
    "format",
    "color_mode",
    "width",
    "height",
    "min_side",
    "channels",
    "bit_depth",
    "content_hash",
]
SIZE_COLUMNS = ["width", "height", "min_side"]  # measured again on every processed image


def metric_columns(metrics: dict) -> list[str]:
    """The CSV columns that the configured metrics fill."""
    return [column for name in metrics for column in METRICS[name].columns]


def measured_columns(metrics: dict) -> list[str]:
    """The numeric columns that the configured metrics fill, which checks can test (not the hash)."""
    return [column for column in metric_columns(metrics) if column != "phash"]


@dataclass
class ReaderSettings:
    metrics: dict  # name -> parameters, the validated `metrics` config section
    max_pixels: int
    max_file_bytes: int
    max_aspect_ratio: float
    analysis_side: int
    faces: FaceSettings | None = None  # the common `faces` section: how the face quality is judged on is found
    face_region_scale: float = 1.0

    @classmethod
    def from_config(cls, explore: ExploreConfig, metrics: dict | None = None) -> "ReaderSettings":
        """The reader settings of a validated explore config (`metrics` replaces its metric list)."""
        images, limits = explore.images, FileLimits.from_config(explore.file_limits)
        return cls(
            explore.metrics if metrics is None else metrics,
            limits.max_pixels,
            limits.max_file_bytes,
            images.max_aspect_ratio,
            images.analysis_side,
            FaceSettings.from_config(explore.faces),
            images.face_region_scale,
        )

    def face_path(self) -> FacePath | None:
        """The face path of these settings (one per process: loading costs ~10 ms), or None when faces
        are not measured."""
        if "faces" not in self.metrics or self.faces is None:
            return None
        if self.faces not in _FACE_PATHS:
            _FACE_PATHS[self.faces] = FacePath(self.faces)
        return _FACE_PATHS[self.faces]


_FACE_PATHS: dict[FaceSettings, FacePath] = {}


def unreadable_row(reason: str | None, settings: ReaderSettings) -> dict:
    """A row of measure_file with every value empty and `error` set."""
    return {**{column: None for column in BASIC_COLUMNS + metric_columns(settings.metrics)}, "error": reason}


def measure_file(path: str, settings: ReaderSettings) -> dict:
    """Basic properties and every configured metric of one file; `error` says why it is unreadable."""
    row = unreadable_row(None, settings)
    try:
        bgr, info = read_image(path, settings.max_pixels, settings.max_file_bytes, settings.max_aspect_ratio)
    except UnreadableImage as exc:
        row.update(exc.info, error=str(exc))
        return row
    row.update(info)
    try:
        return {**row, **measure_array(bgr, settings)}
    except UnreadableImage as exc:
        return {**row, "error": str(exc)}


def measure_array(bgr: np.ndarray, settings: ReaderSettings) -> dict:
    """Every configured metric of a decoded BGR image (also used to re-measure processed images).
    A metric that fails raises UnreadableImage naming it and the error."""
    view = ImageView(bgr, settings.analysis_side, settings.face_path(), settings.face_region_scale)
    height, width = bgr.shape[:2]
    values = {"width": width, "height": height, "min_side": min(width, height)}
    # the faces first: every pixel metric judges the face they find
    for name in sorted(settings.metrics, key=lambda name: name != "faces"):
        try:
            value = METRICS[name].function(view, **settings.metrics[name])
        except Exception as exc:  # a decoder-made array a metric chokes on, a detector that fails: that row says so
            raise UnreadableImage(f"metric {name} failed: {type(exc).__name__}: {exc}") from None
        values.update(value if isinstance(value, dict) else {name: value})
    return {name: round(value, FLOAT_DECIMALS) if isinstance(value, float) else value for name, value in values.items()}


# Process-pool plumbing: settings are sent once per worker, not once per image.
_worker_settings: ReaderSettings | None = None
