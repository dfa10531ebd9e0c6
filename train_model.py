"""Training stage: an age classifier that is honest about how good it is.

Reads a metadata CSV (default: the resampled set, resampling.ipynb's) and configs/train_model.yaml, and writes into
output_dir: model.keras (with the age groups, the backbone and its settings, how answers are read, and
the resolved config inside), metrics.json, history.csv, training_curves.png, confusion_matrix.png,
split.csv (each image's split), test_images.csv (the test split, for predict_age.py), face_problems.csv
(images whose face could not be described as configured) and test_predictions.csv.

    python train_model.py
    python train_model.py --set input_csv=csv/checked_metadata.csv --set training.epochs=30

The story, top to bottom:
1. split by source image, stratified by age group: an image and its augmented copies always share a
   split, and the test split holds original images only, or the reported accuracy would be a lie;
2. prepare every image once (backbones.py): find and describe its face with the pretrained networks
   (cached by content, in parallel), or check that its pixels decode;
3. train the network for a fixed number of epochs (warm-up + cosine decay: no early stopping on a
   noisy validation split) to predict a distribution over years of age (agepipe.model.training.fit),
   calibrate its confidence on the validation split and answer the test set;
4. evaluate those answers beside a majority-class baseline on the very same images, and save.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from agepipe.config.loading import load_config
from agepipe.config.model_stages import TrainConfig
from agepipe.config.schema import AgeRange
from agepipe.data.age_groups import AgeGroups, age_groups_from
from agepipe.data.datasets import labelled_images, read_metadata_csv, unusable_ages, without_suspected_labels
from agepipe.data.vocabulary import TRAINABLE_STATUSES
from agepipe.errors import UserError, shown
from agepipe.model.backbones import backbone_for
from agepipe.model.estimates import (
    CALIBRATION_BINS,
    HEADLINE,
    answer_columns,
    answers,
    correct_prior,
    evaluate,
    fairness,
    fit_temperature,
    population_shares,
    reliability,
    tempered,
    year_targets,
)
from agepipe.model.training import fit, out_of_fold, split_by_source
from agepipe.report.funnel import training_funnel
from agepipe.report.model_card import write_report_card
from agepipe.running.console import progress_bar
from agepipe.running.output_guard import OutputFolder, OutputGuard
from agepipe.running.parallel import Engine
from agepipe.running.writes import run_record
from utils import require_workspace, run_script, setup_logging

log = logging.getLogger("agepipe.train")


# --------------------------------------------------------------------------------------------------
# 1. Data and split
# --------------------------------------------------------------------------------------------------
def read_training_csv(
    path: str, groups: AgeGroups, age_range: AgeRange, exclude_suspected: bool = True
) -> tuple[pd.DataFrame, int]:
    """Usable, labelled rows of any stage's CSV, with `source` (the original image) and `copy`, and how
    many rows were left out because the label check suspects them (when `exclude_suspected`). Ages must be
    whole years within `age_range`: anything else is a labelling error, refused in one line. (Ages above
    max_age are fine: the model's last year stands for max_age and over.)"""
    hint = (
        "run the earlier stages first (the resampled set: python run_notebook.py resampling.ipynb), or train on "
        "the checked set: --set input_csv=csv/checked_metadata.csv"
    )
    frame = read_metadata_csv(path, "input CSV", hint, ("file", "path", "age"))
    if "status" in frame.columns:  # exploration or processing CSV: only the usable images
        frame = frame[frame["status"].isin(TRAINABLE_STATUSES)]
    frame, suspected = without_suspected_labels(frame, exclude_suspected)
    frame = frame[frame["age"].notna() & frame["path"].notna()].copy()
    bad = unusable_ages(frame["age"], age_range)
    if bad.any():
        first = frame[bad].iloc[0]
        raise UserError(
            f"input CSV {path}: {int(bad.sum())} rows have an age that is not a whole number of years within "
            f"age_range {age_range.min}-{age_range.max} (first: {first['file']!r} with age {shown(first['age'])})"
        )
    if "source" not in frame.columns:
        frame["source"] = frame["file"]
    if "copy" not in frame.columns:
        frame["copy"] = 0
    frame["age"] = pd.to_numeric(frame["age"]).astype(int)
    return with_groups(frame, groups, f"input CSV {path}"), suspected


def with_groups(frame: pd.DataFrame, groups: AgeGroups, what: str) -> pd.DataFrame:
    """`frame` with each row's age group index, its rows of no group left out."""
    frame = frame.assign(group_index=[groups.index_of(a) for a in frame["age"]])
    frame = frame[frame["group_index"] >= 0]
    if frame.empty:
        raise UserError(f"{what} has no usable labelled images")
    return frame.reset_index(drop=True)


def cross_validating(config: TrainConfig) -> bool:
    return config.split.method == "cross_validation" and not config.test_inputs


def split_sets(frame: pd.DataFrame, config: TrainConfig, groups: AgeGroups) -> dict[str, pd.DataFrame]:
    """The train, validation and test sets: the test set is the test split, or `test_inputs` when given.
    Cross-validating, every row trains (each fold's network on the others) and the originals are tested."""
    if cross_validating(config):
        frame["split"] = "train"
        return {"train": frame, "validation": frame.iloc[:0], "test": frame[frame["copy"] == 0]}
    frame["split"] = split_by_source(
        frame, config.split.validation, 0.0 if config.test_inputs else config.split.test, config.seed
    )
    if config.test_inputs:
        test = labelled_images(config.test_inputs, config.labels_csv, config.age_range)
        test = with_groups(test[test["age"].notna()].assign(source=test["file"], copy=0), groups, "test_inputs")
    else:
        test = frame[frame["split"] == "test"]
    sets = {
        "train": frame[frame["split"] == "train"],
        "validation": frame[frame["split"] == "validation"],
        "test": test,
    }
    overlap = set(sets["train"]["source"]) & (set(sets["validation"]["source"]) | set(sets["test"]["source"]))
    if overlap:  # a source in two splits would make the reported accuracy a lie: never go on
        raise RuntimeError(f"leak: {len(overlap)} sources in two splits")
    return sets


# --------------------------------------------------------------------------------------------------
# 2. Inputs
# --------------------------------------------------------------------------------------------------
def prepare(
    sets: dict[str, pd.DataFrame], backbone, engine: Engine, cache, folder: OutputFolder
) -> dict[str, pd.DataFrame]:
    """Each set's images prepared by the backbone (before TensorFlow starts: the worker pool forks);
    images it cannot use are listed in face_problems.csv and left out."""
    prepared = backbone.prepare(
        pd.concat([rows.assign(set=name) for name, rows in sets.items()], ignore_index=True),
        engine,
        cache,
        training=True,
    )
    folder.write_csv("face_problems.csv", prepared.loc[prepared["problem"].notna(), ["set", "file", "path", "problem"]])
    unusable = prepared["inputs"].isna()
    if unusable.any():
        log.warning(
            "%d images cannot be used and are left out (listed in %s/face_problems.csv)",
            int(unusable.sum()),
            folder.path,
        )
    fallbacks = int(prepared["problem"].notna().sum() - unusable.sum())
    if fallbacks:
        log.info(
            "%d faces had no plausible landmarks and were described unaligned (faces.on_no_landmarks: square)",
            fallbacks,
        )
    sets = {name: prepared[(prepared["set"] == name) & ~unusable].reset_index(drop=True) for name in sets}
    if sets["train"].empty or sets["test"].empty:
        raise UserError(
            f"too few images to train and test: {len(sets['train'])} train, {len(sets['validation'])} validation, "
            f"{len(sets['test'])} test"
        )
    return sets


# --------------------------------------------------------------------------------------------------
# 3. Training and answering the test set
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What training gave: the network, its history (a row per epoch), its timings, the age mix it learnt
    as its prior, the calibration temperature, and its answers (year probabilities) for the test set."""

    model: object
    history: pd.DataFrame
    timing: dict
    training_shares: np.ndarray
    temperature: float
    probabilities: np.ndarray


def answered(
    raw: np.ndarray, temperature: float, config: TrainConfig, groups: AgeGroups, training_shares
) -> np.ndarray:
    """Year probabilities as the model will answer them: tempered, and re-weighted to
    `evaluation.prior_csv`'s age mix when given."""
    probabilities = tempered(raw, temperature, groups, config.max_age)
    prior = population_shares(config.evaluation.prior_csv, groups, "evaluation.prior_csv")
    return (
        probabilities if prior is None else correct_prior(probabilities, groups, config.max_age, training_shares, prior)
    )


def temperature_for(
    config: TrainConfig, backbone, rows: pd.DataFrame, held_out: tuple, groups: AgeGroups, scratch: str
) -> float:
    """The temperature that makes the confidences honest (1 when calibration is off): fitted on faces
    unlike those a network trained on, the training `rows` cut into clusters of look-alikes, each
    answered by a network trained on the others (`calibration_folds`): a network sure of itself on its
    own kind of faces is less right on others, and users bring others. Without such clusters (too few
    faces, a pixel backbone), on the `held_out` (year probabilities, ages) of the validation split."""
    evaluation = config.evaluation
    if not evaluation.calibrate:
        return 1.0
    folds = evaluation.calibration_folds
    fold = backbone.look_alikes(rows, folds, config.seed) if folds else None
    if fold is not None:
        log.info(
            "calibrating on %d clusters of look-alike faces, each answered by a network trained on the others", folds
        )
        held_out = (
            out_of_fold(config, backbone.single(), rows, groups, folds, config.seed, scratch, fold=fold),
            rows["age"],
        )
    return 1.0 if held_out[0] is None else fit_temperature(*held_out, groups, config.max_age)


def trained_model(
    config: TrainConfig, backbone, train: pd.DataFrame, validation: pd.DataFrame, groups: AgeGroups, scratch: str
):
    """The network fitted on `train` (class-weighted when asked), its history, timings, and the age mix
    it learns as its prior (uniform when class weighting evens the groups out)."""
    counts = np.bincount(train["group_index"], minlength=len(groups.labels))
    for label in (label for label, count in zip(groups.labels, counts) if count == 0):
        log.warning("age group %s has no training images: the model cannot learn it", label)
    weights = None
    shares = counts / counts.sum()
    if config.training.class_weighting:
        weights = (len(train) / (len(groups.labels) * np.maximum(counts, 1)))[train["group_index"]].astype(np.float32)
        shares = np.full(len(groups.labels), 1 / len(groups.labels))
    model, history, seconds, replicas = fit(config, backbone, train, validation, groups, scratch, weights)
    log.info(
        "trained %s on %d images for %d epochs in %.0f s on %d replicas",
        backbone.kind,
        len(train),
        len(history),
        seconds,
        replicas,
    )
    return (
        model,
        history,
        {
            "training_seconds": round(seconds, 1),
            "training_images_per_second": round(len(history) * len(train) / seconds, 1),
            "replicas": replicas,
        },
        shares,
    )


def held_out_run(config: TrainConfig, backbone, sets: dict, groups: AgeGroups, scratch: str) -> Run:
    """Train on the train split, calibrate on the validation split, answer the test set."""
    model, history, timing, shares = trained_model(config, backbone, sets["train"], sets["validation"], groups, scratch)
    flip, batch = config.evaluation.flip_test_time_augmentation, config.training.batch_size
    validation = sets["validation"]
    held_out = (backbone.predict(model, validation, flip, batch) if len(validation) else None, validation["age"])
    temperature = temperature_for(config, backbone, sets["train"], held_out, groups, scratch)
    start = time.perf_counter()
    raw = backbone.predict(model, sets["test"], flip, batch)
    timing["prediction_images_per_second"] = round(len(sets["test"]) / max(time.perf_counter() - start, 1e-9), 1)
    return Run(model, history, timing, shares, temperature, answered(raw, temperature, config, groups, shares))


def cross_validated_run(config: TrainConfig, backbone, sets: dict, groups: AgeGroups, scratch: str) -> Run:
    """Every original image answered by a network trained on the other folds (k folds by source, seeded),
    the temperature fitted on those answers, then the model fitted on every labelled image."""
    rows = sets["train"]
    sets["test"] = rows[rows["copy"] == 0].reset_index(drop=True)  # the originals, in the order of their answers
    years = out_of_fold(
        config,
        backbone,
        rows,
        groups,
        config.split.folds,
        config.seed,
        scratch,
        progress=progress_bar(config.split.folds, "folds", "fold")(None),
    )
    raw = years[(rows["copy"] == 0).to_numpy()]
    model, history, timing, shares = trained_model(config, backbone, rows, rows.iloc[:0], groups, scratch)
    temperature = temperature_for(config, backbone, rows, (raw, sets["test"]["age"]), groups, scratch)
    return Run(model, history, timing, shares, temperature, answered(raw, temperature, config, groups, shares))


# --------------------------------------------------------------------------------------------------
# 4. Evaluation and saving
# --------------------------------------------------------------------------------------------------
def answers_table(
    test: pd.DataFrame, probabilities: np.ndarray, config: TrainConfig, groups: AgeGroups
) -> pd.DataFrame:
    """Each test image's label (`age`) beside the model's answer, in prediction's columns
    (estimates.answer_columns): test_predictions.csv."""
    evaluation = config.evaluation
    answer = answers(probabilities, groups, config.max_age, evaluation.answer_rule, evaluation.interval)
    return (
        test[["file", "path", "age"]]
        .reset_index(drop=True)
        .assign(**answer_columns(answer, groups, evaluation.interval))
    )


def card_figures(probabilities: np.ndarray, test: pd.DataFrame, config: TrainConfig, groups: AgeGroups) -> dict:
    """The report card's reliability table, and its fairness table per demographic column the test rows carry."""
    rule, interval = config.evaluation.answer_rule, config.evaluation.interval
    answer = answers(probabilities, groups, config.max_age, rule, interval)
    right = answer.group == np.array([groups.index_of(a) for a in test["age"]])
    return {
        "reliability": reliability(answer.confidence, right).to_dict("records"),
        "fairness": {
            column: fairness(
                probabilities,
                test["age"],
                test[column],
                names,
                groups,
                config.max_age,
                rule,
                interval,
                config.fairness.min_images,
            )
            for column, names in config.fairness.attributes.items()
            if column in test.columns and test[column].notna().any()
        },
    }


def scored(config: TrainConfig, sets: dict, run: Run, groups: AgeGroups) -> dict:
    """The report: the test metrics beside the majority class of the training split on the very same
    test images, the card's figures, and what the run was."""
    max_age, evaluation, test = config.max_age, config.evaluation, sets["test"]
    shares = population_shares(config.target_csv, groups)
    metrics = evaluate(
        run.probabilities, test["age"], groups, max_age, shares, evaluation.answer_rule, evaluation.interval
    )
    for label in metrics["groups_without_test_images"]:
        log.warning("age group %s has no test images: its recall is not measured", label)
    metrics.update(card_figures(run.probabilities, test, config, groups))
    majority = int(np.argmax(np.bincount(sets["train"]["group_index"], minlength=len(groups.labels))))
    copies = sets["train"]["copy"]
    baseline = evaluate(
        year_targets(np.full(len(test), sum(groups.bounds(max_age)[majority]) / 2), max_age, 0),
        test["age"],
        groups,
        max_age,
        shares,
    )
    tested = (
        f"out of fold: {config.split.folds} folds of " if cross_validating(config) else "test split of "
    ) + config.input_csv
    return {
        "test": metrics,
        "majority_baseline": {"group": groups.labels[majority], **{k: baseline[k] for k in HEADLINE}},
        "test_source": ", ".join(config.test_inputs) or tested,
        "temperature": run.temperature,
        "flip_test_time_augmentation": evaluation.flip_test_time_augmentation,
        "prior_correction": evaluation.prior_csv,
        "split_images": {name: len(rows) for name, rows in sets.items()},
        "funnel": training_funnel(config.input_csv),
        "epochs": int(len(run.history)),
        "trained_on": f"{int((copies == 0).sum())} originals and {int((copies > 0).sum())} augmented copies",
        **run.timing,
        "age_groups": groups.labels,
        **run_record(config),
    }


def save(
    config: TrainConfig, folder: OutputFolder, backbone, frame: pd.DataFrame, sets: dict, run: Run, groups: AgeGroups
) -> dict:
    """Write the model with its metadata, the metrics, the splits, the test answers and the report card;
    return the metrics."""
    import matplotlib

    from agepipe.model.keras_networks import model_bytes

    matplotlib.use("Agg")  # files only, no display needed
    report = scored(config, sets, run, groups)
    evaluation = config.evaluation
    metadata = {
        "age_group_edges": list(groups.edges),
        "labels": groups.labels,
        "max_age": config.max_age,
        **backbone.metadata(),
        "training_group_shares": list(map(float, run.training_shares)),
        "answer_rule": evaluation.answer_rule,
        "interval": evaluation.interval,
        "temperature": run.temperature,
        **run_record(config),
    }
    folder.write_bytes("model.keras", model_bytes(run.model, metadata, folder, lite=backbone.lite))
    folder.write_json("metrics.json", report)
    folder.write_csv("history.csv", run.history)
    folder.write_csv("split.csv", frame[["file", "source", "copy", "age", "split"]])
    test = sets["test"]
    folder.write_csv(
        "test_images.csv", test[[c for c in ("file", "path", "age", "gender", "race") if c in test.columns]]
    )
    folder.write_csv("test_predictions.csv", answers_table(test, run.probabilities, config, groups))
    write_report_card(folder, report, run.history, HEADLINE, CALIBRATION_BINS, evaluation.min_test_images)
    folder.finish()
    return report


def summary_lines(report: dict, config: TrainConfig, backbone, trained: int, suspected: int) -> list[str]:
    """What the run did and how good the model is, for the terminal."""
    test, baseline = report["test"], report["majority_baseline"]
    tested = f"out of fold ({config.split.folds} folds)" if cross_validating(config) else "test"
    lines = [
        f"trained {backbone.kind} on {trained} images of {config.input_csv} ({report['trained_on']}; "
        f"{suspected} suspected label errors left out) for {report['epochs']} epochs "
        f"in {report['training_seconds']:.0f}s; {tested} on {test['images']} images:",
        f"  accuracy {test['accuracy']:.1%} (majority baseline {baseline['accuracy']:.1%}), one-off "
        f"{test['one_off_accuracy']:.1%}, "
        f"macro-F1 {test['macro_f1']:.3f}, MAE {test['mae_years']:.1f} years (baseline {baseline['mae_years']:.1f}), "
        f"calibration error {test['calibration_error']:.3f}",
    ]
    for column, table in test["fairness"].items():
        if table["adjusted_accuracy_gap"] is not None:
            lines.append(
                f"  by {column}: age-mix-adjusted accuracy from "
                f"{table['values'][table['worst']]['age_mix_adjusted_accuracy']:.1%} "
                f"({table['worst']}) to {table['values'][table['best']]['age_mix_adjusted_accuracy']:.1%} "
                f"({table['best']})"
            )
    return lines


def main(args) -> None:
    config = load_config(TrainConfig, args.config, args.overrides)
    require_workspace(config.workspace)
    setup_logging(config.log_level)
    start = time.perf_counter()
    groups = age_groups_from(config)
    frame, suspected = read_training_csv(config.input_csv, groups, config.age_range, config.exclude_suspected_labels)
    backbone = backbone_for(config)
    inputs = [
        config.input_csv,
        *config.test_inputs,
        config.labels_csv,
        config.target_csv,
        config.evaluation.prior_csv,
        *sorted({os.path.dirname(p) for p in frame["path"]}),
    ]
    with OutputGuard(inputs=inputs) as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        cache = guard.journal(config.descriptor_cache, "descriptor_cache")
        sets = prepare(split_sets(frame, config, groups), backbone, Engine.of(config), cache, folder)
        log.info(
            "split: %d train, %d validation, %d test images (%d augmented copies unused in test)",
            len(sets["train"]),
            len(sets["validation"]),
            len(sets["test"]),
            int((frame["split"] == "unused").sum()),
        )
        train_and_answer = cross_validated_run if cross_validating(config) else held_out_run
        with folder.scratch() as scratch:
            run = train_and_answer(config, backbone, sets, groups, scratch)
        report = save(config, folder, backbone, frame, sets, run, groups)
    print("\n".join(summary_lines(report, config, backbone, len(sets["train"]), suspected)))
    print(
        f"wrote {folder.path}/model.keras, metrics.json and the report card {folder.path}/report.html "
        f"in {time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    run_script(
        main,
        "Train the age classifier.",
        "train_model.yaml",
        TrainConfig,
        [
            "python train_model.py",
            "python train_model.py --set training.epochs=30 --set model.face_features.head_units=[512,128]",
            "python train_model.py --set input_csv=csv/checked_metadata.csv --set output_dir=models/natural_mix",
            "python train_model.py --set model.backbone=pixels --set model.pixels.network=cnn",
        ],
    )
