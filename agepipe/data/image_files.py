"""Reading one image file safely: the guards every stage runs before decoding, and the decoding.

`read_image` refuses what is not a regular file, what is too large, a decompression bomb or an
absurd aspect ratio before any pixel memory is allocated, and names the reason in one line
(`UnreadableImage`), which the stages write into their CSV rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import stat
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

# What counts as an image file, any case: each gets a row, those no decoder here reads (HEIF/AVIF: a
# phone's photos) with the reason
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".heic", ".heif", ".avif"}
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class UnreadableImage(Exception):
    """The file cannot be used as an image. The message is the reason written to the CSV; `info`
    holds what was learnt before the problem (size, hash, header fields)."""

    def __init__(self, reason: str, info: dict | None = None):
        super().__init__(reason)
        self.info = info or {}


@dataclass(frozen=True)
class FileLimits:
    """What any stage reads of an image file at most (the common `file_limits` section): larger files
    are not read, images whose header claims more pixels are not decoded."""

    max_pixels: int
    max_file_bytes: int

    @classmethod
    def from_config(cls, section) -> "FileLimits":
        return cls(section.max_pixels, int(section.max_file_mb * 1e6))


def bit_depth(image_format: str, mode: str, data: bytes) -> int:
    """Bits per channel. Pillow shows 16-bit colour PNGs as 8-bit "RGB", so PNGs are asked directly."""
    if image_format == "PNG" and len(data) > 24:
        return data[24]  # the bit-depth byte of the IHDR chunk, which must come first
    return 16 if mode.startswith("I;16") else 32 if mode in ("I", "F") else 1 if mode == "1" else 8


def content_digest(data: bytes) -> str:
    """The `content_hash` of a file's bytes: exact duplicates share it, and caches are keyed by it."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@contextlib.contextmanager
def pillow_size_check_off():
    """Let Pillow read a huge image's header (only the header: file_limits.max_pixels, checked right after,
    decides), and restore Pillow's own guard for every other caller afterwards."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(
    path: str, max_pixels: int, max_file_bytes: int, max_aspect_ratio: float = math.inf
) -> tuple[np.ndarray, dict]:
    """Decode an image file to 8-bit BGR and describe it, or raise UnreadableImage with the reason.

    Guards come before any decoding: only regular files are opened (a FIFO or a link to a device would
    be read forever), the file size is capped, and the header is read first (Pillow, no decoding) so
    that a decompression bomb or an extreme aspect ratio (30000x1 pixels would be scaled to 6 million
    pixels a side for analysis) is refused before any pixel memory is allocated. Decoding itself uses
    OpenCV (libjpeg-turbo), the fastest decoder here. Grayscale, alpha, palette, 16-bit and CMYK images
    are all converted to 8-bit BGR; the original mode, channel count and bit depth are reported. An
    image with transparency is judged as a viewer shows it, over white: what its alpha hides is not seen.
    """
    check_name(path)
    data = file_bytes(path, max_file_bytes)
    info = {"file_size": len(data), "content_hash": content_digest(data)}
    if not data:
        raise UnreadableImage("empty file (0 bytes)", info)
    orientation, transparent = read_header(data, info)
    check_dimensions(info, max_pixels, max_aspect_ratio)
    if info["format"] == "JPEG":
        bgr = decode_jpeg(data, orientation, info)
    elif transparent:
        bgr = composited_on_white(data)
    else:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies an EXIF orientation itself
    if bgr is None or bgr.size == 0:
        raise UnreadableImage(f"{info['format']} data could not be decoded (corrupt file)", info)
    return bgr, info


def check_name(path: str) -> None:
    """Refuse a file name that later stages could not open from a UTF-8 CSV line."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # readable here, but its name cannot be written to a UTF-8 CSV for later stages to open
        raise UnreadableImage("file name is not valid UTF-8; rename the file") from None
    if CONTROL_CHARACTERS.search(path):
        raise UnreadableImage("file name holds control characters (newline, tab...); rename the file")


