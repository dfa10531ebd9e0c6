"""Everything a stage writes goes through here: atomic writes, run records, and the guards that refuse an
output path which would destroy data the run did not make (an input, a folder of the user's, the
project's .git), the run lock, and `OutputFolder`, the proof of which files in an image folder
agepipe wrote.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from config import PROJECT_DIR, plain
from errors import UserError
from image_io import IMAGE_EXTENSIONS

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
