"""What long work shows on the terminal, and what it keeps off it: a progress bar (tqdm), and the
silencing of native libraries' start-up chatter (TensorFlow's, LiteRT's, onnxruntime's), which would
bury a stage's own output."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide what C++ code writes to file descriptor 2: TensorFlow's and LiteRT's start-up lines (oneDNN, CUDA
    drivers, XNNPACK) are written by absl before any log level applies, and would bury the stage's own output."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def progress_bar(total: int, description: str, unit: str = "img"):
    """A tqdm wrapper factory showing items per second; quiet when stderr is not a terminal."""
    from tqdm import tqdm

    def wrap(iterator):
        return tqdm(
            iterator,
            total=total,
            desc=description,
            unit=unit,
            smoothing=0.1,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
        )

    return wrap
