"""Exact and near-duplicate images of a whole dataset, in a few dozen bytes per file: perceptual hashes
within a Hamming distance found by multi-index hashing over sorted arrays, and groups as the connected
components of all such pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from agepipe.config.data_stages import Duplicates


class Components:
    """Connected components of a graph whose edges arrive in batches, in memory that grows with the
    number of nodes, not of edges: pending edges are merged into the labelling once they are many.

    `root[i]` is the lowest node of i's component as of the last `merge`: nodes with the same root are
    connected; nodes with different roots may still be connected through pending edges.
    """

    def __init__(self, nodes: int):
        self.root = np.arange(nodes, dtype=index_type(nodes))
        self.merges = 0
        self._pending: list[np.ndarray] = []
        self._edges = 0

    def add(self, pairs: np.ndarray) -> None:
        """Add edges (rows of two nodes)."""
        for start in range(0, len(pairs), MERGE_EDGES):
            self._pending.append(pairs[start : start + MERGE_EDGES])
            self._edges += len(self._pending[-1])
            if self._edges >= MERGE_EDGES:
                self.merge()

    @property
    def pending(self) -> int:
        """Edges added since the last merge."""
        return self._edges

    def merge(self) -> None:
        """Bring `root` up to date: join the components the pending edges connect. Only the roots
        those edges touch enter scipy's connected components, so the cost follows the edges."""
        if not self._edges:
            return
        edges = self.root[np.concatenate(self._pending)]
        self._pending, self._edges = [], 0
        edges = edges[edges[:, 0] != edges[:, 1]]
        if len(edges):
            roots, local = np.unique(edges, return_inverse=True)  # sorted: a component's first root is its lowest
            local = local.reshape(-1, 2)
            graph = coo_matrix(
                (np.ones(len(local), np.int8), (local[:, 0], local[:, 1])), shape=(len(roots), len(roots))
            )
            _, component = connected_components(graph, directed=False)
            _, first = np.unique(component, return_index=True)
            joined = roots[first][component]  # each touched root's new root
            for block in range(0, len(self.root), MERGE_EDGES):  # the nodes in blocks: working arrays stay small
                nodes = self.root[block : block + MERGE_EDGES]
                at = np.minimum(np.searchsorted(roots, nodes), len(roots) - 1)
                touched = roots[at] == nodes
                nodes[touched] = joined[at[touched]]
        self.merges += 1


MERGE_EDGES = 50_000  # pending edges before a merge, and nodes relabelled at once: bounds the working memory


def index_type(count: int) -> type:
    """The smallest integer type for positions among `count` items: per-file arrays stay small."""
    return np.int32 if count < 2**31 else np.int64


