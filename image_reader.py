"""Find, label, measure and check the images of a face dataset.

Three steps, each usable on its own:

- `load_dataset` finds every image file under a folder and reads its age label (from UTKFace file names
  `age_gender_race_date.jpg[.chip.jpg]`, or from a labels CSV), one row per file, unlabelled ones too.
- `compute_images_quality_metrics` decodes each image once, in parallel, and measures it. Every metric is
  one small function registered with `@metric`, with its parameters' schema beside it; the YAML file
  lists the metrics to compute and their parameters. Files that cannot be read get a row with the error.
- `check_images_quality` applies named threshold rules (`checks` in the YAML) and the duplicate search,
  adding a boolean `flag_<check>` column per check, the list of failed checks and a status per file.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pandas as pd
from pydantic import create_model
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from face_analysis import FACE_COLUMNS, DetectorSettings, FaceDetector, face_geometry, detector_model_path
from image_io import CONTROL_CHARACTERS, UnreadableImage, read_image
from config_models import AgeRange, Bounded, CheckRule, Duplicates, ExploreConfig, Labels, Section
from utils import AgeGroups, ConfigError, Journal, UserError, load_config, parallel_map, progress_bar, validate_section

log = logging.getLogger("agepipe.reader")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# UTKFace: age_gender_race_date.jpg[.chip.jpg]; gender and race may be missing in the wild.
UTKFACE_NAME = re.compile(r"^(?P<age>\d+)_(?:(?P<gender>\d)_)?(?:(?P<race>\d)_)?")
FLOAT_DECIMALS = 4  # metric values are rounded so the CSV is readable and diffs are meaningful


class Status(StrEnum):
    """What exploration says of a file (its `status` column); the first problem found wins."""

    OK = "ok"
    LOW_QUALITY = "low_quality"  # fails at least one check
    UNLABELLED = "unlabelled"  # no usable age
    UNREADABLE = "unreadable"  # not a decodable image; `reason` says why


class Check(StrEnum):
    """The checks computed in code rather than configured as thresholds in `checks:`."""

    DUPLICATE = "duplicate"  # a copy (exact or near) of an earlier file
    AGE_CONFLICT = "age_conflict"  # in a duplicate group whose ages disagree


def flag_column(check: str) -> str:
    """The boolean column saying whether a file fails `check`."""
    return f"flag_{check}"


def score_column(check: str) -> str:
    """The numeric column of a threshold check's margin: negative when failed, lowest is worst."""
    return f"score_{check}"


# --------------------------------------------------------------------------------------------------
# Finding and labelling files
# --------------------------------------------------------------------------------------------------
def find_image_files(dataset_dir: Path) -> list[tuple[str, str]]:
    """(relative posix path, real path) of every image file below `dataset_dir`, sorted.

    Extensions are matched case-insensitively, and `x.jpg.chip.jpg` counts by its last suffix. Hidden
    files and folders count like any other. A folder that cannot be listed is returned too (its
    relative path ends with "/"), so that it gets a row saying why its files are missing.
    """
    found = []
    unlisted = []

    def record_unlisted(error: OSError) -> None:
        if error.filename and os.path.abspath(error.filename) != os.path.abspath(dataset_dir):
            unlisted.append(error.filename)

    for root, dirs, files in os.walk(dataset_dir, onerror=record_unlisted):
        dirs.sort()
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                real = os.path.join(root, name)
                found.append((display_name(os.path.relpath(real, dataset_dir)), real))
    found += [(display_name(os.path.relpath(folder, dataset_dir)) + "/", folder) for folder in unlisted]
    return sorted(found)


def display_name(path: str) -> str:
    r"""A file name that can go into a UTF-8 CSV: undecodable bytes become \xNN escapes, and control
    characters (newlines, tabs...) their backslash escapes, so that one file is always one CSV line.

    Examples
    --------
    >>> display_name("a\nb.jpg")
    'a\\nb.jpg'
    """
    name = os.fsencode(path).decode("utf-8", "backslashreplace").replace(os.sep, "/")
    return CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode(), name)


