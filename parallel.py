"""Running a function over many items in parallel, streaming: a process pool on this machine that
survives killed and hanging workers, or the workers of a Dask cluster, with a bounded number of items
in flight either way so that memory does not grow with the number of items.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel

from errors import UserError

def resolve_workers(num_workers: int) -> int:
    """0 means every core this process may use."""
    if num_workers > 0:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def engine_name(config: BaseModel) -> str:
    """What runs the image work, for summary lines: "2 workers" or "the Dask cluster at tcp://...". """
    if config.scheduler != "local":
        return f"the Dask cluster at {config.scheduler}"
    return f"{resolve_workers(config.num_workers)} workers"


class TaskTimeout(Exception):
    """An item took longer than its time limit."""


def _on_alarm(signum, frame):
    raise TaskTimeout


def _run_chunk(func: Callable, chunk: list, timeout: float | None) -> list[tuple[bool, Any]]:
    """Run func on each item of a chunk inside a worker: (True, result) or (False, reason) per item.
    A time limit interrupts even a blocking read (the alarm's exception stops the system call)."""
    import signal

    results = []
    for item in chunk:
        if timeout:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            results.append((True, func(item)))
        except TaskTimeout:
            results.append((False, f"timed out after {timeout:g} s"))
        except MemoryError:
            results.append((False, "out of memory"))
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
    return results


def parallel_map(
    func: Callable,
    items: Iterable,
    num_workers: int,
    *,
    initializer: Callable | None = None,
    initargs: tuple = (),
    chunksize: int = 64,
    progress: Callable[[Iterator], Iterator] | None = None,
    on_failure: Callable[[Any, str], Any] | None = None,
    timeout: float | None = None,
    scheduler: str = "local",
    chunk_files: int = 1000,
    chunked: bool = False,
) -> Iterator:
    """Yield func(item) for every item, as results finish (not in order), over a pool of processes.

    `items` is consumed lazily and only a few chunks are in flight, so neither the items nor the
    results pile up in memory: the caller writes results out as they come. An item that takes longer
    than `timeout` seconds, or whose worker dies (killed by the out-of-memory killer, a crash in a
    decoder), yields on_failure(item, reason) instead: it costs that item, never the run. After a
    worker dies, the items it may have held are retried one at a time in a fresh worker, so only the
    culprit fails. Without `on_failure`, such a failure raises RuntimeError.

    Items go out in chunks: `chunked` says `items` yields them as lists already, else they are cut
    into lists of `chunk_files`. With `scheduler` "local" each chunk is split further, for balance,
    into pieces of at most `chunksize` items for a pool of `num_workers` processes on this machine;
    with the address of a Dask scheduler, each chunk is one task on that cluster (see `_dask_map`).
    """
    chunks = iter(items) if chunked else batched_lists(items, chunk_files)
    wrap = progress or (lambda it: it)
    if scheduler != "local":
        yield from wrap(_dask_map(func, chunks, scheduler, initializer, initargs, on_failure))
        return
    yield from wrap(_pool_map(func, chunks, resolve_workers(num_workers), initializer, initargs, chunksize, on_failure, timeout))


def batched_lists(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


_worker_initialized_with: tuple | None = None


def _run_dask_chunk(func: Callable, chunk: list, initializer: Callable | None, initargs: tuple) -> list[tuple[bool, Any]]:
    """A chunk on a Dask worker: the initializer runs once per worker process and settings, as in the
    local pool. No per-item time limit: the alarm signal only works in a main thread."""
    global _worker_initialized_with
    if initializer and _worker_initialized_with != (initializer, initargs):
        initializer(*initargs)
        _worker_initialized_with = (initializer, initargs)
    return _run_chunk(func, chunk, None)


def _dask_map(func, chunks, address, initializer, initargs, on_failure) -> Iterator:
    """Chunks of items over the workers of the Dask cluster at `address`, one task per chunk, two
    tasks per worker thread in flight.

    The scheduler re-runs a chunk whose worker is lost on another worker; a chunk that has killed
    three workers yields on_failure for each of its items. Workers must see the files at the same
    paths (a shared file system) and import agepipe's modules (start them in the project folder).
    """
    from distributed import Client, as_completed
    from distributed.scheduler import KilledWorker

    try:
        client = Client(address, timeout=30)
    except (OSError, TimeoutError) as exc:
        raise UserError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    with client:
        running: dict = {}
        finished = as_completed()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                future = client.submit(_run_dask_chunk, func, chunk, initializer, initargs, pure=False)
                running[future] = chunk
                finished.add(future)

        for _ in range(2 * max(1, sum(client.nthreads().values()))):
            submit_next()
        for future in finished:
            chunk = running.pop(future)
            try:
                results = future.result()
            except KilledWorker:
                results = [(False, "its Dask worker died three times")] * len(chunk)
            future.release()
            submit_next()
            for item, (ok, value) in zip(chunk, results):
                yield value if ok else _failed(item, value, on_failure)


def _failed(item: Any, reason: str, on_failure: Callable[[Any, str], Any] | None) -> Any:
    """What an item that failed yields: on_failure(item, reason), or without it a RuntimeError."""
    if on_failure is None:
        raise RuntimeError(f"{reason} while processing {item!r:.200}")
    return on_failure(item, reason)


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    """Worker start-up: die with the parent (a killed run must not leave workers writing files behind
    it), then the caller's initializer."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if initializer:
        initializer(*initargs)


def _pool_map(func, chunks, workers, initializer, initargs, chunksize, on_failure, timeout) -> Iterator:
    # fork is fastest on Linux, and a forked worker dies with its parent (PR_SET_PDEATHSIG: a killed run
    # leaves no worker writing behind it). TensorFlow is not fork-safe, so the scripts that use it start
    # their pools before importing it; OpenCV's thread pool is paused while workers fork (below).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with opencv_threads_stopped():
        yield from _run_pools(func, _pieces(chunks, chunksize, workers), workers, context, initializer, initargs, timeout, on_failure)


def _pieces(chunks: Iterator[list], chunksize: int, workers: int) -> Iterator[list]:
    """Each chunk cut into pieces of at most `chunksize` items, and into at least 4 per worker, so that
    a small chunk still keeps every worker busy."""
    for chunk in chunks:
        size = max(1, min(chunksize, -(-len(chunk) // (workers * 4))))
        yield from (chunk[i:i + size] for i in range(0, len(chunk), size))


@contextlib.contextmanager
def opencv_threads_stopped():
    """Run OpenCV single-threaded while workers are forked: a child forked while the caller's OpenCV
    thread pool exists inherits its locks, and hangs in its first OpenCV call that touches the pool."""
    opencv = sys.modules.get("cv2")
    threads = opencv.getNumThreads() if opencv else None
    if opencv:
        opencv.setNumThreads(1)
    try:
        yield
    finally:
        if opencv:
            opencv.setNumThreads(threads)


def _run_pools(func, pieces, workers, context, initializer, initargs, timeout, on_failure) -> Iterator:
    """The pools of _pool_map: one over the pieces, then after a worker died one per suspect item,
    then a new pool over the remaining pieces."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    suspects: list = []
    exhausted = False
    while not exhausted:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(initializer, initargs)) as pool:
            running = {}
            try:
                while True:
                    while len(running) < workers * 2 and (piece := next(pieces, None)) is not None:  # few in flight: memory stays flat
                        running[pool.submit(_run_chunk, func, piece, timeout)] = piece
                    if not running:
                        exhausted = True
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        results = future.result()
                        for item, (ok, value) in zip(running.pop(future), results):
                            yield value if ok else _failed(item, value, on_failure)
            except BrokenProcessPool:
                suspects += [item for piece in running.values() for item in piece]
        # a worker died: retry what it may have held one item per pool, so only the culprit fails
        while suspects:
            item = suspects.pop()
            try:
                with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=(initializer, initargs)) as single:
                    ok, value = single.submit(_run_chunk, func, [item], timeout).result()[0]
                yield value if ok else _failed(item, value, on_failure)
            except BrokenProcessPool:
                yield _failed(item, "its worker process died (out of memory or a crash in a decoder)", on_failure)
