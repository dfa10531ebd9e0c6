"""Execute a notebook headlessly with papermill, the way `make pipeline` and the tests run the notebooks.

    python run_notebook.py resampling.ipynb [--config PATH] [--set key=value ...]

Each notebook has a cell tagged `parameters` (`config_path`, `overrides`); --config and --set replace
them, as papermill does. The executed copy, with its outputs, is saved to reports/notebooks/ (the
notebook in the repository is left as it is). A failing cell stops the run with the cell's error and
exit status 1.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from cli import native_stderr_silenced
from config import PROJECT_DIR
from outputs import current_umask


def main() -> None:
    parser = argparse.ArgumentParser(description="Execute a notebook headlessly.")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--config", help="config file for the notebook (default: its own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_DIR / "reports" / "notebooks")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    args = parser.parse_args()
    if not args.notebook.is_file():
        sys.exit(f"error: notebook {args.notebook} not found")
    import papermill
    from papermill.exceptions import PapermillExecutionError

    parameters = {"overrides": args.overrides}
    if args.config:
        parameters["config_path"] = str(Path(args.config).resolve())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    target = args.output_dir / args.notebook.name
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agepipe-kernel-") as runtime, \
            tempfile.NamedTemporaryFile(dir=args.output_dir, prefix=".tmp-", suffix=".ipynb", delete=False) as partial:
        # the kernel's connection file goes to a temporary folder, never the repository
        os.environ["JUPYTER_RUNTIME_DIR"] = runtime
        try:
            # the kernel's own stderr ("Parent appears to have exited" at shutdown) is not the user's
            # business: a cell's error is in the exception and in the saved notebook
            with native_stderr_silenced():
                papermill.execute_notebook(str(args.notebook), partial.name, parameters=parameters, cwd=str(PROJECT_DIR),
                                           kernel_name="python3", progress_bar=False, log_output=False, execution_timeout=args.timeout)
        except PapermillExecutionError as exc:
            error = re.sub(r"\x1b\[[0-9;]*m", "", f"{exc.ename}: {exc.evalue}")  # no terminal colours
            print(f"error: {args.notebook} failed: {error}", file=sys.stderr)
            sys.exit(1)
        finally:
            if os.path.getsize(partial.name):
                os.chmod(partial.name, 0o666 & ~current_umask())  # a temporary file is private; outputs are not
                os.replace(partial.name, target)  # the executed copy appears whole, failed or not
            else:
                os.unlink(partial.name)
    print(f"executed {args.notebook} in {time.perf_counter() - start:.0f}s; with outputs: {target}")


if __name__ == "__main__":
    main()
