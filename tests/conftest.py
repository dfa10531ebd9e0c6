"""Shared fixtures: the generated sample dataset and one exploration run over it.

Scripts are run as users run them (python SCRIPT.py --set ...) in a subprocess, with every output
redirected into a temporary folder, so tests never touch the project's own csv/ or datasets.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "agepipe"
sys.path.insert(0, str(PROJECT))


def root_modules() -> dict[str, Path]:
    """The project's top-level modules by name: the scripts a user runs and the helpers they share."""
    return {path.stem: path for path in sorted(PROJECT.glob("*.py"))}


def scripts() -> list[str]:
    """The top-level modules a user runs: those with a `__main__` block."""
    return [
        name
        for name, path in root_modules().items()
        if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
    ]


def library_modules() -> list[str]:
    """Every module of the library, importable by name: the package's, then the top-level helpers."""
    package = [
        ".".join(path.relative_to(PROJECT).with_suffix("").parts)
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.stem != "__init__"
    ]
    return package + [name for name in root_modules() if name not in scripts()]


@pytest.fixture(autouse=True)
def claimed_tmp_path(tmp_path):
    """Library functions called in the test process may write below the test's own folder: it is
    claimed as the scripts claim their outputs (output_guard.OutputGuard), so nothing else can be written."""
    from agepipe.running import writes

    writes.adopt(((), (str(tmp_path.resolve()),)))
    return tmp_path


def run(
    script: str, *overrides: str, config: str | None = None, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run a top-level script with --set overrides; fail the test with its output if it fails (or, with
    a `timeout`, if it hangs)."""
    command = [sys.executable, str(PROJECT / script)]
    if config:
        command += ["--config", config]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """The built-in sample dataset, generated once per test session with the default config."""
    folder = tmp_path_factory.mktemp("sample") / "sample_dataset"
    run("make_sample_dataset.py", f"output_dir={folder}")
    return folder


@pytest.fixture(scope="session")
def manifest(sample) -> pd.DataFrame:
    return read_csv(sample / "manifest.csv")


@pytest.fixture(scope="session")
def explored(sample, tmp_path_factory) -> Path:
    """csv folder of one exploration run over the sample, with the default thresholds."""
    out = tmp_path_factory.mktemp("explored")
    run(
        "explore_images.py",
        f"dataset_dir={sample}",
        f"output_csv={out}/image_metadata.csv",
        f"summary_csv={out}/summary.csv",
    )
    return out


@pytest.fixture(scope="session")
def metadata(explored, manifest) -> pd.DataFrame:
    """The exploration CSV joined with what the generator planted in each file."""
    frame = read_csv(explored / "image_metadata.csv")
    return frame.merge(manifest[["file", "defect", "broken", "source"]], on="file", how="left")


def process(input_csv, out, *extra, check=True):
    """Run the processing stage on an exploration CSV, writing into the folder `out`: whole images
    (`output: images`), so that repairs can be compared with the clean originals they came from; the
    default, a dataset of face crops, is tested on its own (test_process.py)."""
    return run(
        "process_images.py",
        f"input_csv={input_csv}",
        f"output_dir={out}/images",
        f"output_csv={out}/processed.csv",
        "output=images",
        *extra,
        check=check,
    )


@pytest.fixture(scope="session")
def processed(explored, tmp_path_factory) -> Path:
    """Folder of one processing run over the explored sample (images/ and processed.csv)."""
    out = tmp_path_factory.mktemp("processed")
    process(explored / "image_metadata.csv", out)
    return out


@pytest.fixture(scope="session")
def descriptor_cache(tmp_path_factory):
    """One descriptor cache for every training run of the session: each face is described once."""
    return tmp_path_factory.mktemp("descriptors") / "face_descriptors.jsonl"


def run_notebook(name, tmp, *overrides):
    command = [sys.executable, "run_notebook.py", name, "--output-dir", str(tmp)]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return nbformat.read(tmp / name, as_version=4)


def notebook_text(notebook) -> str:
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(scope="session")
def resampled(processed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resampled")
    common = [
        f"target_csv={tmp}/target.csv",
        f"processed_csv={processed}/processed.csv",
        f"output_dir={tmp}/images",
        f"output_csv={tmp}/resampled.csv",
    ]
    population = run_notebook("australian_population.ipynb", tmp, *common)
    notebook = run_notebook("resampling.ipynb", tmp, *common)
    return tmp, population, notebook


def kill_part_way(script: str, overrides: list[str], journal: Path, lines: int, timeout: float = 120) -> int:
    """Start a script, SIGKILL it (no clean-up at all) once its journal (a file, or a folder of part
    files) records `lines` finished items, and return how many items it records as finished."""
    command = [sys.executable, script] + [a for o in overrides for a in ("--set", o)]
    child = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and finished_items(journal) < lines:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return finished_items(journal)


def kill_processing_part_way(explored: Path, out: Path, lines: int) -> int:
    """Kill process_images.py (whole images, as `process` writes them; one worker, chunks of 20) over an
    exploration into `out` once `lines` rows are done."""
    overrides = [
        f"input_csv={explored / 'image_metadata.csv'}",
        f"output_dir={out}/images",
        f"output_csv={out}/processed.csv",
        "output=images",
        "num_workers=1",
        "chunk_files=20",
    ]
    return kill_part_way("process_images.py", overrides, out / "processed.csv.parts", lines)


def finished_items(journal: Path) -> int:
    """Items a journal file or a folder of part files records (each begins with a header line)."""
    files = sorted(journal.glob("*.jsonl")) if journal.is_dir() else [journal] if journal.exists() else []
    return sum(max(0, f.read_text().count("\n") - 1) for f in files)
