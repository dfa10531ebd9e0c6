"""Benchmark the label check on planted label errors in real crops, beside cleanlab's default ranking on the
same out-of-fold predictions; then a model trained without the suspected labels against one trained on
all, on faces never seen.

    python benchmarks/bench_labels.py DIR [--share 0.05] [--min-shift 15] [--folds 5] [--work-dir W] [--no-training]
    python benchmarks/bench_labels.py --tiny      # a check that it runs: generated faces, 2 folds, a few epochs

DIR holds face crops with UTKFace names. A copy of it is made (links, renamed) in which `--share` of the
faces, chosen at random (seeded), carry an age moved by at least `--min-shift` years; the rest keep
theirs. explore_images.py, process_images.py and check_labels.py run over the copy, and the planted
errors are ranked by label_quality: AUROC, and precision among the k lowest (k = the number planted).
cleanlab's default ranking (get_label_quality_scores: self-confidence of the given age group) is
computed from the same out-of-fold group probabilities the check writes.

Then, unless --no-training: the copy's faces are split into `--folds` folds; for each, the label check
runs on the other folds only, train_model.py trains on them with every label and without the suspected
ones, and both models predict the fold's faces, scored against their true (unplanted) ages: over all of
them, and over those whose label was planted wrong.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.data.age_groups import AgeGroups  # noqa: E402
from agepipe.data.datasets import parse_utkface_name, suspected_labels_mask  # noqa: E402
from agepipe.model.training import stratified_folds  # noqa: E402
from crops import configured_groups, labelled_crops  # noqa: E402
from runs import TINY_LABEL_CHECK, TINY_TRAINING, add_dataset_arguments, dataset_of, script  # noqa: E402


def planted_copy(dataset: Path, folder: Path, share: float, min_shift: int, seed: int) -> pd.DataFrame:
    """Links to the crops of `dataset` under new names, `share` of them with an age moved by at least
    `min_shift` years (within 1-100): one row per face with its true and its given age."""
    rng = np.random.default_rng(seed)
    faces = labelled_crops(dataset)
    wrong = set(rng.choice(len(faces), round(share * len(faces)), replace=False).tolist())
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, path) in enumerate(faces):
        true = parse_utkface_name(name)["age"]
        given = true
        if index in wrong:
            choices = [a for a in range(1, 101) if abs(a - true) >= min_shift]
            given = int(rng.choice(choices))
        new = f"{given}_{name.split('_', 1)[1]}" if "_" in name else f"{given}_{name}"
        link = folder / new
        if not link.exists():
            link.symlink_to(Path(path).resolve())
        rows.append({"file": new, "path": str(link), "true_age": true, "age": given, "planted": index in wrong})
    return pd.DataFrame(rows)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher: more likely positive), by ranks."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranking_figures(checked: pd.DataFrame, truth: pd.DataFrame, groups: AgeGroups) -> list[dict]:
    from cleanlab.rank import get_label_quality_scores

    table = checked.merge(truth[["file", "planted"]], on="file").dropna(subset=["label_quality"])
    positive = table["planted"].to_numpy(bool)
    k = int(positive.sum())
    probabilities = table[[f"oof_p_{g}" for g in groups.labels]].to_numpy()
    labels = np.array([groups.index_of(a) for a in table["age"]])
    cleanlab = get_label_quality_scores(labels, probabilities / probabilities.sum(axis=1, keepdims=True))
    figures = []
    for name, quality in (
        ("agepipe year_window (the check's label_quality)", table["label_quality"].to_numpy()),
        ("cleanlab self-confidence", cleanlab),
    ):
        worst = np.argsort(quality, kind="stable")[:k]
        figures.append(
            {
                "ranking": name,
                "faces": len(table),
                "planted": k,
                "auroc": auroc(-quality, positive),
                "precision_at_k": float(positive[worst].mean()),
            }
        )
    flagged = suspected_labels_mask(table)
    figures.append(
        {
            "ranking": "suspected_label_error (threshold)",
            "faces": len(table),
            "planted": k,
            "flagged": int(flagged.sum()),
            "precision": float(positive[flagged.to_numpy()].mean()) if flagged.any() else None,
            "recall": float(flagged.to_numpy()[positive].mean()),
        }
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--min-shift", type=int, default=15)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--trained-folds", type=int, help="train and test only the first this many folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--no-training", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.share, args.folds, args.trained_folds = 0.1, 2, 1
    check, train = (TINY_LABEL_CHECK, TINY_TRAINING) if args.tiny else ([], [])
    groups = configured_groups()
    with tempfile.TemporaryDirectory(prefix="bench-labels-") as temporary:
        work = (args.work_dir or Path(temporary)).resolve()
        truth = planted_copy(dataset_of(args, parser, work), work / "data", args.share, args.min_shift, args.seed)
        ws = f"workspace={work}"
        start = time.perf_counter()
        script("explore_images.py", ws, f"dataset_dir={work}/data")
        script("process_images.py", ws)
        explored = time.perf_counter()
        script("check_labels.py", ws, *check)
        print(
            f"explored and processed in {explored - start:.0f} s; the label check took "
            f"{time.perf_counter() - explored:.0f} s "
            "(describing every face included, on an empty descriptor cache)",
            flush=True,
        )
        checked = pd.read_csv(work / "csv" / "checked_metadata.csv", keep_default_na=False, na_values=[""])
        pd.set_option("display.width", 200)
        print(pd.DataFrame(ranking_figures(checked, truth, groups)).round(3).to_string(index=False), flush=True)
        if not args.no_training:
            trained = args.trained_folds or args.folds
            figures = training_figures(work, checked, truth, groups, args.folds, args.seed, check, train, trained)
            print(pd.DataFrame(figures).round(3).to_string(index=False))


def training_figures(
    work: Path,
    checked: pd.DataFrame,
    truth: pd.DataFrame,
    groups: AgeGroups,
    folds: int,
    seed: int,
    check: list[str],
    train_settings: list[str],
    trained_folds: int,
) -> list[dict]:
    """Per variant (all labels, without the suspected ones): means over the first `trained_folds` of the
    folds of accuracy and MAE on the held-out faces' true ages, over all of them and over those whose
    label was planted wrong (the label check and training with `check` and `train_settings` beside their
    defaults)."""
    table = checked[checked["label_check"].isna()].merge(truth[["file", "true_age", "planted"]], on="file")
    table = table.assign(source=table["file"], group_index=[groups.index_of(a) for a in table["age"]])
    fold_of = stratified_folds(table, folds, seed)
    results = []
    for fold in range(trained_folds):
        folder = work / f"fold{fold}"
        folder.mkdir(exist_ok=True)
        train, test = table[fold_of != fold], table[fold_of == fold]
        train.drop(columns=["predicted_age", "label_quality", "suspected_label_error", "label_check"]).to_csv(
            folder / "train.csv", index=False
        )
        test_csv = test.assign(age=test["true_age"])[["file", "path", "age", "planted"]].to_csv(index=False)
        variants = (("all labels", "false"), ("without suspected labels", "true"))
        # a fold an earlier run in the same --work-dir finished on the same faces is read, not trained again
        done = (
            (folder / "test.csv").exists()
            and (folder / "test.csv").read_text() == test_csv
            and all((folder / variant.replace(" ", "_") / "test_predictions.csv").exists() for variant, _ in variants)
        )
        (folder / "test.csv").write_text(test_csv)
        if not done:
            script(
                "check_labels.py",
                f"workspace={work}",
                f"input_csv={folder}/train.csv",
                f"output_csv={folder}/train_checked.csv",
                *check,
            )
        for variant, exclude in variants:
            out = folder / variant.replace(" ", "_")
            if not done:
                script(
                    "train_model.py",
                    f"workspace={work}",
                    f"input_csv={folder}/train_checked.csv",
                    f"test_inputs=[{folder}/test.csv]",
                    f"output_dir={out}",
                    "target_csv=null",
                    f"exclude_suspected_labels={exclude}",
                    *train_settings,
                )
            predictions = pd.read_csv(out / "test_predictions.csv").merge(
                test[["file", "planted"]], on="file", how="left"
            )
            for subset, rows in (
                ("all held-out faces", predictions),
                ("faces planted wrong", predictions[predictions["planted"] == True]),  # noqa: E712
            ):
                results.append(
                    {
                        "variant": variant,
                        "test faces": subset,
                        "fold": fold,
                        "faces": len(rows),
                        "accuracy": float((rows["predicted_age_group"] == rows["age"].map(groups.label_of)).mean()),
                        "mae_years": float((rows["predicted_age"] - rows["age"]).abs().mean()),
                    }
                )
        print(f"fold {fold} done", flush=True)
    frame = pd.DataFrame(results)
    return (
        frame.groupby(["variant", "test faces"])
        .agg(faces=("faces", "sum"), accuracy=("accuracy", "mean"), mae_years=("mae_years", "mean"))
        .reset_index()
        .to_dict("records")
    )


if __name__ == "__main__":
    main()
