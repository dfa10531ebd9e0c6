"""The files of a face dataset and their labels, and the pipeline's tables: finding every image file
under a folder, one row per file (unlabelled ones too), reading its age from a UTKFace file name or a
labels CSV, and reading the CSVs the stages pass to each other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from agepipe.config.data_stages import Labels
from agepipe.config.schema import AgeRange
from agepipe.data.age_groups import AgeGroups
from agepipe.data.image_files import CONTROL_CHARACTERS, IMAGE_EXTENSIONS
from agepipe.errors import UserError

log = logging.getLogger("agepipe.dataset")

# UTKFace: age_gender_race_date.jpg[.chip.jpg]; gender and race may be missing in the wild.
UTKFACE_NAME = re.compile(r"^(?P<age>\d+)_(?:(?P<gender>\d)_)?(?:(?P<race>\d)_)?")
LABEL_COLUMNS = ["file", "age", "age_group", "gender", "race"]


def find_image_files(dataset_dir: Path, skipped: Counter | None = None) -> Iterator[tuple[str, str]]:
    """(relative posix path, real path) of every image file below `dataset_dir`, in sorted order; the
    other files are counted by extension in `skipped`, when given (say_skipped).

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
        elif (extension := os.path.splitext(entry[0])[1].lower()) in IMAGE_EXTENSIONS:  # not pathlib: it
            yield entry[0], entry[1]  # interns every name for good (Python 3.11)
        elif skipped is not None:
            skipped[extension or "no extension"] += 1


def say_skipped(skipped: Counter, where) -> None:
    """Log how many files a listing left out as not images, by extension."""
    if skipped:
        kinds = ", ".join(f"{count} {extension}" for extension, count in skipped.most_common())
        count = sum(skipped.values())
        log.info(
            "left out %d file%s of %s that %s not images (%s)",
            count,
            "s" * (count != 1),
            where,
            "are" if count != 1 else "is",
            kinds,
        )


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


@dataclass
class LabelTable:
    """The ages a labels CSV gives, by image path relative to its folder: a file listed twice with
    different ages has none, and says so."""

    path: Path
    ages: dict[str, float]  # NaN where the CSV's age is not a number
    conflicting: set[str]

    def __len__(self) -> int:
        return len(self.ages) + len(self.conflicting)

    def __contains__(self, file: str) -> bool:
        return file in self.ages or file in self.conflicting

    def age_of(self, file: str) -> tuple[float | None, str | None]:
        """(the age the CSV gives `file`, None), or (None, why it gives none)."""
        if file in self.conflicting:
            return None, f"listed more than once in {self.path.name} with different ages"
        if file not in self.ages:
            return None, "not listed in the labels CSV"
        age = self.ages[file]
        return (None, "age in the labels CSV is not a number") if math.isnan(age) else (age, None)


def read_labels_csv(path: Path, file_columns: list[str], age_columns: list[str]) -> LabelTable:
    """The ages of a labels CSV: image paths relative to its folder and ages, in the first column of each
    list (`file_columns`, `age_columns`) the CSV has, in any case."""
    labels = read_table(path, "labels CSV", dtype=str, keep_default_na=False)
    file_column, age_column = (
        labels_column(labels, path, names, key)
        for names, key in ((file_columns, "labels.file_column"), (age_columns, "labels.age_column"))
    )
    table = LabelTable(Path(path), {}, set())
    for file, age in zip(
        labels[file_column].str.replace("\\", "/"), pd.to_numeric(labels[age_column], errors="coerce")
    ):
        age = float(age)
        if file in table.ages and not (table.ages[file] == age or math.isnan(table.ages[file]) and math.isnan(age)):
            del table.ages[file]
            table.conflicting.add(file)
        elif file not in table.conflicting:
            table.ages[file] = age
    return table


HEADER_NAME = re.compile(r"^[A-Za-z_][\w .-]{0,39}$")


