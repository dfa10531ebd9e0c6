"""Execute a notebook headlessly, the way `make pipeline` and the tests run the notebooks.

    python run_notebook.py resampling.ipynb [--config PATH] [--set key=value ...]

The executed copy, with its outputs, is saved to reports/notebooks/ (the notebook in the repository is
left as it is). --config and --set reach the notebook through the AGEPIPE_CONFIG and AGEPIPE_SET
environment variables. A failing cell stops the run with the cell's error and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from utils import PROJECT_DIR, atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description="Execute a notebook headlessly.")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--config", help="config file for the notebook (default: its own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_DIR / "reports" / "notebooks")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    args = parser.parse_args()
    if not args.notebook.exists():
        sys.exit(f"error: notebook {args.notebook} not found")
    if args.config:
        os.environ["AGEPIPE_CONFIG"] = args.config
    os.environ["AGEPIPE_SET"] = "\n".join(args.overrides)
    notebook = nbformat.read(args.notebook, as_version=4)
    target = args.output_dir / args.notebook.name
    with tempfile.TemporaryDirectory(prefix="agepipe-kernel-") as sockets:
        # local socket files, not TCP, in a temporary folder: never left in the repository
        kernel = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel-ipc"))
        client = NotebookClient(notebook, km=kernel, timeout=args.timeout, resources={"metadata": {"path": str(PROJECT_DIR)}})
        try:
            # the kernel's own stderr (e.g. "Parent appears to have exited" at shutdown) is not the user's
            # business: cell errors and outputs are in the notebook
            client.execute(stderr=subprocess.DEVNULL)
        except CellExecutionError as exc:
            error = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # drop the traceback's colours
            print(f"error: {args.notebook} failed: {error[-1] if error else exc}", file=sys.stderr)
            sys.exit(1)
        finally:
            with atomic_write(target, encoding="utf-8") as f:
                nbformat.write(notebook, f)
    print(f"executed {args.notebook}; with outputs: {target}")


if __name__ == "__main__":
    main()
