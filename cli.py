"""The command line every script shares: `--config` and `--set` arguments, logging, a progress bar, the
silencing of native libraries' start-up chatter, and `run_script`, which turns a user's mistake into one
line on stderr (exit status 2) instead of a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from typing import Callable, Iterable

from config import CONFIG_DIR, ModelT, load_config
from errors import ConfigError, UserError

def parse_args(description: str, default_config: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default=str(CONFIG_DIR / default_config), help="YAML config file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set num_workers=1 (repeatable; dotted keys reach nested values)",
    )
    return parser.parse_args(argv)


FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_script(main: Callable[[argparse.Namespace], None], description: str, default_config: str):
    """Entry point shared by the scripts: parse arguments, run, turn user errors into one line."""
    args = parse_args(description, default_config)
    try:
        main(args)
    except (ConfigError, UserError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_ERRORS:
            raise
        # a full disk or a read-only folder: what was written stays whole (atomic writes), re-run after fixing
        print(one_line(f"error: {exc.strerror}: {exc.filename or 'while writing'}; re-run the same command once fixed"), file=sys.stderr)
        sys.exit(2)


MAX_ERROR_CHARACTERS = 1000


def one_line(message: str) -> str:
    """An error message as one line of at most MAX_ERROR_CHARACTERS (a path or value in it may be long).

    Examples
    --------
    >>> one_line("first\\nsecond")
    'first second'
    """
    flat = " ".join(message.split())
    return flat if len(flat) <= MAX_ERROR_CHARACTERS else flat[:MAX_ERROR_CHARACTERS] + "…"


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


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # TensorFlow and matplotlib are chatty at INFO; the stages' own messages are what users need.
    for noisy in ("matplotlib", "PIL", "tensorflow", "h5py", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# Files


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


def notebook_config(model: type[ModelT], path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelT:
    """A notebook's config, from its `parameters` cell (which run_notebook.py sets through papermill)."""
    config = load_config(model, path, overrides)
    setup_logging(config.log_level)
    return config
