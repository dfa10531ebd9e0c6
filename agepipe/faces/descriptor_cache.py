"""Describing many image files in parallel, each description cached by the file's content hash in a
resumable journal, so that an image is described once however many stages, runs or copies of it there
are. A worker takes IMAGES_PER_BATCH images at a time and puts their faces through the networks
together (describer.FaceDescriber.locate, then finish).
"""

from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import asdict
from typing import Iterable

import numpy as np

from agepipe.config.loading import config_fingerprint
from agepipe.data.image_files import FileLimits, UnreadableImage, content_digest, read_image
from agepipe.faces.alignment import DESCRIPTOR_MODEL, LANDMARK_MODEL
from agepipe.faces.describer import (
    AGE_CLASSES,
    DESCRIPTOR_SIZE,
    DescriptorSettings,
    FaceDescriber,
    FaceDescription,
    ImageFaces,
    age_network_files,
    build_networks,
    require_dlib,
)
from agepipe.running.console import progress_bar
from agepipe.running.parallel import Engine, parallel_map
from agepipe.running.resume import Journal

log = logging.getLogger("agepipe.faces")

# Images a worker describes at a time, their faces through the networks together (on a batch of 4-16
# chips dlib's descriptor costs about 6 ms a face on a core here, against 7 one at a time, and the age
# network 1.5 against 2.7; more gains little).
IMAGES_PER_BATCH = 8
# What dlib's descriptor network can produce: each view's 128 numbers within +-1, of length 1.29-1.54 on
# 60 faces of UTKFace and All-Age-Faces in three views; these bounds leave a wide margin. A cached
# descriptor outside them (scaled, edited) was not written by the network.
DLIB_MAX_ELEMENT = 1.0
DLIB_LENGTH_RANGE = (0.8, 2.2)
# The age network's log-probabilities: each at most 0 and at least log(floor); their probabilities sum to
# 1 (up to the floor's share and six decimals of rounding).
PROBABILITY_SUM_TOLERANCE = 1e-3
CACHE_FORMAT = 3  # the layout: a row per image and settings, holding its faces


def content_hash(path: str, max_bytes: int) -> str | None:
    """BLAKE2 of a regular file's bytes (the exploration stage's content_hash), or None for anything
    that is not a readable regular file of at most `max_bytes` (a FIFO or /dev/zero would never end)."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode) or status.st_size > max_bytes:
            return None
        with open(path, "rb") as f:
            return content_digest(f.read(max_bytes + 1))
    except (OSError, UnicodeEncodeError):
        return None


def _describe_batch(state: tuple[FaceDescriber, FileLimits], tasks: list[tuple[str, str]]) -> list[tuple[str, dict]]:
    """Each task's (content hash, path) image as its cache row, the faces of all of them through the
    networks together."""
    describer, limits = state
    located = []
    for key, path in tasks:
        try:
            bgr, _ = read_image(path, limits.max_pixels, limits.max_file_bytes)
            located.append(describer.locate(np.ascontiguousarray(bgr[..., ::-1]), bgr, seed=view_seed(key)))
        except UnreadableImage as exc:
            located.append(ImageFaces(None, [], f"unreadable: {exc}"))
        except (
            Exception
        ) as exc:  # a decoder-made array the detector or landmarks choke on: that image's row says so, the run goes on
            located.append(_not_described(exc))
    try:
        described = describer.finish(located)
    except Exception:  # chips the networks choke on: each image alone, so that only the culprit's row says so
        described = [_finished_alone(describer, image) for image in located]
    return [(key, cache_row(image)) for (key, _), image in zip(tasks, described)]


def _finished_alone(describer: FaceDescriber, image: ImageFaces) -> ImageFaces:
    try:
        return describer.finish([image])[0]
    except Exception as exc:
        return _not_described(exc)


def _not_described(exc: Exception) -> ImageFaces:
    return ImageFaces(None, [], f"could not be described: {type(exc).__name__}")


def cache_row(described: ImageFaces) -> dict:
    """An image's description as one row of the cache (JSON: six decimals are plenty)."""
    return {
        "found": described.found,
        "problem": described.problem,
        "faces": [
            {
                "box": None if face.box is None else [round(v, 2) for v in face.box],
                "descriptor": None if face.vector is None else np.round(face.vector, 6).tolist(),
                "problem": face.problem,
            }
            for face in described.faces
        ],
    }


def from_cache_row(row: dict) -> ImageFaces:
    return ImageFaces(
        row["found"],
        [
            FaceDescription(
                None if face["box"] is None else tuple(face["box"]),
                None if face["descriptor"] is None else np.asarray(face["descriptor"], np.float32),
                face["problem"],
            )
            for face in row["faces"]
        ],
        row["problem"],
    )


def descriptor_shape(settings: DescriptorSettings) -> tuple[int, int]:
    """(views, numbers per view) of a descriptor made with `settings`."""
    return len(settings.views), DESCRIPTOR_SIZE * (
        settings.face_descriptor != "none"
    ) + AGE_CLASSES * settings.age_network


