"""A fuzzer for the pipeline's inputs: writes N hostile files made from a few real images.

    python tests/fuzz_images.py SEED_FOLDER OUT_FOLDER [N]

Mutations, cycled: truncations (also cut short with an end marker appended), bit flips, random bytes,
empty files, a header declaring a huge image (decompression bomb), a header quoting a secret, a bad
CRC, EXIF orientations (and an impossible one), extreme aspect ratios, 16-bit, float, CMYK, palette, RGBA, grayscale and
animated images, FIFOs, symbolic links (to a face, to /dev/zero, dangling, a loop), and odd names
(spaces, Unicode, newlines, a leading dash, 200+ characters, a name that is only dots). Seeded: the
same arguments write the same files.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with a valid CRC and almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def pillow_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation
    return pillow_bytes(image, "JPEG", exif=exif.tobytes())


def mutations(face: np.ndarray, jpeg: bytes, rng: np.random.Generator):
    """(suffix, bytes or a special marker) for each kind of hostile content."""
    rgb = Image.fromarray(face[..., ::-1])
    flipped = bytearray(jpeg)
    for position in rng.integers(20, len(flipped), 8):
        flipped[position] ^= 1 << int(rng.integers(0, 8))
    yield ".jpg", jpeg[: int(rng.integers(10, len(jpeg) - 10))]
    yield ".jpg", bytes(flipped)
    yield ".jpg", rng.bytes(int(rng.integers(1, 4000)))
    yield ".jpg", b""
    yield ".png", png_bomb(100_000, 100_000)
    yield ".png", cv2.imencode(".png", np.full((1, 5000, 3), 100, np.uint8))[1].tobytes()
    yield ".png", cv2.imencode(".png", (face.astype(np.uint16) * 257))[1].tobytes()
    yield ".tif", cv2.imencode(".tiff", face.astype(np.float32) / 255)[1].tobytes()
    yield ".jpg", pillow_bytes(rgb.convert("CMYK"), "JPEG")
    yield ".png", pillow_bytes(rgb.convert("P"), "PNG")
    yield ".png", pillow_bytes(rgb.convert("RGBA"), "PNG")
    yield ".bmp", pillow_bytes(rgb.convert("L"), "BMP")
    yield ".webp", pillow_bytes(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(10)], duration=100)
    yield ".jpg", jpeg  # an intact face under an odd name
    yield ".jpg", jpeg[: int(len(jpeg) * rng.uniform(0.6, 0.95))] + b"\xff\xd9"  # cut short, an end marker appended
    yield ".jpg", b"P6 SECRETPASSWORD 640 480\n255\n" + rng.bytes(64)  # a header that quotes its own bytes in errors
    yield (
        ".jpg",
        with_orientation(rgb, int(rng.choice([3, 6, 8, 99]))),
    )  # a phone photo turned by EXIF (99: no such turn)
    yield (
        ".png",
        png_bomb(64, 64)[:20] + bytes([png_bomb(64, 64)[20] ^ 0xFF]) + png_bomb(64, 64)[21:],
    )  # a header with a bad CRC
    yield ".jpg", "fifo"
    yield ".jpg", "link_to_face"
    yield ".jpg", "link_to_dev_zero"
    yield ".jpg", "dangling_link"
    yield ".jpg", "link_loop"


ODD_NAMES = ["with space", "ünïcödé_名前", "new\nline", "-leading-dash", "x" * 200, "tab\tand\rreturn"]


def write_fuzz(seed_folder: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` hostile files into `out` (created); return their paths."""
    rng = np.random.default_rng(seed)
    seeds = sorted(p for p in Path(seed_folder).iterdir() if p.suffix.lower() == ".jpg" and p.stat().st_size > 0)
    faces = [(f, cv2.imread(str(f))) for f in seeds[:10]]
    faces = [(f, image) for f, image in faces if image is not None]
    out.mkdir(parents=True)
    written = []
    while len(written) < count:
        source, face = faces[len(written) % len(faces)]
        jpeg = source.read_bytes()
        for suffix, content in mutations(face, jpeg, rng):
            if len(written) >= count:
                break
            index = len(written)
            age = int(rng.integers(-5, 130)) if index % 7 == 0 else int(rng.integers(1, 90))
            odd = f"{ODD_NAMES[index % len(ODD_NAMES)]}_{index}" if index % 3 == 0 else f"{index:05d}"
            name = f"{age}_{index % 2}_{index % 5}_{odd}{suffix}"
            if index % 11 == 0:
                name = "." + name  # hidden
            path = out / name
            if content == "fifo":
                os.mkfifo(path)
            elif content == "link_to_face":
                path.symlink_to(source.resolve())
            elif content == "link_to_dev_zero":
                path.symlink_to("/dev/zero")
            elif content == "dangling_link":
                path.symlink_to(out / "does-not-exist.jpg")
            elif content == "link_loop":
                path.symlink_to(path)
            else:
                path.write_bytes(content)
            written.append(path)
    return written


if __name__ == "__main__":
    files = write_fuzz(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1000)
    print(f"wrote {len(files)} hostile files to {sys.argv[2]}")
