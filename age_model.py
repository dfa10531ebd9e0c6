"""The age-group classifier's pieces shared by train_model.py and predict_age.py: input pipeline, model,
label targets, evaluation metrics, and saving/loading a model together with its age groups."""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter hides our own log

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from utils import AgeGroups, UserError  # noqa: E402

METADATA_ENTRY = "agepipe.json"  # stored inside the .keras zip, beside Keras' own files


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------
def label_distribution_matrix(groups: AgeGroups, max_age: int, sigma_years: float) -> np.ndarray:
    """Row a: the target over groups for a person aged a.

    With sigma_years = 0 this is one-hot. Otherwise it is a Gaussian over age (in years, centred on
    the label) integrated over each group's years: a 19-year-old's target leans toward 20-29, so the
    loss knows that neighbouring groups are nearer misses than distant ones (label distribution
    learning, Gao et al. 2017).
    """
    bounds = groups.bounds(max_age)
    matrix = np.zeros((max_age + 1, len(bounds)), np.float32)
    for age in range(max_age + 1):
        if sigma_years == 0:
            matrix[age, groups.index_of(age)] = 1.0
            continue
        cdf = lambda x: 0.5 * (1 + math.erf((x - age) / (sigma_years * math.sqrt(2))))  # noqa: E731
        # a group covers [lower - 0.5, upper + 0.5); the first and last groups take the tails
        edges = [-math.inf] + [lower - 0.5 for lower, _ in bounds[1:]] + [math.inf]
        matrix[age] = [cdf(hi) - cdf(lo) for lo, hi in zip(edges[:-1], edges[1:])]
    return matrix / matrix.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Input pipeline
# --------------------------------------------------------------------------------------------------
def decode_and_resize(path: tf.Tensor, size: int) -> tf.Tensor:
    """File -> size x size x 3 uint8 tensor (any format TensorFlow decodes; grayscale becomes RGB)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, (size, size), method="area", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def augmentation_layers(config: dict, seed: int) -> keras.Sequential:
    """Face-safe training-time augmentation: mirror, small rotation, zoom, shift, brightness, contrast."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(config["max_rotation_degrees"] / 360.0, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom(config["max_zoom"], fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomTranslation(config["max_shift"], config["max_shift"], fill_mode="reflect", seed=seed + 3),
            keras.layers.RandomBrightness(config["max_brightness"], value_range=(0, 255), seed=seed + 4),
            keras.layers.RandomContrast(config["max_contrast"], seed=seed + 5),
        ],
        name="augmentation",
    )


def make_dataset(paths, ages, targets: np.ndarray, weights: np.ndarray | None, size: int, batch_size: int, shuffle_buffer: int,
                 training: bool, seed: int, augment: keras.Sequential | None = None, cache: str | None = None) -> tf.data.Dataset:
    """A streaming tf.data pipeline: read and decode in parallel, cache the small decoded images
    (`cache`: a file path caches on disk, so memory does not grow with the dataset; "" caches in
    memory; None not at all), shuffle and augment when training, batch, prefetch.
    Yields (images as float32 0-255, target distributions[, sample weights])."""
    ages = np.clip(np.asarray(ages, np.int64), 0, len(targets) - 1)
    dataset = tf.data.Dataset.from_tensor_slices((np.asarray(paths, str), ages))
    dataset = dataset.map(lambda p, a: (decode_and_resize(p, size), a), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is not None:
        dataset = dataset.cache(cache)
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    table = tf.constant(targets)
    group_weights = None if weights is None else tf.constant(weights, tf.float32)

    def to_model_inputs(images, batch_ages):
        images = tf.cast(images, tf.float32)
        if augment is not None:
            images = augment(images, training=True)
        soft = tf.gather(table, batch_ages)
        if group_weights is None:
            return images, soft
        return images, soft, tf.gather(group_weights, tf.argmax(soft, axis=1))

    dataset = dataset.map(to_model_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def build_model(config: dict, size: int, classes: int) -> keras.Model:
    """The classifier: raw 0-255 RGB pixels in, probabilities over age groups out.

    `backbone: cnn` is a compact VGG-style network defined here: per stage two 3x3 convolutions with
    batch normalisation, then pooling; global average pooling, dropout and a softmax. Any other value
    names a keras.applications model (e.g. MobileNetV3Small) whose `weights` is a local weights file,
    the Keras name of pretrained weights ("imagenet", downloaded when online) or null.
    """
    inputs = keras.Input((size, size, 3), name="image")
    if config["backbone"] == "cnn":
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
        for stage, filters in enumerate(config["filters"]):
            for conv in range(config["convs_per_stage"]):
                x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{stage}_{conv}")(x)
                # small datasets give few steps per epoch: a lower momentum keeps the moving statistics
                # in step with the weights, or validation swings from epoch to epoch
                x = keras.layers.BatchNormalization(momentum=config["batch_norm_momentum"])(x)
                x = keras.layers.Activation("relu")(x)
            x = keras.layers.MaxPooling2D()(x)
            x = keras.layers.SpatialDropout2D(config["spatial_dropout"])(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        application = getattr(keras.applications, config["backbone"], None)
        if application is None:
            raise UserError(f"model.backbone: {config['backbone']!r} is neither 'cnn' nor a keras.applications model")
        backbone = application(include_top=False, weights=config["weights"], input_shape=(size, size, 3), pooling="avg")
        preprocess = getattr(keras.applications, _application_module(config["backbone"])).preprocess_input
        x = backbone(preprocess(inputs))
    x = keras.layers.Dropout(config["dropout"])(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="age_group")(x)
    return keras.Model(inputs, outputs, name="age_group_classifier")


def _application_module(name: str) -> str:
    """keras.applications.MobileNetV3Small's preprocess_input lives in keras.applications.mobilenet_v3."""
    module = getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]
    if not hasattr(getattr(keras.applications, module, None), "preprocess_input"):
        raise UserError(f"model.backbone: cannot find the preprocessing of {name}")
    return module


def save_with_metadata(model: keras.Model, path: Path, groups: AgeGroups, size: int, max_age: int) -> None:
    """Save in the native .keras format, with the age groups and input size inside the same file.

    Written to a temporary file first and renamed, so an interrupted save leaves the old model."""
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    model.save(temporary)
    metadata = {"age_group_edges": list(groups.edges), "labels": groups.labels, "input_size": size, "max_age": max_age}
    with zipfile.ZipFile(temporary, "a") as archive:
        archive.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2))
    os.replace(temporary, path)


