"""The one guard every path a stage writes goes through.

One rule set, checked before any work starts (`OutputGuard`), for every CSV, image folder, plot, model,
cache, lock, part file and run record of every script and notebook:

- never an input file, nor inside an input folder;
- never inside a `.git` folder, nor inside the project's code (configs/, tests/, .venv/...), nor a folder
  that holds the project;
- never a file the run cannot prove agepipe wrote: each folder agepipe writes into holds a manifest
  (manifest.py) of the files it wrote there and a digest of each as written. A file that is not
  listed, or whose content changed since, is the user's and is never replaced or deleted, even with
  `overwrite_output`. Files that identify themselves (journals, part files) prove it by their first
  line instead.

The writing itself (atomic, only where claimed) is writes.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable

from agepipe.config.loading import PROJECT_DIR, plain
from agepipe.errors import UserError, shown
from agepipe.running.manifest import Manifest, written_as
from agepipe.running.writes import (
    _claim,
    check_run_record,
    file_digest,
    remove_temporaries,
    run_record_path,
    temporary_affixes,
    temporary_starts,
    write_bytes,
    write_text,
)

FOLDER_LOCK = ".agepipe.lock"
SCRATCH = "scratch"  # the name of a run's temporary working folder inside an output folder
RESERVED_PREFIX = ".agepipe"  # names of agepipe's own bookkeeping files: never an output a CSV may name
# The project's own folders, where no run writes: its code, tests, configs, data and environment.
PROJECT_FOLDERS = (".git", ".venv", ".ci", "agepipe", "configs", "tests", "benchmarks", "data")


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
        self._locks = contextlib.ExitStack()  # one per claimed file, held until the run ends

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

    def file(self, path: str | os.PathLike, what: str) -> Path:
        """Claim a table (a CSV) agepipe writes whole. An existing file there must be provably agepipe's,
        and its name a CSV's: never another stage's model, report or image, whatever the manifest says."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name")
        self._check_place(path, what)
        if path.suffix.lower() != ".csv":
            raise UserError(f"{what} {path} is not a .csv file name; refusing to write a table there")
        if path.name.startswith(RESERVED_PREFIX):
            raise UserError(f"{what} {path} is a name agepipe keeps for its own bookkeeping")
        manifest = Manifest(path.parent)
        try:
            if path.is_symlink() or (path.exists() and not manifest.owns(path.name)):
                raise UserError(
                    f"{what} {path} exists and agepipe cannot prove it wrote it (or it was changed since): "
                    "move it away or choose another name"
                )
            check_run_record(path)
            ensure_writable_dir(path.parent, f"the folder of {what}")
            self._locks.enter_context(run_lock(path))  # before its temporaries go: they may be a live run's
            manifest.plan([path.name])  # so that the write notes its digest before renaming (writes.atomic_write)
        finally:
            manifest.close()
        remove_temporaries(path.parent, temporary_starts([path.name, run_record_path(path).name]))
        self.files[path.resolve()] = what
        _claim(path, folder=False)
        return path

    def scratch_beside(self, path: Path) -> tempfile.TemporaryDirectory:
        """A temporary folder beside a claimed file, named like that file's temporaries: what a killed
        run leaves there is removed when the file is next claimed."""
        self._require_claimed(path)
        return tempfile.TemporaryDirectory(dir=path.parent, **temporary_affixes(path.name))

    def spool_beside(self, path: Path) -> IO[str]:
        """A nameless temporary text file beside a claimed file (Linux's O_TMPFILE: it never has a name
        that could clash with anything, and nothing is left behind)."""
        self._require_claimed(path)
        return tempfile.TemporaryFile("w+", encoding="utf-8", dir=path.parent)

    def _require_claimed(self, path: Path) -> None:
        if path.resolve() not in self.files:
            raise RuntimeError(f"{path}: claim it through the output guard first")

    def journal(self, path: str | os.PathLike, what: str) -> Path:
        """Claim a file that proves it is agepipe's by its first line (see resume.Journal)."""
        from agepipe.running.resume import Journal

        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name")
        self._check_place(path, what)
        if path.is_symlink() or (path.exists() and not Journal.is_journal(path)):
            raise UserError(
                f"{what} {path} exists and is not one of agepipe's journals: move it away or choose another name"
            )
        ensure_writable_dir(path.parent, f"the folder of {what}")
        self._locks.enter_context(run_lock(path))  # a shared cache: one run appends to it at a time
        remove_temporaries(path.parent, temporary_starts([path.name]))
        self.files[path.resolve()] = what
        _claim(path, folder=False)
        return path

    def folder(
        self, path: str | os.PathLike, what: str, overwrite: bool = False, self_identifying: bool = False
    ) -> OutputFolder:
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
        self._locks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ListedStarts:
    """The first 32 characters of the names the manifest lists in one of the folder's folders (names
    starting with `prefix`), and `also`, as a container asked one name at a time: what
    writes.remove_temporaries matches a killed write's temporary file against, without a folder of
    300,000 outputs costing a name each in memory."""

    def __init__(self, manifest: Manifest, prefix: str, also: set[str]):
        self.manifest, self.prefix, self.also = manifest, prefix, also

    def __contains__(self, start: str) -> bool:
        return start in self.also or (self.manifest.exists() and self.manifest.lists_name_starting(self.prefix + start))


