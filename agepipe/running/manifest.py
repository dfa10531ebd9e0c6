"""Which files agepipe wrote in a folder: the manifest that proves a file may be replaced or deleted.

Each folder agepipe writes into holds `.agepipe-outputs.sqlite`, listing the files it wrote there with a
digest of each as written (output_guard.py's guard reads it; nothing else decides what is agepipe's).
Ownership is by content only: a listed file is agepipe's while its bytes have the digest listed, or the
digest a write noted as `pending` just before renaming it into place (so a run killed between the two
still owns what it wrote). A name listed without a digest (planned, not yet written) is owned only while
no file has it. Every listed name is checked before any is used: a manifest naming a path outside its
folder, or not shaped as agepipe writes it, is refused in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import Iterable, Iterator

from agepipe.errors import UserError, shown

MANIFEST = ".agepipe-outputs.sqlite"
COLUMNS = ("name", "digest", "run", "pending")


def is_listable(name: object) -> bool:
    """Whether a manifest may list `name`: a relative path of plain parts inside its folder (no "..", no
    absolute path, no empty part, no control characters)."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        return False
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def file_digest(path: str | os.PathLike) -> str | None:
    """BLAKE2 of a regular file's bytes (the digest image_files.content_digest gives its bytes), or None
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


def written_as(path: str | os.PathLike, *digests: str | None) -> bool:
    """Whether the regular file at `path` holds bytes with one of `digests` (a None digest matches nothing)."""
    return file_digest(path) in set(digests) - {None}


class Manifest:
    """The files agepipe wrote in one folder, with the digest of each as written (see the module's
    first lines for what proves a file is agepipe's).

    SQLite keeps it on disk, so a folder of a million outputs costs no memory, and its transactions
    keep it whole when a run is killed mid-write.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / MANIFEST
        self._db: sqlite3.Connection | None = None

    def _open(self, check_names: bool = True) -> sqlite3.Connection:
        if self._db is None:
            if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
                raise UserError(f"{self.path} is not agepipe's manifest (a link or not a file): move it away")
            try:
                self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, digest TEXT, run TEXT, pending TEXT)"
                )
                self._check_shape(check_names)
            except sqlite3.DatabaseError:
                self.close()
                raise UserError(
                    f"{self.path} is not agepipe's manifest (damaged, or another file): move it away"
                ) from None
            except UserError:
                self.close()
                raise
        return self._db

    def _check_shape(self, check_names: bool) -> None:
        """Refuse a manifest agepipe did not write as it is (other columns, a name leading outside the
        folder); one from before `pending` existed gains the column."""
        columns = tuple(row[1] for row in self._db.execute("PRAGMA table_info(files)"))
        if columns == COLUMNS[:3]:
            self._db.execute("ALTER TABLE files ADD COLUMN pending TEXT")
        elif columns != COLUMNS:
            raise UserError(f"{self.path} is not agepipe's manifest (its columns are {list(columns)}): move it away")
        if check_names:
            self._db.create_function("is_listable", 1, is_listable, deterministic=True)
            row = self._db.execute("SELECT name FROM files WHERE NOT is_listable(name) LIMIT 1").fetchone()
            if row is not None:
                raise UserError(
                    f"{self.path} lists {shown(row[0])}, a name agepipe never writes (outside its folder, or "
                    "not a file name): it was changed by hand; move it away"
                )

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
        return self.path.is_file()

    def owns(self, name: str) -> bool:
        """True when agepipe wrote the file `name` here and it is as agepipe left it, or when agepipe
        planned it and no file has the name yet."""
        if not self.exists():
            return False
        row = self._open().execute("SELECT digest, pending FROM files WHERE name = ?", (name,)).fetchone()
        if row is None:
            return False
        path = self.folder / name
        if not (path.exists() or path.is_symlink()):
            return True
        return written_as(path, *row)

    def note_pending(self, name: str, digest: str) -> None:
        """Note the digest of a file about to be renamed into place as `name` (writes.atomic_write): a run
        killed before it lists the file as written still owns it."""
        db = self._open(check_names=False)  # a worker notes its own name: no scan of every other name
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO files (name, pending) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET pending = excluded.pending",
            (name, digest),
        )
        db.execute("COMMIT")

    def plan(self, names: Iterable[str]) -> None:
        """List files a run is about to write, before it writes them."""
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO files (name) VALUES (?)", ((n,) for n in names))

    def record(self, entries: Iterable[tuple[str, str | None]], run: str | None = None) -> None:
        """List files as written, with their digests (and the run that wrote them)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO files (name, digest, run) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET digest = excluded.digest, run = excluded.run, pending = NULL",
                ((name, digest, run) for name, digest in entries),
            )

    def others(self, run: str) -> Iterator[tuple[str, str | None, str | None]]:
        """(name, digest, pending digest) of the listed files another run wrote."""
        yield from self._open().execute(
            "SELECT name, digest, pending FROM files WHERE run IS NOT ? ORDER BY name", (run,)
        )

    def names(self) -> Iterator[str]:
        """Every listed name, one at a time."""
        yield from (row[0] for row in self._open().execute("SELECT name FROM files"))

    def lists_name_starting(self, prefix: str) -> bool:
        """Whether a listed name starts with `prefix` (one indexed lookup)."""
        return (
            self._open()
            .execute("SELECT 1 FROM files WHERE name >= ? AND name < ? LIMIT 1", (prefix, prefix + "\U0010ffff"))
            .fetchone()
            is not None
        )

    def forget_others(self, run: str, keep: list[tuple[str, str | None]]) -> None:
        """Forget every file another run wrote, except `keep` (name, digest)."""
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE run IS NOT ?", (run,))
            db.executemany("INSERT INTO files (name, digest, run) VALUES (?, ?, NULL)", keep)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
