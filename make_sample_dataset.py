"""Generate the built-in sample dataset: synthetic faces with UTKFace-style names and planted defects.

No public face images may be shipped with the project, so the pipeline's demo and tests run on faces
drawn here: a head, skin, hair, eyes, brows, nose and mouth, with the cues a classifier can learn age
from (children's rounder heads with low-set, large eyes; wrinkles, skin texture and greying, receding
hair with age). A known share of the images gets exactly one known defect (blur, sensor noise, under- or
over-exposure, low resolution, low contrast), and a few broken files are added (empty, truncated JPEG,
text with an image extension, no age in the name, an exact duplicate, a near duplicate with another
age). `manifest.csv` beside the images records what was planted where: the tests' oracle.

Everything is drawn from one seeded generator, so the same config gives byte-identical files.

    python make_sample_dataset.py [--config configs/make_sample_dataset.yaml] [--set num_images=100]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from agepipe.config.data_stages import Defects, SampleConfig
from agepipe.config.loading import load_config
from agepipe.errors import UserError
from agepipe.running.output_guard import OutputGuard
from utils import run_script, setup_logging

log = logging.getLogger("agepipe.sample")

DEFECTS = ["blur", "noise", "dark", "bright", "low_resolution", "low_contrast"]


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------
def _ellipse(canvas, centre, axes, colour, angle=0.0, start=0, end=360, thickness=-1):
    cv2.ellipse(
        canvas,
        (int(round(centre[0])), int(round(centre[1]))),
        (max(1, int(round(axes[0]))), max(1, int(round(axes[1])))),
        angle,
        start,
        end,
        tuple(int(c) for c in colour),
        thickness,
        cv2.LINE_AA,
    )


def _polyline(canvas, points, colour, thickness):
    pts = np.round(np.asarray(points)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, tuple(int(c) for c in colour), max(1, int(round(thickness))), cv2.LINE_AA)


def _mix(a, b, t):
    return np.asarray(a, float) * (1 - t) + np.asarray(b, float) * t


@dataclass
class Head:
    """Where the parts of one drawn face go, on a canvas of side `s` (twice the image's size)."""

    s: int
    age: int
    female: bool
    child: float  # 1 for a baby, 0 from 16: large round cranium, big low eyes
    old: float  # 0 until 30, 1 at 85: wrinkles, texture, grey
    skin: np.ndarray
    hair: np.ndarray
    cx: float
    cy: float
    head_w: float
    head_h: float


def draw_face(
    rng: np.random.Generator, age: int, female: bool, skin_rgb, hair_rgb, size: int, pose: dict
) -> np.ndarray:
    """Draw one face as a BGR uint8 image of `size` x `size` pixels.

    Proportions follow the facial-growth cues used by age-estimation research: in children the
    cranium is large and round and the eyes sit near the middle of the head, low and big; the face
    lengthens through adolescence; from the thirties wrinkles, skin texture and grey hair appear.
    """
    s = size * 2  # draw at double size, then shrink: cheap anti-aliasing
    child = float(np.clip((16 - age) / 15, 0, 1))
    old = float(np.clip((age - 30) / 55, 0, 1))
    grey = float(np.clip((age - 38) / 35, 0, 1)) * rng.uniform(0.6, 1.0)
    skin = np.clip(np.asarray(skin_rgb, float)[::-1] * rng.uniform(0.92, 1.08), 0, 255)
    hair = _mix(np.asarray(hair_rgb, float)[::-1], (200, 200, 205), grey) * rng.uniform(0.85, 1.1)
    background = rng.uniform(60, 200, 3)
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:] = background * np.linspace(0.85, 1.15, s, dtype=np.float32)[:, None, None]
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    cx = s / 2 + rng.normal(0, s * 0.015)
    head_w = s * rng.uniform(0.30, 0.33) * (1 + 0.08 * child)
    head_h = head_w * (1.12 + 0.22 * (1 - child)) * rng.uniform(0.97, 1.03)
    head = Head(s, age, female, child, old, skin, hair, cx, s * 0.53, head_w, head_h)
    _draw_head_and_hair(canvas, head, rng)
    canvas, eye_y, eye_ry = _draw_eyes(canvas, head, _mix(hair * 0.6, (170, 170, 175), grey * 0.8), rng)
    _draw_nose_mouth_and_beard(canvas, head, eye_y, eye_ry, rng)
    return _skin_light_and_pose(canvas, head, size, pose, rng)


