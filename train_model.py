"""Training stage: an age classifier that is honest about how good it is.

Reads a metadata CSV (default: the processing stage's) and configs/train_model.yaml, and writes into
output_dir: model.keras (with the age groups, the backbone and its settings, how answers are read, and
the resolved config inside), metrics.json, history.csv, training_curves.png, confusion_matrix.png,
split.csv (each image's split), test_images.csv (the test split, for predict_age.py), face_problems.csv
(images whose face could not be described as configured) and test_predictions.csv.

    python train_model.py
    python train_model.py --set input_csv=csv/resampled_metadata.csv --set training.epochs=30

The story, top to bottom:
1. split by source image, stratified by age group: an image and its augmented copies always share a
   split, and the test split holds original images only, or the reported accuracy would be a lie;
2. prepare every image once (backbones.py): find and describe its face with the pretrained networks
   (cached by content, in parallel), or check that its pixels decode;
3. train the network for a fixed number of epochs (warm-up + cosine decay: no early stopping on a
   noisy validation split) to predict a distribution over years of age;
4. calibrate the confidence on the validation split, evaluate on the test split beside a
   majority-class baseline on the very same images, and save.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd

from age_estimates import answers, correct_prior, evaluate, fit_temperature, population_shares, tempered, year_targets
from age_groups import AgeGroups, age_groups_from
from backbones import backbone_for
from cli import run_script, setup_logging
from config import load_config
from model_configs import Distribution, TrainConfig, Training
from dataset import labelled_images, read_metadata_csv
from errors import UserError
from image_processor import TRAINABLE_STATUSES
from image_visualizer import figure_png
from outputs import OutputFolder, OutputGuard
from writes import run_record
from parallel import Engine

log = logging.getLogger("agepipe.train")
HEADLINE = ("accuracy", "one_off_accuracy", "macro_f1", "balanced_accuracy", "population_weighted_accuracy", "mae_years")


# --------------------------------------------------------------------------------------------------
# 1. Data and split
# --------------------------------------------------------------------------------------------------
def read_training_csv(path: str, groups: AgeGroups) -> pd.DataFrame:
    """Usable, labelled rows of any stage's CSV, with `source` (the original image) and `copy`.
    Ages must be whole, non-negative years: anything else is a labelling error, refused in one line.
    (Ages above max_age are fine: the model's last year stands for max_age and over.)"""
    frame = read_metadata_csv(path, "input CSV", "run the earlier stages first", ("file", "path", "age"))
    if "status" in frame.columns:  # exploration or processing CSV: only the usable images
        frame = frame[frame["status"].isin(TRAINABLE_STATUSES)]
    frame = frame[frame["age"].notna() & frame["path"].notna()].copy()
    ages = pd.to_numeric(frame["age"], errors="coerce")
    bad = ages.isna() | (ages % 1 != 0) | (ages < 0)
    if bad.any():
        first = frame[bad].iloc[0]
        raise UserError(f"input CSV {path}: {int(bad.sum())} rows have an age that is not a whole number of years "
                        f"(first: {first['file']!r} with age {first['age']!r})")
    if "source" not in frame.columns:
        frame["source"], frame["copy"] = frame["file"], 0
    frame["age"] = ages.astype(int)
    return with_groups(frame, groups, f"input CSV {path}")


def with_groups(frame: pd.DataFrame, groups: AgeGroups, what: str) -> pd.DataFrame:
    """`frame` with each row's age group index, its rows of no group left out."""
    frame = frame.assign(group_index=[groups.index_of(a) for a in frame["age"]])
    frame = frame[frame["group_index"] >= 0]
    if frame.empty:
        raise UserError(f"{what} has no usable labelled images")
    return frame.reset_index(drop=True)


def split_by_source(frame: pd.DataFrame, validation: float, test: float, seed: int) -> pd.Series:
    """'train', 'validation' or 'test' per row. Sources (original images) are shuffled within each age
    group and cut by the fractions, so every split has each group in proportion; all copies of a
    source follow it, and augmented copies are dropped from the test split ('unused')."""
    rng = np.random.default_rng(seed)
    sources = frame.groupby("source")["group_index"].first()
    assignment = {}
    for _, members in sources.groupby(sources):
        names = members.index.to_numpy().copy()
        rng.shuffle(names)
        n_test, n_validation = round(len(names) * test), round(len(names) * validation)
        if len(names) >= 3:  # every split gets at least one source of a group that has a few
            n_test, n_validation = max(n_test, 1 if test > 0 else 0), max(n_validation, 1 if validation > 0 else 0)
        for index, name in enumerate(names):
            assignment[name] = "test" if index < n_test else "validation" if index < n_test + n_validation else "train"
    split = frame["source"].map(assignment)
    return split.where(~((split == "test") & (frame["copy"] > 0)), "unused")


def split_sets(frame: pd.DataFrame, config: TrainConfig, groups: AgeGroups) -> dict[str, pd.DataFrame]:
    """The train, validation and test sets: the test set is the test split, or `test_inputs` when given."""
    frame["split"] = split_by_source(frame, config.split.validation, 0.0 if config.test_inputs else config.split.test, config.seed)
    if config.test_inputs:
        test = labelled_images(config.test_inputs, config.labels_csv, config.age_range)
        test = with_groups(test[test["age"].notna()].assign(source=test["file"], copy=0), groups, "test_inputs")
    else:
        test = frame[frame["split"] == "test"]
    sets = {"train": frame[frame["split"] == "train"], "validation": frame[frame["split"] == "validation"], "test": test}
    overlap = set(sets["train"]["source"]) & (set(sets["validation"]["source"]) | set(sets["test"]["source"]))
    assert not overlap, f"leak: {len(overlap)} sources in two splits"
    return sets


# --------------------------------------------------------------------------------------------------
# 2-3. Inputs, devices, model, training
# --------------------------------------------------------------------------------------------------
def prepare(sets: dict[str, pd.DataFrame], backbone, engine: Engine, cache, folder: OutputFolder) -> dict[str, pd.DataFrame]:
    """Each set's images prepared by the backbone (before TensorFlow starts: the worker pool forks);
    images it cannot use are listed in face_problems.csv and left out."""
    prepared = backbone.prepare(pd.concat([rows.assign(set=name) for name, rows in sets.items()], ignore_index=True), engine, cache)
    folder.write_csv("face_problems.csv", prepared.loc[prepared["problem"].notna(), ["set", "file", "path", "problem"]])
    unusable = prepared["inputs"].isna()
    if unusable.any():
        log.warning("%d images cannot be used and are left out (listed in %s/face_problems.csv)", int(unusable.sum()), folder.path)
    fallbacks = int(prepared["problem"].notna().sum() - unusable.sum())
    if fallbacks:
        log.info("%d faces had no plausible landmarks and were described unaligned (on_no_landmarks: whole_image)", fallbacks)
    sets = {name: prepared[(prepared["set"] == name) & ~unusable].reset_index(drop=True) for name in sets}
    if sets["train"].empty or sets["test"].empty:
        raise UserError(f"too few images to train and test: {len(sets['train'])} train, {len(sets['validation'])} validation, "
                        f"{len(sets['test'])} test")
    return sets


def distribution_strategy(settings: Distribution):
    """The tf.distribute strategy of the config; must run before TensorFlow touches a device."""
    import tensorflow as tf

    if settings.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if settings.strategy == "mirrored":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * settings.logical_cpus)
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def learning_rate_schedule(training: Training, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero over the remaining epochs."""
    import keras

    total = training.epochs * steps_per_epoch
    warmup = min(training.warmup_epochs * steps_per_epoch, total - 1)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else training.learning_rate, decay_steps=max(1, total - warmup),
        warmup_target=training.learning_rate if warmup else None, warmup_steps=warmup,
    )


def fit(config: TrainConfig, backbone, sets: dict[str, pd.DataFrame], groups: AgeGroups, scratch: str, weights):
    """The trained network, its history (one row per epoch) and the seconds it took."""
    from age_model import group_accuracy_metric  # first: it quiets TensorFlow's start-up log before TensorFlow loads

    strategy = distribution_strategy(config.distribution)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    training, max_age = config.training, config.max_age
    batch = training.batch_size * strategy.num_replicas_in_sync
    targets = lambda ages: year_targets(ages, max_age, training.label_sigma_years)  # noqa: E731
    data, steps = backbone.fit_data(sets["train"], sets["validation"], targets, weights, batch, config.seed, scratch, strategy.num_replicas_in_sync)
    with strategy.scope():
        model = backbone.build(sets["train"]["inputs"], max_age)
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate_schedule(training, steps), weight_decay=config.model.section.weight_decay),
                      loss=keras.losses.KLDivergence(), metrics=[group_accuracy_metric(groups, max_age)])
    log.info("model: %s, %s parameters, %d replicas", backbone.kind, f"{model.count_params():,}", strategy.num_replicas_in_sync)
    start = time.perf_counter()
    fitted = model.fit(**data, epochs=training.epochs, verbose=1 if os.isatty(2) else 0)
    history = pd.DataFrame(fitted.history).rename_axis("epoch").reset_index()
    return model, history, time.perf_counter() - start, strategy.num_replicas_in_sync


# --------------------------------------------------------------------------------------------------
# 4. Calibration, evaluation, saving
# --------------------------------------------------------------------------------------------------
def plot_history(history: pd.DataFrame, folder: OutputFolder) -> None:
    import matplotlib.pyplot as plt

    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for axes, metric, title in ((loss, "loss", "Loss (KL divergence to the age distribution)"), (accuracy, "group_accuracy", "Age-group accuracy")):
        axes.plot(history["epoch"] + 1, history[metric], label="training")
        if f"val_{metric}" in history.columns and history[f"val_{metric}"].notna().any():
            axes.plot(history["epoch"] + 1, history[f"val_{metric}"], label="validation (held out)")
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    folder.write_bytes("training_curves.png", figure_png(figure, dpi=100))


def plot_confusion(confusion: np.ndarray, labels: list[str], folder: OutputFolder, title: str) -> None:
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(1, confusion.sum(axis=1, keepdims=True))
    figure, axes = plt.subplots(figsize=(7, 6), layout="constrained")
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(confusion):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    axes.set_xticks(range(len(labels)), labels, rotation=45)
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="predicted group", ylabel="true group", title=title)
    figure.colorbar(image, label="share of the true group")
    folder.write_bytes("confusion_matrix.png", figure_png(figure, dpi=100))


def calibrated(model, backbone, sets, config: TrainConfig, groups: AgeGroups, training_shares) -> tuple[np.ndarray, float, float]:
    """The test set's year probabilities as the model will answer them (tempered by the temperature fitted
    on the validation split, re-weighted to `evaluation.prior_csv`'s mix when given), the temperature,
    and the images per second of prediction."""
    flip, batch = config.evaluation.flip_test_time_augmentation, config.training.batch_size
    temperature = 1.0
    if config.evaluation.calibrate and len(sets["validation"]):
        temperature = fit_temperature(backbone.predict(model, sets["validation"], flip, batch), sets["validation"]["age"], groups, config.max_age)
    start = time.perf_counter()
    probabilities = tempered(backbone.predict(model, sets["test"], flip, batch), temperature)
    speed = len(sets["test"]) / max(time.perf_counter() - start, 1e-9)
    prior = population_shares(config.evaluation.prior_csv, groups, "evaluation.prior_csv")
    if prior is not None:
        probabilities = correct_prior(probabilities, groups, config.max_age, training_shares, prior)
    return probabilities, temperature, speed


def test_predictions(test: pd.DataFrame, probabilities: np.ndarray, config: TrainConfig, groups: AgeGroups) -> pd.DataFrame:
    answer = answers(probabilities, groups, config.max_age, config.evaluation.answer_rule, config.evaluation.interval)
    table = test[["file", "path", "age"]].reset_index(drop=True).assign(
        age_group=[groups.labels[i] for i in answer.group], age_group_confidence=np.round(answer.confidence, 4),
        predicted_age=answer.age, age_low=answer.low, age_high=answer.high)
    return pd.concat([table, pd.DataFrame(np.round(answer.group_probabilities, 4), columns=[f"p_{label}" for label in groups.labels])], axis=1)


def main(args) -> None:
    config = load_config(TrainConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    groups = age_groups_from(config)
    frame = read_training_csv(config.input_csv, groups)
    backbone = backbone_for(config.model)
    inputs = [config.input_csv, *config.test_inputs, config.labels_csv, config.target_csv, config.evaluation.prior_csv,
              *sorted({os.path.dirname(p) for p in frame["path"]})]
    with OutputGuard(inputs=inputs) as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        cache = guard.journal(config.descriptor_cache, "descriptor_cache")
        sets = prepare(split_sets(frame, config, groups), backbone, Engine.of(config), cache, folder)
        train = sets["train"]
        train_counts = np.bincount(train["group_index"], minlength=len(groups.labels))
        for label in (label for label, count in zip(groups.labels, train_counts) if count == 0):
            log.warning("age group %s has no training images: the model cannot learn it", label)
        log.info("split: %d train, %d validation, %d test images (%d augmented copies unused in test)",
                 len(train), len(sets["validation"]), len(sets["test"]), int((frame["split"] == "unused").sum()))
        weights = (len(train) / (len(groups.labels) * np.maximum(train_counts, 1)))[train["group_index"]].astype(np.float32)
        weights = weights if config.training.class_weighting else None
        # the age mix the model learns as its prior: uniform when class weighting evens the groups out
        training_shares = np.full(len(groups.labels), 1 / len(groups.labels)) if weights is not None else train_counts / train_counts.sum()
        with folder.scratch() as scratch:
            model, history, seconds, replicas = fit(config, backbone, sets, groups, scratch, weights)
        probabilities, temperature, speed = calibrated(model, backbone, sets, config, groups, training_shares)
        metrics = save(config, folder, backbone, model, frame, sets, history, probabilities, groups, training_shares, temperature,
                       {"training_seconds": round(seconds, 1), "training_images_per_second": round(len(history) * len(train) / seconds, 1),
                        "prediction_images_per_second": round(speed, 1), "replicas": replicas})
    test, baseline = metrics["test"], metrics["majority_baseline"]
    print(f"trained {backbone.kind} on {len(train)} images for {len(history)} epochs in {seconds:.0f}s; test on {test['images']} images:")
    print(f"  accuracy {test['accuracy']:.1%} (majority baseline {baseline['accuracy']:.1%}), one-off {test['one_off_accuracy']:.1%}, "
          f"macro-F1 {test['macro_f1']:.3f}, MAE {test['mae_years']:.1f} years (baseline {baseline['mae_years']:.1f}), "
          f"calibration error {test['calibration_error']:.3f}")
    print(f"wrote {folder.path}/model.keras, metrics.json, history.csv, training_curves.png, confusion_matrix.png, test_images.csv")


def save(config: TrainConfig, folder: OutputFolder, backbone, model, frame, sets, history, probabilities, groups, training_shares,
         temperature: float, timing: dict) -> dict:
    """Write the model with its metadata, the metrics (beside the majority class of the training split,
    on the very same test images), the splits, the test predictions and the plots; return the metrics."""
    import matplotlib

    from age_model import model_bytes

    matplotlib.use("Agg")  # files only, no display needed
    max_age, evaluation, test = config.max_age, config.evaluation, sets["test"]
    shares = population_shares(config.target_csv, groups)
    metrics = evaluate(probabilities, test["age"], groups, max_age, shares, evaluation.answer_rule, evaluation.interval)
    for label in metrics["groups_without_test_images"]:
        log.warning("age group %s has no test images: its recall is not measured", label)
    majority = int(np.argmax(np.bincount(sets["train"]["group_index"], minlength=len(groups.labels))))
    baseline = evaluate(year_targets(np.full(len(test), sum(groups.bounds(max_age)[majority]) / 2), max_age, 0), test["age"], groups, max_age, shares)
    metadata = {"age_group_edges": list(groups.edges), "labels": groups.labels, "max_age": max_age, **backbone.metadata(),
                "training_group_shares": list(map(float, training_shares)), "answer_rule": evaluation.answer_rule,
                "interval": evaluation.interval, "temperature": temperature, **run_record(config)}
    folder.write_bytes("model.keras", model_bytes(model, metadata, folder))
    report = {"test": metrics, "majority_baseline": {"group": groups.labels[majority], **{k: baseline[k] for k in HEADLINE}},
              "test_source": ", ".join(config.test_inputs) or "test split of " + config.input_csv, "temperature": temperature,
              "flip_test_time_augmentation": evaluation.flip_test_time_augmentation, "prior_correction": evaluation.prior_csv,
              "split_images": {name: len(rows) for name, rows in sets.items()}, "epochs": int(len(history)), **timing,
              "age_groups": groups.labels, **run_record(config)}
    folder.write_json("metrics.json", report)
    folder.write_csv("history.csv", history)
    folder.write_csv("split.csv", frame[["file", "source", "copy", "age", "split"]])
    folder.write_csv("test_images.csv", test[[c for c in ("file", "path", "age", "gender", "race") if c in test.columns]])
    folder.write_csv("test_predictions.csv", test_predictions(test, probabilities, config, groups))
    plot_history(history, folder)
    plot_confusion(metrics["confusion_matrix"], groups.labels, folder, f"Test confusion matrix (accuracy {metrics['accuracy']:.1%})")
    folder.finish()
    return report


if __name__ == "__main__":
    run_script(main, "Train the age classifier.", "train_model.yaml", TrainConfig, [
        "python train_model.py", "python train_model.py --set training.epochs=30 --set model.face_features.head_units=[512,128]",
        "python train_model.py --set input_csv=csv/resampled_metadata.csv --set output_dir=models/resampled",
        "python train_model.py --set model.backbone=pixels --set model.pixels.network=cnn"])
