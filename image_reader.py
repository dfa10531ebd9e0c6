"""The exploration stage's public API: the images of a face dataset listed, measured and checked, all
streaming, so that memory does not grow with the dataset.

- `load_dataset` lists every image file under a folder with its age label (datasets.py), one row per
  file, unlabelled ones too, into a spool, cut into chunks.
- `compute_images_quality_metrics` decodes each image once, in parallel, and measures it with every
  configured metric (image_metrics.py), chunk by chunk into part files: an interrupted run continues.
- `check_images_quality` applies the named threshold rules (`checks` in the YAML) and the duplicate
  search's columns (duplicates.py), adding `flag_<check>` and `score_<check>` columns, the failed
  checks, a status and a reason per file.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
import pandas as pd
from pydantic import BaseModel

from agepipe.config.data_stages import CheckRule, ExploreConfig, Labels
from agepipe.config.loading import CONFIG_DIR, apply_override, load_config, validate_section
from agepipe.config.schema import AgeRange
from agepipe.data.age_groups import AgeGroups
from agepipe.data.datasets import iter_dataset
from agepipe.data.vocabulary import Check, Status, flag_column, score_column
from agepipe.errors import SHOWN_CHARACTERS, ConfigError, UserError, shown
from agepipe.faces.detector import detector_model_path
from agepipe.quality.image_metrics import (
    FLOAT_DECIMALS,
    METRICS,
    SIZE_COLUMNS,
    ReaderSettings,
    measure_file,
    measured_columns,
    unreadable_row,
)
from agepipe.running.console import progress_bar
from agepipe.running.parallel import Engine
from agepipe.running.resume import PartStore, fill_parts, json_line, json_table
from agepipe.running.writes import read_run_record

log = logging.getLogger("agepipe.reader")


# --------------------------------------------------------------------------------------------------
# Listing and measuring, chunk by chunk
# --------------------------------------------------------------------------------------------------
def _measure_task(settings: ReaderSettings, path: str) -> dict:
    return measure_file(path, settings)


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


@dataclass
class Dataset:
    """The files of a dataset, listed and labelled once into a spool (JSON lines) and cut into chunks,
    each measured into its own part file (see load_dataset)."""

    spool: TextIO
    chunks: list[Chunk]
    parts: PartStore

    @property
    def files(self) -> int:
        return sum(chunk.files for chunk in self.chunks)

    def chunk_rows(self) -> Iterator[tuple[int, Chunk, Iterator[dict]]]:
        """(index, chunk, its rows) of each chunk, read back one row at a time from the spool; the rows
        a caller leaves unread are skipped."""
        self.spool.seek(0)
        for index, chunk in enumerate(self.chunks):
            lines = itertools.islice(self.spool, chunk.files)
            yield index, chunk, map(json.loads, lines)
            collections.deque(lines, maxlen=0)

    def tables(self) -> Iterator[pd.DataFrame]:
        """The files' labels and measurements side by side, in file order, in tables of at most
        TABLE_ROWS rows (a slice of one chunk each): memory does not depend on the chunks' sizes."""
        for _, chunk, rows in self.chunk_rows():
            measured = self.parts.rows(chunk.part)
            for start in range(0, chunk.files, TABLE_ROWS):
                labels = json_table(list(itertools.islice(rows, TABLE_ROWS))).drop(columns=["_key", "_real_path"])
                values = list(itertools.islice(measured, len(labels)))
                if len(values) < len(labels) or (
                    start + len(labels) == chunk.files and next(measured, None) is not None
                ):
                    # only a part edited by hand can get here: each is written whole
                    raise UserError(
                        f"{self.parts.folder / chunk.part} does not hold {chunk.files} rows: delete it and re-run"
                    )
                yield pd.concat([labels, json_table(values).set_axis(labels.index)], axis=1)


TABLE_ROWS = 500


