"""Benchmark how the data stages scale with the number of files: time and peak memory.

    python benchmarks/bench_scale.py [--sizes 3000 30000 300000] [--hashes 1000000] [--workers 0]
                                     [--stages explore,dask,process,predict]
                                     [--model models/age_group_classifier/model.keras]
    python benchmarks/bench_scale.py --tiny      # a check that it runs: 60 and 120 files, 2,000 hashes, no prediction

1. For each size N: a synthetic dataset of N small JPEG files (distinct pixels: a face from the
   built-in sample, shifted and tinted per file), then the whole explore_images.py over it in a
   subprocess: images/s, near-duplicate search seconds (from a separate timing on its CSV) and peak
   memory of the main process and of its largest worker; then the same run through a Dask
   LocalCluster of as many single-threaded workers (`scheduler` set to its address); then
   process_images.py on that exploration, and predict_age.py on the folder with --model (skipped
   when there is none). `--stages` picks which of these run. Prediction's descriptor cache is filled first
   (fill_cache): describing
   300,000 faces would take over an hour here, and what prediction holds in memory does not depend on the
   numbers a description holds.
2. Near-duplicate search alone: `find_duplicates` on --hashes random 256-bit perceptual hashes (what
   `hash_side: 16` gives) with a few hundred planted pairs within the configured `max_hash_distance`;
   reports seconds, peak memory and how many planted pairs were found. It runs last: a child process
   started afterwards would inherit its peak memory figure.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.config.data_stages import Duplicates  # noqa: E402
from agepipe.config.loading import CONFIG_DIR, load_config  # noqa: E402
from agepipe.config.model_stages import PredictConfig  # noqa: E402
from agepipe.data.image_files import FileLimits  # noqa: E402
from agepipe.faces.descriptor_cache import DescriptorCache, content_hash, describe_files  # noqa: E402
from agepipe.model.backbones import saved_backbone  # noqa: E402
from agepipe.model.saved_models import read_model_metadata  # noqa: E402
from agepipe.quality.duplicates import find_duplicates  # noqa: E402
from agepipe.running.parallel import Engine  # noqa: E402
from image_reader import load_explore_config  # noqa: E402
from runs import explore_run, measured_run, tiny_faces  # noqa: E402


def planted_hashes(count: int, pairs: int, max_distance: int, seed: int = 0) -> tuple[pd.DataFrame, set]:
    """`count` random 256-bit hashes in a frame like the exploration's, with `pairs` planted pairs."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    planted = set()
    for a, b in rng.choice(count, (pairs, 2), replace=False):  # disjoint pairs: no plant undoes another
        bits = np.unpackbits(codes[a])
        bits[rng.choice(256, rng.integers(0, max_distance + 1), replace=False)] ^= 1
        codes[b] = np.packbits(bits)
        planted.add((min(a, b), max(a, b)))
    frame = pd.DataFrame(
        {
            "file": [f"{i}.jpg" for i in range(count)],
            "age": rng.integers(1, 90, count),
            "content_hash": [f"c{i}" for i in range(count)],
            "phash": [c.tobytes().hex() for c in codes],
        }
    )
    return frame, planted


def near_duplicate_benchmark(count: int, rule: Duplicates) -> None:
    max_distance = rule.max_hash_distance
    frame, planted = planted_hashes(count, 300, max_distance)
    start = time.perf_counter()
    result = find_duplicates(frame, rule.model_copy(update={"max_age_difference": 0}))
    seconds = time.perf_counter() - start
    group = result["duplicate_group"].to_numpy()
    found = sum(1 for a, b in planted if not pd.isna(group[a]) and group[a] == group[b])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"find_duplicates on {count:,} random 256-bit hashes: {seconds:.1f} s, {found}/{len(planted)} planted pairs "
        f"(<= {max_distance} bits) grouped, {int(result['duplicate_group'].notna().sum())} files in groups, peak "
        f"memory {peak:.0f} MB"
    )


TEMPLATES = 50  # file i of make_dataset's datasets is template i % TEMPLATES, tinted and shifted


def make_dataset(folder: Path, count: int, templates_dir: Path, seed: int = 0) -> None:
    """`count` distinct small JPEG faces with UTKFace names, written in a few seconds per 10,000, made
    from the faces of a sample dataset in `templates_dir`."""
    faces = sorted(templates_dir.glob("*.chip.jpg"))[:TEMPLATES]
    if not faces:
        sys.exit(
            f"no faces in {templates_dir}: run make_sample_dataset.py first (the faces of the built-in sample are "
            "the templates)"
        )
    decoded = [
        image for image in map(cv2.imread, map(str, faces)) if image is not None
    ]  # a sample's broken files are no template
    templates = [cv2.resize(image, (96, 96), interpolation=cv2.INTER_AREA) for image in decoded]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        face = templates[i % len(templates)].astype(np.int16)
        face = np.clip(face + rng.integers(-12, 13, 3) + rng.normal(0, 2, face.shape), 0, 255).astype(np.uint8)
        shift = rng.integers(-4, 5, 2)
        face = np.roll(face, tuple(shift), axis=(0, 1))
        ok, data = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, 90])
        sub = folder / f"part{i // 10000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{1 + i % 90}_{i % 2}_{i % 5}_{i:09d}.jpg.chip.jpg").write_bytes(data.tobytes())


