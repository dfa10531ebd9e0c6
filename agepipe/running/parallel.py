"""Running a function over many items in parallel, streaming: a process pool on this machine that
survives killed and hanging workers, or the workers of a Dask cluster, with a bounded number of items
in flight either way so that memory does not grow with the number of items.

A stage hands `parallel_map` a task function `task(state, item)` (or `task(state, items)`, batched)
and the `state` every worker needs (settings, a loaded model): it reaches each worker process once,
with the parent's output claims (writes.claims), and OpenCV runs single-threaded there (the
parallelism comes from the workers).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel

from agepipe.errors import UserError, shown
from agepipe.running import writes

TaskFunction = Callable[[Any, Any], Any]


def resolve_workers(num_workers: int) -> int:
    """0 means every core this process may use."""
    if num_workers > 0:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Engine:
    """Where a stage's image work runs, from the settings every stage shares (configs/common.yaml)."""

    num_workers: int = 1  # processes of the local pool; 0 = every core
    scheduler: str = "local"  # "local", or the address of a Dask scheduler
    scheduler_timeout: float = 30  # seconds to reach the scheduler
    chunk_files: int = 1000  # items per chunk: one Dask task
    task_timeout: float | None = None  # seconds one item may take (local pool only)

    @classmethod
    def of(cls, config: BaseModel) -> "Engine":
        return cls(
            config.num_workers,
            config.scheduler,
            config.scheduler_timeout_seconds,
            config.chunk_files,
            config.task_timeout_seconds,
        )

    @property
    def name(self) -> str:
        """For summary lines: "2 workers" or "the Dask cluster at tcp://..."."""
        if self.scheduler != "local":
            return f"the Dask cluster at {self.scheduler}"
        return f"{resolve_workers(self.num_workers)} workers"


class TaskTimeout(BaseException):
    """An item took longer than its time limit. Not an Exception: a stage's own `except Exception`
    (a metric that fails on an image) must not turn a timeout into an ordinary failure."""


def _on_alarm(signum, frame):
    raise TaskTimeout


# --------------------------------------------------------------------------------------------------
# In each worker process
# --------------------------------------------------------------------------------------------------
_state: Any = None
_state_token: str | None = None


def _install(state: Any, token: str, claimed: tuple) -> None:
    """Give this worker process the stage's state and the parent's output claims, once per run."""
    global _state, _state_token
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the workers; OpenCV's own threads would oversubscribe
    writes.adopt(claimed)
    _state, _state_token = state, token