def file_bytes(path: str, max_file_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_file_bytes`, read once (never a FIFO, device or socket)."""
    try:
        status = os.stat(path)
        if stat.S_ISDIR(status.st_mode):
            raise UnreadableImage("a folder that cannot be listed: the files in it cannot be seen")
        if not stat.S_ISREG(status.st_mode):
            raise UnreadableImage("not a regular file (a FIFO, device or socket, or a link to one)")
        if status.st_size > max_file_bytes:
            raise UnreadableImage(
                f"file is {status.st_size / 1e6:.0f} MB, over file_limits.max_file_mb", {"file_size": status.st_size}
            )
        with open(path, "rb") as f:
            data = f.read(max_file_bytes + 1)  # the file may have grown since
    except OSError as exc:
        raise UnreadableImage(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > max_file_bytes:
        raise UnreadableImage("file grew over file_limits.max_file_mb while being read", {"file_size": len(data)})
    return data


def read_header(data: bytes, info: dict) -> tuple[int, bool]:
    """Fill `info` with what the header says (format, mode, size as shown, channels, bit depth), decoding
    no pixel; return the EXIF orientation (1: as stored) and whether the image has transparency."""
    try:
        with pillow_size_check_off(), Image.open(io.BytesIO(data)) as header:
            mode = header.mode
            info.update(format=header.format, color_mode=mode, width=header.size[0], height=header.size[1])
            info["channels"] = len(header.getbands())
            orientation = header.getexif().get(EXIF_ORIENTATION, 1) if header.format == "JPEG" else 1
            transparent = header.has_transparency_data
    except UnidentifiedImageError:
        if data[4:8] == b"ftyp":  # the ISO media container HEIC and AVIF photos come in
            raise UnreadableImage("a HEIF/AVIF photo, which cannot be decoded here: convert it to JPEG", info) from None
        raise UnreadableImage("not an image: content is not a known image format", info) from None
    except Exception as exc:  # Pillow raises many types on corrupt headers; their text may quote the file's bytes
        raise UnreadableImage(f"corrupt image header ({type(exc).__name__})", info) from None
    info["bit_depth"] = bit_depth(info["format"], mode, data)
    if orientation in TRANSPOSED:  # the size as the image is shown: turned a quarter by its EXIF orientation
        info["width"], info["height"] = info["height"], info["width"]
    info["min_side"] = min(info["width"], info["height"])
    return orientation, transparent


def composited_on_white(data: bytes) -> np.ndarray:
    """An image with an alpha channel or a transparent colour, as shown over white, in 8-bit BGR."""
    with pillow_size_check_off(), Image.open(io.BytesIO(data)) as image:
        rgba = np.asarray(ImageOps.exif_transpose(image).convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255
    shown = rgba[..., :3] * alpha + 255 * (1 - alpha)
    return np.ascontiguousarray(np.rint(shown[..., ::-1]).astype(np.uint8))


def check_dimensions(info: dict, max_pixels: int, max_aspect_ratio: float) -> None:
    """Refuse, before decoding, an image of no pixels, of more than `max_pixels` (a decompression bomb) or
    more elongated than `max_aspect_ratio`."""
    width, height = info["width"], info["height"]
    if width == 0 or height == 0:
        raise UnreadableImage(f"zero-pixel image ({width}x{height})", info)
    if width * height > max_pixels:
        raise UnreadableImage(
            f"refused: {width}x{height} pixels is over file_limits.max_pixels (decompression bomb guard)", info
        )
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise UnreadableImage(f"refused: {width}x{height} pixels is more elongated than images.max_aspect_ratio", info)


EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # orientations that turn the stored image a quarter
# The EXIF orientation's turns and flips, as OpenCV operations applied in order.
ORIENTATION_STEPS = {
    2: [("flip", 1)],
    3: [("rotate", cv2.ROTATE_180)],
    4: [("flip", 0)],
    5: [("rotate", cv2.ROTATE_90_CLOCKWISE), ("flip", 1)],
    6: [("rotate", cv2.ROTATE_90_CLOCKWISE)],
    7: [("rotate", cv2.ROTATE_90_COUNTERCLOCKWISE), ("flip", 1)],
    8: [("rotate", cv2.ROTATE_90_COUNTERCLOCKWISE)],
}


def oriented(bgr: np.ndarray, orientation: int) -> np.ndarray:
    """The image as it is meant to be shown, by its EXIF orientation tag (1: as stored).

    Examples
    --------
    >>> stored = np.arange(6, dtype=np.uint8).reshape(2, 3)
    >>> oriented(stored, 6).tolist()  # stored on its side: shown turned a quarter clockwise
    [[3, 0], [4, 1], [5, 2]]
    """
    for operation, code in ORIENTATION_STEPS.get(orientation, []):
        bgr = cv2.rotate(bgr, code) if operation == "rotate" else cv2.flip(bgr, code)
    return bgr


def decode_jpeg(data: bytes, orientation: int, info: dict) -> np.ndarray | None:
    """Decode a JPEG strictly, as shown (EXIF orientation applied). libjpeg fills what a damaged or
    truncated file lacks with grey and only warns, even when an end marker was appended to the cut:
    here its warnings make the file unreadable, with libjpeg's own words (which never quote the data)."""
    if b"\xff\xd9" not in data[-1024:]:  # the quick tell, before any decoding
        raise UnreadableImage("truncated JPEG: no end-of-image marker", info)
    try:
        bgr = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "corrupt" in message.lower() or "premature" in message.lower():
            raise UnreadableImage(f"corrupt or truncated JPEG data ({message[:120]})", info) from None
        # a JPEG kind libjpeg-turbo's fast interface does not read (arithmetic coding, 12-bit): OpenCV's own
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return oriented(bgr, orientation)
