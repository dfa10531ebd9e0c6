"""Training stage: an age-group classifier that is honest about how good it is.

Reads a metadata CSV (default: the resampling stage's) and configs/train_model.yaml, and writes into
output_dir: model.keras (with the age groups and input size inside), metrics.json, history.csv,
training_curves.png, confusion_matrix.png, split.csv (each image's split) and test_predictions.csv.

    python train_model.py
    python train_model.py --set input_csv=csv/processed_metadata.csv --set training.epochs=5

The story, top to bottom:
1. split by source image, stratified by age group: an image and its augmented copies always share a
   split, and the test split holds original images only, or the reported accuracy would be a lie;
2. stream the images through tf.data (decode, resize, cache, augment in training only, prefetch);
3. define the network and train it with early stopping, checkpoints, a warm-up + cosine learning rate
   and a CSV log of each epoch;
4. evaluate on the test split beside a majority-class baseline on the very same images, and save.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from utils import (
    Bool,
    Int,
    ListOf,
    Number,
    Optional,
    Str,
    UserError,
    age_groups_from,
    atomic_write,
    ensure_writable_dir,
    load_config,
    read_metadata_csv,
    run_script,
    setup_logging,
    write_csv_atomic,
)

log = logging.getLogger("agepipe.train")

SCHEMA = {
    "input_csv": Str(),
    "test_dataset_dir": Optional(Str()),
    "output_dir": Str(),
    "max_age": Int(1, 130),
    "seed": Int(0),
    "deterministic": Bool(),
    "split": {"validation": Number(0.01, 0.5), "test": Number(0.0, 0.5)},
    "input": {"image_size": Int(16, 512), "batch_size": Int(1, 4096), "shuffle_buffer": Int(1), "cache": Str(["disk", "memory", "none"])},
    "augmentation": {"enabled": Bool(), "max_rotation_degrees": Number(0, 30), "max_zoom": Number(0, 0.5),
                     "max_shift": Number(0, 0.3), "max_brightness": Number(0, 1), "max_contrast": Number(0, 1)},
    "model": {"backbone": Str(), "weights": Optional(Str()), "filters": ListOf(Int(1, 2048), min_length=1),
              "convs_per_stage": Int(1, 4), "batch_norm_momentum": Number(0, 0.999), "spatial_dropout": Number(0, 0.9),
              "dropout": Number(0, 0.9), "weight_decay": Number(0, 1)},
    "training": {"epochs": Int(1, 10000), "learning_rate": Number(1e-7, 10), "warmup_epochs": Int(0, 100),
                 "early_stopping_patience": Int(1, 1000), "class_weighting": Bool(), "label_smoothing": Number(0, 0.5),
                 "label_sigma_years": Number(0, 50)},
    "evaluation": {"flip_test_time_augmentation": Bool()},
    "distribution": {"strategy": Str(["default", "mirrored", "multi_worker"]), "logical_cpus": Int(1, 64)},
}


# --------------------------------------------------------------------------------------------------
# 1. Data and split
# --------------------------------------------------------------------------------------------------
def read_training_csv(path: str, groups) -> pd.DataFrame:
    """Usable, labelled rows of any stage's CSV, with `source` (the original image) and `copy`."""
    frame = read_metadata_csv(path, "input CSV", "run the earlier stages first", ("file", "path", "age"))
    if "status" in frame.columns:  # exploration or processing CSV: only the usable images
        frame = frame[frame["status"].isin(["ok", "kept", "repaired"])]
    frame = frame[frame["age"].notna() & frame["path"].notna()].copy()
    if "source" not in frame.columns:
        frame["source"], frame["copy"] = frame["file"], 0
    frame["age"] = frame["age"].astype(int)
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
            n_test, n_validation = max(n_test, 1 if test > 0 else 0), max(n_validation, 1)
        for index, name in enumerate(names):
            assignment[name] = "test" if index < n_test else "validation" if index < n_test + n_validation else "train"
    split = frame["source"].map(assignment)
    return split.where(~((split == "test") & (frame["copy"] > 0)), "unused")


