"""Find, label, measure and check the images of a face dataset.

Three steps, each usable on its own, all streaming so that memory does not grow with the dataset:

- `iter_dataset` finds every image file under a folder and reads its age label (from UTKFace file names
  `age_gender_race_date.jpg[.chip.jpg]`, or from a labels CSV), one row per file, unlabelled ones too.
- `measure_chunks` decodes each image once, in parallel, and measures it, chunk by chunk into part
  files (`plan_chunks` cuts the files into chunks). Every metric is one small function registered with
  `@metric`, with its parameters' schema beside it; the YAML file lists the metrics to compute and
  their parameters. Files that cannot be read get a row with the error.
- `check_images_quality` applies named threshold rules (`checks` in the YAML) and the duplicate search
  (`duplicate_groups`, over the whole dataset from compact hash arrays), adding a boolean
  `flag_<check>` column per check, the list of failed checks and a status per file.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import cv2
import numpy as np
import pandas as pd
from pydantic import create_model
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from face_analysis import FACE_COLUMNS, DetectorSettings, FaceDetector, face_geometry, detector_model_path
from image_io import CONTROL_CHARACTERS, UnreadableImage, read_image
from config_models import AgeRange, Bounded, CheckRule, Duplicates, ExploreConfig, Labels, Section
from utils import AgeGroups, ConfigError, PartStore, UserError, json_line, json_table, load_config, parallel_map, progress_bar, validate_section

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
def find_image_files(dataset_dir: Path) -> Iterator[tuple[str, str]]:
    """(relative posix path, real path) of every image file below `dataset_dir`, in sorted order.

    One folder is listed at a time, so memory grows with the largest folder, not with the dataset.
    Extensions are matched case-insensitively, and `x.jpg.chip.jpg` counts by its last suffix. Hidden
    files and folders count like any other; links to folders are not followed. A folder that cannot
    be listed is yielded too (its relative path ends with "/"), so that it gets a row saying why its
    files are missing.
    """
    stack = [iter(_sorted_entries(str(dataset_dir), ""))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry[2]:
            try:
                stack.append(iter(_sorted_entries(entry[1], entry[0])))
            except OSError:
                yield entry[0], entry[1]
        elif os.path.splitext(entry[0])[1].lower() in IMAGE_EXTENSIONS:  # not pathlib: Python 3.11's interns every name for good
            yield entry[0], entry[1]


def _sorted_entries(folder: str, prefix: str) -> list[tuple[str, str, bool]]:
    """(relative name, path, is a folder to enter) of a folder's entries, sorted so that a depth-first
    walk yields relative paths in sorted order: a folder sorts as its name + "/"."""
    entries = []
    with os.scandir(folder) as listing:
        for entry in listing:
            try:
                enter = entry.is_dir() and not entry.is_symlink()
                linked_folder = entry.is_dir() and entry.is_symlink()
            except OSError:
                enter = linked_folder = False
            if not linked_folder:
                entries.append((display_name(prefix + entry.name) + ("/" if enter else ""), entry.path, enter))
    return sorted(entries)


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
    match = UTKFACE_NAME.match(os.path.basename(name))
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


def iter_dataset(dataset_dir, labels: Labels, age_range: AgeRange, age_groups: AgeGroups) -> Iterator[dict]:
    """One row per image file under `dataset_dir`, in sorted order: file, path, age, age_group, gender,
    race, label_error, and the real path to read it from (_real_path).

    `labels` is the `labels` section of the explore config: `source` is "filename" (UTKFace names) or
    "csv" (`csv_path`, `file_column`, `age_column`; files are relative to the dataset folder).
    A file without a usable age keeps its row, with `label_error` saying why.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"dataset folder {dataset_dir} does not exist")
    from_csv = labels.source == "csv"
    if from_csv:
        csv_path = Path(labels.csv_path or "")
        csv_path = csv_path if csv_path.is_absolute() else dataset_dir / csv_path
        csv_ages = read_labels_csv(csv_path, labels.file_column, labels.age_column)
    files = matched = 0
    for file, real in find_image_files(dataset_dir):
        files += 1
        parsed = parse_utkface_name(file)
        age, error = parsed["age"], None
        if from_csv:
            matched += file in csv_ages
            age = csv_ages.get(file, "not listed in the labels CSV")
            if isinstance(age, str):
                age, error = None, age
            elif pd.isna(age):
                age, error = None, "age in the labels CSV is not a number"
            else:
                age = float(age)
        elif age is None:
            error = "no age in the file name (expected age_gender_race_date.jpg)"
        if age is not None and not (age_range.min <= age <= age_range.max):
            error = f"age {age:g} outside {age_range.min}-{age_range.max}"
            age = None
        yield {
            "file": file,
            "path": display_name(os.path.abspath(real)),
            "age": age,
            "age_group": None if age is None else age_groups.label_of(age),
            "gender": parsed["gender"],
            "race": parsed["race"],
            "label_error": error,
            "_real_path": real,
        }
    if not files:
        raise UserError(f"dataset folder {dataset_dir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if from_csv and matched < len(csv_ages):
        log.warning("%d rows of %s name files that are not in %s", len(csv_ages) - matched, csv_path, dataset_dir)


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


def _measure_task(task: tuple[int, int, str]) -> tuple[int, int, dict]:
    chunk, position, path = task
    return chunk, position, measure_file(path, _worker_settings)


def file_key(file: str, real_path: str) -> str:
    """Identity of a file's content for re-using measurements: name, size and modification time."""
    try:
        st = os.stat(real_path)
        return f"{file}|{st.st_size}|{st.st_mtime_ns}"
    except (OSError, UnicodeEncodeError):
        return f"{file}|missing"


@dataclass
class Chunk:
    part: str  # its part file's name in the PartStore: a digest of its files' keys and the settings
    files: int


def plan_chunks(rows: Iterator[dict], spool: TextIO, parts: PartStore, chunk_files: int) -> list[Chunk]:
    """Write each row of `iter_dataset`, with its file key, to `spool` (JSON lines) and cut the files
    into chunks of about `chunk_files`.

    A chunk ends after a file whose name hashes to 0 modulo `chunk_files` (or at MAX_CHUNK_FACTOR
    times that many files): a boundary depends only on the name before it, so adding or removing a
    file changes one chunk, and a re-run measures that chunk again, not every chunk after it.
    """
    chunks, keys = [], []
    for row in rows:
        row["_key"] = file_key(row["file"], row["_real_path"])
        spool.write(json_line(row))
        keys.append(row["_key"])
        if zlib.crc32(row["file"].encode("utf-8", "surrogatepass")) % chunk_files == 0 or len(keys) >= MAX_CHUNK_FACTOR * chunk_files:
            chunks.append(Chunk(parts.part_name(keys), len(keys)))
            keys = []
    if keys:
        chunks.append(Chunk(parts.part_name(keys), len(keys)))
    return chunks


MAX_CHUNK_FACTOR = 2  # bounds the rows a chunk holds in memory while its files are measured


def spooled_chunks(spool: TextIO, chunks: list[Chunk]) -> Iterator[tuple[int, Chunk, Iterator[dict]]]:
    """(index, chunk, its rows) of each chunk, read back one row at a time from the spool written by
    plan_chunks; the rows a caller leaves unread are skipped."""
    spool.seek(0)
    for index, chunk in enumerate(chunks):
        lines = itertools.islice(spool, chunk.files)
        yield index, chunk, map(json.loads, lines)
        collections.deque(lines, maxlen=0)


def measure_chunks(spool: TextIO, chunks: list[Chunk], parts: PartStore, settings: ReaderSettings, num_workers: int,
                   scheduler: str = "local") -> None:
    """Measure the files of every chunk that has no part file yet and write its part.

    Files stream through a process pool (or a Dask cluster), a few chunks at a time; each chunk's
    rows are written to its part file as soon as its last file is measured, so an interrupted run
    loses at most the chunks in flight, and a re-run with new thresholds measures nothing.
    """
    missing = {chunk.part for chunk in chunks if not parts.has(chunk.part)}
    files = sum(chunk.files for chunk in chunks if chunk.part in missing)
    reused = sum(chunk.files for chunk in chunks) - files
    if reused:
        log.info("re-using measurements of %d unchanged files", reused)
    tasks = ([(index, position, row["_real_path"]) for position, row in enumerate(rows)]
             for index, chunk, rows in spooled_chunks(spool, chunks) if chunk.part in missing)
    pending: dict[int, list] = {}  # chunk index -> its rows so far
    remaining: dict[int, int] = {}  # chunk index -> rows still to come
    for index, position, row in parallel_map(
        _measure_task,
        tasks,
        num_workers,
        chunked=True,
        initializer=_init_worker,
        initargs=(settings,),
        progress=progress_bar(files, "measuring"),
        on_failure=lambda task, reason: (task[0], task[1], unreadable_row(reason, settings)),
        timeout=settings.timeout_seconds,
        scheduler=scheduler,
    ):
        pending.setdefault(index, [None] * chunks[index].files)[position] = row
        remaining[index] = remaining.get(index, chunks[index].files) - 1
        if not remaining[index]:
            parts.write(chunks[index].part, pending.pop(index))
            del remaining[index]


def chunk_tables(spool: TextIO, chunks: list[Chunk], parts: PartStore) -> Iterator[pd.DataFrame]:
    """The files' labels and measurements side by side, in file order, in tables of at most
    TABLE_ROWS rows (a slice of one chunk each): memory does not depend on the chunks' sizes."""
    for _, chunk, rows in spooled_chunks(spool, chunks):
        measured = parts.rows(chunk.part)
        for start in range(0, chunk.files, TABLE_ROWS):
            labels = json_table(list(itertools.islice(rows, TABLE_ROWS))).drop(columns=["_key", "_real_path"])
            values = list(itertools.islice(measured, len(labels)))
            if len(values) < len(labels) or (start + len(labels) == chunk.files and next(measured, None) is not None):
                # only a part edited by hand can get here: each is written whole
                raise UserError(f"{parts.folder / chunk.part} does not hold {chunk.files} rows: delete it and re-run")
            yield pd.concat([labels, json_table(values).set_axis(labels.index)], axis=1)


TABLE_ROWS = 500


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
    return pd.concat(margins, axis=1).min(axis=1, skipna=False).round(FLOAT_DECIMALS)


class Components:
    """Connected components of a graph whose edges arrive in batches, in memory that grows with the
    number of nodes, not of edges: pending edges are merged into the labelling once they are many.

    `root[i]` is the lowest node of i's component as of the last `merge`: nodes with the same root are
    connected; nodes with different roots may still be connected through pending edges.
    """

    def __init__(self, nodes: int):
        self.root = np.arange(nodes, dtype=index_type(nodes))
        self.merges = 0
        self._pending: list[np.ndarray] = []
        self._edges = 0

    def add(self, pairs: np.ndarray) -> None:
        """Add edges (rows of two nodes)."""
        for start in range(0, len(pairs), MERGE_EDGES):
            self._pending.append(pairs[start:start + MERGE_EDGES])
            self._edges += len(self._pending[-1])
            if self._edges >= MERGE_EDGES:
                self.merge()

    @property
    def pending(self) -> int:
        """Edges added since the last merge."""
        return self._edges

    def merge(self) -> None:
        """Bring `root` up to date: join the components the pending edges connect. Only the roots
        those edges touch enter scipy's connected components, so the cost follows the edges."""
        if not self._edges:
            return
        edges = self.root[np.concatenate(self._pending)]
        self._pending, self._edges = [], 0
        edges = edges[edges[:, 0] != edges[:, 1]]
        if len(edges):
            roots, local = np.unique(edges, return_inverse=True)  # sorted: a component's first root is its lowest
            local = local.reshape(-1, 2)
            graph = coo_matrix((np.ones(len(local), np.int8), (local[:, 0], local[:, 1])), shape=(len(roots), len(roots)))
            _, component = connected_components(graph, directed=False)
            _, first = np.unique(component, return_index=True)
            joined = roots[first][component]  # each touched root's new root
            for block in range(0, len(self.root), MERGE_EDGES):  # the nodes in blocks: working arrays stay small
                nodes = self.root[block:block + MERGE_EDGES]
                at = np.minimum(np.searchsorted(roots, nodes), len(roots) - 1)
                touched = roots[at] == nodes
                nodes[touched] = joined[at[touched]]
        self.merges += 1


MERGE_EDGES = 50_000  # pending edges before a merge, and nodes relabelled at once: bounds the working memory


def index_type(count: int) -> type:
    """The smallest integer type for positions among `count` items: per-file arrays stay small."""
    return np.int32 if count < 2**31 else np.int64


def hash_bytes(hex_hashes) -> np.ndarray:
    """Hex hashes of equal length as rows of bytes (one binary code per row)."""
    width = max(2, -(-max(len(h) for h in hex_hashes) // 2) * 2)
    return np.frombuffer(b"".join(bytes.fromhex(h.rjust(width, "0")) for h in hex_hashes), np.uint8).reshape(len(hex_hashes), -1)


def substring_keys(codes: np.ndarray, start: int, stop: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Bits start..stop of every code (rows of bytes; bit 0 is the first byte's highest bit), or of
    the codes at `rows`, as integers; stop - start <= MAX_SUBSTRING_BITS.

    Examples
    --------
    >>> substring_keys(np.array([[0b10110000, 0b11000000]], np.uint8), 2, 10).tolist()
    [195]
    """
    first, last = start // 8, (stop - 1) // 8
    value = np.zeros(len(codes) if rows is None else len(rows), np.uint64)
    for column in range(first, last + 1):
        value = (value << np.uint64(8)) | (codes[:, column] if rows is None else codes[rows, column])
    return (value >> np.uint64(8 * (last + 1) - stop)) & np.uint64((1 << (stop - start)) - 1)


MAX_SUBSTRING_BITS = 57  # a substring is gathered from whole bytes into 64 bits
VERIFY_BATCH = 16_384  # candidate pairs checked at once: bounds the memory of their gathered codes
SEARCH_WINDOW = 16_384  # sorted codes whose runs are searched at once: bounds the working arrays


def near_pairs(codes: np.ndarray, max_distance: int, graph: Components | None = None, nodes: np.ndarray | None = None,
               subset: np.ndarray | None = None, window: int = SEARCH_WINDOW) -> Iterator[np.ndarray]:
    """Batches of pairs (i < j) of binary codes (rows of bytes) at most `max_distance` bits apart, exactly.

    Multi-index hashing: the bits are cut into at least max_distance + 1 disjoint substrings, and two
    codes within max_distance bits agree on at least one of them (pigeonhole). For each substring the
    codes are sorted by it; codes that agree on it (a run) are candidates, checked on the whole code.
    Time grows with the number of candidates, not with n² (a million random 256-bit hashes take
    seconds). Memory: the sort order, 4 bytes per code, and working arrays for about `window` sorted
    codes at a time (whole runs: a larger run is taken alone), where faiss's IndexBinaryMultiHash hash
    tables took 1 KB per code. A pair may come more than once (it can agree on several substrings).

    With `subset`, only codes[subset] are searched, and i and j index `subset` (no copy of the codes).

    With `graph` (whose node for code i is nodes[i], or i), candidates it already connects are
    skipped, and so are whole runs of codes agreeing on a substring once they are one component: a
    cluster of thousands of near-identical images then costs about its size, not its size squared.
    The components stay exact; only redundant pairs go.

    Examples
    --------
    >>> codes = np.array([[0b11110000, 0], [0b11110001, 0], [0b00001111, 0]], np.uint8)
    >>> np.unique(np.concatenate(list(near_pairs(codes, 2))), axis=0).tolist()
    [[0, 1]]
    """
    count = len(codes) if subset is None else len(subset)
    bits, index = codes.shape[1] * 8, index_type(count)
    pieces = min(bits, max(max_distance + 1, -(-bits // MAX_SUBSTRING_BITS)))
    bounds = np.linspace(0, bits, pieces + 1).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        keys = substring_keys(codes, start, stop, subset)
        order = np.argsort(keys, kind="stable").astype(index)
        keys = keys[order]
        run_bounds = np.r_[np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]), count].astype(index)
        del keys
        # windows of whole runs: run r is in window w when it starts in [w * window, (w + 1) * window)
        cuts = np.unique(np.searchsorted(run_bounds[:-1], np.arange(0, count + window, window)))
        for first_run, stop_run in zip(cuts[:-1], cuts[1:]):
            yield from _pairs_in_runs(codes, subset, order, run_bounds[first_run:stop_run + 1], max_distance, graph, nodes)


def _pairs_in_runs(codes: np.ndarray, subset: np.ndarray | None, order: np.ndarray, run_bounds: np.ndarray, max_distance: int,
                   graph: Components | None, nodes: np.ndarray | None) -> Iterator[np.ndarray]:
    """near_pairs within the runs of sorted positions run_bounds[r]..run_bounds[r + 1] of one substring."""
    def root(code: np.ndarray) -> np.ndarray:
        return graph.root[code if nodes is None else nodes[code]]

    def code(i: np.ndarray) -> np.ndarray:
        return codes[i if subset is None else subset[i]]

    run_start, run_length = run_bounds[:-1], np.diff(run_bounds)
    active = run_start[0] + np.flatnonzero(np.repeat(run_length > 1, run_length)).astype(order.dtype)  # positions in runs of two or more
    first = np.repeat(run_start, run_length)[active - run_start[0]]
    end = first + np.repeat(run_length, run_length)[active - run_start[0]]
    offset, pruned_at = 1, -1
    while True:
        paired = end - active > offset  # positions with a run member `offset` places further on
        active, first, end = active[paired], first[paired], end[paired]
        if not len(active):
            return
        if graph is not None and graph.pending >= len(active):  # enough news to prune by
            graph.merge()
        if graph is not None and graph.merges != pruned_at:  # drop the runs that are one component by now
            keep = np.isin(first, _split_runs(order, first, end, root))
            active, first, end = active[keep], first[keep], end[keep]
            pruned_at = graph.merges
        a, b = order[active], order[active + offset]
        if graph is not None:
            apart = root(a) != root(b)
            a, b = a[apart], b[apart]
        close = np.concatenate([np.bitwise_count(code(a[i:i + VERIFY_BATCH]) ^ code(b[i:i + VERIFY_BATCH])).sum(axis=1) <= max_distance
                                for i in range(0, len(a), VERIFY_BATCH)] or [np.zeros(0, bool)])
        if close.any():
            yield np.stack([np.minimum(a, b)[close], np.maximum(a, b)[close]], axis=1)
        offset += 1


def identical(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pairs (first row with the same key, row), one per row."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return np.stack([rows[first][inverse.ravel()], rows], axis=1)


def identical_codes(codes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows joining each set of identical codes (rows of bytes), and the indices of the
    codes left to search (one per set). Codes are sorted by a 64-bit hash of their bytes and compared
    whole with their neighbours, so a hash collision only leaves a copy in the search: still exact,
    in a few bytes per code where sorting the codes themselves would copy them."""
    fingerprint = np.zeros(len(codes), np.uint64)
    for column in codes.T:  # FNV-style: multiply by an odd 64-bit prime, add the byte
        fingerprint *= np.uint64(1099511628211)
        fingerprint += column
    order = np.argsort(fingerprint, kind="stable").astype(index_type(len(codes)))
    del fingerprint
    same = np.zeros(len(order), bool)  # same[i]: the code at sorted position i is the one before it
    for start in range(1, len(order), VERIFY_BATCH):
        stop = min(start + VERIFY_BATCH, len(order))
        same[start:stop] = (codes[order[start - 1:stop - 1]] == codes[order[start:stop]]).all(axis=1)
    return np.stack([rows[order[np.flatnonzero(same) - 1]], rows[order[same]]], axis=1), np.sort(order[~same])


def _split_runs(order: np.ndarray, first: np.ndarray, end: np.ndarray, root: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The first positions of the runs (given by each active position's run `first` and `end`, in
    sorted order `order`) whose codes are not all in one component (`root` of codes)."""
    runs, at = np.unique(first, return_index=True)
    lengths = end[at] - runs
    run_of_member = np.repeat(runs, lengths)
    members = run_of_member + (np.arange(len(run_of_member), dtype=runs.dtype) - np.repeat(np.cumsum(lengths, dtype=runs.dtype) - lengths, lengths))
    return np.unique(run_of_member[root(order[members]) != root(order[run_of_member])])


@dataclass
class DuplicateGroups:
    """The duplicate groups of a whole dataset, as arrays over file positions (see `find`)."""

    root: np.ndarray  # each file's group, named by its lowest position
    number: np.ndarray  # the group's number, 1, 2, ... in order of roots; 0 for a file in no group
    age_conflict: np.ndarray  # the group's ages differ by more than allowed

    @classmethod
    def of_components(cls, root: np.ndarray, ages: np.ndarray, max_age_difference: float) -> "DuplicateGroups":
        """Number the groups of files whose `root`s (see connected_duplicates) are shared, and flag the
        groups whose `ages` differ by more than `max_age_difference`."""
        has_members = np.bincount(root, minlength=len(root)) > 1  # by position: a root with other members
        number = np.cumsum(has_members, dtype=root.dtype)[root]
        in_group = has_members[root]
        del has_members
        number[~in_group] = 0
        oldest, youngest = np.full(len(root), -np.inf, np.float32), np.full(len(root), np.inf, np.float32)
        np.fmax.at(oldest, root, ages)
        np.fmin.at(youngest, root, ages)
        oldest -= youngest  # each group's age spread; -inf when no age in it is known
        del youngest
        return cls(root, number, in_group & (oldest[root] > max_age_difference))

    def columns(self, start: int, files: pd.Series, root_names: dict[int, str]) -> pd.DataFrame:
        """duplicate_group, duplicate_of (the group's first file, for its other members) and
        age_conflict of `files`, at positions start, start + 1, ... `root_names` holds the names of
        the group roots seen so far: a root comes before its group's other members, so a caller going
        through the files in order in one or more calls always finds the name it needs."""
        positions = np.arange(start, start + len(files))
        root, number = self.root[positions], self.number[positions]
        is_root = (number > 0) & (root == positions)
        root_names.update(zip(positions[is_root].tolist(), files.to_numpy()[is_root]))
        return pd.DataFrame(
            {
                "duplicate_group": pd.arrays.IntegerArray(number, number == 0),
                "duplicate_of": [root_names[r] if n and r != p else None for r, n, p in zip(root.tolist(), number.tolist(), positions.tolist())],
                "age_conflict": self.age_conflict[positions],
            },
            index=files.index,
        )


@dataclass
class HashArrays:
    """The hashes duplicate search needs, compactly: perceptual hashes as rows of bytes and content
    digests (only of files without a perceptual hash), each with the files' positions."""

    codes: np.ndarray
    code_rows: np.ndarray
    content: np.ndarray
    content_rows: np.ndarray

    @classmethod
    def of(cls, content_hashes: pd.Series, phashes: pd.Series, start: int = 0) -> "HashArrays":
        """The hashes of files at positions start, start + 1, ... (None where unknown)."""
        has_code = phashes.notna().to_numpy()
        code_rows = np.flatnonzero(has_code)
        codes = hash_bytes(phashes.to_numpy()[code_rows]) if len(code_rows) else np.zeros((0, 0), np.uint8)
        content_rows = np.flatnonzero(~has_code & content_hashes.notna().to_numpy())
        content = np.array([h.encode() for h in content_hashes.to_numpy()[content_rows]], dtype="S")
        return cls(codes, start + code_rows, content, start + content_rows)


def connected_duplicates(hashes: HashArrays, files: int, max_distance: int) -> np.ndarray:
    """Each file's group root (the lowest position in its group; a file in no group is its own):
    exact duplicates (the same bytes) and near duplicates (perceptual hashes within `max_distance`
    bits) are joined, and groups are the connected components of the graph of all such pairs.

    Identical bytes decode to identical pixels and so to identical perceptual hashes (distance 0):
    content digests are needed only for the files without a perceptual hash. Identical hashes are
    joined at once, and the near-duplicate search runs over the distinct ones."""
    graph = Components(files)
    graph.add(identical(hashes.content, hashes.content_rows))
    pairs, distinct = identical_codes(hashes.codes, hashes.code_rows)
    graph.add(pairs)
    graph.merge()
    # in (nearly) the codes' own order: close codes then meet as neighbours, and join early
    distinct = distinct[np.argsort(substring_keys(hashes.codes, 0, min(hashes.codes.shape[1] * 8, MAX_SUBSTRING_BITS), distinct), kind="stable")]
    distinct_rows = hashes.code_rows[distinct]
    for pairs in near_pairs(hashes.codes, max_distance, graph, distinct_rows, distinct):
        graph.add(distinct_rows[pairs])
    graph.merge()
    return graph.root


def gather_hashes(tables: Iterator[pd.DataFrame], files: int) -> tuple[HashArrays, np.ndarray]:
    """The hashes and ages of a whole dataset given as tables in file order (`files` rows in all),
    gathered into compact arrays one table at a time."""
    ages = np.empty(files, np.float32)
    codes, code_rows, content, content_rows = None, np.empty(files, index_type(files)), [], []
    start = found = 0
    for table in tables:
        hashes = HashArrays.of(table["content_hash"], table["phash"], start)
        if len(hashes.codes):
            if codes is None:
                codes = np.empty((files, hashes.codes.shape[1]), np.uint8)
            end = found + len(hashes.codes)
            codes[found:end], code_rows[found:end] = hashes.codes, hashes.code_rows
            found = end
        content.append(hashes.content)
        content_rows.append(hashes.content_rows)
        ages[start:start + len(table)] = pd.to_numeric(table["age"], errors="coerce").to_numpy(np.float32)
        start += len(table)
    codes = codes[:found] if codes is not None else np.zeros((0, 0), np.uint8)
    return HashArrays(codes, code_rows[:found], np.concatenate(content), np.concatenate(content_rows)), ages


def duplicate_groups(tables: Iterator[pd.DataFrame], files: int, rule: Duplicates) -> DuplicateGroups:
    """The duplicate groups of a whole dataset given as tables in file order (`files` rows in all)."""
    hashes, ages = gather_hashes(tables, files)
    root = connected_duplicates(hashes, files, rule.max_hash_distance)
    del hashes  # the hashes, the largest arrays, go before the groups are numbered
    return DuplicateGroups.of_components(root, ages, rule.max_age_difference)


def find_duplicates(frame: pd.DataFrame, rule: Duplicates) -> pd.DataFrame:
    """The duplicate columns (see DuplicateGroups.columns) of a table with file, age, content_hash and
    phash columns."""
    return duplicate_groups(iter([frame]), len(frame), rule).columns(0, frame["file"], {})


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


def check_images_quality(frame: pd.DataFrame, checks: dict[str, CheckRule], duplicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Apply the threshold checks, and the duplicate search's columns when given (see
    DuplicateGroups.columns); add flags, failed checks and a status per file.

    Every check adds a boolean column `flag_<check>` (threshold checks also `score_<check>`). `failed_checks` lists the failed ones (";"),
    `status` is one of ok, low_quality, unlabelled, unreadable (the first problem wins, in reverse
    order), and `reason` says why in words.
    """
    frame = pd.concat([frame, apply_checks(frame, checks)], axis=1)
    names = list(checks)
    if duplicates is not None:
        frame = pd.concat([frame, duplicates], axis=1)
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
