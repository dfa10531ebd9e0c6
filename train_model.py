"""Training stage: an age classifier that is honest about how good it is.

Reads a metadata CSV (default: the resampling stage's) and configs/train_model.yaml, and writes into
output_dir: model.keras (with the age groups, the backbone and the resolved config inside),
metrics.json, history.csv, training_curves.png, confusion_matrix.png, split.csv (each image's split),
face_problems.csv (images whose face could not be described as configured) and test_predictions.csv.

    python train_model.py
    python train_model.py --set input_csv=csv/processed_metadata.csv --set training.epochs=30

The story, top to bottom:
1. split by source image, stratified by age group: an image and its augmented copies always share a
   split, and the test split holds original images only, or the reported accuracy would be a lie;
2. describe every face once with the pretrained dlib descriptor and age network (cached by content,
   in parallel), or, for pixel backbones, stream the images through tf.data;
3. train the network for a fixed number of epochs (warm-up + cosine decay: no early stopping on a
   noisy validation split) to predict a distribution over years of age;
4. evaluate on the test split beside a majority-class baseline on the very same images, and save.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from age_groups import age_groups_from
from cli import run_script, setup_logging
from config import load_config
from config_models import Distribution, TrainConfig, Training
from dataset import read_metadata_csv
from errors import UserError
from face_analysis import DESCRIPTOR_BACKBONE, MAX_FILE_BYTES, MAX_PIXELS, DescriptorSettings, describe_files
from image_processor import TRAINABLE_STATUSES
from image_visualizer import figure_png
from outputs import OutputFolder, OutputGuard, run_record
from parallel import Engine

log = logging.getLogger("agepipe.train")

# --------------------------------------------------------------------------------------------------
# 1. Data and split
# --------------------------------------------------------------------------------------------------
def read_training_csv(path: str, groups, max_age: int) -> pd.DataFrame:
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
    frame["group_index"] = [groups.index_of(a) for a in frame["age"]]
    frame = frame[frame["group_index"] >= 0]
    if frame.empty:
        raise UserError(f"input CSV {path} has no usable labelled images")
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


def read_test_folder(folder: str, groups) -> pd.DataFrame:
    """A separate test set: every image under `folder` whose UTKFace name carries an age."""
    from dataset import find_image_files, parse_utkface_name

    if not Path(folder).is_dir():
        raise UserError(f"test_dataset_dir {folder} does not exist")
    rows = [{"file": f, "path": p, "age": parse_utkface_name(f)["age"]} for f, p in find_image_files(Path(folder))]
    frame = pd.DataFrame(rows).dropna(subset=["age"])
    if frame.empty:
        raise UserError(f"test_dataset_dir {folder} holds no images with an age in their name")
    frame["age"] = frame["age"].astype(int)
    frame["group_index"] = [groups.index_of(a) for a in frame["age"]]
    frame["source"], frame["copy"] = frame["file"], 0
    return frame[frame["group_index"] >= 0].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# 2-3. Devices, pipeline, model, training
# --------------------------------------------------------------------------------------------------
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


def describe(frame: pd.DataFrame, settings: DescriptorSettings, cache: Path, engine: Engine) -> pd.DataFrame:
    """`frame` with each image's face descriptor (None where it could not be described) and problem."""
    descriptors, problems = describe_files(list(frame["path"]), settings, cache, engine, MAX_PIXELS, MAX_FILE_BYTES)
    return frame.assign(descriptor=descriptors, face_problem=problems)


def decodable_paths(rows: pd.DataFrame) -> set[str]:
    """The paths among `rows` that decode (read_image's guards and decoder), for pixel backbones."""
    from image_io import UnreadableImage, read_image

    readable = set()
    for path in rows["path"].unique():
        try:
            read_image(path, MAX_PIXELS, MAX_FILE_BYTES)
            readable.add(path)
        except UnreadableImage:
            pass
    return readable