class OutputFolder:
    """A folder a stage writes, locked for the run, and the proof of which files in it agepipe wrote.

    A run may replace or delete only the files its manifest lists as agepipe's, unchanged since:
    `begin` refuses when a file the run plans to write is someone else's, then lists the planned names
    (each write notes its digest before renaming into place, so a killed run's files stay provably ours;
    a planned name nothing was written to is agepipe's only while no file has it); `finish` lists what the
    run wrote, with digests, and deletes the listed files of earlier runs that this one did not write. A
    non-empty folder without a manifest is refused unless `overwrite` (the user's explicit word that agepipe
    may write into it; nothing of theirs is touched even then).
    """

    def __init__(self, path: Path, what: str, overwrite: bool = False, self_identifying: bool = False):
        self.path, self.what = path, what
        self.manifest = Manifest(path)
        self.run = os.urandom(8).hex()
        if path.is_dir() and not self_identifying and not self.manifest.exists() and not overwrite:
            strangers = [p.name for p in path.iterdir() if p.name not in (".gitkeep", FOLDER_LOCK)]
            if strangers:
                raise UserError(
                    f"{what} {path} holds files agepipe did not write ({shown(strangers[0])}, ...): "
                    "choose an empty folder, or allow writing into it with --set overwrite_output=true"
                )
        ensure_writable_dir(path, what)
        self.written: dict[str, str | None] = {}
        self._lock = locked(
            path / FOLDER_LOCK, f"another run is writing into {what} {path} right now; wait for it to finish"
        )
        remove_temporaries(path, self._listed_starts(path, {SCRATCH}))

    def scratch(self) -> tempfile.TemporaryDirectory:
        """A temporary folder inside this one for the run's working files (a killed run's is removed by
        the next run)."""
        return tempfile.TemporaryDirectory(dir=self.path, **temporary_affixes(SCRATCH))

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
                raise UserError(
                    f"{self.what} {self.path} holds a file of yours named like an output, {shown(name)}: "
                    "move it away or choose another folder (agepipe never replaces it)"
                )
        self.manifest.plan(planned)

    def owns(self, name: str) -> bool:
        return self.manifest.owns(name)

    def _writable(self, name: str) -> Path:
        """The path of an output this run writes here now: never over a file of the user's."""
        target = self.target(name)
        if (target.exists() or target.is_symlink()) and name not in self.written and not self.manifest.owns(name):
            raise UserError(
                f"{self.what} {self.path} holds a file of yours named like an output, {shown(name)}: "
                "move it away or choose another folder (agepipe never replaces it)"
            )
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
        """List the files this run wrote (name, digest; by default those noted with `wrote`; `record`
        may have listed others already), then delete the files earlier runs wrote here that this one
        did not, when they are as agepipe left them, and what killed writes left; return how many were
        deleted. Nothing here holds a name per file in memory: the manifest is read as a stream."""
        self.manifest.record(self.written.items() if written is None else written, self.run)
        removed, kept = 0, []
        for name, digest, pending in self.manifest.others(self.run):
            target = self.path / name
            if not target.exists():
                continue
            if (
                is_inside(target, self.path)
                and not target.is_symlink()
                and target.is_file()
                and written_as(target, digest, pending)
            ):
                target.unlink()
                removed += 1
            else:
                kept.append((name, digest))  # changed since agepipe wrote it: the user's now, never deleted
        folders = {self.path} | {
            self.path / os.path.dirname(name) for name in self.manifest.names()
        }  # every name: this run's and the others'
        for folder in folders:  # while the manifest still lists every name a temporary may belong to
            removed += remove_temporaries(folder, self._listed_starts(folder, set()))
        self.manifest.forget_others(self.run, kept)
        return removed

    def _listed_starts(self, folder: Path, also: set[str]) -> "ListedStarts":
        return ListedStarts(
            self.manifest, "" if folder == self.path else f"{folder.relative_to(self.path).as_posix()}/", also
        )

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
    """Hold an exclusive lock on `path`'s lock file (beside it, named as agepipe's bookkeeping:
    ".agepipe.<name>.lock") for the block; OutputGuard holds one per claimed file for the run. A second
    run on the same output stops at once with one line instead of both corrupting each other's files."""
    path = Path(path)
    lock = path.parent / f"{RESERVED_PREFIX}.{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock, f"another run is writing {path} right now; wait for it to finish") as handle:
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def locked(lock: Path, busy: str) -> IO[str]:
    """The lock file `lock`, opened (created if need be) and locked exclusively, or one line: `busy` when
    another run holds it; a refusal when `lock` is not a regular file of its own (a link is never followed,
    a FIFO never waited on). A POSIX record lock, not flock: worker processes forked from this one do not
    inherit it, so a killed run's orphaned workers cannot keep the next run out."""
    try:
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        raise UserError(f"{lock} cannot be agepipe's lock file ({exc.strerror}): move it away") from None
    handle = os.fdopen(descriptor, "w")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        handle.close()
        raise UserError(f"{lock} cannot be agepipe's lock file (not a regular file): move it away")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(busy) from None
    return handle