def _draw_head_and_hair(canvas: np.ndarray, head: Head, rng: np.random.Generator) -> None:
    """Neck and shoulders, hair behind the head, ears, the head, forehead lines and the hairline."""
    s, cx, cy, head_w, head_h, skin, hair = head.s, head.cx, head.cy, head.head_w, head.head_h, head.skin, head.hair
    _ellipse(canvas, (cx, s * 1.05), (s * 0.42, s * 0.22), skin * 0.55 + rng.uniform(20, 80, 3) * 0.45)
    _ellipse(canvas, (cx, cy + head_h * 0.85), (head_w * 0.45, head_h * 0.5), skin * 0.82)
    long_hair = head.female and rng.random() < 0.8
    bald = (not head.female) and rng.random() < 0.7 * head.old
    if long_hair:
        _ellipse(canvas, (cx, cy + head_h * 0.25), (head_w * 1.22, head_h * 1.05), hair * 0.85)
    if not bald:
        _ellipse(canvas, (cx, cy - head_h * 0.1), (head_w * 1.08, head_h * 1.02), hair * 0.9)
    for side in (-1, 1):
        _ellipse(canvas, (cx + side * head_w * 0.97, cy + head_h * 0.02), (head_w * 0.13, head_h * 0.17), skin * 0.9)
    _ellipse(canvas, (cx, cy), (head_w, head_h), skin)
    if head.old > 0:  # forehead lines deepen with age
        forehead = cy - head_h * 0.3
        for k in range(int(1 + 4 * head.old)):
            y = forehead - k * head_h * 0.07
            _ellipse(
                canvas,
                (cx, y + head_w * 0.4),
                (head_w * 0.45, head_w * 0.4),
                _wrinkle(head),
                start=235,
                end=305,
                thickness=max(1, int(s * 0.005 * (0.5 + head.old))),
            )
    if not bald:  # fringe and hairline: recedes with age in men
        recede = 0.25 * head.old if not head.female else 0.0
        hairline = cy - head_h * (0.55 + recede - 0.05 * head.child)
        _ellipse(canvas, (cx, hairline - head_h * 0.25), (head_w * 1.02, head_h * 0.42), hair, start=180, end=360)
        _ellipse(canvas, (cx, hairline - head_h * 0.12), (head_w * 0.98, head_h * 0.2), hair)


def _wrinkle(head: Head) -> np.ndarray:
    """Wrinkles are a darker shade of the skin."""
    return head.skin * (0.62 - 0.05 * head.old)