def parse_utkface_name(name: str) -> dict:
    """Age, gender and race from a UTKFace-style file name; age is None when the name has none.

    Examples
    --------
    >>> parse_utkface_name("25_1_3_20170116174525125.jpg.chip.jpg")
    {'age': 25, 'gender': 1, 'race': 3}
    """
    match = UTKFACE_NAME.match(Path(name).name)
    if not match:
        return {"age": None, "gender": None, "race": None}
    to_int = lambda v: None if v is None else int(v)  # noqa: E731
    return {"age": int(match["age"]), "gender": to_int(match["gender"]), "race": to_int(match["race"])}


def read_labels_csv(path: Path, file_column: str, age_column: str) -> dict[str, object]:
    """Map relative file path -> age (or an error string) from a labels CSV."""
    try:
        labels = pd.read_csv(path, dtype={file_column: str}, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"labels CSV {path} not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"labels CSV {path} cannot be read: {exc}") from None
    for column in (file_column, age_column):
        if column not in labels.columns:
            raise UserError(f"labels CSV {path} has no column {column!r} (it has {len(labels.columns)} columns)")
    mapping: dict[str, object] = {}
    for file, age in zip(labels[file_column].str.replace("\\", "/"), labels[age_column]):
        value = pd.to_numeric(age, errors="coerce")
        if file in mapping and mapping[file] != value:
            mapping[file] = f"listed more than once in {path.name} with different ages"
        else:
            mapping[file] = value
    return mapping


def load_dataset(dataset_dir, labels: Labels, age_range: AgeRange, age_groups: AgeGroups) -> pd.DataFrame:
    """One row per image file under `dataset_dir`: file, path, age, age_group, gender, race, label_error.

    `labels` is the `labels` section of the explore config: `source` is "filename" (UTKFace names) or
    "csv" (`csv_path`, `file_column`, `age_column`; files are relative to the dataset folder).
    A file without a usable age keeps its row, with `label_error` saying why.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"dataset folder {dataset_dir} does not exist")
    files = find_image_files(dataset_dir)
    if not files:
        raise UserError(f"dataset folder {dataset_dir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    from_csv = labels.source == "csv"
    if from_csv:
        csv_path = Path(labels.csv_path or "")
        csv_path = csv_path if csv_path.is_absolute() else dataset_dir / csv_path
        csv_ages = read_labels_csv(csv_path, labels.file_column, labels.age_column)
        unmatched = len(set(csv_ages) - {f for f, _ in files})
        if unmatched:
            log.warning("%d rows of %s name files that are not in %s", unmatched, csv_path, dataset_dir)

    rows = []
    for file, real in files:
        parsed = parse_utkface_name(file)
        age, error = parsed["age"], None
        if from_csv:
            age = csv_ages.get(file, "not listed in the labels CSV")
            if isinstance(age, str):
                age, error = None, age
            elif pd.isna(age):
                age, error = None, "age in the labels CSV is not a number"
        elif age is None:
            error = "no age in the file name (expected age_gender_race_date.jpg)"
        if age is not None and not (age_range.min <= age <= age_range.max):
            error = f"age {age:g} outside {age_range.min}-{age_range.max}"
            age = None
        rows.append(
            {
                "file": file,
                "path": display_name(os.path.abspath(real)),
                "age": age,
                "age_group": None if age is None else age_groups.label_of(age),
                "gender": parsed["gender"],
                "race": parsed["race"],
                "label_error": error,
                "_real_path": real,
            }
        )
    frame = pd.DataFrame(rows)
    for column in ("age", "gender", "race"):
        frame[column] = frame[column].astype("Int64")
    return frame


# --------------------------------------------------------------------------------------------------
# Metrics: each one a small function of an ImageView, registered with its parameters' schema
# --------------------------------------------------------------------------------------------------
@dataclass
class Metric:
    function: Callable
    params: type[Section]  # the model of the function's keyword parameters
    columns: tuple[str, ...]  # the CSV columns it fills


METRICS: dict[str, Metric] = {}


def metric(columns: tuple[str, ...] = (), **params: Any):
    """Register `function(view, **params)` as a metric, each parameter given as its type (with its
    bounds: config_models.Bounded). It returns one value, whose CSV column is the function's name, or
    a dict of values for the named `columns`."""

    def register(function):
        model = create_model(f"{function.__name__}_parameters", __base__=Section, **{name: (kind, ...) for name, kind in params.items()})
        METRICS[function.__name__] = Metric(function, model, columns or (function.__name__,))
        return function

    return register


class ImageView:
    """A decoded image and the derived arrays several metrics share, computed at most once.

    Pixel metrics look at `gray`, the image scaled so its shorter side is `analysis_side` pixels:
    sharpness and noise then mean the same thing for a 200 px crop and a 4000 px photo.
    """

    def __init__(self, bgr: np.ndarray, analysis_side: int):
        self.bgr = bgr
        self.analysis_side = analysis_side

    @cached_property
    def analysis_scale(self) -> float:
        """Size of the analysis copy relative to the image."""
        return self.analysis_side / min(self.bgr.shape[:2])

    @cached_property
    def analysis_bgr(self) -> np.ndarray:
        h, w = self.bgr.shape[:2]
        scale = self.analysis_scale
        if scale == 1:
            return self.bgr
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        return cv2.resize(self.bgr, size, interpolation=interpolation)

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


@metric(columns=FACE_COLUMNS, min_score=Bounded(float, 0, 1), iou_threshold=Bounded(float, 0, 1), border_fraction=Bounded(float, 0, 1))
def faces(view: ImageView, min_score: float, iou_threshold: float, border_fraction: float) -> dict:
    """Faces found by BlazeFace (face_analysis.FaceDetector) and the geometry of the best one: its
    box, score, share of the image, offset from the centre, roll and keypoints, in image pixels."""
    settings = DetectorSettings(min_score, iou_threshold, border_fraction)
    if settings not in _DETECTORS:
        _DETECTORS[settings] = FaceDetector(settings)
    found = _DETECTORS[settings].detect(view.analysis_bgr)
    height, width = view.bgr.shape[:2]
    return face_geometry(found.scaled(1 / view.analysis_scale), width, height)


_DETECTORS: dict[DetectorSettings, FaceDetector] = {}  # one per process and setting: loading costs ~10 ms


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


BASIC_COLUMNS = ["file_size", "format", "color_mode", "width", "height", "min_side", "channels", "bit_depth", "content_hash"]
SIZE_COLUMNS = ["width", "height", "min_side"]  # measured again on every processed image


def metric_columns(metrics: dict) -> list[str]:
    """The CSV columns that the configured metrics fill."""
    return [column for name in metrics for column in METRICS[name].columns]


def measured_columns(metrics: dict) -> list[str]:
    """The numeric columns that the configured metrics fill, which checks can test (not the hash)."""
    return [column for column in metric_columns(metrics) if column != "phash"]


# --------------------------------------------------------------------------------------------------
# Measuring files
# --------------------------------------------------------------------------------------------------
@dataclass
class ReaderSettings:
    metrics: dict  # name -> parameters, the validated `metrics` config section
    max_pixels: int
    max_file_bytes: int
    max_aspect_ratio: float
    analysis_side: int
    timeout_seconds: float

    @classmethod
    def from_config(cls, explore: ExploreConfig, metrics: dict | None = None) -> "ReaderSettings":
        """The reader settings of a validated explore config (`metrics` replaces its metric list)."""
        images = explore.images
        return cls(explore.metrics if metrics is None else metrics, images.max_pixels, int(images.max_file_mb * 1e6),
                   images.max_aspect_ratio, images.analysis_side, explore.task_timeout_seconds)


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
    view = ImageView(bgr, settings.analysis_side)
    height, width = bgr.shape[:2]
    values = {"width": width, "height": height, "min_side": min(width, height)}
    for name, params in settings.metrics.items():
        try:
            value = METRICS[name].function(view, **params)
        except Exception as exc:  # a decoder-made array a metric chokes on, a detector that fails: that image's row says so
            raise UnreadableImage(f"metric {name} failed: {type(exc).__name__}: {exc}") from None
        values.update(value if isinstance(value, dict) else {name: value})
    return {name: round(value, FLOAT_DECIMALS) if isinstance(value, float) else value for name, value in values.items()}


# Process-pool plumbing: settings are sent once per worker, not once per image.
_worker_settings: ReaderSettings | None = None


def _init_worker(settings: ReaderSettings) -> None:
    global _worker_settings
    _worker_settings = settings
    cv2.setNumThreads(1)  # parallelism comes from the pool; OpenCV's own threads would oversubscribe


def _measure_task(task: tuple[str, str]) -> tuple[str, dict]:
    key, path = task
    return key, measure_file(path, _worker_settings)


def file_key(file: str, real_path: str) -> str:
    """Identity of a file's content for the metrics cache: name, size and modification time."""
    try:
        st = os.stat(real_path)
        return f"{file}|{st.st_size}|{st.st_mtime_ns}"
    except (OSError, UnicodeEncodeError):
        return f"{file}|missing"


def compute_images_quality_metrics(
    dataset: pd.DataFrame, settings: ReaderSettings, num_workers: int, cache: Journal, scheduler: str = "local", scheduler_chunk: int = 1000
) -> pd.DataFrame:
    """Add basic properties and metric columns to `dataset` (from `load_dataset`).

    Images are streamed through a process pool; each result is appended to `cache` as soon as it
    arrives, so an interrupted run continues where it stopped and a re-run with new thresholds
    re-uses the measurements instead of decoding every image again.
    """
    keys = [file_key(f, p) for f, p in zip(dataset["file"], dataset["_real_path"])]
    todo = [(k, p) for k, p in zip(keys, dataset["_real_path"]) if k not in cache.done]
    if len(todo) < len(keys):
        log.info("re-using measurements of %d unchanged files", len(keys) - len(todo))
    with cache:
        for key, row in parallel_map(
            _measure_task,
            todo,
            num_workers,
            initializer=_init_worker,
            initargs=(settings,),
            progress=progress_bar(len(todo), "measuring"),
            on_failure=lambda task, reason: (task[0], unreadable_row(reason, settings)),
            timeout=settings.timeout_seconds,
            scheduler=scheduler,
            scheduler_chunk=scheduler_chunk,
        ):
            cache.record(key, row)
    measured = cache.rows(keys)
    measured.index = dataset.index
    return pd.concat([dataset, measured], axis=1)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def check_margin(values: pd.Series, below: float | None, above: float | None) -> pd.Series:
    """How far each value is inside the allowed range, in the metric's units: negative when it is
    below `below` or above `above` (the check fails), the lowest the worst; empty when unmeasured.

    Examples
    --------
    >>> check_margin(pd.Series([3.0, 10.0, None]), below=8, above=None).tolist()
    [-5.0, 2.0, nan]
    """
    values = pd.to_numeric(values, errors="coerce").astype(float)
    margins = [values - below] if below is not None else []
    margins += [above - values] if above is not None else []
    return pd.concat(margins, axis=1).min(axis=1, skipna=False)


def find_duplicates(frame: pd.DataFrame, max_distance: int, max_age_difference: int) -> pd.DataFrame:
    """Group exact duplicates (same bytes) and near duplicates (perceptual hashes within `max_distance`).

    Returns columns duplicate_group (1, 2, ... or <NA>), duplicate_of (the group's first file, for every
    other member), and age_conflict (the group's ages differ by more than `max_age_difference`). Groups
    are the connected components of the graph of all such pairs.
    """
    n = len(frame)
    positions = np.arange(n)
    content = pd.factorize(frame["content_hash"])[0]  # -1 where unknown
    known = positions[content >= 0]
    exact = np.stack([pd.Series(known).groupby(content[known]).transform("min").to_numpy(), known], axis=1)
    where = np.flatnonzero(frame["phash"].notna().to_numpy()) if "phash" in frame.columns else np.array([], int)
    near = where[near_pairs(hash_bytes(frame["phash"].to_numpy()[where]), max_distance)] if len(where) else np.zeros((0, 2), int)
    pairs = np.concatenate([exact.reshape(-1, 2), near]).astype(np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    first = np.full(component.max() + 1 if n else 0, n)
    np.minimum.at(first, component, positions)
    roots = first[component]  # each file's group, named by its first file
    in_group = np.bincount(roots, minlength=n)[roots] > 1
    group_ids = {r: k + 1 for k, r in enumerate(sorted(set(roots[in_group])))}
    files = frame["file"].to_numpy()
    ages = pd.to_numeric(frame["age"], errors="coerce").to_numpy(dtype=float)
    by_group = pd.Series(ages).groupby(roots)
    spread = (by_group.max() - by_group.min()).fillna(0.0)
    result = pd.DataFrame(index=frame.index)
    result["duplicate_group"] = pd.array(pd.Series(roots).map(group_ids).where(in_group), dtype="Int64")
    result["duplicate_of"] = np.where(in_group & (roots != positions), files[roots], None)
    result["age_conflict"] = in_group & (spread.reindex(roots).to_numpy() > max_age_difference)
    return result


def hash_bytes(hex_hashes) -> np.ndarray:
    """Hex hashes of equal length as rows of bytes (the binary codes faiss indexes)."""
    width = max(2, -(-max(len(h) for h in hex_hashes) // 2) * 2)
    return np.frombuffer(b"".join(bytes.fromhex(h.rjust(width, "0")) for h in hex_hashes), np.uint8).reshape(len(hex_hashes), -1)


def near_pairs(codes: np.ndarray, max_distance: int) -> np.ndarray:
    """Every pair (i < j) of binary codes (rows of bytes) at most `max_distance` bits apart, exactly.

    Multi-index hashing (faiss.IndexBinaryMultiHash): the bits are cut into max_distance + 1 disjoint
    substrings, and two codes within max_distance bits agree on at least one of them (pigeonhole), so
    looking up exact substring matches in max_distance + 1 hash tables finds every pair. Candidates are
    then checked on the whole code. The cost grows with the number of pairs that share a substring, not
    with n²: a million 256-bit hashes take seconds. Substrings shorter than 16 bits would match almost
    everything, so short codes or large radii use an exhaustive (but vectorised) index instead.

    Examples
    --------
    >>> codes = np.array([[0b11110000, 0], [0b11110001, 0], [0b00001111, 0]], np.uint8)
    >>> near_pairs(codes, 2).tolist()
    [[0, 1]]
    """
    import faiss

    bits = codes.shape[1] * 8
    substring = bits // (max_distance + 1)
    if substring >= 16:
        index = faiss.IndexBinaryMultiHash(bits, max_distance + 1, substring)
        index.nflip = 0  # exact substring matches are enough, by the pigeonhole argument
    else:
        index = faiss.IndexBinaryFlat(bits)
    index.add(np.ascontiguousarray(codes))
    pairs = []
    for start in range(0, len(codes), NEAR_PAIR_BATCH):
        limits, _, neighbours = index.range_search(np.ascontiguousarray(codes[start:start + NEAR_PAIR_BATCH]), max_distance + 1)
        queries = start + np.repeat(np.arange(len(limits) - 1), np.diff(limits).astype(np.int64))
        keep = queries < neighbours  # each pair once, and not a code with itself
        pairs.append(np.stack([queries[keep], neighbours[keep]], axis=1))
    return np.concatenate(pairs).astype(int) if pairs else np.zeros((0, 2), int)


NEAR_PAIR_BATCH = 100_000  # queries per range search: bounds the memory of the result lists


def apply_checks(frame: pd.DataFrame, checks: dict[str, CheckRule]) -> pd.DataFrame:
    """Per threshold rule, a boolean column `flag_<check>` and beside it `score_<check>`, its margin
    (see check_margin): the exploration and processing stages' single definition of what fails."""
    columns = {}
    for name, rule in checks.items():
        margin = check_margin(frame[rule.metric], rule.below, rule.above)
        columns[flag_column(name)], columns[score_column(name)] = margin < 0, margin
    return pd.DataFrame(columns, index=frame.index)


def failing_checks(values: dict, checks: dict[str, CheckRule]) -> list[str]:
    """Names of the checks one measured image fails."""
    flags = apply_checks(pd.DataFrame([values]), checks).iloc[0]
    return [name for name in checks if flags[flag_column(name)]]


def check_images_quality(frame: pd.DataFrame, checks: dict[str, CheckRule], duplicates: Duplicates) -> pd.DataFrame:
    """Apply the threshold checks and the duplicate search; add flags, failed checks and status.

    Every check adds a boolean column `flag_<check>` (threshold checks also `score_<check>`). `failed_checks` lists the failed ones (";"),
    `status` is one of ok, low_quality, unlabelled, unreadable (the first problem wins, in reverse
    order), and `reason` says why in words.
    """
    frame = pd.concat([frame, apply_checks(frame, checks)], axis=1)
    names = list(checks)
    if duplicates.enabled:
        frame = pd.concat([frame, find_duplicates(frame, duplicates.max_hash_distance, duplicates.max_age_difference)], axis=1)
        frame[flag_column(Check.DUPLICATE)] = frame["duplicate_of"].notna()
        frame[flag_column(Check.AGE_CONFLICT)] = frame["age_conflict"]
        names += [Check.DUPLICATE, Check.AGE_CONFLICT]
    flags = frame[[flag_column(n) for n in names]].to_numpy()
    frame["failed_checks"] = [";".join(n for n, f in zip(names, row) if f) for row in flags]

    unreadable, unlabelled = frame["error"].notna(), frame["label_error"].notna()
    low_quality = frame["failed_checks"] != ""
    frame["status"] = np.select([unreadable, unlabelled, low_quality], [Status.UNREADABLE, Status.UNLABELLED, Status.LOW_QUALITY], Status.OK)
    frame["reason"] = np.select(
        [unreadable, unlabelled, low_quality],
        [frame["error"], frame["label_error"], "failed: " + frame["failed_checks"].str.replace(";", ", ")],
        "",
    )
    return frame


# --------------------------------------------------------------------------------------------------
# The exploration config, shared by every stage that measures or checks images
# --------------------------------------------------------------------------------------------------
LABEL_COLUMNS = ["file", "age", "age_group", "gender", "race"]


def load_explore_config(path, overrides=()) -> ExploreConfig:
    """Load and validate the explore config, including each metric's own parameters and the checks'
    metrics (which must be columns the configured metrics fill)."""
    config = load_config(ExploreConfig, path, overrides)
    try:
        for name, params in config.metrics.items():
            if name not in METRICS:
                raise ConfigError(f"metrics.{name}: unknown metric (known: {', '.join(METRICS)})")
            config.metrics[name] = validate_section(METRICS[name].params, params, f"metrics.{name}").model_dump()
        available = SIZE_COLUMNS + ["file_size", "channels", "bit_depth"] + measured_columns(config.metrics)
        for name, rule in config.checks.items():
            if rule.metric not in available:
                raise ConfigError(f"checks.{name}.metric: expected one of {', '.join(available)}, got {rule.metric!r}")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if "faces" in config.metrics:
        detector_model_path()  # a missing package is one line now, not an error in every row
    return config
