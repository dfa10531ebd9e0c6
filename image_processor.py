"""Image operations: repairs for the processing stage and face-safe augmentations for resampling.

Every function takes an image array, grayscale (H, W) or BGR (H, W, 3), of dtype uint8, uint16 or
float32 (range 0-1), and returns a new array of the same shape, dtype and range; the input is never
modified. Operations that change lightness leave colour alone: exposure scales the three channels of a
pixel by one common factor (hue and saturation unchanged), and contrast, texture and sharpening act on
the lightness channel of CIELAB only.
"""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

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
    """The image as float32 in [0, 1], and the function that turns a result back into the input's dtype."""
    validate_image(image)
    scale = _INTEGER_MAX.get(image.dtype, 1.0)
    dtype = image.dtype

    def restore(result: np.ndarray) -> np.ndarray:
        result = np.clip(result, 0.0, 1.0)
        if dtype == np.float32:
            return result.astype(np.float32)
        return np.round(result * scale).astype(dtype)

    return image.astype(np.float32) / scale, restore


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
# Repairs
# --------------------------------------------------------------------------------------------------
def denoise(image: np.ndarray, noise_sigma: float, strength: float, template_window: int, search_window: int) -> np.ndarray:
    """Non-local means denoising with filter strength h = `strength` x the measured noise sigma.

    Parameters
    ----------
    noise_sigma : noise standard deviation in 8-bit grey levels (the exploration `noise` metric).
    strength : multiple of the noise level used as NLM's h; ~1 removes noise of that level, higher
        values smooth more (and start to remove skin texture).
    template_window, search_window : sizes (odd, pixels) of the patches compared and of the area
        searched for similar patches; the cost grows with the square of search_window.
    Non-local means works on 8-bit data, so 16-bit and float images are denoised at 8-bit precision.
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


def adjust_exposure(image: np.ndarray, target_brightness: float) -> np.ndarray:
    """Gamma-correct lightness so the mean grey level becomes `target_brightness` (0-255 scale).

    Each pixel's three channels are multiplied by the same factor (new luma / old luma), so hue and
    saturation are kept; only pixels pushed past white are clipped. Gamma < 1 brightens, > 1 darkens.
    """
    unit, restore = to_unit_float(image)
    gray = luminance(unit)
    gamma = exposure_gamma(gray, float(target_brightness) / 255.0)
    ratio = np.power(np.maximum(gray, 1e-4), gamma) / np.maximum(gray, 1e-4)
    return restore(unit * (ratio if unit.ndim == 2 else ratio[..., None]))


def stretch_contrast(image: np.ndarray, target_contrast: float) -> np.ndarray:
    """Linearly stretch lightness about its mean so the grey-level standard deviation becomes
    `target_contrast` (0-255 scale); never reduces contrast."""
    unit, restore = to_unit_float(image)
    std = float(luminance(unit).std()) * 255.0
    gain = max(1.0, float(target_contrast) / max(std, 1e-3))

    def stretch(lightness):
        mean = float(lightness.mean())
        return mean + (lightness - mean) * gain

    return restore(_on_lightness(unit, stretch))


def enhance_texture(image: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """CLAHE (contrast-limited adaptive histogram equalisation) on lightness: brings out local detail
    such as skin texture in flat images. `clip_limit` bounds the amplification, `tile_grid` is the
    number of tiles per side."""
    unit, restore = to_unit_float(image)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))

    def equalise(lightness):
        return clahe.apply(np.round(lightness * 65535).astype(np.uint16)).astype(np.float32) / 65535.0

    return restore(_on_lightness(unit, equalise))


def sharpen(image: np.ndarray, amount: float, radius: float) -> np.ndarray:
    """Unsharp mask on lightness: L + amount * (L - gaussian_blur(L, radius)).

    `radius` is the blur's sigma in pixels (the size of the detail boosted); `amount` its gain.
    """
    unit, restore = to_unit_float(image)

    def unsharp(lightness):
        blurred = cv2.GaussianBlur(lightness, (0, 0), float(radius))
        return lightness + float(amount) * (lightness - blurred)

    return restore(_on_lightness(unit, unsharp))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Scale the shorter side to `size` and centre-crop the longer one: a size x size image."""
    validate_image(image)
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    result = resized[top:top + size, left:left + size]
    # cubic interpolation overshoots; OpenCV saturates integer results itself, floats need clipping
    return np.clip(result, 0, 1) if image.dtype == np.float32 else result


# The repair operations the processing config may name, and the parameter a retry strengthens.
REPAIRS: dict[str, Callable] = {
    "denoise": denoise,
    "adjust_exposure": adjust_exposure,
    "stretch_contrast": stretch_contrast,
    "enhance_texture": enhance_texture,
    "sharpen": sharpen,
}
# Sound order: noise first (sharpening and contrast gains amplify it), then exposure (it sets the
# range texture works in), then contrast and texture, and sharpening last.
REPAIR_ORDER = ["denoise", "adjust_exposure", "stretch_contrast", "enhance_texture", "sharpen"]
ESCALATED_PARAMETER = {
    "denoise": "strength",
    "stretch_contrast": "target_contrast",
    "enhance_texture": "clip_limit",
    "sharpen": "amount",
}