def labels_column(labels: pd.DataFrame, path: Path, names: list[str], key: str) -> str:
    """The labels CSV's first column among `names`, in any case; else a UserError listing the columns
    found and the config key (`key`) that names the right one."""
    by_name = {str(column).strip().lower(): column for column in labels.columns}
    for name in names:
        if name.lower() in by_name:
            return by_name[name.lower()]
    # a header names columns; anything else is the file's first line, never quoted
    plain = all(HEADER_NAME.match(str(column)) for column in labels.columns)
    found = ", ".join(map(str, labels.columns)) if plain else f"{len(labels.columns)} columns, no header line"
    raise UserError(
        f"labels CSV {path} has none of the columns {', '.join(names)} (it has {found}): "
        f"name yours with --set {key}=COLUMN"
    )


def checked_age(age: float, age_range: AgeRange) -> tuple[int | None, str | None]:
    """(age as whole years, None), or (None, why it is not a usable age label).

    Examples
    --------
    >>> checked_age(25.0, AgeRange(min=0, max=120)), checked_age(25.5, AgeRange(min=0, max=120))[1]
    ((25, None), 'age 25.5 is not a whole number of years')
    """
    if not math.isfinite(age) or not (age_range.min <= age <= age_range.max):
        return None, f"age {age:g} outside {age_range.min}-{age_range.max}"
    if age != int(age):
        return None, f"age {age:g} is not a whole number of years"
    return int(age), None


def iter_dataset(dataset_dir, labels: Labels, age_range: AgeRange, age_groups: AgeGroups) -> Iterator[dict]:
    """One row per image file under `dataset_dir`, in sorted order: file, path, age, age_group, gender,
    race, label_error, and the real path to read it from (_real_path).

    `labels` is the `labels` section of the explore config: ages come from UTKFace file names, or from
    the labels CSV (`csv_path`, `file_column`, `age_column`; the files it names are relative to the
    dataset folder) when `source` is "csv", or "auto" and a CSV is given.
    A file without a usable age keeps its row, with `label_error` saying why.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"dataset folder {dataset_dir} does not exist")
    from_csv = labels.from_csv
    if from_csv:
        csv_path = Path(labels.csv_path)
        table = read_labels_csv(csv_path, labels.file_column, labels.age_column)
    files = matched = 0
    skipped: Counter = Counter()
    for file, real in find_image_files(dataset_dir, skipped):
        files += 1
        parsed = parse_utkface_name(file)
        age, error = parsed["age"], None
        if from_csv:
            matched += file in table
            age, error = table.age_of(file)
        elif age is None:
            error = "no age in the file name (expected age_gender_race_date.jpg)"
        age, error = checked_age(age, age_range) if age is not None else (None, error)
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
    say_skipped(skipped, dataset_dir)
    if not files:
        raise UserError(f"dataset folder {dataset_dir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if from_csv and matched < len(table):
        log.warning("%d rows of %s name files that are not in %s", len(table) - matched, csv_path, dataset_dir)


def read_table(path, what: str, hint: str = "", **read_options) -> pd.DataFrame:
    """A CSV table given by the user; a missing, empty, unreadable or not regular file (a FIFO would
    never end) raises UserError naming it (and `hint` on what to run when it is missing), never quoting
    its contents."""
    _check_table_file(Path(path), what, hint)
    with _table_errors(Path(path), what):
        return pd.read_csv(path, **read_options)


def read_metadata_csv(path, what: str, hint: str = "", required=(), **read_options) -> pd.DataFrame:
    """Read one of the pipeline's CSVs (read_table); a missing required column raises UserError."""
    frame = read_table(path, what, hint, keep_default_na=False, na_values=[""], **read_options)
    _check_columns(frame, path, what, required)
    return frame