def network_could_produce(descriptor: np.ndarray, settings: DescriptorSettings) -> bool:
    """Whether each view of a descriptor (views x numbers) lies within what the networks can produce:
    dlib's part within its element and length bounds, the age network's a floored log-probability
    distribution."""
    if not np.isfinite(descriptor).all():
        return False
    width = DESCRIPTOR_SIZE if settings.face_descriptor != "none" else 0  # dlib's part comes first
    dlib = descriptor[:, :width]
    if width:
        length = np.linalg.norm(dlib, axis=1)
        if (
            np.abs(dlib).max() > DLIB_MAX_ELEMENT
            or not ((DLIB_LENGTH_RANGE[0] <= length) & (length <= DLIB_LENGTH_RANGE[1])).all()
        ):
            return False
    if settings.age_network:
        log_probabilities = descriptor[:, width:]
        floor = np.log(settings.age_probability_floor) - PROBABILITY_SUM_TOLERANCE
        total = np.exp(log_probabilities).sum(axis=1)
        most = 1 + AGE_CLASSES * settings.age_probability_floor + PROBABILITY_SUM_TOLERANCE
        if (log_probabilities > PROBABILITY_SUM_TOLERANCE).any() or (log_probabilities < floor).any():
            return False
        if ((total < 1 - PROBABILITY_SUM_TOLERANCE) | (total > most)).any():
            return False
    return True


def valid_cache_row(row: dict, settings: DescriptorSettings) -> bool:
    """Whether a cached row is one describe_files could have written with these settings: faces each
    with a box and either a problem or a descriptor of the right views and size whose numbers the
    networks could produce (network_could_produce), and a problem when no face has a descriptor. A
    cache edited, truncated or damaged on disk fails, and its rows are described again."""
    shape = descriptor_shape(settings)
    try:
        found, faces, problem = row["found"], row["faces"], row["problem"]
        if not (found is None or (isinstance(found, int) and found >= 0)) or not isinstance(faces, list):
            return False
        if not (problem is None or isinstance(problem, str)):
            return False
        described = 0
        for face in faces:
            vector, box = face["descriptor"], face["box"]
            if not (face["problem"] is None or isinstance(face["problem"], str)):
                return False
            if box is not None and (
                len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            ):
                return False
            if vector is None:
                if not isinstance(face["problem"], str):
                    return False
                continue
            array = np.asarray(vector, np.float64)
            if array.shape != shape or not network_could_produce(array, settings):
                return False
            described += 1
    except (KeyError, TypeError, ValueError):
        return False
    return described > 0 or isinstance(problem, str)


class DescriptorCache:
    """The descriptions of images, in a journal keyed by each file's content hash and the settings that
    described it (a journal the caller claimed through its OutputGuard): an image is described once
    however many stages, runs or copies of it there are, the rows of several settings (training's views,
    prediction's, a row per face, the fast profile) side by side, and an interrupted run continues where
    it stopped. A cached row that is not a valid description for its settings (valid_cache_row) counts
    as not described. Only the keys are held in memory, never the descriptions."""

    def __init__(self, cache_path: str | os.PathLike, settings: DescriptorSettings):
        require_dlib()  # fail with one line before starting workers
        age_model = age_network_files().model.name if settings.age_network else None
        self.settings, self.path = settings, cache_path
        self.suffix = "|" + config_fingerprint(asdict(settings), LANDMARK_MODEL, DESCRIPTOR_MODEL, age_model)
        self.journal = Journal(
            cache_path,
            f"descriptor-cache-{CACHE_FORMAT}",
            accept=lambda key, row: not key.endswith(self.suffix) or valid_cache_row(row, settings),
        )

    def key(self, digest: str) -> str:
        """The cache key of a file's content hash with these settings."""
        return digest + self.suffix

    def has(self, digest: str) -> bool:
        return self.key(digest) in self.journal.done

    def describe(self, todo: Iterable[tuple[str, str]], count: int, engine: Engine, limits: FileLimits) -> None:
        """Describe the files of `todo` ((content hash, path) pairs, `count` of them, read within
        `limits`) into the cache."""
        if not count:
            return
        build_networks(self.settings)
        log.info("describing %d images (others found in %s)", count, self.path)
        with self.journal:
            describer = FaceDescriber(self.settings)
            for digest, row in parallel_map(
                _describe_batch,
                todo,
                engine,
                state=(describer, limits),
                batched=True,
                chunksize=IMAGES_PER_BATCH,
                progress=progress_bar(count, "describing faces"),
                on_failure=lambda task, reason: (task[0], cache_row(ImageFaces(None, [], f"failed: {reason}"))),
            ):
                self.journal.record(self.key(digest), row)

    def images(self, digests: list[str | None]) -> list[ImageFaces]:
        """The description of each content hash, in order (anything but a hash, such as None or NaN: a
        file that could not be read)."""
        found = self.journal.records(self.key(d) for d in digests if isinstance(d, str))
        unreadable = ImageFaces(None, [], "unreadable: not a readable regular file, or over the size limit")
        return [
            from_cache_row(found[self.key(d)]) if isinstance(d, str) and self.key(d) in found else unreadable
            for d in digests
        ]


def view_seed(digest: str) -> int:
    """The seed a file's views are drawn with: its content hash, so a face gets the same views every run."""
    return int(digest[:16], 16)


def describe_files(
    paths: list[str], settings: DescriptorSettings, cache_path: str | os.PathLike, engine: Engine, limits: FileLimits
) -> list[ImageFaces]:
    """The faces of each of `paths`, read within `limits`, described, in order (describer.ImageFaces),
    through the DescriptorCache at `cache_path`."""
    cache = DescriptorCache(cache_path, settings)
    hashes = [content_hash(p, limits.max_file_bytes) for p in paths]
    todo = {}
    for digest, path in zip(hashes, paths):
        if digest and not cache.has(digest):
            todo.setdefault(digest, path)
    cache.describe(todo.items(), len(todo), engine, limits)
    return cache.images(hashes)