def read_test_folder(folder: str, groups) -> pd.DataFrame:
    """A separate test set: every image under `folder` whose UTKFace name carries an age."""
    from image_reader import find_image_files, parse_utkface_name

    if not Path(folder).is_dir():
        raise UserError(f"test_dataset_dir {folder} does not exist")
    rows = [{"file": f, "path": p, "age": parse_utkface_name(f)["age"]} for f, p in find_image_files(Path(folder))]
    frame = pd.DataFrame(rows).dropna(subset=["age"])
    if frame.empty:
        raise UserError(f"test_dataset_dir {folder} holds no images with an age in their name")
    frame["age"] = frame["age"].astype(int)
    frame["group_index"] = [groups.index_of(a) for a in frame["age"]]
    return frame[frame["group_index"] >= 0].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# 2-3. Devices, pipeline, model, training
# --------------------------------------------------------------------------------------------------
def distribution_strategy(settings: dict):
    """The tf.distribute strategy of the config; must run before TensorFlow touches a device."""
    import tensorflow as tf

    if settings["strategy"] == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if settings["strategy"] == "mirrored":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * settings["logical_cpus"])
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def learning_rate_schedule(training: dict, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero over the remaining epochs."""
    import keras

    total = training["epochs"] * steps_per_epoch
    warmup = min(training["warmup_epochs"] * steps_per_epoch, total - 1)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else training["learning_rate"], decay_steps=max(1, total - warmup),
        warmup_target=training["learning_rate"] if warmup else None, warmup_steps=warmup,
    )


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for axes, metric, title in ((loss, "loss", "Loss"), (accuracy, "accuracy", "Accuracy")):
        axes.plot(history["epoch"] + 1, history[metric], label="training")
        axes.plot(history["epoch"] + 1, history[f"val_{metric}"], label="validation")
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
        axes.legend()
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path, title: str) -> None:
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
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)


def main(args) -> None:
    config = load_config(SCHEMA, args.config, args.overrides)
    setup_logging(config["log_level"])
    groups = age_groups_from(config)
    output_dir = ensure_writable_dir(config["output_dir"], "output_dir")
    frame = read_training_csv(config["input_csv"], groups)
    split = config["split"]

    # 1. Split by source image, then check that the splits can support training and evaluation.
    frame["split"] = split_by_source(frame, split["validation"], 0.0 if config["test_dataset_dir"] else split["test"], config["seed"])
    test = read_test_folder(config["test_dataset_dir"], groups) if config["test_dataset_dir"] else frame[frame["split"] == "test"]
    train, validation = frame[frame["split"] == "train"], frame[frame["split"] == "validation"]
    if train.empty or validation.empty or test.empty:
        raise UserError(f"too few images to split: {len(train)} train, {len(validation)} validation, {len(test)} test")
    train_counts = np.bincount(train["group_index"], minlength=len(groups.labels))
    for label, count in zip(groups.labels, train_counts):
        if count == 0:
            log.warning("age group %s has no training images: the model cannot learn it", label)
    overlap = set(train["source"]) & (set(validation["source"]) | set(test["source"]))
    assert not overlap, f"leak: {len(overlap)} sources in two splits"
    log.info("split: %d train, %d validation, %d test images (%d augmented copies unused in test)",
             len(train), len(validation), len(test), int((frame["split"] == "unused").sum()))

    # 2. TensorFlow, devices and the input pipeline.
    from age_model import (  # first: it quiets TensorFlow's start-up log before TensorFlow loads
        augmentation_layers,
        build_model,
        evaluate,
        label_distribution_matrix,
        make_dataset,
        predict_probabilities,
        save_with_metadata,
    )

    strategy = distribution_strategy(config["distribution"])
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(config["seed"])
    if config["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    training, inputs = config["training"], config["input"]
    size, batch = inputs["image_size"], inputs["batch_size"] * strategy.num_replicas_in_sync
    targets = label_distribution_matrix(groups, config["max_age"], training["label_sigma_years"])
    weights = None
    if training["class_weighting"]:
        weights = np.where(train_counts > 0, len(train) / (len(groups.labels) * np.maximum(train_counts, 1)), 0.0).astype(np.float32)
    augment = augmentation_layers(config["augmentation"], config["seed"]) if config["augmentation"]["enabled"] else None
    with tempfile.TemporaryDirectory(prefix="agepipe-cache-") as cache:
        def dataset(rows, is_training, name):
            # only the training set is read many times; evaluation sets stream without a cache
            cache_to = {"disk": os.path.join(cache, name), "memory": "", "none": None}[inputs["cache"]] if is_training else None
            return make_dataset(rows["path"], rows["age"], targets, weights if is_training else None, size, batch,
                                inputs["shuffle_buffer"], is_training, config["seed"], augment if is_training else None, cache_to)

        train_data, validation_data = dataset(train, True, "train"), dataset(validation, False, "validation")

        # 3. The model, trained with early stopping on validation loss, checkpoints and a CSV log.
        steps = int(np.ceil(len(train) / batch))
        with strategy.scope():
            model = build_model(config["model"], size, len(groups.labels))
            model.compile(
                optimizer=keras.optimizers.AdamW(learning_rate_schedule(training, steps), weight_decay=config["model"]["weight_decay"]),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=training["label_smoothing"]),
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            )
        log.info("model: %s, %s parameters, input %dx%d, %d replicas", config["model"]["backbone"],
                 f"{model.count_params():,}", size, size, strategy.num_replicas_in_sync)
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=training["early_stopping_patience"], restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(str(output_dir / "checkpoint.keras"), monitor="val_loss", save_best_only=True),
            keras.callbacks.CSVLogger(str(output_dir / "history.csv")),
        ]
        start = time.perf_counter()
        model.fit(train_data, validation_data=validation_data, epochs=training["epochs"], callbacks=callbacks,
                  shuffle=False, verbose=1 if os.isatty(2) else 2)  # the dataset shuffles itself, seeded
        train_seconds = time.perf_counter() - start
        history = pd.read_csv(output_dir / "history.csv")

        # 4. Evaluate on the test split, beside the majority class of the training split.
        flip = config["evaluation"]["flip_test_time_augmentation"]
        test_data = dataset(test, False, "test")
        probabilities = predict_probabilities(model, test_data, flip)
    metrics = evaluate(probabilities, test["group_index"].to_numpy(), test["age"].to_numpy(), groups, config["max_age"])
    majority = int(np.argmax(train_counts))
    baseline = evaluate(np.eye(len(groups.labels))[np.full(len(test), majority)], test["group_index"].to_numpy(),
                        test["age"].to_numpy(), groups, config["max_age"])
    for label in metrics["groups_without_test_images"]:
        log.warning("age group %s has no test images: its recall is not measured", label)

    save_with_metadata(model, output_dir / "model.keras", groups, size, config["max_age"])
    (output_dir / "checkpoint.keras").unlink(missing_ok=True)
    report = {
        "test": metrics,
        "majority_baseline": {"group": groups.labels[majority], **{k: baseline[k] for k in ("accuracy", "one_off_accuracy", "macro_f1", "mae_years")}},
        "test_source": config["test_dataset_dir"] or "test split of " + config["input_csv"],
        "flip_test_time_augmentation": flip,
        "split_images": {"train": len(train), "validation": len(validation), "test": len(test)},
        "epochs_run": int(len(history)),
        "best_epoch": int(history["val_loss"].idxmin()) + 1,
        "training_seconds": round(train_seconds, 1),
        "training_images_per_second": round(len(history) * len(train) / train_seconds, 1),
        "replicas": strategy.num_replicas_in_sync,
        "age_groups": groups.labels,
    }
    with atomic_write(output_dir / "metrics.json", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    write_csv_atomic(frame[["file", "source", "copy", "age", "split"]], output_dir / "split.csv")
    predictions = test[["file", "path", "age"]].assign(predicted_group=[groups.labels[i] for i in probabilities.argmax(1)])
    predictions = pd.concat([predictions.reset_index(drop=True),
                             pd.DataFrame(probabilities, columns=[f"p_{label}" for label in groups.labels])], axis=1)
    write_csv_atomic(predictions, output_dir / "test_predictions.csv")
    plot_history(history, output_dir / "training_curves.png")
    plot_confusion(metrics["confusion_matrix"], groups.labels, output_dir / "confusion_matrix.png",
                   f"Test confusion matrix (accuracy {metrics['accuracy']:.1%})")

    print(f"trained on {len(train)} images for {len(history)} epochs in {train_seconds:.0f}s; test on {len(test)} images:")
    print(f"  accuracy {metrics['accuracy']:.1%} (majority baseline {baseline['accuracy']:.1%}), one-off {metrics['one_off_accuracy']:.1%}, "
          f"macro-F1 {metrics['macro_f1']:.3f}, MAE {metrics['mae_years']:.1f} years (baseline {baseline['mae_years']:.1f})")
    print(f"wrote {output_dir}/model.keras, metrics.json, history.csv, training_curves.png, confusion_matrix.png")


if __name__ == "__main__":
    run_script(main, "Train the age-group classifier.", "train_model.yaml")