def read_metadata_chunks(path, what: str, hint: str, required, rows: int, **read_options) -> Iterator[pd.DataFrame]:
    """read_metadata_csv, `rows` rows at a time (each chunk indexed from 0): memory depends on `rows`,
    not on the table's length. Give `dtype` for every column whose type must not depend on the rows
    a chunk happens to hold."""
    _check_table_file(Path(path), what, hint)
    with (
        _table_errors(Path(path), what),
        pd.read_csv(path, chunksize=rows, keep_default_na=False, na_values=[""], **read_options) as reader,
    ):
        for chunk in reader:
            _check_columns(chunk, path, what, required)
            yield chunk.reset_index(drop=True)


def _check_table_file(path: Path, what: str, hint: str) -> None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UserError(f"{what} {path} is not a regular file")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found" + (f": {hint}" if hint else "")) from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror})") from None


@contextlib.contextmanager
def _table_errors(path: Path, what: str):
    """pandas' errors on a user's table as one-line UserErrors that never quote its contents."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise UserError(f"{what} {path} is empty") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise UserError(
            f"{what} {path} is not a table pandas can read ({(str(exc).splitlines() or [''])[0][:120]})"
        ) from None


def _check_columns(frame: pd.DataFrame, path, what: str, required) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise UserError(
            f"{what} {path} lacks column {missing[0]!r} (it has {len(frame.columns)} other columns): is it the right "
            "file?"
        )


def labelled_images(inputs: list[str], labels_csv: str | None, age_range: AgeRange) -> pd.DataFrame:
    """Every image the `inputs` name, one row each (iter_labelled_images), as a table.

    Examples
    --------
    >>> import tempfile, cv2, numpy as np
    >>> folder = tempfile.mkdtemp()
    >>> _ = cv2.imwrite(f"{folder}/photo.jpg", np.zeros((8, 8, 3), np.uint8))
    >>> _ = open(f"{folder}/labels.csv", "w").write("file,age\\nphoto.jpg,41\\n")
    >>> table = labelled_images([folder], f"{folder}/labels.csv", AgeRange(min=0, max=120))
    >>> table[["age", "label_error"]].values.tolist()
    [[41, None]]
    """
    return pd.DataFrame(iter_labelled_images(inputs, labels_csv, age_range))


def iter_labelled_images(inputs: list[str], labels_csv: str | None, age_range: AgeRange) -> Iterator[dict]:
    """Every image the `inputs` name, one row each, one at a time: file (as shown), path, age (when
    known: None otherwise), gender, race (when known), label_error.

    An input is a folder (searched recursively), an image file, or a table of images (a CSV with a
    `path` column, or a `file` column relative to the CSV's folder: an exploration, processed or
    resampled CSV, a training split, a labels CSV beside its images). Ages come from the table's `age`
    column, else from `labels_csv` (file relative to its input folder, age), else from UTKFace names.
    Every input is checked before the first row: a missing one is a UserError, as are inputs that
    hold no image at all.
    """
    labels = read_labels_csv(Path(labels_csv), ["file"], ["age"]) if labels_csv else None
    for item in inputs:
        if not (Path(item).is_dir() or Path(item).is_file()):
            raise UserError(f"input {item} does not exist")
    count = 0
    for row in _input_rows(inputs):
        parsed = parse_utkface_name(row["relative"])
        age, error = row.get("age"), None
        if age is None or pd.isna(age):
            age, error = (
                labels.age_of(row["relative"])
                if labels is not None and row["relative"] in labels
                else (parsed["age"], None)
            )
        age, error = (
            checked_age(float(age), age_range)
            if isinstance(age, numbers.Real) and not pd.isna(age)
            else (None, error or "no age known")
        )
        row.update(
            age=age, label_error=error, gender=row.get("gender", parsed["gender"]), race=row.get("race", parsed["race"])
        )
        del row["relative"]
        count += 1
        yield row
    if not count:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, inputs))}")


def _input_rows(inputs: list[str]) -> Iterator[dict]:
    """file, path and relative (the name a labels CSV or a UTKFace name is matched by) of each input image."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            skipped: Counter = Counter()
            yield from (
                {"file": display_name(str(path / name)), "path": real, "relative": name}
                for name, real in find_image_files(path, skipped)
            )
            say_skipped(skipped, path)
        elif path.suffix.lower() == ".csv":
            yield from _table_rows(path)
        else:
            yield {"file": display_name(str(path)), "path": str(path), "relative": path.name}


