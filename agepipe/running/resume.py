"""The two ways an interrupted stage continues where it stopped: a `Journal` of finished items (one
JSON line each), and a `PartStore` of part files, each holding the finished rows of one chunk of work.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from agepipe.errors import UserError
from agepipe.running.writes import atomic_write

log = logging.getLogger("agepipe")

FLUSH_SECONDS = 1.0
HEADER_BYTES = 4096  # a journal's first line is short; reading more of a stranger's file would be pointless


JOURNAL_MARK = "agepipe"  # the first line's `written_by`: a JSON-lines file of the user's is never taken for a journal


class Journal:
    """An append-only JSON-lines file of finished items, so an interrupted stage can continue.

    The first line names the file as agepipe's and holds a fingerprint of the settings that affect the
    results; a journal with another fingerprint is discarded, so a changed config redoes the work (a
    file whose first line is not a journal's is never touched: OutputGuard.journal refuses it). Each
    later line is one finished item (a flat row plus its key), flushed at least every FLUSH_SECONDS: a
    crash loses at most the last second of work. A torn last line is cut off when the journal is next
    opened, and a damaged line elsewhere is skipped, so its item is done again, as is a row that
    `accept(key, row)` (when given) refuses. Memory holds where each key's last row starts in the file (`done`,
    an OffsetIndex: 16 bytes a key), never the rows: they are read back by `records` and `rows`, one
    seek each.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str, accept: Callable[[str, dict], bool] | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.accept = accept
        self.done = OffsetIndex()
        self._file = None
        if self.path.exists():
            self._load()

    @staticmethod
    def header(path: str | os.PathLike) -> dict | None:
        """The first line of a journal as a mapping, or None when `path` is not one of agepipe's journals."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO would never answer
                return None
            with open(path, "rb") as f:
                header = json.loads(f.readline(HEADER_BYTES).decode("utf-8"))
        except (OSError, ValueError):
            return None
        marked = isinstance(header, dict) and header.get("written_by") == JOURNAL_MARK
        return header if marked and isinstance(header.get("fingerprint"), str) else None

    @classmethod
    def is_journal(cls, path: str | os.PathLike) -> bool:
        return cls.header(path) is not None

    def _load(self) -> None:
        header = self.header(self.path)
        if header is None:
            raise UserError(f"{self.path} is not one of agepipe's journals: move it away or choose another name")
        if header["fingerprint"] != self.fingerprint:
            log.info("discarding %s: it was made with other settings", self.path)
            self.path.unlink()
            return
        digests, offsets = array.array("Q"), array.array("q")
        with open(self.path, "rb") as f:
            good_end = len(f.readline())
            for line in f:
                parsed = _parsed(line)
                if parsed is None and not line.endswith(b"\n"):
                    break  # the torn last line of an interrupted write
                if parsed is not None:  # a refused row (-1) undoes the key's earlier rows: the item is done again
                    digests.append(OffsetIndex.digest(parsed[0]))
                    offsets.append(good_end if self.accept is None or self.accept(*parsed) else -1)
                good_end += len(line)  # a damaged line is skipped: its item is done again
        self.done = OffsetIndex(np.frombuffer(digests, np.uint64), np.frombuffer(offsets, np.int64))
        if good_end < self.path.stat().st_size:
            os.truncate(self.path, good_end)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._file = open(self.path, "ab")
        self._flushed = time.monotonic()
        if fresh:
            self._file.write(self._header_line().encode())
            self._file.flush()
        return self

    def _header_line(self) -> str:
        return json.dumps({"written_by": JOURNAL_MARK, "fingerprint": self.fingerprint}) + "\n"

    def record(self, key: str, row: dict) -> None:
        self.done[key] = self._file.tell()
        self._file.write(json_line(row, key).encode())
        now = time.monotonic()
        if now - self._flushed > FLUSH_SECONDS:  # bounds what a crash can lose without a syscall per row
            self._file.flush()
            self._flushed = now

    def __exit__(self, exc_type, exc, tb):
        self._file.close()
        self._file = None

    def forget(self, keys: Iterable[str]) -> None:
        """Treat these items as not done (their rows stay until a later record replaces them)."""
        for key in keys:
            self.done.forget(key)

    def keys(self) -> Iterator[str]:
        """The keys of the rows the journal holds, read from the file, in the order of their rows."""
        with open(self.path, "rb") as f:
            f.readline()
            yield from (parsed[0] for parsed in map(_parsed, f) if parsed is not None)

    def records(self, keys: Iterable[str]) -> dict[str, dict]:
        """The last recorded row of each of `keys` that is done, one seek and one line each."""
        offsets = {key: offset for key in keys if (offset := self.done.get(key)) is not None}
        if self._file is not None:
            self._file.flush()
        found = {}
        if not offsets:
            return found
        with open(self.path, "rb") as f:
            for key, offset in sorted(offsets.items(), key=lambda item: item[1]):
                f.seek(offset)
                parsed = _parsed(f.readline())
                if parsed is None:
                    raise UserError(f"{self.path} changed while this run used it: delete it and re-run")
                if parsed[0] == key:  # another key sharing its digest (OffsetIndex) reads as not done
                    found[key] = parsed[1]
        return found

    def rows(self, keys: list[str], compact: bool = True):
        """The recorded rows for `keys`, in that order, as a DataFrame (the last record of a key wins).
        With `compact`, the journal is rewritten without the rows of other keys."""
        import pandas as pd

        found = self.records(keys)
        missing = set(keys) - set(found)
        if missing:
            raise RuntimeError(f"{self.path} lacks {len(missing)} results; delete it and re-run")
        if compact:
            self.compact(found)
        return pd.DataFrame.from_records([found[key] for key in keys])

    def compact(self, found: dict[str, dict]) -> None:
        """Rewrite the journal with only these rows (drops results of files no longer present)."""
        self.done = OffsetIndex()
        with atomic_write(self.path, "wb") as f:
            f.write(self._header_line().encode())
            for key, row in found.items():
                self.done[key] = f.tell()
                f.write(json_line(row, key).encode())

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class OffsetIndex:
    """Where the last row of each key of a journal starts in its file: a 64-bit digest of the key and
    the byte offset, 16 bytes a key in sorted arrays (plus a dict of the keys recorded or forgotten
    since), so that a journal of 300,000 rows costs megabytes of memory, not a string per key. Keys
    sharing a digest (a chance in about 10^8 among 300,000 keys) are read back as not done: the
    journal checks the key of each row it reads.

    Built from parallel arrays of digests and offsets in file order: the last entry of a digest wins,
    and an offset of -1 means the key is not done.
    """

    def __init__(self, digests: np.ndarray | None = None, offsets: np.ndarray | None = None):
        digests = np.empty(0, np.uint64) if digests is None else digests
        offsets = np.empty(0, np.int64) if offsets is None else offsets
        order = np.lexsort((np.arange(len(digests)), digests))  # by digest, then file order
        digests, offsets = digests[order], offsets[order]
        last = np.append(digests[1:] != digests[:-1], True) if len(digests) else np.zeros(0, bool)
        keep = last & (offsets >= 0)
        self._digests, self._offsets = digests[keep], offsets[keep]
        self._recent: dict[int, int] = {}  # digest -> offset (-1: forgotten), newer than the arrays

    @staticmethod
    def digest(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")

    def get(self, key: str) -> int | None:
        digest = self.digest(key)
        offset = self._recent.get(digest)
        if offset is None:
            position = int(np.searchsorted(self._digests, np.uint64(digest)))
            found = position < len(self._digests) and int(self._digests[position]) == digest
            offset = int(self._offsets[position]) if found else -1
        return offset if offset >= 0 else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: str, offset: int) -> None:
        self._recent[self.digest(key)] = offset

    def forget(self, key: str) -> None:
        self._recent[self.digest(key)] = -1

    def __len__(self) -> int:
        recent = np.fromiter(self._recent, np.uint64, len(self._recent))
        stored = np.isin(recent, self._digests)
        done = np.fromiter(self._recent.values(), np.int64, len(self._recent)) >= 0
        return len(self._digests) - int(stored.sum()) + int(done.sum())


def _parsed(line: bytes) -> tuple[str, dict] | None:
    """(key, row) of a journal line, or None when the line is damaged."""
    try:
        row = json.loads(line.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("_key"), str):
        return None
    return row.pop("_key"), row


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
    for name in dict.fromkeys(name for row in rows for name in row):  # every row's keys: a row may lack some
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
            if self.TEMPORARY.fullmatch(entry.name) or (
                self.NAME.fullmatch(entry.name) and self._header(entry.path) == entry.name
            ):
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


def fill_parts(
    parts: PartStore,
    chunks: Iterable[tuple[str, list]],
    func,
    engine,
    *,
    state,
    progress,
    on_failure,
    chunksize: int = 64,
) -> None:
    """Run func(state, item) on every item of each chunk ((its part's name, its items)) in parallel
    (parallel.parallel_map), and write each chunk's results, in item order, to its part as soon as
    its last item is done: memory holds the chunks in flight, and an interrupted run loses only
    them. An item whose worker failed gets on_failure(item, reason)."""
    from agepipe.running.parallel import parallel_map

    names: dict[int, str] = {}
    pending: dict[int, list] = {}  # chunk index -> its results so far
    remaining: dict[int, int] = {}  # chunk index -> results still to come

    def tagged() -> Iterator[list]:
        for index, (name, items) in enumerate(chunks):
            names[index], pending[index], remaining[index] = name, [None] * len(items), len(items)
            yield [(index, position, item) for position, item in enumerate(items)]

    for index, position, result in parallel_map(
        _tagged_task,
        tagged(),
        engine,
        chunked=True,
        state=(func, state),
        chunksize=chunksize,
        progress=progress,
        on_failure=lambda task, reason: (task[0], task[1], on_failure(task[2], reason)),
    ):
        pending[index][position] = result
        remaining[index] -= 1
        if not remaining[index]:
            parts.write(names.pop(index), pending.pop(index))
            del remaining[index]


def _tagged_task(state: tuple, task: tuple) -> tuple:
    func, inner = state
    index, position, item = task
    return index, position, func(inner, item)


def _json_default(value):
    """numpy scalars in result rows become plain JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the journal")


class ResumableStage:
    """The skeleton of a stage that writes one output file per task into an output folder and can be
    killed at any moment (processing, resampling): tasks run in parallel, each finished one is
    journalled with the name and digest of the file it wrote, and a re-run continues from the journal.

    A task's result is a flat dict holding `output_file` (its name in the folder, or None when it wrote
    nothing) and `output_digest`. A journalled output that is gone or changed since is done again:
    resuming trusts contents, not names or sizes.
    """

    def __init__(self, folder, journal_path: Path, fingerprint: str):
        self.folder = folder
        self.journal = Journal(journal_path, fingerprint)

    def _changed(self, keys: list[str]) -> list[str]:
        from agepipe.running.manifest import file_digest

        recorded = self.journal.records(key for key in keys if key in self.journal.done)
        return [
            key
            for key, row in recorded.items()
            if isinstance(row.get("output_file"), str)
            and file_digest(self.folder.path / row["output_file"]) != row.get("output_digest")
        ]

    def run(self, tasks: list[tuple[str, dict]], func, engine, *, state, label: str, chunksize: int, on_failure):
        """Run every task not finished yet (func(state, (key, row)) -> (key, result)); return all results
        as a DataFrame in task order."""
        from agepipe.running.console import progress_bar
        from agepipe.running.parallel import parallel_map

        keys = [key for key, _ in tasks]
        for attempt in range(RESUME_PASSES):
            changed = self._changed(keys)
            if changed:
                log.info(
                    "%d outputs listed by the journal are missing from %s or changed: redoing them",
                    len(changed),
                    self.folder.path,
                )
                self.journal.forget(changed)
            todo = [task for task in tasks if task[0] not in self.journal.done]
            if not todo:
                return self.journal.rows(keys)
            if attempt == 0 and len(todo) < len(tasks):
                log.info(
                    "continuing: %d of %d items were finished by an earlier run", len(tasks) - len(todo), len(tasks)
                )
            with self.journal:
                for key, result in parallel_map(
                    func,
                    todo,
                    engine,
                    state=state,
                    chunksize=chunksize,
                    progress=progress_bar(len(todo), label),
                    on_failure=on_failure,
                ):
                    self.journal.record(key, result)
        raise UserError(f"outputs keep vanishing from {self.folder.path} while this run writes them")

    def finish(self, results) -> int:
        """List what the run wrote in the folder's manifest, delete what earlier runs wrote there and this
        one did not, and remove the journal; return how many files were deleted."""
        written = [
            (name, digest)
            for name, digest in zip(results["output_file"], results["output_digest"])
            if isinstance(name, str)
        ]
        removed = self.folder.finish(written)
        self.journal.remove()
        return removed


RESUME_PASSES = 3  # the last pass only checks that the outputs written are all still there
