"""Execute a notebook headlessly with papermill, the way `make pipeline` and the tests run the notebooks.

    python run_notebook.py resampling.ipynb [--config PATH] [--set key=value ...]

Each notebook has a cell tagged `parameters` (`config_path`, `overrides`); --config and --set replace
them, as papermill does. The executed copy, with its outputs, is saved to reports/notebooks/ in the
workspace (`--set workspace=DIR`, as every stage takes it; the notebook in the repository is left as
it is). A failing cell stops the run with the cell's error and
exit status 1.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

from agepipe.config.data_stages import ResamplingConfig
from agepipe.config.loading import PROJECT_DIR
from agepipe.errors import UserError
from agepipe.running.console import native_stderr_silenced
from agepipe.running.kernels import ParentBoundKernelManager
from agepipe.running.output_guard import OutputGuard
from agepipe.running.writes import rename_into_place, temporary_affixes
from utils import WORKSPACE_VARIABLE, argument_parser, require_workspace


def absolute_paths(assignment: str) -> str:
    """A --set whose key is a path of the notebooks' config made absolute against the current folder: the
    notebook's kernel runs in the project folder, and a path typed here is meant from here."""
    from agepipe.config.data_stages import ResamplingConfig
    from agepipe.config.loading import path_fields

    key, _, value = assignment.partition("=")
    if key in path_fields(ResamplingConfig) and value and not value.startswith("["):
        return f"{key}={Path(value).expanduser().resolve()}"
    return assignment


def execute(notebook: Path, folder, target: Path, parameters: dict, timeout: int) -> None:
    """Run the notebook into a temporary file of the output folder, then rename it over `target`: the
    executed copy appears whole, failed or not, and a killed run's partial copy is removed next time."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with (
        folder.scratch() as runtime,
        tempfile.NamedTemporaryFile(dir=folder.path, **temporary_affixes(target.name), delete=False) as partial,
    ):
        # the kernel's connection file (its ports and key) goes to the run's private scratch folder, never
        # the repository nor the shared temporary folder: what a killed run leaves, the next run removes.
        # jupyter_client makes it with tempfile.mkstemp, its runtime files in JUPYTER_RUNTIME_DIR
        os.environ["JUPYTER_RUNTIME_DIR"] = runtime
        shared_temporary, tempfile.tempdir = tempfile.tempdir, runtime
        try:
            # the kernel's own stderr ("Parent appears to have exited" at shutdown) is not the user's
            # business: a cell's error is in the exception and in the saved notebook
            with native_stderr_silenced():
                papermill.execute_notebook(
                    str(notebook),
                    partial.name,
                    parameters=parameters,
                    cwd=str(PROJECT_DIR),
                    kernel_name="python3",
                    progress_bar=False,
                    log_output=False,
                    execution_timeout=timeout,
                    kernel_manager_class=ParentBoundKernelManager,
                )
        except PapermillExecutionError as exc:
            error = re.sub(r"\x1b\[[0-9;]*m", "", f"{exc.ename}: {exc.evalue}")  # no terminal colours
            print(f"error: {notebook} failed: {error}", file=sys.stderr)
            sys.exit(1)
        finally:
            tempfile.tempdir = shared_temporary
            if os.path.getsize(partial.name):
                rename_into_place(partial.name, target)
                folder.wrote(target.name)
            else:
                os.unlink(partial.name)


def main() -> None:
    parser = argument_parser(
        "Execute a notebook headlessly; both notebooks read resampling.yaml.",
        "resampling.yaml",
        ResamplingConfig,
        [
            "python run_notebook.py resampling.ipynb --set target_size=5000",
            "python run_notebook.py australian_population.ipynb --set workspace=/tmp/agepipe-run",
        ],
        sys.argv[1:],
    )
    parser.add_argument("notebook", type=Path)
    parser.add_argument(
        "--output-dir", type=Path, help="where the executed copy goes (default: reports/notebooks in the workspace)"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take")
    args = parser.parse_args()
    if not args.notebook.is_file() and (PROJECT_DIR / args.notebook).is_file():
        args.notebook = PROJECT_DIR / args.notebook  # the project's notebooks, from any folder
    if not args.notebook.is_file():
        raise UserError(f"notebook {args.notebook} not found")
    workspace = next(
        (o.partition("=")[2] for o in reversed(args.overrides) if o.partition("=")[0] == "workspace"),
        os.environ.get(WORKSPACE_VARIABLE),
    )
    require_workspace(workspace)
    if args.output_dir is None:
        args.output_dir = (
            (Path(workspace).expanduser().resolve() if workspace else PROJECT_DIR) / "reports" / "notebooks"
        )
    parameters = {
        "overrides": [absolute_paths(o) for o in args.overrides],
        "config_path": str(Path(args.config).resolve()),
    }
    start = time.perf_counter()
    with OutputGuard(inputs=[args.notebook]) as guard:
        folder = guard.folder(args.output_dir, "--output-dir", overwrite=True)
        target = folder.target(args.notebook.name)
        folder.begin([target.name])  # an executed notebook never replaces a file of the user's of that name
        execute(args.notebook, folder, target, parameters, args.timeout)
    print(f"executed {args.notebook} in {time.perf_counter() - start:.0f}s; with outputs: {target}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