def _draw_eyes(
    canvas: np.ndarray, head: Head, brow: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    """Shaded sockets, eyes, brows, crow's feet and under-eye bags; returns the canvas, the eyes' height
    and half-height."""
    s, cx, head_w, skin, old = head.s, head.cx, head.head_w, head.skin, head.old
    eye_y = head.cy + head.head_h * (-0.08 + 0.16 * head.child)
    eye_dx = head_w * 0.42
    eye_rx = head_w * (0.17 + 0.05 * head.child)
    eye_ry = eye_rx * (0.5 - 0.08 * old)
    iris = rng.choice([(40, 60, 90), (30, 40, 50), (120, 100, 60), (60, 110, 70)])
    sockets = np.zeros((s, s), np.float32)  # eye sockets are shaded in real faces: brow ridge above
    for side in (-1, 1):
        _ellipse(sockets, (cx + side * eye_dx, eye_y - eye_ry * 0.3), (eye_rx * 1.6, eye_ry * 2.6), (1.0,))
    sockets = cv2.GaussianBlur(sockets, (0, 0), eye_rx * 0.4)[..., None]
    canvas = (canvas * (1 - 0.22 * sockets)).astype(np.uint8)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        _ellipse(canvas, (ex, eye_y + eye_ry * 0.8), (eye_rx * 1.1, eye_ry * 0.9), skin * (0.9 - 0.08 * old))
        _ellipse(canvas, (ex, eye_y), (eye_rx, eye_ry), (235, 238, 240))
        _ellipse(canvas, (ex, eye_y), (eye_ry * 0.95, eye_ry * 0.95), iris)
        _ellipse(canvas, (ex, eye_y), (eye_ry * 0.45, eye_ry * 0.45), (15, 15, 15))
        _ellipse(canvas, (ex - eye_ry * 0.3, eye_y - eye_ry * 0.3), (eye_ry * 0.15, eye_ry * 0.15), (250, 250, 250))
        _ellipse(canvas, (ex, eye_y), (eye_rx, eye_ry), skin * 0.45, start=180, end=360, thickness=int(s * 0.008))
        brow_y = eye_y - eye_ry * (2.2 + 0.4 * head.child)
        brow_pts = [
            (ex - side * eye_rx * 1.1, brow_y + eye_ry * 0.4),
            (ex, brow_y - eye_ry * 0.2),
            (ex + side * eye_rx * 1.2, brow_y + eye_ry * 0.1),
        ]
        _polyline(canvas, brow_pts, brow, s * (0.022 - 0.008 * old) * (0.8 if head.female else 1.1))
        if old > 0:  # crow's feet and under-eye bags
            for k in range(int(2 + 3 * old)):
                a = (k - 1.5) * 0.35
                x0 = ex + side * eye_rx * 1.15
                _polyline(
                    canvas,
                    [(x0, eye_y), (x0 + side * eye_rx * 0.5 * np.cos(a), eye_y + eye_rx * 0.5 * np.sin(a))],
                    _wrinkle(head),
                    s * 0.004 * (0.5 + old),
                )
            _ellipse(
                canvas,
                (ex, eye_y + eye_ry * 1.5),
                (eye_rx * 0.8, eye_ry * 0.7),
                _wrinkle(head),
                start=20,
                end=160,
                thickness=int(s * 0.004 * (1 + 2 * old)),
            )
    return canvas, eye_y, eye_ry


def _draw_nose_mouth_and_beard(
    canvas: np.ndarray, head: Head, eye_y: float, eye_ry: float, rng: np.random.Generator
) -> None:
    """The nose, the mouth, nasolabial folds with age, and stubble on some grown men."""
    s, cx, head_w, head_h, skin, old, child = head.s, head.cx, head.head_w, head.head_h, head.skin, head.old, head.child
    nose_top = eye_y + eye_ry
    nose_len = head_h * (0.22 + 0.12 * (1 - child) + 0.05 * old)
    nose_w = head_w * (0.16 + 0.04 * old)
    nose_y = nose_top + nose_len
    _polyline(
        canvas, [(cx - nose_w * 0.2, nose_top), (cx - nose_w * 0.35, nose_y - nose_len * 0.2)], skin * 0.78, s * 0.006
    )
    _ellipse(canvas, (cx, nose_y), (nose_w, nose_w * 0.45), skin * 0.72, start=0, end=180, thickness=int(s * 0.007))
    for side in (-1, 1):
        _ellipse(canvas, (cx + side * nose_w * 0.45, nose_y), (nose_w * 0.2, nose_w * 0.13), skin * 0.35)
    mouth_y = nose_y + (head.cy + head_h - nose_y) * (0.38 - 0.05 * child)
    mouth_w = head_w * (0.42 - 0.08 * child)
    lip = _mix(skin, (90, 80, 190) if head.female else (110, 100, 170), 0.35 + 0.15 * head.female) * (0.85 - 0.1 * old)
    lip_h = mouth_w * (0.22 - 0.1 * old)
    _ellipse(canvas, (cx, mouth_y), (mouth_w, lip_h), lip)
    _polyline(
        canvas, [(cx - mouth_w, mouth_y), (cx, mouth_y + lip_h * 0.15), (cx + mouth_w, mouth_y)], skin * 0.3, s * 0.006
    )
    if old > 0:  # nasolabial folds deepen with age
        for side in (-1, 1):
            pts = [
                (cx + side * nose_w * 1.2, nose_y - nose_len * 0.2),
                (cx + side * (mouth_w + nose_w * 0.4), mouth_y + lip_h * 0.5),
                (cx + side * mouth_w * 1.05, mouth_y + head_h * 0.12),
            ]
            _polyline(canvas, pts, _wrinkle(head), s * 0.006 * (0.4 + 1.6 * old))
    if not head.female and 18 <= head.age and rng.random() < 0.35:  # stubble
        beard_mask = np.zeros((s, s), np.uint8)
        _ellipse(beard_mask, (cx, mouth_y + head_h * 0.08), (head_w * 0.75, head_h * 0.3), (255,))
        dots = (rng.random((s, s)) < 0.25) & (beard_mask > 0)
        canvas[dots] = (canvas[dots] * 0.55 + head.hair * 0.45).astype(np.uint8)


def _skin_light_and_pose(canvas: np.ndarray, head: Head, size: int, pose, rng: np.random.Generator) -> np.ndarray:
    """Skin texture growing with age, a soft side light, the rough alignment of real crops (tilt, scale,
    shift), and the shrink to `size`."""
    s = head.s
    face = canvas.astype(np.float32)
    head_mask = np.zeros((s, s), np.float32)
    _ellipse(head_mask, (head.cx, head.cy), (head.head_w, head.head_h), (1.0,))
    texture = cv2.GaussianBlur(rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), 2.0)
    face += (texture * (3 + 22 * head.old) * head_mask)[..., None]  # children's skin stays smooth
    light_x = rng.uniform(-1, 1)
    face *= (1 + 0.12 * light_x * np.linspace(-1, 1, s, dtype=np.float32)[None, :])[..., None]
    warp = cv2.getRotationMatrix2D(
        (s / 2, s / 2), rng.uniform(-1, 1) * pose.max_rotation_degrees, 1 + rng.uniform(-1, 1) * pose.max_scale_change
    )
    warp[:, 2] += rng.uniform(-1, 1, 2) * pose.max_shift_fraction * s
    face = cv2.warpAffine(np.clip(face, 0, 255), warp, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    face = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(face, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------------
def plant_defect(image: np.ndarray, defect: str, rng: np.random.Generator, settings: Defects) -> np.ndarray:
    """Degrade a clean image in one known way; `settings` holds the [low, high] strength ranges."""

    def draw(key):
        low, high = getattr(settings, key)
        return rng.uniform(low, high)

    img = image.astype(np.float32)
    if defect == "blur":
        out = cv2.GaussianBlur(img, (0, 0), draw("blur_sigma"))
    elif defect == "noise":
        out = img + rng.normal(0, draw("noise_sigma"), img.shape)
    elif defect == "dark":
        out = img * draw("dark_gain")
    elif defect == "bright":
        out = 255 - (255 - img) * draw("bright_headroom")
    elif defect == "low_resolution":
        side = int(draw("low_resolution_size"))
        out = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    elif defect == "low_contrast":
        out = (img - img.mean()) * draw("low_contrast_scale") + img.mean()
    else:
        raise ValueError(f"unknown defect {defect!r}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------
def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buffer.tobytes()


def sample_ages(rng: np.random.Generator, n: int, ages: dict) -> np.ndarray:
    """Ages from per-decade weights, so the sample is as unbalanced as real face datasets."""
    candidates = np.arange(ages.min, ages.max + 1)
    weights = np.asarray(ages.decade_weights, float)
    per_age = weights[np.minimum(candidates // 10, len(weights) - 1)]
    return rng.choice(candidates, size=n, p=per_age / per_age.sum())


def utk_name(age: int, gender: int, race: int, index: int) -> str:
    # UTKFace ends names with a capture timestamp; a fixed date plus the index keeps names unique
    return f"{age}_{gender}_{race}_20170101{index:09d}.jpg.chip.jpg"


def generate(config: SampleConfig) -> pd.DataFrame:
    """Write the sample into config.output_dir and return the manifest (one row per file)."""
    rng = np.random.default_rng(config.seed)
    rows, encoded = drawn_faces(config, rng)
    add_broken_files(rows, encoded, config, rng)
    with OutputGuard() as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        folder.begin(list(encoded) + ["manifest.csv"])
        for name, data in encoded.items():
            folder.write_bytes(name, data)
        manifest = pd.DataFrame(rows).sort_values("file").reset_index(drop=True)
        folder.write_csv("manifest.csv", manifest)
        folder.finish()
    return manifest


def drawn_faces(config: SampleConfig, rng: np.random.Generator) -> tuple[list[dict], dict[str, bytes]]:
    """The faces, a share of them with one planted defect: their manifest rows and their JPEG bytes by name."""
    n, size, quality = config.num_images, config.image_size, config.jpeg_quality
    ages = sample_ages(rng, n, config.ages)
    defect_count = int(round(n * config.defects.fraction))
    defect_of = np.array(["none"] * n, dtype=object)
    chosen = rng.choice(n, size=defect_count, replace=False)
    defect_of[chosen] = [DEFECTS[i % len(DEFECTS)] for i in range(defect_count)]

    rows, encoded = [], {}
    for i in range(n):
        gender = int(rng.integers(0, 2))
        race = int(rng.integers(0, len(config.skin_tones)))
        hair = config.hair_colours[int(rng.integers(0, len(config.hair_colours)))]
        image = draw_face(rng, int(ages[i]), bool(gender), config.skin_tones[race], hair, size, config.pose)
        image = np.clip(image + rng.normal(0, config.camera_noise_sigma, image.shape), 0, 255).astype(np.uint8)
        if defect_of[i] != "none":
            image = plant_defect(image, defect_of[i], rng, config.defects)
        name = utk_name(int(ages[i]), gender, race, i)
        encoded[name] = encode_jpeg(image, quality)
        rows.append({"file": name, "age": int(ages[i]), "defect": defect_of[i], "broken": "", "source": ""})
    return rows, encoded


def add_broken_files(
    rows: list[dict], encoded: dict[str, bytes], config: SampleConfig, rng: np.random.Generator
) -> None:
    """Add to `rows` and `encoded` the files every stage must cope with: an exact duplicate, a near
    duplicate labelled another age, an empty, a truncated and a non-image file, a face with no age."""
    n, size, quality = config.num_images, config.image_size, config.jpeg_quality
    clean = [r for r in rows if r["defect"] == "none"]
    original, twin = clean[0], clean[1]

    def add(name, data, age, broken, source=""):
        encoded[name] = data
        rows.append({"file": name, "age": age, "defect": "none", "broken": broken, "source": source})

    add(
        utk_name(original["age"], 0, 0, n + 1),
        encoded[original["file"]],
        original["age"],
        "exact_duplicate",
        original["file"],
    )
    shifted = cv2.imdecode(np.frombuffer(encoded[twin["file"]], np.uint8), cv2.IMREAD_COLOR)
    shifted = cv2.add(shifted, np.full_like(shifted, config.near_duplicate_brightness_shift))
    other_age = (twin["age"] + 30) % config.ages.max + 1
    add(
        utk_name(other_age, 0, 0, n + 2),
        encode_jpeg(shifted, quality - 5),
        other_age,
        "near_duplicate_other_age",
        twin["file"],
    )
    add(utk_name(30, 0, 0, n + 3), b"", 30, "empty")
    truncated = encoded[clean[2]["file"]]
    add(utk_name(clean[2]["age"], 0, 0, n + 4), truncated[: len(truncated) // 2], clean[2]["age"], "truncated")
    add(utk_name(40, 1, 0, n + 5), b"this is a text file, not a JPEG image\n", 40, "not_an_image")
    unnamed = draw_face(rng, 35, False, config.skin_tones[0], config.hair_colours[0], size, config.pose)
    add("portrait_without_age.jpg", encode_jpeg(unnamed, quality), None, "no_age_in_name")


def main(args):
    config = load_config(SampleConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    if config.ages.min >= config.ages.max:
        raise UserError(f"{args.config}: ages: expected min < max")
    start = time.perf_counter()
    manifest = generate(config)
    counts = manifest["defect"].value_counts().to_dict()
    broken = int((manifest["broken"] != "").sum())
    print(
        f"wrote {len(manifest)} files to {config.output_dir}/ in {time.perf_counter() - start:.1f}s: "
        f"{counts.get('none', 0)} clean faces, "
        + ", ".join(f"{counts.get(d, 0)} {d}" for d in DEFECTS)
        + f", {broken} broken or duplicate files; manifest: {config.output_dir}/manifest.csv"
    )


if __name__ == "__main__":
    run_script(
        main,
        "Generate the synthetic sample dataset.",
        "make_sample_dataset.yaml",
        SampleConfig,
        [
            "python make_sample_dataset.py",
            "python make_sample_dataset.py --set num_images=100 --set output_dir=/tmp/small_sample",
        ],
    )