def _table_rows(path: Path) -> Iterator[dict]:
    """The images a CSV lists (see iter_labelled_images), with the columns it has of age, gender and
    race (only those columns are read: a wide exploration CSV costs little memory)."""
    table = read_metadata_csv(
        path, "input table", dtype={"file": str, "path": str}, usecols=lambda column: column in TABLE_COLUMNS
    )
    if "path" not in table.columns and "file" not in table.columns:
        raise UserError(f"input table {path} lists no images: it needs a path or a file column")
    paths = table["path"] if "path" in table.columns else table["file"]
    names = table["file"] if "file" in table.columns else table["path"]
    known = {
        column: pd.to_numeric(table[column], errors="coerce")
        for column in ("age", "gender", "race")
        if column in table.columns
    }
    for position, (image, name) in enumerate(zip(paths, names)):
        if not isinstance(image, str) or not image:
            continue
        full = image if os.path.isabs(image) else str(path.parent / image)
        yield {
            "file": display_name(str(name)),
            "path": full,
            "relative": str(name),
            **{c: values.iloc[position] for c, values in known.items()},
        }


TABLE_COLUMNS = {"path", "file", "age", "gender", "race"}


def unusable_ages(ages: pd.Series, age_range: AgeRange) -> pd.Series:
    """True where an age label cannot be used: missing, not a whole number of years, or outside the
    plausible `age_range` (1e30 is a typo, not an age).

    Examples
    --------
    >>> ages = pd.Series([25, 25.5, -1, None, "x", 250, 1e30])
    >>> unusable_ages(ages, AgeRange(min=0, max=120)).tolist()
    [False, True, True, True, True, True, True]
    """
    ages = pd.to_numeric(ages, errors="coerce")
    return ages.isna() | (ages % 1 != 0) | (ages < age_range.min) | (ages > age_range.max)


def suspected_labels_mask(frame: pd.DataFrame) -> pd.Series:
    """True for the rows check_labels.py suspects of a wrong age label (its column, read back from a CSV,
    is text: "True", "False" or empty).

    Examples
    --------
    >>> suspected_labels_mask(pd.DataFrame({"suspected_label_error": ["True", "False", None, True]})).tolist()
    [True, False, False, True]
    """
    return frame["suspected_label_error"].astype(str).str.lower() == "true"


class MissingColumn(ValueError):
    """The data frame lacks a column a figure or a report needs; the message names it."""


def require(frame: pd.DataFrame, *columns: str) -> None:
    for column in columns:
        if column not in frame.columns:
            raise MissingColumn(
                f"column {column!r} is not in the CSV (columns: {', '.join(map(str, frame.columns[:12]))}...)"
            )


def suspected_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of a label check's CSV it suspects of a wrong age label, least likely label first."""
    require(frame, "suspected_label_error", "label_quality", "predicted_age", "age", "path", "file")
    suspected = frame[suspected_labels_mask(frame)]
    return suspected.sort_values(["label_quality", "file"], kind="stable")


def without_suspected_labels(frame: pd.DataFrame, exclude: bool) -> tuple[pd.DataFrame, int]:
    """`frame` without the rows check_labels.py suspects of a wrong age label (when `exclude` and the
    frame has its column), and how many were left out."""
    if not exclude or "suspected_label_error" not in frame.columns:
        return frame, 0
    suspected = suspected_labels_mask(frame)
    return frame[~suspected], int(suspected.sum())
