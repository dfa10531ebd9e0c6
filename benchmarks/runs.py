"""The project's scripts run as a user runs them, in a subprocess: `run` and `script` stop the benchmark
with the failing command's error; `measured_run` also measures a script's wall time and peak memory,
and `explore_run` explores a folder that way."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
# The script's own peak resident memory and its largest (waited-for) worker's. The script's is VmHWM,
# not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a large benchmark process would
# report the benchmark's own size.
CHILD = """
import re, resource, runpy, sys, json
sys.path.insert(0, ".")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
with open("/proc/self/status") as status:
    main_kb = int(re.search(r"VmHWM:\\s*(\\d+)", status.read()).group(1))
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print("PEAK", json.dumps({"main_mb": main_kb / 1024, "worker_mb": kids.ru_maxrss / 1024}))
"""


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in the project folder; on failure, stop the benchmark with its error output."""
    result = subprocess.run([str(c) for c in command], cwd=PROJECT, capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stderr[-3000:]}")
    return result


def script(name: str, *overrides: str) -> subprocess.CompletedProcess:
    """Run one of the project's scripts with --set overrides."""
    return run(sys.executable, name, *[a for o in overrides for a in ("--set", o)])


def measured_run(name: str, *overrides: str) -> dict:
    """Run one of the project's scripts with --set overrides: seconds, main_mb and worker_mb (peak
    resident memory of the script's process and of its largest worker) and its stdout."""
    command = [sys.executable, "-c", CHILD, name, *[a for o in overrides for a in ("--set", o)]]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-2000:]}")
    elapsed = time.perf_counter() - start
    output, peak = result.stdout.split("PEAK", 1)
    return {"seconds": elapsed, **json.loads(peak), "stdout": output}


def explore_run(dataset_dir: Path, out: Path, workers: int, scheduler: str = "local") -> dict:
    """Explore `dataset_dir` into `out`/m.csv: files, seconds, images_per_s, main_mb and worker_mb."""
    stats = measured_run(
        "explore_images.py",
        f"dataset_dir={dataset_dir}",
        f"output_csv={out}/m.csv",
        f"summary_csv={out}/s.csv",
        f"num_workers={workers}",
        "log_level=WARNING",
        f"scheduler={scheduler}",
    )
    with open(out / "m.csv") as csv:
        files = sum(1 for _ in csv) - 1
    return {"files": files, "images_per_s": files / stats["seconds"], **stats}


# --------------------------------------------------------------------------------------------------
# --tiny: every benchmark also runs on a few dozen generated faces, with small counts and no peer, so
# that a benchmark that breaks fails the tests (tests/test_benchmarks.py) instead of rotting.
# --------------------------------------------------------------------------------------------------
TINY_FACES = 40
# train_model.py's and check_labels.py's settings in a tiny run: a few epochs, one head
TINY_TRAINING = ["training.epochs=3", "model.face_features.ensemble=1"]
TINY_LABEL_CHECK = ["training.epochs=3", "folds=2", "second_pass_leave_out=0"]


def add_dataset_arguments(parser, what: str = "a folder of face crops with UTKFace names") -> None:
    """DIR (`what`), and --tiny, which needs no DIR."""
    parser.add_argument(
        "dataset_dir", type=Path, nargs="?", help=f"{what} (with --tiny: generated faces when not given)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a check that the benchmark runs: a few dozen generated faces, small counts, no peer (the tests run this)",
    )


def dataset_of(args, parser, work: Path) -> Path:
    """The benchmark's DIR: the one given, or with --tiny a few dozen faces drawn by make_sample_dataset.py."""
    if args.dataset_dir is not None:
        return args.dataset_dir.resolve()
    if not args.tiny:
        parser.error("give DIR, or --tiny")
    return tiny_faces(work)


def tiny_faces(work: Path) -> Path:
    """TINY_FACES faces drawn by make_sample_dataset.py (UTKFace names, planted defects and broken files included)."""
    folder = work / "tiny_faces"
    if not folder.is_dir():
        script("make_sample_dataset.py", f"output_dir={folder}", f"num_images={TINY_FACES}")
    return folder