def _start_worker(state: Any, token: str, claimed: tuple) -> None:
    """Local pool worker start-up: die with the parent (a killed run must not leave workers writing
    files behind it), then take the stage's state."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    _install(state, token, claimed)


def _run_chunk(func: TaskFunction, chunk: list, timeout: float | None, batch: int = 0) -> list[tuple[bool, Any]]:
    """Run func(state, item) on each item of a chunk inside a worker, or with `batch`, func(state, items)
    on consecutive lists of `batch` items: (True, result) or (False, reason) per item. A batch that runs
    out of time or memory runs again an item at a time, so that only its culprit fails."""
    if not batch:
        return [_guarded(functools.partial(func, _state, item), timeout) for item in chunk]
    results = []
    for start in range(0, len(chunk), batch):
        items = chunk[start : start + batch]
        ok, value = _guarded(functools.partial(func, _state, items), timeout and timeout * len(items))
        if ok:
            results.extend((True, result) for result in value)
        elif len(items) == 1:
            results.append((ok, value))
        else:
            results.extend(_run_chunk(func, [item], timeout, batch)[0] for item in items)
    return results


def _guarded(call: Callable[[], Any], timeout: float | None) -> tuple[bool, Any]:
    """(True, call()) or (False, why it failed): out of time (a time limit interrupts even a blocking
    read: the alarm's exception stops the system call) or out of memory."""
    import signal

    if timeout:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return True, call()
    except TaskTimeout:
        return False, f"took longer than task_timeout_seconds ({timeout:g} s)"
    except MemoryError:
        return False, "out of memory"
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _run_dask_chunk(
    func: TaskFunction, chunk: list, batch: int, state: Any, token: str, claimed: tuple
) -> list[tuple[bool, Any]]:
    """A chunk on a Dask worker: the state is installed once per worker process and run, as in the
    local pool. No per-item time limit: the alarm signal only works in a main thread."""
    if _state_token != token:
        _install(state, token, claimed)
    return _run_chunk(func, chunk, None, batch)


# --------------------------------------------------------------------------------------------------
# In the command's process
# --------------------------------------------------------------------------------------------------
def parallel_map(
    func: TaskFunction,
    items: Iterable,
    engine: Engine,
    *,
    state: Any = None,
    chunksize: int = 64,
    progress: Callable[[Iterator], Iterator] | None = None,
    on_failure: Callable[[Any, str], Any] | None = None,
    chunked: bool = False,
    batched: bool = False,
) -> Iterator:
    """Yield func(state, item) for every item, as results finish (not in order), over the `engine`'s
    workers.

    `items` is consumed lazily and only a few chunks are in flight, so neither the items nor the
    results pile up in memory: the caller writes results out as they come. An item that takes longer
    than the engine's task timeout, or whose worker dies (killed by the out-of-memory killer, a crash
    in a decoder), yields on_failure(item, reason) instead: it costs that item, never the run. After a
    worker dies, the items it may have held are retried one at a time in a fresh worker, so only the
    culprit fails. Without `on_failure`, such a failure raises RuntimeError.

    Items go out in chunks: `chunked` says `items` yields them as lists already, else they are cut
    into lists of `engine.chunk_files`. On the local pool each chunk is split further, for balance,
    into pieces of at most `chunksize` items; on a Dask cluster each chunk is one task (`_dask_map`).
    With `batched`, func(state, items) takes a list of at most `chunksize` items and returns their
    results in order (a network that runs faster on several inputs at once).
    """
    chunks = iter(items) if chunked else batched_lists(items, engine.chunk_files)
    wrap = progress or (lambda it: it)
    setup = (state, os.urandom(8).hex(), writes.claims())
    batch = chunksize if batched else 0
    if engine.scheduler != "local":
        yield from wrap(_dask_map(func, chunks, batch, engine.scheduler, engine.scheduler_timeout, setup, on_failure))
        return
    yield from wrap(
        _pool_map(
            func, chunks, resolve_workers(engine.num_workers), setup, chunksize, batch, on_failure, engine.task_timeout
        )
    )


def batched_lists(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _failed(item: Any, reason: str, on_failure: Callable[[Any, str], Any] | None) -> Any:
    """What an item that failed yields: on_failure(item, reason), or without it a RuntimeError."""
    if on_failure is None:
        raise RuntimeError(f"{reason} while processing {item!r:.200}")
    return on_failure(item, reason)


def _outcomes(chunk: list, results: list[tuple[bool, Any]], on_failure) -> Iterator:
    for item, (ok, value) in zip(chunk, results):
        yield value if ok else _failed(item, value, on_failure)


@contextlib.contextmanager
def connected_client(address: str, timeout: float) -> Iterator:
    """A Dask client of the scheduler at `address` once it has a worker, or one line when it does not
    answer within `timeout` seconds (distributed's own timeout does not cover a server that accepts the
    connection and never answers: the connection is made in a thread, waited for with a deadline) or has
    no worker within `timeout` more."""
    from distributed import Client

    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            outcome["client"] = Client(address, timeout=timeout)
        except BaseException as exc:  # whatever a wrong server makes the handshake raise, said in one line
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="dask-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if "client" not in outcome:
        error = outcome.get("error")
        why = f"{type(error).__name__}: {shown(str(error))}" if error else f"no answer within {timeout:g} s"
        raise UserError(f"cannot reach the Dask scheduler at {address} ({why})")
    client = outcome["client"]
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise UserError(
                f"the Dask scheduler at {address} has no worker (none joined within {timeout:g} s): "
                f"start one with `dask worker {address}` in the project folder"
            ) from None
        # a worker that cannot import agepipe drops the task's message and the task waits forever: a first
        # task of agepipe's, with the same deadline, finds out
        try:
            client.submit(_worker_answers, pure=False).result(timeout=timeout)
        except Exception as exc:
            why = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise workers_cannot_run(address, why) from None
        yield client


def workers_cannot_run(address: str, why: str) -> UserError:
    """The one line for Dask workers that fail agepipe's tasks themselves (not an item inside them)."""
    return UserError(
        f"the Dask workers of {address} cannot run agepipe's tasks ({why}): start them in the project folder, "
        "with its .venv"
    )


def _worker_answers() -> bool:
    """A Dask worker's first task: it answers only when it can import agepipe."""
    return True


def _dask_map(func, chunks, batch: int, address: str, connect_timeout: float, setup: tuple, on_failure) -> Iterator:
    """Chunks of items over the workers of the Dask cluster at `address`, one task per chunk, two
    tasks per worker thread in flight.

    The scheduler re-runs a chunk whose worker is lost on another worker; a chunk that has killed
    three workers yields on_failure for each of its items. Workers must see the files at the same
    paths (a shared file system) and import agepipe's modules (start them in the project folder).
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    with connected_client(address, connect_timeout) as client:
        running: dict = {}
        finished = as_completed()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                future = client.submit(_run_dask_chunk, func, chunk, batch, *setup, pure=False)
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
            except Exception as exc:  # items fail inside _run_chunk: this is the worker failing the task itself
                raise workers_cannot_run(address, f"{type(exc).__name__}: {shown(str(exc))}") from None
            future.release()
            submit_next()
            yield from _outcomes(chunk, results, on_failure)


def _pool_map(func, chunks, workers: int, setup: tuple, chunksize: int, batch: int, on_failure, timeout) -> Iterator:
    # fork is fastest on Linux, and a forked worker dies with its parent (PR_SET_PDEATHSIG: a killed run
    # leaves no worker writing behind it). TensorFlow is not fork-safe, so the scripts that use it start
    # their pools before importing it; OpenCV's thread pool is paused while workers fork (below).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pieces = _pieces(chunks, chunksize, workers)
    with opencv_threads_stopped():
        while True:
            suspects, exhausted = yield from _pool_until_broken(
                func, pieces, workers, context, setup, batch, timeout, on_failure
            )
            yield from _retry_alone(func, suspects, context, setup, batch, timeout, on_failure)
            if exhausted:
                return


def _pieces(chunks: Iterator[list], chunksize: int, workers: int) -> Iterator[list]:
    """Each chunk cut into pieces of at most `chunksize` items, and into at least 4 per worker, so that
    a small chunk still keeps every worker busy."""
    for chunk in chunks:
        size = max(1, min(chunksize, -(-len(chunk) // (workers * 4))))
        yield from (chunk[i : i + size] for i in range(0, len(chunk), size))


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


def _pool_until_broken(
    func, pieces: Iterator[list], workers: int, context, setup: tuple, batch: int, timeout, on_failure
):
    """Run pieces through one pool, a few in flight, until they run out or a worker dies. Yields the
    outcomes; returns (the items a dead worker may have held, whether the pieces ran out)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=setup) as pool:
        running: dict = {}
        try:
            while True:
                while (
                    len(running) < workers * 2 and (piece := next(pieces, None)) is not None
                ):  # few in flight: memory stays flat
                    running[pool.submit(_run_chunk, func, piece, timeout, batch)] = piece
                if not running:
                    return [], True
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    results = future.result()  # first: a dead worker's piece stays among the suspects
                    yield from _outcomes(running.pop(future), results, on_failure)
        except BrokenProcessPool:
            return [item for piece in running.values() for item in piece], False


def _retry_alone(func, suspects: list, context, setup: tuple, batch: int, timeout, on_failure) -> Iterator:
    """After a worker died: each item it may have held in a pool of its own, so only the culprit fails."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    for item in suspects:
        try:
            with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=setup) as single:
                yield from _outcomes(
                    [item], single.submit(_run_chunk, func, [item], timeout, batch).result(), on_failure
                )
        except BrokenProcessPool:
            yield _failed(item, "its worker process died (out of memory or a crash in a decoder)", on_failure)
