"""Benchmark the exploration stage against plain JPEG decoding of the same files.

    python benchmarks/bench_explore.py DIR [--repeat 10] [--workers 0] [--no-peer]
    python benchmarks/bench_explore.py --tiny      # a check that it runs: generated faces, small counts, no peer

In one run, over the same files (read once beforehand so every pass finds them in the page cache):
1. reference: plain cv2.imread of every file on one core;
2. measuring every metric except face detection, over all cores;
3. the same with face detection;
then the whole explore_images.py script in a subprocess, on DIR and on DIR repeated --repeat times
(symbolic links), reporting wall time and peak memory (the script's own and its largest worker's).
Peak memory that stays flat between the two sizes shows that images are streamed. Last, the peer a user
would pick instead, cleanvision (installed into a temporary venv), finds its default issues in the same
files on all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.data.age_groups import AgeGroups  # noqa: E402
from agepipe.data.datasets import iter_dataset  # noqa: E402
from agepipe.quality.image_metrics import ReaderSettings  # noqa: E402
from agepipe.running import writes  # noqa: E402
from agepipe.running.parallel import Engine, resolve_workers  # noqa: E402
from agepipe.running.resume import PartStore  # noqa: E402
from image_reader import Dataset, compute_images_quality_metrics, load_explore_config, plan_chunks  # noqa: E402
from peers import peer_python  # noqa: E402
from runs import add_dataset_arguments, dataset_of, explore_run  # noqa: E402

PEER_SCRIPT = """
import json, sys, time
from cleanvision import Imagelab
paths = json.load(open(sys.argv[1]))
start = time.perf_counter()
Imagelab(filepaths=paths).find_issues(verbose=False)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def cleanvision_rate(paths: list[str], work: Path) -> float:
    """Images per second of cleanvision's default checks over `paths`, in its own venv."""
    python = peer_python(work, "cleanvision")
    (work / "paths.json").write_text(json.dumps(paths))
    (work / "peer.py").write_text(PEER_SCRIPT)
    result = subprocess.run(
        [str(python), str(work / "peer.py"), str(work / "paths.json")], capture_output=True, text=True, check=True
    )
    return len(paths) / json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def decode_rate(paths: list[str]) -> float:
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for path in paths:
        cv2.imread(path, cv2.IMREAD_COLOR)
    return len(paths) / (time.perf_counter() - start)


def measure_rate(dataset: list[dict], config, with_faces: bool, workers: int) -> float:
    """Images per second of the measuring pass alone (`compute_images_quality_metrics`), into a fresh part store."""
    metrics = {k: v for k, v in config.metrics.items() if with_faces or k != "faces"}
    settings = ReaderSettings.from_config(config, metrics)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "spool", "w+", encoding="utf-8") as spool:
        writes.adopt(((), (tmp,)))  # the part files go where a stage's would: claimed, as the stage's guard claims them
        parts = PartStore(Path(tmp) / "parts", "bench")
        chunks = plan_chunks(iter(dataset), spool, parts, config.chunk_files)
        start = time.perf_counter()
        compute_images_quality_metrics(Dataset(spool, chunks, parts), settings, Engine(workers))
        return len(dataset) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser, "a folder of images")
    parser.add_argument("--repeat", type=int, default=10, help="the larger set is the dataset this many times")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved reference/stage rounds")
    parser.add_argument("--no-peer", action="store_true", help="skip cleanvision")
    args = parser.parse_args()
    if args.tiny:
        args.repeat, args.rounds, args.no_peer = 2, 1, True
    with tempfile.TemporaryDirectory(prefix="bench-explore-") as tmp:
        benchmark(args, dataset_of(args, parser, Path(tmp)), Path(tmp))


def benchmark(args, dataset_dir: Path, tmp: Path) -> None:
    config = load_explore_config(PROJECT / "configs/explore_images.yaml")
    dataset = list(
        iter_dataset(dataset_dir, config.labels, config.age_range, AgeGroups(tuple(config.age_groups.edges)))
    )
    paths = [row["_real_path"] for row in dataset]
    workers = resolve_workers(args.workers)
    for path in paths:  # warm the page cache so no pass pays for the disk
        Path(path).read_bytes()

    print(f"{len(paths)} files in {dataset_dir}, {workers} workers, {os.cpu_count()} cores")
    # Rounds interleave the reference and the stage, and medians are reported: on a shared machine the
    # speed of both drifts by tens of percent from one minute to the next.
    references, rates = [], []
    for _ in range(args.rounds):
        references.append(decode_rate(paths))
        rates.append(measure_rate(dataset, config, False, workers))
    reference, rate = statistics.median(references), statistics.median(rates)
    print(f"plain cv2.imread, 1 core:                 {reference:8.0f} images/s   (reference, median of {args.rounds})")
    print(
        f"all metrics but face detection, {workers} workers: {rate:8.0f} images/s   ratio {rate / reference:.2f}"
        f"   (per round: {', '.join(f'{r / f:.2f}' for r, f in zip(rates, references))})"
    )
    rate = measure_rate(dataset, config, True, workers)
    print(f"all metrics with face detection, {workers} workers:{rate:8.0f} images/s   ratio {rate / reference:.2f}")

    big = tmp / "repeated"
    for copy in range(args.repeat):
        for file, real in ((row["file"], row["_real_path"]) for row in dataset):
            target = big / f"copy{copy:02d}" / file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.abspath(real))
    for name, folder in (("dataset", dataset_dir), (f"dataset x{args.repeat}", big)):
        stats = explore_run(folder, tmp / name.replace(" ", "_"), args.workers)
        print(
            f"explore_images.py on {name:14s} {stats['files']:6d} files {stats['seconds']:7.1f} s "
            f"{stats['images_per_s']:6.0f} images/s   peak memory: main {stats['main_mb']:.0f} MB, "
            f"largest worker {stats['worker_mb']:.0f} MB"
        )
        if name == "dataset":
            script_rate = stats["images_per_s"]
    if not args.no_peer:
        peer = cleanvision_rate(paths, tmp)
        print(
            f"cleanvision (default checks, all cores) {len(paths):6d} files {len(paths) / peer:7.1f} s {peer:6.0f} "
            "images/s"
            f"   explore_images.py with faces: {script_rate / peer:.2f}x cleanvision"
        )


if __name__ == "__main__":
    main()