def load_with_metadata(path: str | os.PathLike) -> tuple[keras.Model, dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, KeyError):
        raise UserError(f"model file {path} was not saved by train_model.py (no {METADATA_ENTRY} inside)") from None
    return keras.saving.load_model(path, compile=False), metadata


def predict_probabilities(model: keras.Model, dataset: tf.data.Dataset, flip: bool) -> np.ndarray:
    """Class probabilities; with `flip`, averaged with those of the mirrored images (test-time
    augmentation: faces are nearly symmetric, so the two views' errors partly cancel)."""
    outputs = []
    for batch in dataset:
        images = batch[0] if isinstance(batch, tuple) else batch
        probabilities = model(images, training=False).numpy()
        if flip:
            probabilities = (probabilities + model(tf.reverse(images, axis=[2]), training=False).numpy()) / 2
        outputs.append(probabilities)
    return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]), np.float32)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def evaluate(probabilities: np.ndarray, true_groups: np.ndarray, true_ages: np.ndarray, groups: AgeGroups, max_age: int) -> dict:
    """Accuracy, one-off accuracy (within one adjacent group), macro-F1 over the groups present,
    per-group recall (None for a group with no test images), confusion matrix (rows: true), and the
    mean absolute error in years of the expected age (probabilities x group mid-points)."""
    classes = len(groups.labels)
    predicted = probabilities.argmax(axis=1)
    true_groups = np.asarray(true_groups)
    confusion = np.zeros((classes, classes), int)
    np.add.at(confusion, (true_groups, predicted), 1)
    recall, f1 = {}, []
    for index, label in enumerate(groups.labels):
        support, hits, predicted_count = confusion[index].sum(), confusion[index, index], confusion[:, index].sum()
        recall[label] = None if support == 0 else float(hits / support)
        if support:
            precision = hits / predicted_count if predicted_count else 0.0
            f1.append(0.0 if hits == 0 else float(2 * precision * recall[label] / (precision + recall[label])))
    expected_age = probabilities @ np.asarray(groups.midpoints(max_age))
    return {
        "images": int(len(true_groups)),
        "accuracy": float((predicted == true_groups).mean()),
        "one_off_accuracy": float((np.abs(predicted - true_groups) <= 1).mean()),
        "macro_f1": float(np.mean(f1)) if f1 else None,
        "mae_years": float(np.abs(expected_age - np.asarray(true_ages, float)).mean()),
        "per_group_recall": recall,
        "groups_without_test_images": [label for label, value in recall.items() if value is None],
        "confusion_matrix": confusion.tolist(),
    }