def plot_history(history: pd.DataFrame, folder: OutputFolder, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for axes, metric, title in ((loss, "loss", "Loss (KL divergence to the age distribution)"), (accuracy, "group_accuracy", "Age-group accuracy")):
        axes.plot(history["epoch"] + 1, history[metric], label="training")
        if f"val_{metric}" in history.columns and history[f"val_{metric}"].notna().any():
            axes.plot(history["epoch"] + 1, history[f"val_{metric}"], label="validation")
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    folder.write_bytes(name, figure_png(figure))


def plot_confusion(confusion: np.ndarray, labels: list[str], folder: OutputFolder, name: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
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
    folder.write_bytes(name, figure_png(figure))


def main(args) -> None:
    config = load_config(TrainConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    frame = read_training_csv(config.input_csv, age_groups_from(config), config.max_age)
    uses_descriptors = config.model.backbone == DESCRIPTOR_BACKBONE
    guard = OutputGuard(inputs=[config.input_csv, config.test_dataset_dir, config.target_csv, config.evaluation.prior_csv,
                                *sorted({os.path.dirname(p) for p in frame["path"]})])
    folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
    cache = guard.journal(config.descriptor_cache, "descriptor_cache") if uses_descriptors else None
    with guard:
        train_and_save(config, frame, folder, cache)


def train_and_save(config: TrainConfig, frame: pd.DataFrame, folder: OutputFolder, cache: Path | None) -> None:
    groups = age_groups_from(config)
    max_age, seed, model_config, split = config.max_age, config.seed, config.model, config.split
    uses_descriptors = cache is not None

    # 1. Split by source image, then check that the splits can support training and evaluation.
    frame["split"] = split_by_source(frame, split.validation, 0.0 if config.test_dataset_dir else split.test, seed)
    test = read_test_folder(config.test_dataset_dir, groups) if config.test_dataset_dir else frame[frame["split"] == "test"]
    train, validation = frame[frame["split"] == "train"], frame[frame["split"] == "validation"]
    overlap = set(train["source"]) & (set(validation["source"]) | set(test["source"]))
    assert not overlap, f"leak: {len(overlap)} sources in two splits"

    # 2. Describe every face once (before TensorFlow starts: the worker pool forks).
    if uses_descriptors:
        settings = DescriptorSettings(**model_config.descriptor.model_dump())
        sets = pd.concat([train.assign(set="train"), validation.assign(set="validation"), test.assign(set="test")], ignore_index=True)
        described = describe(sets, settings, cache, Engine.of(config))
        folder.write_csv("face_problems.csv", described.loc[described["face_problem"].notna(), ["set", "file", "path", "face_problem"]])
        missing = described["descriptor"].isna()
        if missing.any():
            log.warning("%d images have no face descriptor and are left out (listed in %s/face_problems.csv)", int(missing.sum()), folder.path)
        fallbacks = int(described["face_problem"].notna().sum() - missing.sum())
        if fallbacks:
            log.info("%d faces had no plausible landmarks and were described whole (on_no_landmarks: whole_image)", fallbacks)
        train, validation, test = (described[(described["set"] == name) & ~missing] for name in ("train", "validation", "test"))
    else:  # pixels are decoded in TensorFlow's pipeline, where a bad file would stop training: check each once now
        used = pd.concat([train, validation, test])
        readable = decodable_paths(used)
        dropped = sorted(set(used["path"]) - readable)
        if dropped:
            log.warning("%d images cannot be decoded and are left out, e.g. %s", len(dropped), dropped[0])
        train, validation, test = (rows[rows["path"].isin(readable)] for rows in (train, validation, test))
    if train.empty or test.empty:
        raise UserError(f"too few images to train and test: {len(train)} train, {len(validation)} validation, {len(test)} test")
    train_counts = np.bincount(train["group_index"], minlength=len(groups.labels))
    for label, count in zip(groups.labels, train_counts):
        if count == 0:
            log.warning("age group %s has no training images: the model cannot learn it", label)
    log.info("split: %d train, %d validation, %d test images (%d augmented copies unused in test)",
             len(train), len(validation), len(test), int((frame["split"] == "unused").sum()))

    # 3. TensorFlow, devices, the model and a fixed-length training run.
    from age_model import (  # first: it quiets TensorFlow's start-up log before TensorFlow loads
        augmentation_layers,
        build_descriptor_model,
        build_pixel_model,
        correct_prior,
        evaluate,
        group_accuracy_metric,
        group_matrix,
        pixel_dataset,
        population_shares,
        predict_years,
        model_bytes,
        year_targets,
    )

    strategy = distribution_strategy(config.distribution)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    training, inputs = config.training, config.input
    batch = inputs.batch_size * strategy.num_replicas_in_sync
    sigma = training.label_sigma_years
    group_weights = len(train) / (len(groups.labels) * np.maximum(train_counts, 1))
    weights = group_weights[train["group_index"].to_numpy()].astype(np.float32) if training.class_weighting else None
    # the age mix the model learns as its prior: uniform when class weighting evens the groups out
    training_shares = np.full(len(groups.labels), 1 / len(groups.labels)) if weights is not None else train_counts / train_counts.sum()
    flip = config.evaluation.flip_test_time_augmentation

    with folder.scratch() as cache_dir:
        if uses_descriptors:
            def views(rows):  # (images x views x 128) -> one array per view
                stacked = np.stack(rows["descriptor"].to_list())
                return [stacked[:, v] for v in range(stacked.shape[1])]

            train_views = views(train)
            x_train = np.concatenate(train_views)  # the mirror view is a second training sample
            y_train = year_targets(np.tile(train["age"].to_numpy(), len(train_views)), max_age, sigma)
            w_train = None if weights is None else np.tile(weights, len(train_views))
            fit_data = dict(x=x_train, y=y_train, sample_weight=w_train, batch_size=batch, shuffle=True)
            if len(validation):
                fit_data["validation_data"] = (views(validation)[0], year_targets(validation["age"], max_age, sigma))
            steps = int(np.ceil(len(x_train) / batch))

            def predict(rows):
                test_views = views(rows)
                return predict_years(model, test_views[0], test_views[1] if flip and len(test_views) > 1 else None)
        else:
            size = inputs.image_size
            augment = augmentation_layers(config.augmentation, seed) if config.augmentation.enabled else None
            cache_to = {"disk": os.path.join(cache_dir, "train"), "memory": "", "none": None}[inputs.cache]
            fit_data = dict(x=pixel_dataset(train["path"], size, batch, targets=year_targets(train["age"], max_age, sigma), weights=weights,
                                            shuffle_buffer=inputs.shuffle_buffer, seed=seed, cache=cache_to, augment=augment),
                            shuffle=False)  # the dataset shuffles itself, seeded
            if len(validation):
                fit_data["validation_data"] = pixel_dataset(validation["path"], size, batch, targets=year_targets(validation["age"], max_age, sigma))
            steps = int(np.ceil(len(train) / batch))

            def predict(rows):
                return predict_years(model, pixel_dataset(rows["path"], size, batch), mirrored_inputs=flip)

        with strategy.scope():
            if uses_descriptors:
                model = build_descriptor_model(model_config, max_age, x_train.mean(axis=0), x_train.var(axis=0) + 1e-6)
            else:
                model = build_pixel_model(model_config, inputs.image_size, max_age)
            model.compile(
                optimizer=keras.optimizers.AdamW(learning_rate_schedule(training, steps), weight_decay=model_config.weight_decay),
                loss=keras.losses.KLDivergence(),
                metrics=[group_accuracy_metric(groups, max_age)],
            )
        log.info("model: %s, %s parameters, %d replicas", model_config.backbone, f"{model.count_params():,}", strategy.num_replicas_in_sync)
        start = time.perf_counter()
        fitted = model.fit(**fit_data, epochs=training.epochs, verbose=1 if os.isatty(2) else 0)
        train_seconds = time.perf_counter() - start
        history = pd.DataFrame(fitted.history).rename_axis("epoch").reset_index()

        # 4. Evaluate on the test split, beside the majority class of the training split.
        start = time.perf_counter()
        probabilities = predict(test)
        predict_seconds = time.perf_counter() - start

    prior = population_shares(config.evaluation.prior_csv, groups)
    if prior is not None:
        probabilities = correct_prior(probabilities, groups, max_age, training_shares, prior)
    shares = population_shares(config.target_csv, groups)
    metrics = evaluate(probabilities, test["age"].to_numpy(), groups, max_age, shares)
    majority = int(np.argmax(train_counts))
    majority_age = groups.bounds(max_age)[majority]
    baseline = evaluate(year_targets(np.full(len(test), sum(majority_age) / 2), max_age, 0), test["age"].to_numpy(), groups, max_age, shares)
    for label in metrics["groups_without_test_images"]:
        log.warning("age group %s has no test images: its recall is not measured", label)

    metadata = {"age_group_edges": list(groups.edges), "labels": groups.labels, "max_age": max_age,
                "backbone": model_config.backbone, "descriptor": model_config.descriptor.model_dump() if uses_descriptors else None,
                "input_size": None if uses_descriptors else inputs.image_size, "training_group_shares": list(map(float, training_shares)),
                **run_record(config)}
    folder.write_bytes("model.keras", model_bytes(model, metadata, folder))
    headline = ("accuracy", "one_off_accuracy", "macro_f1", "balanced_accuracy", "population_weighted_accuracy", "mae_years")
    report = {
        "test": metrics,
        "majority_baseline": {"group": groups.labels[majority], **{k: baseline[k] for k in headline}},
        "test_source": config.test_dataset_dir or "test split of " + config.input_csv,
        "flip_test_time_augmentation": flip,
        "prior_correction": config.evaluation.prior_csv,
        "split_images": {"train": len(train), "validation": len(validation), "test": len(test)},
        "epochs": int(len(history)),
        "training_seconds": round(train_seconds, 1),
        "training_images_per_second": round(len(history) * len(train) / train_seconds, 1),
        "prediction_images_per_second": round(len(test) / max(predict_seconds, 1e-9), 1),
        "replicas": strategy.num_replicas_in_sync,
        "age_groups": groups.labels,
        **run_record(config),
    }
    folder.write_json("metrics.json", report)
    folder.write_csv("history.csv", history)
    folder.write_csv("split.csv", frame[["file", "source", "copy", "age", "split"]])
    group_probabilities = probabilities @ group_matrix(groups, max_age)
    predictions = test[["file", "path", "age"]].reset_index(drop=True).assign(
        predicted_group=[groups.labels[i] for i in group_probabilities.argmax(1)],
        expected_age=np.round(probabilities @ np.arange(max_age + 1), 2))
    predictions = pd.concat([predictions, pd.DataFrame(group_probabilities, columns=[f"p_{label}" for label in groups.labels])], axis=1)
    folder.write_csv("test_predictions.csv", predictions)
    plot_history(history, folder, "training_curves.png")
    plot_confusion(metrics["confusion_matrix"], groups.labels, folder, "confusion_matrix.png",
                   f"Test confusion matrix (accuracy {metrics['accuracy']:.1%})")
    folder.finish()

    print(f"trained {model_config.backbone} on {len(train)} images for {len(history)} epochs in {train_seconds:.0f}s; test on {len(test)} images:")
    print(f"  accuracy {metrics['accuracy']:.1%} (majority baseline {baseline['accuracy']:.1%}), one-off {metrics['one_off_accuracy']:.1%}, "
          f"macro-F1 {metrics['macro_f1']:.3f}, MAE {metrics['mae_years']:.1f} years (baseline {baseline['mae_years']:.1f})")
    print(f"wrote {folder.path}/model.keras, metrics.json, history.csv, training_curves.png, confusion_matrix.png")


if __name__ == "__main__":
    run_script(main, "Train the age classifier.", "train_model.yaml")
