"""Image operations: repairs for the processing stage and face-safe augmentations for resampling.

Every function takes an image array, grayscale (H, W) or BGR (H, W, 3), of dtype uint8, uint16 or
float32 (range 0-1), and returns a new array of the same shape, dtype and range; the input is never
modified. Operations that change lightness leave colour alone: exposure scales the three channels of a
pixel by one common factor (hue and saturation unchanged), and contrast, texture and sharpening act on
the lightness channel of CIELAB only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
from pydantic import create_model
from skimage.util import img_as_float32

from agepipe.config.data_stages import ResamplingAugmentation
from agepipe.config.schema import Bounded, Section

# --------------------------------------------------------------------------------------------------
# dtype handling
# --------------------------------------------------------------------------------------------------
_INTEGER_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def validate_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected a (H, W) grayscale or (H, W, 3) BGR image, got shape {image.shape}")
    if image.dtype not in _INTEGER_MAX and image.dtype != np.float32:
        raise ValueError(f"expected dtype uint8, uint16 or float32, got {image.dtype}")
    if min(image.shape[:2]) == 0:
        raise ValueError(f"image has no pixels (shape {image.shape})")


def to_unit_float(image: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The image as float32 in [0, 1] (scikit-image's img_as_float32), and the function that turns a
    result back into the input's dtype, clipped and rounded.

    Examples
    --------
    >>> unit, restore = to_unit_float(np.array([[0, 51, 255]], np.uint8))
    >>> unit.dtype, restore(unit * 2).tolist()
    (dtype('float32'), [[0, 102, 255]])
    """
    validate_image(image)
    scale = _INTEGER_MAX.get(image.dtype, 1.0)
    dtype = image.dtype

    def restore(result: np.ndarray) -> np.ndarray:
        result = np.clip(result, 0.0, 1.0)
        if dtype == np.float32:
            return result.astype(np.float32)
        return np.round(result * scale).astype(dtype)

    return img_as_float32(image), restore