@contextlib.contextmanager
def load_dataset(
    dataset_dir, labels: Labels, age_range: AgeRange, groups: AgeGroups, parts: PartStore, chunk_files: int
) -> Iterator[Dataset]:
    """List and label every image file under `dataset_dir` (datasets.iter_dataset), one row per file,
    into a spool beside the part files, cut into chunks of about `chunk_files` files (plan_chunks).

    Examples
    --------
    >>> import tempfile, cv2, numpy as np
    >>> from agepipe.config.data_stages import Labels
    >>> from agepipe.config.schema import AgeRange
    >>> folder = tempfile.mkdtemp()
    >>> _ = cv2.imwrite(f"{folder}/25_1_3_face.jpg", np.full((64, 64, 3), 128, np.uint8))
    >>> parts = PartStore(f"{folder}/parts", "settings")
    >>> labels = Labels(source="filename", csv_path=None, file_column=["file"], age_column=["age"])
    >>> with load_dataset(folder, labels, AgeRange(min=0, max=120), AgeGroups((0, 20, 40)), parts, 1000) as dataset:
    ...     row = next(dataset.chunk_rows())[2].__next__()
    >>> dataset.files, row["file"], row["age"], row["age_group"]
    (1, '25_1_3_face.jpg', 25, '20-39')
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8", dir=parts.folder) as spool:
        yield Dataset(
            spool, plan_chunks(iter_dataset(dataset_dir, labels, age_range, groups), spool, parts, chunk_files), parts
        )


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
        if (
            zlib.crc32(row["file"].encode("utf-8", "surrogatepass")) % chunk_files == 0
            or len(keys) >= MAX_CHUNK_FACTOR * chunk_files
        ):
            chunks.append(Chunk(parts.part_name(keys), len(keys)))
            keys = []
    if keys:
        chunks.append(Chunk(parts.part_name(keys), len(keys)))
    return chunks


MAX_CHUNK_FACTOR = 2  # bounds the rows a chunk holds in memory while its files are measured


def compute_images_quality_metrics(dataset: Dataset, settings: ReaderSettings, engine: Engine) -> None:
    """Measure the files of every chunk of `dataset` that has no part file yet and write its part.

    Files stream through a process pool (or a Dask cluster), a few chunks at a time; each chunk's
    rows are written to its part file as soon as its last file is measured, so an interrupted run
    loses at most the chunks in flight, and a re-run with new thresholds measures nothing.
    """
    chunks, parts = dataset.chunks, dataset.parts
    missing = {chunk.part for chunk in chunks if not parts.has(chunk.part)}
    files = sum(chunk.files for chunk in chunks if chunk.part in missing)
    reused = sum(chunk.files for chunk in chunks) - files
    if reused:
        log.info("re-using measurements of %d unchanged files", reused)
    todo = (
        (chunk.part, [row["_real_path"] for row in rows])
        for _, chunk, rows in dataset.chunk_rows()
        if chunk.part in missing
    )
    fill_parts(
        parts,
        todo,
        _measure_task,
        engine,
        state=settings,
        progress=progress_bar(files, "measuring"),
        on_failure=lambda path, reason: unreadable_row(reason, settings),
    )


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


def apply_checks(frame: pd.DataFrame, checks: dict[str, CheckRule]) -> pd.DataFrame:
    """Per threshold rule, a boolean column `flag_<check>` and beside it `score_<check>`, its margin
    (see check_margin): the exploration and processing stages' single definition of what fails."""
    columns = {}
    for name, rule in checks.items():
        margin = check_margin(frame[rule.metric], rule.below, rule.above)
        columns[flag_column(name)], columns[score_column(name)] = margin < 0, margin
    return pd.DataFrame(columns, index=frame.index)


def failing_checks(values: dict, checks: dict[str, CheckRule]) -> list[str]:
    """Names of the checks one measured image fails (an informational check never fails it)."""
    flags = apply_checks(pd.DataFrame([values]), checks).iloc[0]
    return [name for name, rule in checks.items() if flags[flag_column(name)] and not rule.informational]


