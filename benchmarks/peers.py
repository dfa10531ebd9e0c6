"""The peers a user would pick instead of agepipe, each installed by a benchmark into its own temporary
virtual environment: they are measured beside the project in the same run, never its dependencies."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path


def peer_python(work: Path, package: str) -> Path:
    """The Python of a venv under `work` with `package` installed (created on first use)."""
    environment = work / f"venv-{package}"
    python = environment / "bin" / "python"
    if not python.exists():
        venv.create(environment, with_pip=True)
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", package], capture_output=True, text=True
        )
        if result.returncode:
            sys.exit(f"could not install the peer {package}:\n{result.stderr[-2000:]}")
    return python