def explore_benchmark(folder: Path, out: Path, workers: int, rule: Duplicates, scheduler: str = "local") -> dict:
    stats = explore_run(folder, out, workers, scheduler)
    frame = pd.read_csv(out / "m.csv", usecols=["file", "age", "content_hash", "phash"])
    start = time.perf_counter()
    find_duplicates(frame, rule)
    return {**stats, "search_seconds": time.perf_counter() - start}


def dataset_files(folder: Path) -> list[Path]:
    """make_dataset's files, in the order it made them."""
    return sorted(folder.glob("part*/*.jpg"), key=lambda path: int(path.name.split("_")[3].split(".")[0]))


def fill_cache(folder: Path, cache: Path, model: Path, workers: int) -> None:
    """Describe the first TEMPLATES files for real with `model`'s settings, and give every other file
    its template's description under its own content hash."""
    limits = FileLimits.from_config(load_config(PredictConfig, CONFIG_DIR / "predict_age.yaml").file_limits)
    settings = saved_backbone(read_model_metadata(model), limits).descriptor
    files = dataset_files(folder)
    templates = [str(f) for f in files[:TEMPLATES]]
    describe_files(templates, settings, cache, Engine(workers), limits)
    cached = DescriptorCache(cache, settings)
    keys = [cached.key(content_hash(f, limits.max_file_bytes)) for f in templates]
    found = cached.journal.records(keys)
    rows = [found[key] for key in keys]
    with cached.journal:
        for index, path in enumerate(files[TEMPLATES:], TEMPLATES):
            cached.journal.record(cached.key(content_hash(str(path), limits.max_file_bytes)), rows[index % TEMPLATES])


def process_benchmark(explored: Path, out: Path, workers: int) -> str:
    """process_images.py on the exploration in `explored`: its part of the report."""
    processed = measured_run(
        "process_images.py",
        f"input_csv={explored}/m.csv",
        f"output_dir={out}/processed",
        f"output_csv={out}/processed.csv",
        f"num_workers={workers}",
        "log_level=WARNING",
    )
    return (
        f"process {processed['seconds']:6.0f} s, peak memory main {processed['main_mb']:.0f} MB, "
        f"largest worker {processed['worker_mb']:.0f} MB"
    )


def prediction_benchmark(folder: Path, out: Path, model: Path, workers: int) -> str:
    """predict_age.py on `folder` with `model`, its descriptor cache filled first: its part of the report."""
    fill_cache(folder, out / "descriptors.jsonl", model, workers)
    predicted = measured_run(
        "predict_age.py",
        f"inputs=[{folder}]",
        f"model_path={model}",
        f"descriptor_cache={out}/descriptors.jsonl",
        f"output_csv={out}/p.csv",
        f"num_workers={workers}",
        "log_level=WARNING",
    )
    return f"predict (descriptors cached) {predicted['seconds']:6.0f} s, peak memory {predicted['main_mb']:.0f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[3000, 30000, 300000])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument(
        "--stages", default="explore,dask,process,predict", help="which to measure (process needs explore)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=PROJECT / "models/age_group_classifier/model.keras",
        help="the model prediction runs with (make pipeline trains this one)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a check that it runs: small sizes, no prediction (the tests run this)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.hashes, args.stages = [60, 120], 2000, "explore,dask,process"
    stages = set(args.stages.split(","))
    if "predict" in stages and not args.model.is_file():
        stages.discard("predict")
        print(f"no model at {args.model}: prediction is not measured")
    from distributed import LocalCluster

    from agepipe.running.parallel import resolve_workers

    rule = load_explore_config(PROJECT / "configs/explore_images.yaml").duplicates
    workers = resolve_workers(args.workers)
    cluster = (
        LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
        if "dask" in stages
        else contextlib.nullcontext()
    )
    with tempfile.TemporaryDirectory() as tmp, cluster:
        templates = tiny_faces(Path(tmp)) if args.tiny else PROJECT / "sample_dataset"
        for size in args.sizes:
            folder, explored = Path(tmp) / f"n{size}", Path(tmp) / f"out{size}"
            start = time.perf_counter()
            make_dataset(folder, size, templates)
            report = [f"made in {time.perf_counter() - start:5.0f} s"]
            if "explore" in stages:
                stats = explore_benchmark(folder, explored, workers, rule)
                report.append(
                    f"explore {stats['seconds']:7.1f} s = {stats['files'] / stats['seconds']:5.0f} img/s, "
                    "near-duplicate "
                    f"search {stats['search_seconds']:5.1f} s, peak memory main {stats['main_mb']:.0f} MB, largest "
                    "worker "
                    f"{stats['worker_mb']:.0f} MB"
                )
            if "dask" in stages:
                dask = explore_benchmark(folder, Path(tmp) / f"dask{size}", workers, rule, cluster.scheduler_address)
                report.append(
                    f"explore on a Dask LocalCluster of {workers}: {dask['files'] / dask['seconds']:5.0f} img/s"
                )
            if "process" in stages:
                report.append(process_benchmark(explored, Path(tmp) / f"processed{size}", workers))
            if "predict" in stages:
                report.append(prediction_benchmark(folder, Path(tmp) / f"predicted{size}", args.model, workers))
            print(f"N = {size:>7,}: " + "; ".join(report), flush=True)
            subprocess.run(["rm", "-rf", str(folder), str(explored)], check=True)
    if args.hashes:
        near_duplicate_benchmark(args.hashes, rule)


if __name__ == "__main__":
    main()
