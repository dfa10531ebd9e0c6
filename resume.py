"""The two ways an interrupted stage continues where it stopped: a `Journal` of finished items (one
JSON line each), and a `PartStore` of part files, each holding the finished rows of one chunk of work.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

from outputs import atomic_write

log = logging.getLogger("agepipe")

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
