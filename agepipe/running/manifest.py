"""Which files agepipe wrote in a folder: the manifest that proves a file may be replaced or deleted.

Each folder agepipe writes into holds `.agepipe-outputs.sqlite`, listing the files it wrote there with a
digest of each as written (output_guard.py's guard reads it; nothing else decides what is agepipe's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Iterable, Iterator

from agepipe.errors import UserError

MANIFEST = ".agepipe-outputs.sqlite"
LEGACY_MANIFEST = ".agepipe-outputs.json"  # what agepipe wrote before the manifest held digests


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
                raise UserError(
                    f"{self.path} is not agepipe's manifest (damaged, or another file): move it away"
                ) from None
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
            db.executemany(
                "INSERT INTO files (name, digest, run) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET digest = excluded.digest, run = excluded.run",
                ((name, digest, run) for name, digest in entries),
            )

    def others(self, run: str) -> Iterator[tuple[str, str | None]]:
        """(name, digest) of the listed files another run wrote."""
        yield from self._open().execute("SELECT name, digest FROM files WHERE run IS NOT ? ORDER BY name", (run,))

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


def legacy_proof(path: Path) -> bool:
    """Outputs of agepipe versions before manifests: a CSV with its run record beside it."""
    return Path(f"{path}.run.json").is_file()