def check_images_quality(
    frame: pd.DataFrame, checks: dict[str, CheckRule], duplicates: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Apply the threshold checks, and the duplicate search's columns when given (see
    DuplicateGroups.columns); add flags, failed checks and a status per file.

    Every check adds a boolean column `flag_<check>` (threshold checks also `score_<check>`).
    `failed_checks` lists the failed ones (";"; an informational check flags without failing),
    `status` is one of ok, low_quality, unlabelled, unreadable (the first problem wins, in reverse
    order), and `reason` says why in words.
    """
    frame = pd.concat([frame, apply_checks(frame, checks)], axis=1)
    names = [name for name, rule in checks.items() if not rule.informational]
    if duplicates is not None:
        frame = pd.concat([frame, duplicates], axis=1)
        frame[flag_column(Check.DUPLICATE)] = frame["duplicate_of"].notna()
        frame[flag_column(Check.AGE_CONFLICT)] = frame["age_conflict"]
        names += [Check.DUPLICATE, Check.AGE_CONFLICT]
    flags = frame[[flag_column(n) for n in names]].to_numpy()
    frame["failed_checks"] = [";".join(n for n, f in zip(names, row) if f) for row in flags]

    unreadable, unlabelled = frame["error"].notna(), frame["label_error"].notna()
    low_quality = frame["failed_checks"] != ""
    frame["status"] = np.select(
        [unreadable, unlabelled, low_quality], [Status.UNREADABLE, Status.UNLABELLED, Status.LOW_QUALITY], Status.OK
    )
    frame["reason"] = np.select(
        [unreadable, unlabelled, low_quality],
        [frame["error"], frame["label_error"], "failed: " + frame["failed_checks"].str.replace(";", ", ")],
        "",
    )
    return frame


# --------------------------------------------------------------------------------------------------
# The exploration config, shared by every stage that measures or checks images
# --------------------------------------------------------------------------------------------------
def load_explore_config(path, overrides=()) -> ExploreConfig:
    """Load and validate the explore config, including each metric's own parameters and the checks'
    metrics (which must be columns the configured metrics fill)."""
    try:
        return validated_exploration(load_config(ExploreConfig, path, overrides))
    except ConfigError as exc:
        raise ConfigError(exc if str(exc).startswith((str(path), "--set ")) else f"{path}: {exc}") from None


def validated_exploration(config: ExploreConfig) -> ExploreConfig:
    """`config` with each metric's parameters checked against the metric's own model, and each check's
    metric against the columns the configured metrics fill."""
    for name, params in config.metrics.items():
        if name not in METRICS:
            raise ConfigError(f"metrics.{name}: unknown metric (known: {', '.join(METRICS)})")
        config.metrics[name] = validate_section(METRICS[name].params, params, f"metrics.{name}").model_dump()
    available = SIZE_COLUMNS + ["file_size", "channels", "bit_depth"] + measured_columns(config.metrics)
    for name, rule in config.checks.items():
        if rule.metric not in available:
            raise ConfigError(f"checks.{name}.metric: expected one of {', '.join(available)}, got {rule.metric!r}")
    if "faces" in config.metrics:
        detector_model_path()  # a missing package is one line now, not an error in every row
    return config


def exploration_keys(overrides: Iterable[str], own: type[BaseModel]) -> tuple[list[str], list[str]]:
    """The overrides split into a later stage's own keys (in its model `own`) and the exploration's."""
    others = [
        o
        for o in overrides
        if o.partition("=")[0].split(".")[0] not in own.model_fields
        and o.partition("=")[0].split(".")[0] in ExploreConfig.model_fields
    ]
    return [o for o in overrides if o not in others], others


def exploration_settings(exploration_csv: str | os.PathLike, overrides: Iterable[str] = ()) -> ExploreConfig:
    """The settings the exploration that wrote `exploration_csv` ran with, read from its run record:
    the one source of truth for the thresholds of every later stage. A value given for one of them
    (`overrides`) that differs from what the exploration ran with is a one-line ConfigError naming both.
    A CSV without its run record (copied or edited by hand) is judged by configs/explore_images.yaml,
    and the log says so."""
    record = Path(f"{exploration_csv}.run.json")
    try:
        recorded = read_run_record(record)["config"]
        base = validated_exploration(validate_section(ExploreConfig, recorded))
    except FileNotFoundError:
        if Path(exploration_csv).exists():  # else the stage says, in one line, that the CSV is missing
            log.warning(
                "%s has no run record (%s): judging it by the thresholds of %s as they are now",
                exploration_csv,
                record.name,
                EXPLORE_CONFIG,
            )
        return load_explore_config(EXPLORE_CONFIG, overrides)
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        raise ConfigError(f"{record} is not the run record of an exploration: re-run explore_images.py") from None
    for assignment in overrides:
        trial = copy.deepcopy(recorded)
        key = apply_override(trial, assignment)
        if validated_exploration(validate_section(ExploreConfig, trial)) != base:
            node = recorded
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            recorded_value = (
                f"{node:g}" if isinstance(node, (int, float)) and not isinstance(node, bool) else shown(node)
            )
            raise ConfigError(
                f"--set {key}: the exploration ran with {recorded_value} ({record}), this command says "
                f"{assignment.partition('=')[2][:SHOWN_CHARACTERS]}; re-run explore_images.py with the value you want"
            )
    return base


EXPLORE_CONFIG = CONFIG_DIR / "explore_images.yaml"  # for an exploration CSV without its run record (copied, edited)