def luminance(unit: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of a unit-float image (the grey level the exploration metrics measure)."""
    if unit.ndim == 2:
        return unit
    b, g, r = unit[..., 0], unit[..., 1], unit[..., 2]
    return 0.114 * b + 0.587 * g + 0.299 * r


def _on_lightness(unit: np.ndarray, change: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply `change` to CIELAB lightness scaled to [0, 1], keeping a* and b* (the colour) as they are."""
    if unit.ndim == 2:
        return change(unit)
    lab = cv2.cvtColor(unit, cv2.COLOR_BGR2Lab)
    lab[..., 0] = np.clip(change(lab[..., 0] / 100.0), 0.0, 1.0) * 100.0
    return cv2.cvtColor(lab, cv2.COLOR_Lab2BGR)


# --------------------------------------------------------------------------------------------------
# Repairs: each one a function registered with @repair, its parameters' model and its place beside it
# --------------------------------------------------------------------------------------------------
@dataclass
class Repair:
    function: Callable
    params: type[Section]  # the model of the parameters the config gives it
    order: int  # repairs run in this order, whatever the order in the config
    escalated: str | None  # the parameter a retry strengthens
    measured: dict[str, str]  # parameters taken from the image's exploration measurements: name -> metric


REPAIRS: dict[str, Repair] = {}


def repair(order: int, escalated: str | None = None, measured: dict[str, str] | None = None, **params: Any):
    """Register `function(image, **params)` as a repair that configs/process_images.yaml may name, each
    parameter given as its type with its bounds (schema.Bounded). `order` places it among the
    repairs, `escalated` names the parameter a retry makes stronger, `measured` the parameters that come
    from the image's own measurements (e.g. noise_sigma from the noise metric)."""

    def register(function):
        model = create_model(
            f"{function.__name__}_parameters", __base__=Section, **{name: (kind, ...) for name, kind in params.items()}
        )
        REPAIRS[function.__name__] = Repair(function, model, order, escalated, measured or {})
        return function

    return register


def repair_order() -> list[str]:
    """The repairs in the order they run: noise first (sharpening and contrast gains amplify it), then
    exposure (it sets the range texture works in), then contrast and texture, sharpening last."""
    return sorted(REPAIRS, key=lambda name: REPAIRS[name].order)


@repair(
    order=10,
    escalated="strength",
    measured={"noise_sigma": "noise"},
    strength=Bounded(float, 0.01, 20),
    template_window=Bounded(int, 3, 21),
    search_window=Bounded(int, 3, 51),
)
def denoise(
    image: np.ndarray, noise_sigma: float, strength: float, template_window: int, search_window: int
) -> np.ndarray:
    """Non-local means denoising with filter strength h = `strength` x the measured noise sigma.

    Non-local means works on 8-bit data, so 16-bit and float images are denoised at 8-bit precision.

    Parameters
    ----------
    image : ndarray
        Grayscale (H, W) or BGR (H, W, 3); uint8, uint16 or float32 in [0, 1].
    noise_sigma : float
        Noise standard deviation in 8-bit grey levels (the exploration `noise` metric).
    strength : float
        Multiple of the noise level used as NLM's h; ~1 removes noise of that level, higher values
        smooth more (and start to remove skin texture).
    template_window, search_window : int
        Sizes (odd, pixels) of the patches compared and of the area searched for similar patches;
        the cost grows with the square of search_window.

    Returns
    -------
    ndarray
        The denoised image, same shape and dtype.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> noisy = np.clip(128 + rng.normal(0, 10, (64, 64)), 0, 255).astype(np.uint8)
    >>> clean = denoise(noisy, noise_sigma=10, strength=1.2, template_window=7, search_window=21)
    >>> bool(clean.std() < noisy.std() / 2), clean.dtype
    (True, dtype('uint8'))
    """
    unit, restore = to_unit_float(image)
    h = max(0.0, float(strength) * float(noise_sigma))
    if h == 0:
        return image.copy()
    eight_bit = np.round(unit * 255).astype(np.uint8)
    if eight_bit.ndim == 2:
        result = cv2.fastNlMeansDenoising(eight_bit, None, h, template_window, search_window)
    else:
        result = cv2.fastNlMeansDenoisingColored(eight_bit, None, h, h, template_window, search_window)
    return restore(result.astype(np.float32) / 255.0)


def exposure_gamma(gray_unit: np.ndarray, target_mean: float, iterations: int = 40) -> float:
    """The gamma g for which mean(gray ** g) equals `target_mean` (both in [0, 1]), by bisection."""
    histogram, edges = np.histogram(gray_unit, bins=1024, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weights = histogram / max(1, histogram.sum())
    low, high = math.log(0.05), math.log(20.0)  # mean(gray ** g) falls as g rises
    for _ in range(iterations):
        mid = (low + high) / 2
        if (weights * centres ** math.exp(mid)).sum() > target_mean:
            low = mid
        else:
            high = mid
    return math.exp((low + high) / 2)


@repair(order=20, target_brightness=Bounded(float, 1, 254))
def adjust_exposure(image: np.ndarray, target_brightness: float) -> np.ndarray:
    """Gamma-correct lightness so the mean grey level becomes `target_brightness` (0-255 scale).

    Each pixel's three channels move by the same amount (new luma - old luma), so its colour
    differences (chroma) are kept: darkening a washed-out face does not grey it, and brightening a dark
    one does not multiply its colour, and its colour noise, into a saturated cast. Gamma < 1 brightens,
    > 1 darkens.

    Parameters
    ----------
    image : ndarray
        Grayscale or BGR; uint8, uint16 or float32 in [0, 1].
    target_brightness : float
        The wanted mean grey level, 0-255 whatever the dtype.

    Returns
    -------
    ndarray
        The corrected image, same shape and dtype.

    Examples
    --------
    >>> dark = np.tile(np.linspace(5, 60, 50, dtype=np.float32), (50, 1)).astype(np.uint8)
    >>> round(float(adjust_exposure(dark, 120).mean()))
    120
    """
    unit, restore = to_unit_float(image)
    gray = luminance(unit)
    gamma = exposure_gamma(gray, float(target_brightness) / 255.0)
    shift = np.power(gray, gamma) - gray
    return restore(unit + (shift if unit.ndim == 2 else shift[..., None]))


@repair(order=30, escalated="target_contrast", target_contrast=Bounded(float, 1, 128))
def stretch_contrast(image: np.ndarray, target_contrast: float) -> np.ndarray:
    """Linearly stretch lightness about its mean so the grey-level standard deviation becomes
    `target_contrast` (0-255 scale); never reduces contrast.

    Parameters
    ----------
    image : ndarray
        Grayscale or BGR; uint8, uint16 or float32 in [0, 1].
    target_contrast : float
        The wanted standard deviation of the grey levels, 0-255 whatever the dtype.

    Returns
    -------
    ndarray
        The stretched image, same shape and dtype.

    Examples
    --------
    >>> flat = np.tile(np.linspace(110, 140, 64, dtype=np.float32), (64, 1)).astype(np.uint8)
    >>> round(float(stretch_contrast(flat, 30).std()))
    30
    """
    unit, restore = to_unit_float(image)
    std = float(luminance(unit).std()) * 255.0
    gain = max(1.0, float(target_contrast) / max(std, 1e-3))

    def stretch(lightness):
        mean = float(lightness.mean())
        return mean + (lightness - mean) * gain

    return restore(_on_lightness(unit, stretch))


@repair(order=40, escalated="clip_limit", clip_limit=Bounded(float, 0.1, 40), tile_grid=Bounded(int, 1, 64))
def enhance_texture(image: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """CLAHE (contrast-limited adaptive histogram equalisation) on lightness: brings out local detail
    such as skin texture in flat images.

    Parameters
    ----------
    image : ndarray
        Grayscale or BGR; uint8, uint16 or float32 in [0, 1].
    clip_limit : float
        Bounds the amplification of each tile's histogram (OpenCV's clipLimit).
    tile_grid : int
        Number of tiles per side.

    Returns
    -------
    ndarray
        The equalised image, same shape and dtype.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> faint = (128 + rng.normal(0, 2, (64, 64))).astype(np.uint8)
    >>> bool(enhance_texture(faint, clip_limit=2.0, tile_grid=4).std() > faint.std())
    True
    """
    unit, restore = to_unit_float(image)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))

    def equalise(lightness):
        return clahe.apply(np.round(lightness * 65535).astype(np.uint16)).astype(np.float32) / 65535.0

    return restore(_on_lightness(unit, equalise))


@repair(order=50, escalated="amount", amount=Bounded(float, 0.01, 20), radius=Bounded(float, 0.1, 20))
def sharpen(image: np.ndarray, amount: float, radius: float) -> np.ndarray:
    """Unsharp mask on lightness: L + amount * (L - gaussian_blur(L, radius)).

    Parameters
    ----------
    image : ndarray
        Grayscale or BGR; uint8, uint16 or float32 in [0, 1].
    amount : float
        Gain of the detail added back.
    radius : float
        Sigma of the Gaussian blur in pixels: the size of the detail boosted.

    Returns
    -------
    ndarray
        The sharpened image, same shape and dtype.

    Examples
    --------
    >>> edge = np.zeros((32, 32), np.uint8)
    >>> edge[:, 16:] = 200
    >>> edge = cv2.GaussianBlur(edge, (0, 0), 2)
    >>> crisp = sharpen(edge, amount=1.0, radius=2.0)
    >>> bool(np.abs(np.diff(crisp.astype(int))).max() > np.abs(np.diff(edge.astype(int))).max())
    True
    """
    unit, restore = to_unit_float(image)

    def unsharp(lightness):
        blurred = cv2.GaussianBlur(lightness, (0, 0), float(radius))
        return lightness + float(amount) * (lightness - blurred)

    return restore(_on_lightness(unit, unsharp))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Scale the shorter side to `size` and centre-crop the longer one: a size x size image.

    Examples
    --------
    >>> resize_square(np.zeros((300, 200, 3), np.uint8), 100).shape
    (100, 100, 3)
    """
    validate_image(image)
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    result = resized[top : top + size, left : left + size]
    # cubic interpolation overshoots; OpenCV saturates integer results itself, floats need clipping
    return np.clip(result, 0, 1) if image.dtype == np.float32 else result


def encode_image(bgr: np.ndarray, suffix: str, jpeg_quality: int) -> bytes:
    """Encode in the format of a file suffix where OpenCV can write it, else as PNG (lossless)."""
    suffix = suffix.lower() if suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp") else ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if suffix in (".jpg", ".jpeg") else []
    ok, buffer = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise RuntimeError(f"cannot encode image as {suffix}")
    return buffer.tobytes()


# --------------------------------------------------------------------------------------------------
# Face-safe augmentations (for up-sampling): mirror images, small rotations and crops, tone jitter,
# mild blur or noise. Never vertical flips or large rotations: faces are upright.
# --------------------------------------------------------------------------------------------------
def flip_horizontal(image: np.ndarray) -> np.ndarray:
    validate_image(image)
    return np.ascontiguousarray(image[:, ::-1])


def rotate_scale_shift(image: np.ndarray, degrees: float, scale: float, shift_x: float, shift_y: float) -> np.ndarray:
    """Rotate about the centre by `degrees`, zoom by `scale` (>1 crops in), and shift by fractions of
    the width and height; borders are filled by reflection, so no black corners appear."""
    validate_image(image)
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(degrees), float(scale))
    matrix[:, 2] += (float(shift_x) * w, float(shift_y) * h)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def jitter_tone(image: np.ndarray, brightness: float, contrast: float, gamma: float) -> np.ndarray:
    """out = ((in ** gamma - mean) * contrast + mean + brightness), in unit range; brightness in [-1, 1]."""
    unit, restore = to_unit_float(image)
    toned = np.power(unit, float(gamma))
    mean = float(toned.mean())
    return restore((toned - mean) * float(contrast) + mean + float(brightness))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    validate_image(image)
    return cv2.GaussianBlur(image, (0, 0), float(sigma)) if sigma > 0 else image.copy()


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of `sigma` 8-bit grey levels."""
    unit, restore = to_unit_float(image)
    return restore(unit + rng.normal(0.0, float(sigma) / 255.0, unit.shape).astype(np.float32))


def random_augmentation(
    image: np.ndarray, rng: np.random.Generator, ranges: ResamplingAugmentation
) -> tuple[np.ndarray, str]:
    """One random face-safe variant of `image` drawn from `rng` within `ranges` (the `augmentation`
    section of configs/resampling.yaml), and a description of what was applied."""
    steps = []
    if rng.random() < ranges.flip_probability:
        image = flip_horizontal(image)
        steps.append("flip")
    degrees = rng.uniform(-1, 1) * ranges.max_rotation_degrees
    scale = 1 + rng.uniform(-1, 1) * ranges.max_scale_change
    shift_x, shift_y = rng.uniform(-1, 1, 2) * ranges.max_shift_fraction
    image = rotate_scale_shift(image, degrees, scale, shift_x, shift_y)
    steps.append(f"rotate({degrees:+.1f}deg, scale {scale:.2f}, shift {shift_x:+.2f},{shift_y:+.2f})")
    brightness = rng.uniform(-1, 1) * ranges.max_brightness_shift
    contrast = 1 + rng.uniform(-1, 1) * ranges.max_contrast_change
    gamma = 1 + rng.uniform(-1, 1) * ranges.max_gamma_change
    image = jitter_tone(image, brightness, contrast, gamma)
    steps.append(f"tone(brightness {brightness:+.2f}, contrast {contrast:.2f}, gamma {gamma:.2f})")
    if rng.random() < ranges.blur_probability:
        sigma = rng.uniform(0, ranges.max_blur_sigma)
        image = gaussian_blur(image, sigma)
        steps.append(f"blur({sigma:.2f})")
    elif rng.random() < ranges.noise_probability:
        sigma = rng.uniform(0, ranges.max_noise_sigma)
        image = add_noise(image, sigma, rng)
        steps.append(f"noise({sigma:.1f})")
    return image, "; ".join(steps)
