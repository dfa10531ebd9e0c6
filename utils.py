"""Helpers every agepipe script shares.

Configuration: each script declares a schema (types and ranges, no default values: the YAML files in
`configs/` hold every tunable number). `load_config` reads `configs/common.yaml` (settings every stage
shares, such as the age groups), then the script's own file, then `--set dotted.key=value` overrides,
and validates the result before any work starts. A problem raises `ConfigError` whose message names the
key path and what was expected; `run_script` turns it into one line on stderr and exit status 2.

Also here: logging, atomic writes, age-group binning, a streaming process-pool (or Dask) map with a
progress bar, and the two ways an interrupted stage continues where it stopped: a journal of finished
items, and a store of part files of finished chunks.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"
COMMON_CONFIG = CONFIG_DIR / "common.yaml"

log = logging.getLogger("agepipe")


# --------------------------------------------------------------------------------------------------
# Configuration (the models are in config_models.py)
# --------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A configuration problem; the message names the key path and what was expected."""


def validate_section(model: type[ModelT], data: Any, where: str = "") -> ModelT:
    """`data` as a `model`, or a one-line ConfigError naming the first problem's key path (under
    `where`), what was expected and what was found."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # a misspelt key is also a missing one: naming the misspelling says more
        first = min(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise ConfigError(describe_problem(first, where)) from None


# what a pydantic error type expects, in the words of a config file
EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
            "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
            "model_attributes_type": "a mapping", "finite_number": "a finite number"}


def describe_problem(error: dict, where: str = "") -> str:
    """One pydantic error as `key.path: expected ..., got <value>` (or the key's own rule).

    Examples
    --------
    >>> describe_problem({"type": "greater_than_equal", "loc": ("edges", 1), "msg": "", "input": -2, "ctx": {"ge": 0}}, "age_groups")
    'age_groups.edges[1]: expected a value >= 0, got -2'
    """
    keys = [where] if where else []
    for part in error["loc"]:
        if isinstance(part, int) and keys:
            keys[-1] += f"[{part}]"
        else:
            keys.append(str(part))
    key = ".".join(keys) or "the config"
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"{key}: missing key"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "value_error":
        return f"{key}: {context.get('error', error['msg'])}"
    expected = EXPECTED.get(kind) or {
        "greater_than_equal": f"a value >= {context.get('ge', 0):g}", "less_than_equal": f"a value <= {context.get('le', 0):g}",
        "literal_error": f"one of {context.get('expected')}", "too_short": f"at least {context.get('min_length')} items",
        "too_long": f"at most {context.get('max_length')} items",
    }.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    return f"{key}: expected {expected}, got {error['input']!r}"


MAX_CONFIG_BYTES, MAX_YAML_ALIASES = 1_000_000, 100


def _read_yaml(path: Path) -> dict:
    """A YAML mapping from `path`; a missing, unreadable, huge or alias-bombed file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: a config file of over {MAX_CONFIG_BYTES:,} characters is not a config file")
        # aliases can expand a few lines into billions of nodes ("billion laughs"); configs need few
        if sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)) > MAX_YAML_ALIASES:
            raise ConfigError(f"{path}: uses more than {MAX_YAML_ALIASES} YAML aliases")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(config: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a config section")
        node = child
    node[parts[-1]] = value


def load_config(model: type[ModelT], path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelT:
    """Read the common settings, the script's YAML file and the overrides, as a `model` (see
    config_models.py); any problem is one ConfigError line starting with the file's path."""
    config = _read_yaml(COMMON_CONFIG)
    config.update(_read_yaml(Path(path)))
    for assignment in overrides:
        apply_override(config, assignment)
    try:
        return validate_section(model, config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def plain(value: Any) -> Any:
    """A config model (or anything else json cannot write) as JSON-ready data: json.dumps's `default`."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def config_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable settings, to tell whether a saved state still applies."""
    text = json.dumps(parts, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(description: str, default_config: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default=str(CONFIG_DIR / default_config), help="YAML config file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set num_workers=1 (repeatable; dotted keys reach nested values)",
    )
    return parser.parse_args(argv)


def notebook_config(model: type[ModelT], path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelT:
    """A notebook's config, from its `parameters` cell (which run_notebook.py sets through papermill)."""
    config = load_config(model, path, overrides)
    setup_logging(config.log_level)
    return config


class UserError(RuntimeError):
    """A problem with the user's input (missing folder, unwritable output...): one line, exit 2."""


FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_script(main: Callable[[argparse.Namespace], None], description: str, default_config: str):
    """Entry point shared by the scripts: parse arguments, run, turn user errors into one line."""
    args = parse_args(description, default_config)
    try:
        main(args)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_ERRORS:
            raise
        # a full disk or a read-only folder: what was written stays whole (atomic writes), re-run after fixing
        print(f"error: {exc.strerror}: {exc.filename or 'while writing'}; re-run the same command once fixed", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide what C++ code writes to file descriptor 2: TensorFlow's and LiteRT's start-up lines (oneDNN, CUDA
    drivers, XNNPACK) are written by absl before any log level applies, and would bury the stage's own output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # TensorFlow and matplotlib are chatty at INFO; the stages' own messages are what users need.
    for noisy in ("matplotlib", "PIL", "tensorflow", "h5py", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process's umask, read without setting it (Linux shows it in /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it and put it back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Open a temporary file beside `path`; on success rename it over `path`, else remove it.

    A reader never sees a half-written file, and a crash leaves the previous version intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name stays short: a 250-character name plus a suffix would exceed the file system's limit
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:32]}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_csv_atomic(frame, path: str | os.PathLike) -> None:
    with atomic_write(path, newline="", encoding="utf-8") as f:
        frame.to_csv(f, index=False)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def copy_file_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


RECORDED_PACKAGES = ("numpy", "opencv-python-headless", "pandas", "pillow", "scikit-image", "tensorflow", "keras", "dlib-bin",
                     "face-recognition-models")


def run_record(config: Any) -> dict:
    """What reproduces a run: the resolved config (after --set) and the versions of the packages used."""
    from importlib import metadata

    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"config": json.loads(json.dumps(config, default=plain)), "python": sys.version.split()[0], "packages": versions}


def write_run_record(config: Any, output: str | os.PathLike) -> Path:
    """Save run_record(config) as <output>.run.json beside a stage's output."""
    target = Path(f"{output}.run.json")
    with atomic_write(target, encoding="utf-8") as f:
        json.dump(run_record(config), f, indent=2)
    return target


def read_metadata_csv(path, what: str, hint: str = "", required=(), **read_options):
    """Read one of the pipeline's CSVs; a missing, empty or unreadable file, or a missing required
    column, raises UserError naming the file (and `hint` on what to run when it is missing)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], **read_options)
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found" + (f": {hint}" if hint else "")) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{what} {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} cannot be read: {exc}") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise UserError(f"{what} {path} lacks column {missing[0]!r} (it has {len(frame.columns)} other columns): is it the right file?")
    return frame


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create `path` if needed and prove it is writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path} is not writable ({exc.strerror or exc})") from None
    return path


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when one folder is, contains or lies inside the other."""
    return is_inside(a, b) or is_inside(b, a)


def check_output_csv(path: str | os.PathLike, what: str, inputs=(), image_folders=()) -> Path:
    """Refuse, in one line, an output CSV that is an input file, a folder, an image file, or inside an
    input or image folder: writing it would destroy data the run did not make."""
    from image_reader import IMAGE_EXTENSIONS

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserError(f"{what} {path} has an image file's name; refusing to write a CSV there")
    for other in map(Path, inputs):
        if path.resolve() == other.resolve() or (other.is_dir() and is_inside(path, other)):
            raise UserError(f"{what} {path} would overwrite or sit inside the input {other}")
    for folder in image_folders:
        if is_inside(path, folder):
            raise UserError(f"{what} {path} lies inside the image folder {folder}; put it elsewhere")
    return path


def confined(folder: Path, relative: str) -> Path:
    """folder / relative, refusing a path read from a CSV that would lead outside `folder`
    (an absolute path, `..`, a link out)."""
    target = folder / relative
    if Path(relative).is_absolute() or not is_inside(target, folder):
        raise UserError(f"refusing the path {relative!r} from the CSV: it leads outside {folder}")
    return target


@contextlib.contextmanager
def run_lock(path: str | os.PathLike):
    """Hold an exclusive lock on `path` + ".lock" for the block: a second run on the same outputs stops
    at once with one line instead of both corrupting each other's journal and files."""
    import fcntl

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            # a POSIX record lock, not flock: worker processes forked from this one do not inherit it,
            # so a killed run's orphaned workers cannot keep the next run out
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another run is writing {path} right now; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


MANIFEST = ".agepipe-outputs.json"


class OutputFolder:
    """An image folder a stage writes, and the proof of which files in it the stage wrote.

    The folder holds a manifest of the files agepipe wrote there. A run may replace or delete only
    those: before writing, `begin` adds the files it plans to write to the manifest (so a killed run's
    files stay provably ours), and `finish` deletes the listed files this run did not write (outputs of
    earlier runs with other settings) and lists exactly what it wrote. A folder that is, contains or
    lies inside an input folder, the project or its .git is refused; so is a non-empty folder without
    a manifest, unless `overwrite` (the user's explicit word that it may be written into).
    """

    def __init__(self, path: str | os.PathLike, inputs=(), overwrite: bool = False):
        self.path = Path(path)
        if overlaps(self.path, PROJECT_DIR / ".git"):
            raise UserError(f"output folder {self.path} overlaps the project's .git: refusing to write there")
        if is_inside(PROJECT_DIR, self.path):
            raise UserError(f"output folder {self.path} contains the project itself: refusing to write there")
        for folder in inputs:
            if overlaps(self.path, folder):
                raise UserError(f"output folder {self.path} overlaps the input dataset {folder}: refusing to write there")
        self.manifest = self.path / MANIFEST
        if self.path.is_dir() and not self.manifest.exists() and not overwrite:
            strangers = [p for p in self.path.iterdir() if p.name != ".gitkeep"]
            if strangers:
                raise UserError(f"output folder {self.path} holds files agepipe did not write ({strangers[0].name}, ...): "
                                "choose an empty folder, or allow writing into it with --set overwrite_output=true")
        ensure_writable_dir(self.path, "output folder")

    def owned(self) -> set[str]:
        """Relative paths of the files the manifest says agepipe wrote."""
        try:
            return set(json.loads(self.manifest.read_text(encoding="utf-8"))["files"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return set()

    def _write(self, files: set[str]) -> None:
        with atomic_write(self.manifest, encoding="utf-8") as f:
            json.dump({"written_by": "agepipe", "files": sorted(files)}, f, indent=0)

    def begin(self, planned: Iterable[str]) -> None:
        self._write(self.owned() | set(planned))

    def finish(self, written: Iterable[str]) -> int:
        """Delete the files agepipe wrote here earlier that this run did not; return how many."""
        written = set(written)
        removed = 0
        for relative in sorted(self.owned() - written):
            target = self.path / relative
            if is_inside(target, self.path) and target.is_file() and not target.is_symlink():
                target.unlink()
                removed += 1
        removed += self._remove_temporary_files(self.owned() | written)
        self._write(written)
        return removed

    def _remove_temporary_files(self, names: set[str]) -> int:
        """Delete the temporary files a killed run of atomic_write left for files agepipe owns here: their
        names are "." + the owned name's first 32 characters + "." + 8 random characters + ".tmp"."""
        prefixes: dict[Path, set[str]] = {}
        for relative in names:
            target = self.path / relative
            prefixes.setdefault(target.parent, set()).add(f".{target.name[:32]}.")
        removed = 0
        for folder, starts in prefixes.items():
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                name = entry.name
                if name.endswith(".tmp") and name[:-13] + "." in starts and entry.is_file() and not entry.is_symlink():
                    entry.unlink()
                    removed += 1
        return removed


# --------------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------------
METADATA_ENTRY = "agepipe.json"  # stored inside the .keras zip, beside Keras' own files


def read_model_metadata(path: str | os.PathLike) -> dict:
    """The metadata train_model.py stores inside a .keras file (read without TensorFlow), or UserError."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError):
        raise UserError(f"model file {path} was not saved by train_model.py (no {METADATA_ENTRY} inside)") from None


# --------------------------------------------------------------------------------------------------
# Age groups
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgeGroups:
    """Age groups from their lower edges: edges [0, 10, 70] give groups 0-9, 10-69 and 70+."""

    edges: tuple[int, ...]

    @property
    def labels(self) -> list[str]:
        uppers = [f"{b - 1}" for b in self.edges[1:]]
        return [f"{a}-{u}" for a, u in zip(self.edges, uppers)] + [f"{self.edges[-1]}+"]

    def bounds(self, max_age: int) -> list[tuple[int, int]]:
        """(lower, upper) inclusive ages of each group; the open last group ends at `max_age`."""
        uppers = [b - 1 for b in self.edges[1:]] + [max_age]
        return list(zip(self.edges, uppers))

    def index_of(self, age: float) -> int:
        """Group index of an age, or -1 below the first edge."""
        if age is None or (isinstance(age, float) and math.isnan(age)) or age < self.edges[0]:
            return -1
        return sum(age >= edge for edge in self.edges) - 1

    def label_of(self, age: float) -> str | None:
        index = self.index_of(age)
        return None if index < 0 else self.labels[index]

    def midpoints(self, max_age: int) -> list[float]:
        return [(lo + hi + 1) / 2 for lo, hi in self.bounds(max_age)]


def age_groups_from(config: BaseModel) -> AgeGroups:
    """The age groups of any config (every config has the common `age_groups`)."""
    return AgeGroups(tuple(config.age_groups.edges))


# --------------------------------------------------------------------------------------------------
# Parallel streaming
# --------------------------------------------------------------------------------------------------
def resolve_workers(num_workers: int) -> int:
    """0 means every core this process may use."""
    if num_workers > 0:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def engine_name(config: BaseModel) -> str:
    """What runs the image work, for summary lines: "2 workers" or "the Dask cluster at tcp://...". """
    if config.scheduler != "local":
        return f"the Dask cluster at {config.scheduler}"
    return f"{resolve_workers(config.num_workers)} workers"


class TaskTimeout(Exception):
    """An item took longer than its time limit."""


def _on_alarm(signum, frame):
    raise TaskTimeout


def _run_chunk(func: Callable, chunk: list, timeout: float | None) -> list[tuple[bool, Any]]:
    """Run func on each item of a chunk inside a worker: (True, result) or (False, reason) per item.
    A time limit interrupts even a blocking read (the alarm's exception stops the system call)."""
    import signal

    results = []
    for item in chunk:
        if timeout:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            results.append((True, func(item)))
        except TaskTimeout:
            results.append((False, f"timed out after {timeout:g} s"))
        except MemoryError:
            results.append((False, "out of memory"))
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
    return results


def parallel_map(
    func: Callable,
    items: Iterable,
    num_workers: int,
    *,
    initializer: Callable | None = None,
    initargs: tuple = (),
    chunksize: int = 64,
    progress: Callable[[Iterator], Iterator] | None = None,
    on_failure: Callable[[Any, str], Any] | None = None,
    timeout: float | None = None,
    scheduler: str = "local",
    chunk_files: int = 1000,
    chunked: bool = False,
) -> Iterator:
    """Yield func(item) for every item, as results finish (not in order), over a pool of processes.

    `items` is consumed lazily and only a few chunks are in flight, so neither the items nor the
    results pile up in memory: the caller writes results out as they come. An item that takes longer
    than `timeout` seconds, or whose worker dies (killed by the out-of-memory killer, a crash in a
    decoder), yields on_failure(item, reason) instead: it costs that item, never the run. After a
    worker dies, the items it may have held are retried one at a time in a fresh worker, so only the
    culprit fails. Without `on_failure`, such a failure raises RuntimeError.

    Items go out in chunks: `chunked` says `items` yields them as lists already, else they are cut
    into lists of `chunk_files`. With `scheduler` "local" each chunk is split further, for balance,
    into pieces of at most `chunksize` items for a pool of `num_workers` processes on this machine;
    with the address of a Dask scheduler, each chunk is one task on that cluster (see `_dask_map`).
    """
    chunks = iter(items) if chunked else batched_lists(items, chunk_files)
    wrap = progress or (lambda it: it)
    if scheduler != "local":
        yield from wrap(_dask_map(func, chunks, scheduler, initializer, initargs, on_failure))
        return
    yield from wrap(_pool_map(func, chunks, resolve_workers(num_workers), initializer, initargs, chunksize, on_failure, timeout))


def batched_lists(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


_worker_initialized_with: tuple | None = None


def _run_dask_chunk(func: Callable, chunk: list, initializer: Callable | None, initargs: tuple) -> list[tuple[bool, Any]]:
    """A chunk on a Dask worker: the initializer runs once per worker process and settings, as in the
    local pool. No per-item time limit: the alarm signal only works in a main thread."""
    global _worker_initialized_with
    if initializer and _worker_initialized_with != (initializer, initargs):
        initializer(*initargs)
        _worker_initialized_with = (initializer, initargs)
    return _run_chunk(func, chunk, None)


def _dask_map(func, chunks, address, initializer, initargs, on_failure) -> Iterator:
    """Chunks of items over the workers of the Dask cluster at `address`, one task per chunk, two
    tasks per worker thread in flight.

    The scheduler re-runs a chunk whose worker is lost on another worker; a chunk that has killed
    three workers yields on_failure for each of its items. Workers must see the files at the same
    paths (a shared file system) and import agepipe's modules (start them in the project folder).
    """
    from distributed import Client, as_completed
    from distributed.scheduler import KilledWorker

    try:
        client = Client(address, timeout=30)
    except (OSError, TimeoutError) as exc:
        raise UserError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    with client:
        running: dict = {}
        finished = as_completed()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                future = client.submit(_run_dask_chunk, func, chunk, initializer, initargs, pure=False)
                running[future] = chunk
                finished.add(future)

        for _ in range(2 * max(1, sum(client.nthreads().values()))):
            submit_next()
        for future in finished:
            chunk = running.pop(future)
            try:
                results = future.result()
            except KilledWorker:
                results = [(False, "its Dask worker died three times")] * len(chunk)
            future.release()
            submit_next()
            for item, (ok, value) in zip(chunk, results):
                yield value if ok else _failed(item, value, on_failure)


def _failed(item: Any, reason: str, on_failure: Callable[[Any, str], Any] | None) -> Any:
    """What an item that failed yields: on_failure(item, reason), or without it a RuntimeError."""
    if on_failure is None:
        raise RuntimeError(f"{reason} while processing {item!r:.200}")
    return on_failure(item, reason)


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    """Worker start-up: die with the parent (a killed run must not leave workers writing files behind
    it), then the caller's initializer."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if initializer:
        initializer(*initargs)


def _pool_map(func, chunks, workers, initializer, initargs, chunksize, on_failure, timeout) -> Iterator:
    # fork is fastest on Linux, and a forked worker dies with its parent (PR_SET_PDEATHSIG: a killed run
    # leaves no worker writing behind it). TensorFlow is not fork-safe, so the scripts that use it start
    # their pools before importing it; OpenCV's thread pool is paused while workers fork (below).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with opencv_threads_stopped():
        yield from _run_pools(func, _pieces(chunks, chunksize, workers), workers, context, initializer, initargs, timeout, on_failure)


def _pieces(chunks: Iterator[list], chunksize: int, workers: int) -> Iterator[list]:
    """Each chunk cut into pieces of at most `chunksize` items, and into at least 4 per worker, so that
    a small chunk still keeps every worker busy."""
    for chunk in chunks:
        size = max(1, min(chunksize, -(-len(chunk) // (workers * 4))))
        yield from (chunk[i:i + size] for i in range(0, len(chunk), size))


@contextlib.contextmanager
def opencv_threads_stopped():
    """Run OpenCV single-threaded while workers are forked: a child forked while the caller's OpenCV
    thread pool exists inherits its locks, and hangs in its first OpenCV call that touches the pool."""
    opencv = sys.modules.get("cv2")
    threads = opencv.getNumThreads() if opencv else None
    if opencv:
        opencv.setNumThreads(1)
    try:
        yield
    finally:
        if opencv:
            opencv.setNumThreads(threads)


def _run_pools(func, pieces, workers, context, initializer, initargs, timeout, on_failure) -> Iterator:
    """The pools of _pool_map: one over the pieces, then after a worker died one per suspect item,
    then a new pool over the remaining pieces."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    suspects: list = []
    exhausted = False
    while not exhausted:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(initializer, initargs)) as pool:
            running = {}
            try:
                while True:
                    while len(running) < workers * 2 and (piece := next(pieces, None)) is not None:  # few in flight: memory stays flat
                        running[pool.submit(_run_chunk, func, piece, timeout)] = piece
                    if not running:
                        exhausted = True
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        results = future.result()
                        for item, (ok, value) in zip(running.pop(future), results):
                            yield value if ok else _failed(item, value, on_failure)
            except BrokenProcessPool:
                suspects += [item for piece in running.values() for item in piece]
        # a worker died: retry what it may have held one item per pool, so only the culprit fails
        while suspects:
            item = suspects.pop()
            try:
                with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=(initializer, initargs)) as single:
                    ok, value = single.submit(_run_chunk, func, [item], timeout).result()[0]
                yield value if ok else _failed(item, value, on_failure)
            except BrokenProcessPool:
                yield _failed(item, "its worker process died (out of memory or a crash in a decoder)", on_failure)


def progress_bar(total: int, description: str, unit: str = "img"):
    """A tqdm wrapper factory showing items per second; quiet when stderr is not a terminal."""
    from tqdm import tqdm

    def wrap(iterator):
        return tqdm(
            iterator,
            total=total,
            desc=description,
            unit=unit,
            smoothing=0.1,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )

    return wrap


# --------------------------------------------------------------------------------------------------
# Resumable work
# --------------------------------------------------------------------------------------------------
FLUSH_SECONDS = 1.0
JOURNAL_CHUNK_ROWS = 2000


class Journal:
    """An append-only JSON-lines file of finished items, so an interrupted stage can continue.

    The first line holds a fingerprint of the settings that affect the results; a journal with another
    fingerprint is discarded, so a changed config redoes the work. Each later line is one finished
    item (a flat row plus its key), flushed at least every FLUSH_SECONDS: a crash loses at most the
    last second of work, and a torn last line is cut off when the journal is next opened. Only the
    keys are held in memory; rows are read back, column-wise, by `rows`.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: set[str] = set()
        self._file = None
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        good_end = 0
        with open(self.path, "rb") as f:
            header = f.readline()
            try:
                valid = json.loads(header).get("fingerprint") == self.fingerprint
            except (json.JSONDecodeError, AttributeError):
                valid = False
            if not valid:
                log.info("discarding %s: it was made with other settings", self.path)
                f.close()
                self.path.unlink()
                return
            good_end = f.tell()
            for line in f:
                try:
                    self.done.add(json.loads(line)["_key"])
                except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                    break  # the torn last line of an interrupted write
                good_end = f.tell()
        if good_end < self.path.stat().st_size:
            os.truncate(self.path, good_end)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._file = open(self.path, "a", encoding="utf-8")
        self._flushed = time.monotonic()
        if fresh:
            self._file.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            self._file.flush()
        return self

    def record(self, key: str, row: dict) -> None:
        self._file.write(json_line(row, key))
        self.done.add(key)
        now = time.monotonic()
        if now - self._flushed > FLUSH_SECONDS:  # bounds what a crash can lose without a syscall per row
            self._file.flush()
            self._flushed = now

    def __exit__(self, exc_type, exc, tb):
        self._file.close()

    def rows(self, keys: list[str], compact: bool = True):
        """The recorded rows for `keys`, in that order, as a DataFrame (the last record of a key wins).
        With `compact`, the journal is rewritten without the rows of other keys."""
        import pandas as pd

        with open(self.path, encoding="utf-8") as f:
            f.readline()
            # in chunks: parsing the whole file at once holds its text and every parsed object together
            chunks = pd.read_json(f, lines=True, dtype=False, precise_float=True, chunksize=JOURNAL_CHUNK_ROWS)
            frame = pd.concat(list(chunks), ignore_index=True)
        frame = frame.drop_duplicates("_key", keep="last").set_index("_key")
        missing = set(keys) - set(frame.index)
        if missing:
            raise RuntimeError(f"{self.path} lacks {len(missing)} results; delete it and re-run")
        if compact and len(frame) > len(keys):
            self.compact(frame.loc[keys])
        return frame.loc[keys].reset_index(drop=True)

    def compact(self, frame) -> None:
        """Rewrite the journal with only these rows (drops results of files no longer present)."""
        with atomic_write(self.path, encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for key, row in zip(frame.index, frame.to_dict("records")):
                f.write(json_line(row, key))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def json_line(row: dict, key: str | None = None) -> str:
    """One JSON-lines line of a flat row (with `key` as its _key); NaN becomes null, since JSON has no NaN."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    return json.dumps(clean if key is None else {"_key": key, **clean}, default=_json_default) + "\n"


def json_table(rows: list[dict]):
    """A DataFrame of JSON rows whose column types follow the JSON values: a column of whole numbers
    (and nulls) is Int64, one of numbers float, anything else object. Every chunk of a table read this
    way gets the same types, whichever values it happens to hold, so its CSV text is the same."""
    import pandas as pd

    columns = {}
    for name in rows[0] if rows else []:
        values = [row.get(name) for row in rows]
        kinds = {type(v) for v in values if v is not None}
        if kinds == {int}:
            columns[name] = pd.array(values, dtype="Int64")
        elif kinds and kinds <= {int, float}:
            columns[name] = pd.array(values, dtype="float64")
        else:
            columns[name] = pd.array(values, dtype=object)
    return pd.DataFrame(columns)


class PartStore:
    """A folder of part files, each holding the finished rows of one chunk of work.

    A part's name is a digest of its chunk's item keys and of the settings that shaped the rows, so a
    run re-uses exactly the parts whose chunk and settings are unchanged, and an interrupted run loses
    at most the chunks in flight. Parts are written atomically and begin with a header line naming
    them: `keep_only` deletes a file only when its name and header prove this store wrote it.
    """

    NAME = re.compile(r"[0-9a-f]{32}\.jsonl")
    TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.[0-9a-z_]+\.tmp")  # what a killed atomic_write of a part leaves

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)

    def part_name(self, keys: Iterable[str]) -> str:
        digest = hashlib.sha256(self.fingerprint.encode())
        for key in keys:
            digest.update(key.encode("utf-8", "surrogatepass") + b"\n")
        return digest.hexdigest()[:32] + ".jsonl"

    def has(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def write(self, name: str, rows: list[dict]) -> None:
        with atomic_write(self.folder / name, encoding="utf-8") as f:
            f.write(json.dumps({"part": name}) + "\n")
            f.writelines(json_line(row) for row in rows)

    def rows(self, name: str) -> Iterator[dict]:
        """The part's rows, one at a time."""
        with open(self.folder / name, encoding="utf-8") as f:
            f.readline()
            for line in f:
                yield json.loads(line)

    def keep_only(self, names: set[str]) -> int:
        """Delete the parts (and killed writes of parts) not in `names`; return how many."""
        removed = 0
        for entry in os.scandir(self.folder):
            if not entry.is_file(follow_symlinks=False) or entry.name in names:
                continue
            if self.TEMPORARY.fullmatch(entry.name) or (self.NAME.fullmatch(entry.name) and self._header(entry.path) == entry.name):
                os.unlink(entry.path)
                removed += 1
        return removed

    @staticmethod
    def _header(path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as f:
                return json.loads(f.readline()).get("part")
        except (OSError, ValueError, AttributeError):
            return None


def _json_default(value):
    """numpy scalars in result rows become plain JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the journal")
