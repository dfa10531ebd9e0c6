"""Helpers every agepipe script shares.

Configuration: each script declares a schema (types and ranges, no default values: the YAML files in
`configs/` hold every tunable number). `load_config` reads `configs/common.yaml` (settings every stage
shares, such as the age groups), then the script's own file, then `--set dotted.key=value` overrides,
and validates the result before any work starts. A problem raises `ConfigError` whose message names the
key path and what was expected; `run_script` turns it into one line on stderr and exit status 2.

Also here: logging, atomic writes, age-group binning, a streaming process-pool map with a progress bar,
and a journal that lets an interrupted stage continue where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"
COMMON_CONFIG = CONFIG_DIR / "common.yaml"

log = logging.getLogger("agepipe")


# --------------------------------------------------------------------------------------------------
# Configuration schema
# --------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A configuration problem; the message names the key path and what was expected."""


class Field:
    """One typed config value. Subclasses describe what they accept in `expected`."""

    expected = "a value"

    def validate(self, value: Any, key: str) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, key: str) -> ConfigError:
        return ConfigError(f"{key}: expected {self.expected}, got {value!r}")


class Number(Field):
    def __init__(self, minimum: float | None = None, maximum: float | None = None, integer=False):
        self.minimum, self.maximum, self.integer = minimum, maximum, integer
        kind = "an integer" if integer else "a number"
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        self.expected = kind + (" " + " and ".join(bounds) if bounds else "")

    def validate(self, value, key):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(value, key)
        if self.integer and not isinstance(value, int):
            raise self.fail(value, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(value, key)
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise self.fail(value, key)
        return value


def Int(minimum=None, maximum=None) -> Number:
    return Number(minimum, maximum, integer=True)


class Bool(Field):
    expected = "true or false"

    def validate(self, value, key):
        if not isinstance(value, bool):
            raise self.fail(value, key)
        return value


class Str(Field):
    def __init__(self, choices: Iterable[str] | None = None):
        self.choices = tuple(choices) if choices else None
        self.expected = (
            "one of " + ", ".join(repr(c) for c in self.choices) if self.choices else "a string"
        )

    def validate(self, value, key):
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            raise self.fail(value, key)
        return value


class Optional(Field):
    """`null` or a value accepted by the wrapped field."""

    def __init__(self, inner: Field):
        self.inner = inner
        self.expected = f"null or {inner.expected}"

    def validate(self, value, key):
        if value is None:
            return None
        try:
            return self.inner.validate(value, key)
        except ConfigError:
            raise self.fail(value, key) from None


class ListOf(Field):
    def __init__(self, item: Field, min_length=0, increasing=False):
        self.item, self.min_length, self.increasing = item, min_length, increasing
        order = " in increasing order" if increasing else ""
        self.expected = f"a list of at least {min_length} of {item.expected}{order}"

    def validate(self, value, key):
        if not isinstance(value, list) or len(value) < self.min_length:
            raise self.fail(value, key)
        items = [self.item.validate(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if self.increasing and any(b <= a for a, b in zip(items, items[1:])):
            raise self.fail(value, key)
        return items


class Mapping(Field):
    """A mapping whose keys are checked elsewhere (e.g. each metric's own parameters); null is {}."""

    expected = "a mapping"

    def validate(self, value, key):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(value, key)
        return value


class MapOf(Field):
    """A mapping from free-form names to values of one schema (e.g. named quality checks)."""

    def __init__(self, value_schema):
        self.value_schema = value_schema
        self.expected = "a mapping of names to settings"

    def validate(self, value, key):
        if not isinstance(value, dict):
            raise self.fail(value, key)
        return {
            str(name): validate(item, self.value_schema, f"{key}.{name}")
            for name, item in value.items()
        }


def validate(value: Any, schema: Any, key: str = "") -> Any:
    """Check `value` against `schema` (a Field or a dict of sub-schemas) and return it.

    A dict schema requires exactly its keys: a missing or unknown key is an error, because a typo in
    a threshold name would otherwise silently leave the real threshold at its old value.
    """
    if isinstance(schema, Field):
        return schema.validate(value, key or "<root>")
    where = key or "the config"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(schema)}, got {value!r}")
    unknown = sorted(set(value) - set(schema))
    if unknown:
        name = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(f"{name}: unknown key (allowed here: {', '.join(schema)})")
    result = {}
    for name, sub_schema in schema.items():
        path = f"{key}.{name}" if key else name
        if name not in value:
            raise ConfigError(f"{path}: missing key")
        result[name] = validate(value[name], sub_schema, path)
    return result


COMMON_SCHEMA = {
    "age_groups": {"edges": ListOf(Int(0, 150), min_length=2, increasing=True)},
    "age_range": {"min": Int(0, 150), "max": Int(0, 150)},
    "num_workers": Int(0),
    "log_level": Str(["DEBUG", "INFO", "WARNING", "ERROR"]),
}


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
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


def load_config(schema: dict, path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Read common settings, the script's YAML file and overrides; validate against the schemas."""
    config = _read_yaml(COMMON_CONFIG)
    config.update(_read_yaml(Path(path)))
    for assignment in overrides:
        apply_override(config, assignment)
    full_schema = {**COMMON_SCHEMA, **schema}
    try:
        config = validate(config, full_schema)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if config["age_range"]["min"] >= config["age_range"]["max"]:
        raise ConfigError(f"{path}: age_range: expected min < max, got {config['age_range']}")
    return config


def config_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable settings, to tell whether a saved state still applies."""
    text = json.dumps(parts, sort_keys=True, default=str)
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
        help="override one config value, e.g. --set checks.blurry.threshold=80 (repeatable)",
    )
    return parser.parse_args(argv)


def notebook_config(schema: dict, default_config: str) -> dict:
    """Config for a notebook: AGEPIPE_CONFIG names the file (default configs/<default_config>) and
    AGEPIPE_SET holds newline-separated key=value overrides, as run_notebook.py --set passes them."""
    path = os.environ.get("AGEPIPE_CONFIG") or str(CONFIG_DIR / default_config)
    overrides = [line for line in os.environ.get("AGEPIPE_SET", "").splitlines() if line.strip()]
    config = load_config(schema, path, overrides)
    setup_logging(config["log_level"])
    return config


class UserError(RuntimeError):
    """A problem with the user's input (missing folder, unwritable output...): one line, exit 2."""


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


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # TensorFlow and matplotlib are chatty at INFO; the stages' own messages are what users need.
    for noisy in ("matplotlib", "PIL", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Open a temporary file beside `path`; on success rename it over `path`, else remove it.

    A reader never sees a half-written file, and a crash leaves the previous version intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs get the usual permissions
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
        raise UserError(f"{what} {path} lacks column {missing[0]!r} (it has: {', '.join(map(str, frame.columns[:12]))})")
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


def remove_stale_outputs(output_dir: str | os.PathLike, keep: set[str]) -> int:
    """Delete files under output_dir that this run did not produce: outputs of runs with other settings
    and temporary files of killed runs. Hidden files such as .gitkeep stay."""
    removed = 0
    for root, _, files in os.walk(output_dir):
        for name in files:
            path = os.path.join(root, name)
            ours = not name.startswith(".") or name.endswith(".tmp")
            if ours and path not in keep:
                os.unlink(path)
                removed += 1
    return removed


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


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


def age_groups_from(config: dict) -> AgeGroups:
    return AgeGroups(tuple(config["age_groups"]["edges"]))


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


def parallel_map(
    func: Callable,
    items: Iterable,
    num_workers: int,
    *,
    initializer: Callable | None = None,
    initargs: tuple = (),
    chunksize: int = 64,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> Iterator:
    """Yield func(item) for each item in order, over a process pool (or in-process for 1 worker).

    Results stream back as they finish, so the caller can write them out and memory stays flat.
    """
    workers = resolve_workers(num_workers)
    wrap = progress or (lambda it: it)
    if workers == 1:
        if initializer:
            initializer(*initargs)
        yield from wrap(map(func, items))
        return
    # fork is fastest on Linux, but TensorFlow (imported by the training stage) is not fork-safe,
    # so the training and prediction scripts never use this helper with workers > 1.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from wrap(pool.imap(func, items, chunksize=chunksize))


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
        self._file.write(_json_line(key, row))
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
                f.write(_json_line(key, row))

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _json_line(key: str, row: dict) -> str:
    """One journal line; NaN becomes null, since JSON has no NaN."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    return json.dumps({"_key": key, **clean}, default=_json_default) + "\n"


def _json_default(value):
    """numpy scalars in result rows become plain JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the journal")