def hash_bytes(hex_hashes) -> np.ndarray:
    """Hex hashes of equal length as rows of bytes (one binary code per row)."""
    width = max(2, -(-max(len(h) for h in hex_hashes) // 2) * 2)
    return np.frombuffer(b"".join(bytes.fromhex(h.rjust(width, "0")) for h in hex_hashes), np.uint8).reshape(
        len(hex_hashes), -1
    )


def substring_keys(codes: np.ndarray, start: int, stop: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Bits start..stop of every code (rows of bytes; bit 0 is the first byte's highest bit), or of
    the codes at `rows`, as integers; stop - start <= MAX_SUBSTRING_BITS.

    Examples
    --------
    >>> substring_keys(np.array([[0b10110000, 0b11000000]], np.uint8), 2, 10).tolist()
    [195]
    """
    first, last = start // 8, (stop - 1) // 8
    value = np.zeros(len(codes) if rows is None else len(rows), np.uint64)
    for column in range(first, last + 1):
        value = (value << np.uint64(8)) | (codes[:, column] if rows is None else codes[rows, column])
    return (value >> np.uint64(8 * (last + 1) - stop)) & np.uint64((1 << (stop - start)) - 1)


MAX_SUBSTRING_BITS = 57  # a substring is gathered from whole bytes into 64 bits
VERIFY_BATCH = 16_384  # candidate pairs checked at once: bounds the memory of their gathered codes
SEARCH_WINDOW = 16_384  # sorted codes whose runs are searched at once: bounds the working arrays


def near_pairs(
    codes: np.ndarray,
    max_distance: int,
    graph: Components | None = None,
    nodes: np.ndarray | None = None,
    subset: np.ndarray | None = None,
    window: int = SEARCH_WINDOW,
) -> Iterator[np.ndarray]:
    """Batches of pairs (i < j) of binary codes (rows of bytes) at most `max_distance` bits apart, exactly.

    Multi-index hashing: the bits are cut into at least max_distance + 1 disjoint substrings, and two
    codes within max_distance bits agree on at least one of them (pigeonhole). For each substring the
    codes are sorted by it; codes that agree on it (a run) are candidates, checked on the whole code.
    Time grows with the number of candidates, not with n² (a million random 256-bit hashes take
    seconds). Memory: the sort order, 4 bytes per code, and working arrays for about `window` sorted
    codes at a time (whole runs: a larger run is taken alone), where faiss's IndexBinaryMultiHash hash
    tables took 1 KB per code. A pair may come more than once (it can agree on several substrings).

    With `subset`, only codes[subset] are searched, and i and j index `subset` (no copy of the codes).

    With `graph` (whose node for code i is nodes[i], or i), candidates it already connects are
    skipped, and so are whole runs of codes agreeing on a substring once they are one component: a
    cluster of thousands of near-identical images then costs about its size, not its size squared.
    The components stay exact; only redundant pairs go.

    Examples
    --------
    >>> codes = np.array([[0b11110000, 0], [0b11110001, 0], [0b00001111, 0]], np.uint8)
    >>> np.unique(np.concatenate(list(near_pairs(codes, 2))), axis=0).tolist()
    [[0, 1]]
    """
    count = len(codes) if subset is None else len(subset)
    bits, index = codes.shape[1] * 8, index_type(count)
    pieces = min(bits, max(max_distance + 1, -(-bits // MAX_SUBSTRING_BITS)))
    bounds = np.linspace(0, bits, pieces + 1).astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        keys = substring_keys(codes, start, stop, subset)
        order = np.argsort(keys, kind="stable").astype(index)
        keys = keys[order]
        run_bounds = np.r_[np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]), count].astype(index)
        del keys
        # windows of whole runs: run r is in window w when it starts in [w * window, (w + 1) * window)
        cuts = np.unique(np.searchsorted(run_bounds[:-1], np.arange(0, count + window, window)))
        for first_run, stop_run in zip(cuts[:-1], cuts[1:]):
            yield from _pairs_in_runs(
                codes, subset, order, run_bounds[first_run : stop_run + 1], max_distance, graph, nodes
            )


def _pairs_in_runs(
    codes: np.ndarray,
    subset: np.ndarray | None,
    order: np.ndarray,
    run_bounds: np.ndarray,
    max_distance: int,
    graph: Components | None,
    nodes: np.ndarray | None,
) -> Iterator[np.ndarray]:
    """near_pairs within the runs of sorted positions run_bounds[r]..run_bounds[r + 1] of one substring."""

    def root(code: np.ndarray) -> np.ndarray:
        return graph.root[code if nodes is None else nodes[code]]

    def code(i: np.ndarray) -> np.ndarray:
        return codes[i if subset is None else subset[i]]

    run_start, run_length = run_bounds[:-1], np.diff(run_bounds)
    active = run_start[0] + np.flatnonzero(np.repeat(run_length > 1, run_length)).astype(
        order.dtype
    )  # positions in runs of two or more
    first = np.repeat(run_start, run_length)[active - run_start[0]]
    end = first + np.repeat(run_length, run_length)[active - run_start[0]]
    offset, pruned_at = 1, -1
    while True:
        paired = end - active > offset  # positions with a run member `offset` places further on
        active, first, end = active[paired], first[paired], end[paired]
        if not len(active):
            return
        if graph is not None and graph.pending >= len(active):  # enough news to prune by
            graph.merge()
        if graph is not None and graph.merges != pruned_at:  # drop the runs that are one component by now
            keep = np.isin(first, _split_runs(order, first, end, root))
            active, first, end = active[keep], first[keep], end[keep]
            pruned_at = graph.merges
        a, b = order[active], order[active + offset]
        if graph is not None:
            apart = root(a) != root(b)
            a, b = a[apart], b[apart]
        close = np.concatenate(
            [
                np.bitwise_count(code(a[i : i + VERIFY_BATCH]) ^ code(b[i : i + VERIFY_BATCH])).sum(axis=1)
                <= max_distance
                for i in range(0, len(a), VERIFY_BATCH)
            ]
            or [np.zeros(0, bool)]
        )
        if close.any():
            yield np.stack([np.minimum(a, b)[close], np.maximum(a, b)[close]], axis=1)
        offset += 1


def identical(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pairs (first row with the same key, row), one per row."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return np.stack([rows[first][inverse.ravel()], rows], axis=1)


def identical_codes(codes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows joining each set of identical codes (rows of bytes), and the indices of the
    codes left to search (one per set). Codes are sorted by a 64-bit hash of their bytes and compared
    whole with their neighbours, so a hash collision only leaves a copy in the search: still exact,
    in a few bytes per code where sorting the codes themselves would copy them."""
    fingerprint = np.zeros(len(codes), np.uint64)
    for column in codes.T:  # FNV-style: multiply by an odd 64-bit prime, add the byte
        fingerprint *= np.uint64(1099511628211)
        fingerprint += column
    order = np.argsort(fingerprint, kind="stable").astype(index_type(len(codes)))
    del fingerprint
    same = np.zeros(len(order), bool)  # same[i]: the code at sorted position i is the one before it
    for start in range(1, len(order), VERIFY_BATCH):
        stop = min(start + VERIFY_BATCH, len(order))
        same[start:stop] = (codes[order[start - 1 : stop - 1]] == codes[order[start:stop]]).all(axis=1)
    return np.stack([rows[order[np.flatnonzero(same) - 1]], rows[order[same]]], axis=1), np.sort(order[~same])


def _split_runs(
    order: np.ndarray, first: np.ndarray, end: np.ndarray, root: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """The first positions of the runs (given by each active position's run `first` and `end`, in
    sorted order `order`) whose codes are not all in one component (`root` of codes)."""
    runs, at = np.unique(first, return_index=True)
    lengths = end[at] - runs
    run_of_member = np.repeat(runs, lengths)
    members = run_of_member + (
        np.arange(len(run_of_member), dtype=runs.dtype)
        - np.repeat(np.cumsum(lengths, dtype=runs.dtype) - lengths, lengths)
    )
    return np.unique(run_of_member[root(order[members]) != root(order[run_of_member])])


@dataclass
class DuplicateGroups:
    """The duplicate groups of a whole dataset, as arrays over file positions (see `find`)."""

    root: np.ndarray  # each file's group, named by its lowest position
    number: np.ndarray  # the group's number, 1, 2, ... in order of roots; 0 for a file in no group
    age_conflict: np.ndarray  # the group's ages differ by more than allowed

    @classmethod
    def of_components(cls, root: np.ndarray, ages: np.ndarray, max_age_difference: float) -> "DuplicateGroups":
        """Number the groups of files whose `root`s (see connected_duplicates) are shared, and flag the
        groups whose `ages` differ by more than `max_age_difference`."""
        has_members = np.bincount(root, minlength=len(root)) > 1  # by position: a root with other members
        number = np.cumsum(has_members, dtype=root.dtype)[root]
        in_group = has_members[root]
        del has_members
        number[~in_group] = 0
        oldest, youngest = np.full(len(root), -np.inf, np.float32), np.full(len(root), np.inf, np.float32)
        np.fmax.at(oldest, root, ages)
        np.fmin.at(youngest, root, ages)
        oldest -= youngest  # each group's age spread; -inf when no age in it is known
        del youngest
        return cls(root, number, in_group & (oldest[root] > max_age_difference))

    def columns(self, start: int, files: pd.Series, root_names: dict[int, str]) -> pd.DataFrame:
        """duplicate_group, duplicate_of (the group's first file, for its other members) and
        age_conflict of `files`, at positions start, start + 1, ... `root_names` holds the names of
        the group roots seen so far: a root comes before its group's other members, so a caller going
        through the files in order in one or more calls always finds the name it needs."""
        positions = np.arange(start, start + len(files))
        root, number = self.root[positions], self.number[positions]
        is_root = (number > 0) & (root == positions)
        root_names.update(zip(positions[is_root].tolist(), files.to_numpy()[is_root]))
        return pd.DataFrame(
            {
                "duplicate_group": pd.arrays.IntegerArray(number, number == 0),
                "duplicate_of": [
                    root_names[r] if n and r != p else None
                    for r, n, p in zip(root.tolist(), number.tolist(), positions.tolist())
                ],
                "age_conflict": self.age_conflict[positions],
            },
            index=files.index,
        )


@dataclass
class HashArrays:
    """The hashes duplicate search needs, compactly: perceptual hashes as rows of bytes and content
    digests (only of files without a perceptual hash), each with the files' positions."""

    codes: np.ndarray
    code_rows: np.ndarray
    content: np.ndarray
    content_rows: np.ndarray

    @classmethod
    def of(cls, content_hashes: pd.Series, phashes: pd.Series, start: int = 0) -> "HashArrays":
        """The hashes of files at positions start, start + 1, ... (None where unknown)."""
        has_code = phashes.notna().to_numpy()
        code_rows = np.flatnonzero(has_code)
        codes = hash_bytes(phashes.to_numpy()[code_rows]) if len(code_rows) else np.zeros((0, 0), np.uint8)
        content_rows = np.flatnonzero(~has_code & content_hashes.notna().to_numpy())
        content = np.array([h.encode() for h in content_hashes.to_numpy()[content_rows]], dtype="S")
        return cls(codes, start + code_rows, content, start + content_rows)


def connected_duplicates(hashes: HashArrays, files: int, max_distance: int) -> np.ndarray:
    """Each file's group root (the lowest position in its group; a file in no group is its own):
    exact duplicates (the same bytes) and near duplicates (perceptual hashes within `max_distance`
    bits) are joined, and groups are the connected components of the graph of all such pairs.

    Identical bytes decode to identical pixels and so to identical perceptual hashes (distance 0):
    content digests are needed only for the files without a perceptual hash. Identical hashes are
    joined at once, and the near-duplicate search runs over the distinct ones."""
    graph = Components(files)
    graph.add(identical(hashes.content, hashes.content_rows))
    pairs, distinct = identical_codes(hashes.codes, hashes.code_rows)
    graph.add(pairs)
    graph.merge()
    # in (nearly) the codes' own order: close codes then meet as neighbours, and join early
    distinct = distinct[
        np.argsort(
            substring_keys(hashes.codes, 0, min(hashes.codes.shape[1] * 8, MAX_SUBSTRING_BITS), distinct), kind="stable"
        )
    ]
    distinct_rows = hashes.code_rows[distinct]
    for pairs in near_pairs(hashes.codes, max_distance, graph, distinct_rows, distinct):
        graph.add(distinct_rows[pairs])
    graph.merge()
    return graph.root


def gather_hashes(tables: Iterator[pd.DataFrame], files: int) -> tuple[HashArrays, np.ndarray]:
    """The hashes and ages of a whole dataset given as tables in file order (`files` rows in all),
    gathered into compact arrays one table at a time."""
    ages = np.empty(files, np.float32)
    codes, code_rows, content, content_rows = None, np.empty(files, index_type(files)), [], []
    start = found = 0
    for table in tables:
        hashes = HashArrays.of(table["content_hash"], table["phash"], start)
        if len(hashes.codes):
            if codes is None:
                codes = np.empty((files, hashes.codes.shape[1]), np.uint8)
            end = found + len(hashes.codes)
            codes[found:end], code_rows[found:end] = hashes.codes, hashes.code_rows
            found = end
        content.append(hashes.content)
        content_rows.append(hashes.content_rows)
        ages[start : start + len(table)] = pd.to_numeric(table["age"], errors="coerce").to_numpy(np.float32)
        start += len(table)
    codes = codes[:found] if codes is not None else np.zeros((0, 0), np.uint8)
    return HashArrays(codes, code_rows[:found], np.concatenate(content), np.concatenate(content_rows)), ages


def duplicate_groups(tables: Iterator[pd.DataFrame], files: int, rule: Duplicates) -> DuplicateGroups:
    """The duplicate groups of a whole dataset given as tables in file order (`files` rows in all)."""
    hashes, ages = gather_hashes(tables, files)
    root = connected_duplicates(hashes, files, rule.max_hash_distance)
    del hashes  # the hashes, the largest arrays, go before the groups are numbered
    return DuplicateGroups.of_components(root, ages, rule.max_age_difference)


def find_duplicates(frame: pd.DataFrame, rule: Duplicates) -> pd.DataFrame:
    """The duplicate columns (see DuplicateGroups.columns) of a table with file, age, content_hash and
    phash columns."""
    return duplicate_groups(iter([frame]), len(frame), rule).columns(0, frame["file"], {})
