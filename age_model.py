"""The age classifier's pieces shared by train_model.py, predict_age.py and the benchmarks: targets,
inputs, the model, evaluation, the prior correction, and saving/loading a model with its metadata.

Every model predicts a distribution over single years of age 0..max_age (label-distribution learning:
the target is a Gaussian around the true age, Gao et al. 2017). The expected age is read from it, and
the age-group probabilities are its sums over each group's years, so groups and years never disagree.

Backbones: `dlib_face_descriptor` (the default: the frozen 128-D face descriptor of face_analysis.py,
computed once per image, and a small Keras head on it), `cnn` (pixels, a compact VGG-style network
trained from scratch) or any keras.applications model (pixels).
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

from config_models import ModelSettings, TrainingAugmentation
from age_groups import AgeGroups
from cli import native_stderr_silenced
from errors import UserError
from model_files import METADATA_ENTRY, ModelMetadata, read_model_metadata

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
with native_stderr_silenced():
    import keras
    import tensorflow as tf

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dataset import read_metadata_csv  # noqa: E402
from face_analysis import DESCRIPTOR_BACKBONE, MAX_FILE_BYTES, MAX_PIXELS  # noqa: E402
from image_io import read_image  # noqa: E402

log = logging.getLogger("agepipe.model")



# --------------------------------------------------------------------------------------------------
# Targets and what follows from a distribution over years
# --------------------------------------------------------------------------------------------------
def year_targets(ages, max_age: int, sigma_years: float) -> np.ndarray:
    """Row i: the target distribution over years 0..max_age for a person aged ages[i].

    A Gaussian of `sigma_years` around the age (one-hot for 0), so a 39-year-old's target also
    credits 38 and 40: neighbouring years are near misses, not errors.

    Examples
    --------
    >>> year_targets([2], max_age=4, sigma_years=0).tolist()
    [[0.0, 0.0, 1.0, 0.0, 0.0]]
    """
    ages = np.clip(np.asarray(ages, np.float64), 0, max_age)[:, None]
    years = np.arange(max_age + 1)[None, :]
    if sigma_years == 0:
        return (years == np.round(ages)).astype(np.float32)
    density = np.exp(-0.5 * ((years - ages) / sigma_years) ** 2)
    return (density / density.sum(axis=1, keepdims=True)).astype(np.float32)


def group_matrix(groups: AgeGroups, max_age: int) -> np.ndarray:
    """(max_age + 1, groups) 0/1 matrix: year probabilities @ this = group probabilities."""
    matrix = np.zeros((max_age + 1, len(groups.labels)), np.float32)
    for index, (lower, upper) in enumerate(groups.bounds(max_age)):
        matrix[lower:upper + 1, index] = 1.0
    return matrix


def expected_age(year_probabilities: np.ndarray) -> np.ndarray:
    return year_probabilities @ np.arange(year_probabilities.shape[1])


def correct_prior(year_probabilities: np.ndarray, groups: AgeGroups, max_age: int, training_shares, target_shares) -> np.ndarray:
    """Re-weight predictions learnt under the training set's age mix to another population's mix:
    p'(year) is proportional to p(year) x target share / training share of the year's group (Bayes' rule
    with a changed prior; Saerens et al. 2002)."""
    ratio = np.asarray(target_shares, float) / np.maximum(np.asarray(training_shares, float), 1e-9)
    adjusted = year_probabilities * (group_matrix(groups, max_age) @ ratio)[None, :]
    return adjusted / np.maximum(adjusted.sum(axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------
# Pixel input: one decoding function for training and prediction
# --------------------------------------------------------------------------------------------------
def load_pixels(path: str, size: int) -> np.ndarray:
    """An image file as a size x size x 3 RGB uint8 array (area-resampled), the way training and
    prediction both see it. Raises image_io.UnreadableImage with the reason."""
    bgr, _ = read_image(path, MAX_PIXELS, MAX_FILE_BYTES)
    return np.ascontiguousarray(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[..., ::-1])


def pixel_dataset(paths, size: int, batch_size: int, *, targets=None, weights=None, shuffle_buffer: int = 0, seed: int = 0,
                  cache: str | None = None, augment: keras.Sequential | None = None) -> tf.data.Dataset:
    """Images of `paths` decoded by `load_pixels` in parallel, batched as float32 0-255, with their
    `targets` (and sample `weights`) when given; shuffled with `shuffle_buffer`, augmented with `augment`.

    `cache`: a file path caches the small decoded images on disk, so memory stays flat however large the
    dataset; "" caches in memory; None not at all."""
    def decode(path):
        return load_pixels(path.decode(), size)

    columns = [np.asarray(paths, str)] + [np.asarray(c, np.float32) for c in (targets, weights) if c is not None]
    dataset = tf.data.Dataset.from_tensor_slices(tuple(columns))

    def read(path, *labels):
        image = tf.ensure_shape(tf.numpy_function(decode, [path], tf.uint8), (size, size, 3))
        return (image, *labels)

    dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is not None:
        dataset = dataset.cache(cache)
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def to_float(images, *labels):
        images = tf.cast(images, tf.float32)
        if augment is not None:
            images = augment(images, training=True)
        return (images, *labels) if labels else images

    dataset = dataset.batch(batch_size).map(to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def group_accuracy_metric(groups: AgeGroups, max_age: int):
    """A Keras metric: share of samples whose most probable group (from the year distribution) is the
    target's. For the learning curves only; reported figures come from `evaluate`."""
    matrix = tf.constant(group_matrix(groups, max_age))

    def group_accuracy(y_true, y_pred):
        return tf.cast(tf.equal(tf.argmax(y_true @ matrix, axis=1), tf.argmax(y_pred @ matrix, axis=1)), tf.float32)

    return group_accuracy


def augmentation_layers(config: TrainingAugmentation, seed: int) -> keras.Sequential:
    """Face-safe training-time augmentation for pixel backbones: mirror, small rotation, zoom, shift,
    brightness, contrast."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(config.max_rotation_degrees / 360.0, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom(config.max_zoom, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomTranslation(config.max_shift, config.max_shift, fill_mode="reflect", seed=seed + 3),
            keras.layers.RandomBrightness(config.max_brightness, value_range=(0, 255), seed=seed + 4),
            keras.layers.RandomContrast(config.max_contrast, seed=seed + 5),
        ],
        name="augmentation",
    )


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def build_descriptor_model(config: ModelSettings, max_age: int, mean: np.ndarray, variance: np.ndarray) -> keras.Model:
    """A Keras head on face descriptors: standardise, `head_units` dense layers with dropout, softmax
    over years. `ensemble` > 1 builds that many independently initialised heads and averages their
    outputs (one model, one file)."""
    inputs = keras.Input((len(mean),), name="descriptor")
    standardised = keras.layers.Normalization(mean=mean, variance=variance, name="standardise")(inputs)
    heads = []
    for member in range(config.ensemble):
        x = standardised
        for layer, units in enumerate(config.head_units):
            x = keras.layers.Dense(units, activation="gelu", name=f"head{member}_dense{layer}")(x)
            x = keras.layers.Dropout(config.dropout, name=f"head{member}_dropout{layer}")(x)
        heads.append(keras.layers.Dense(max_age + 1, activation="softmax", name=f"head{member}_years")(x))
    outputs = heads[0] if len(heads) == 1 else keras.layers.Average(name="years")(heads)
    return keras.Model(inputs, outputs, name="age_from_face_descriptor")


def build_pixel_model(config: ModelSettings, size: int, max_age: int) -> keras.Model:
    """Raw 0-255 RGB pixels in, a distribution over years out.

    `backbone: cnn` is a compact VGG-style network defined here: per stage `convs_per_stage` 3x3
    convolutions with batch normalisation, then pooling; global average pooling, dropout and a softmax.
    Any other value names a keras.applications model whose `weights` is a local weights file or null.
    """
    inputs = keras.Input((size, size, 3), name="image")
    if config.backbone == "cnn":
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
        for stage, filters in enumerate(config.filters):
            for conv in range(config.convs_per_stage):
                x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{stage}_{conv}")(x)
                # small datasets give few steps per epoch: a lower momentum keeps the moving statistics
                # in step with the weights, or validation swings from epoch to epoch
                x = keras.layers.BatchNormalization(momentum=config.batch_norm_momentum)(x)
                x = keras.layers.Activation("relu")(x)
            x = keras.layers.MaxPooling2D()(x)
            x = keras.layers.SpatialDropout2D(config.spatial_dropout)(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        application = getattr(keras.applications, config.backbone, None)
        if application is None:
            raise UserError(f"model.backbone: {config.backbone!r} is neither {DESCRIPTOR_BACKBONE!r}, 'cnn' nor a keras.applications model")
        backbone = application(include_top=False, weights=config.weights, input_shape=(size, size, 3), pooling="avg")
        preprocess = getattr(keras.applications, _application_module(config.backbone)).preprocess_input
        x = backbone(preprocess(inputs))
    x = keras.layers.Dropout(config.dropout)(x)
    outputs = keras.layers.Dense(max_age + 1, activation="softmax", name="years")(x)
    return keras.Model(inputs, outputs, name="age_from_pixels")


def _application_module(name: str) -> str:
    """keras.applications.MobileNetV3Small's preprocess_input lives in keras.applications.mobilenet_v3."""
    module = getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]
    if not hasattr(getattr(keras.applications, module, None), "preprocess_input"):
        raise UserError(f"model.backbone: cannot find the preprocessing of {name}")
    return module


def model_bytes(model: keras.Model, metadata: dict, folder) -> bytes:
    """The model in the native .keras format with `metadata` (age groups, backbone and its settings,
    input size, training age mix, the resolved config) inside the same file, saved through a scratch
    folder of the output folder (outputs.OutputFolder.scratch): Keras writes only to a path."""
    with folder.scratch() as scratch:
        path = Path(scratch) / "model.keras"
        model.save(path)
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2, default=str))
        return path.read_bytes()


def load_with_metadata(path: str | os.PathLike) -> tuple[keras.Model, ModelMetadata]:
    """A saved model and its metadata; a damaged file, or a model whose shape its metadata does not
    describe, is one UserError line."""
    metadata = read_model_metadata(path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise UserError(f"model file {path} cannot be loaded: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None
    expected_input = (metadata.input_size, metadata.input_size, 3) if metadata.input_size else None
    if model.output_shape[-1] != metadata.max_age + 1 or (expected_input and tuple(model.input_shape[1:]) != expected_input):
        raise UserError(f"model file {path}: its metadata (max_age {metadata.max_age}, input size {metadata.input_size}) does not "
                        f"describe its network (input {model.input_shape[1:]}, output {model.output_shape[-1]}); it was edited or damaged")
    return model, metadata


def predict_years(model: keras.Model, inputs, mirrored_inputs=None, batch_size: int = 256) -> np.ndarray:
    """Year probabilities; averaged with those of the mirror images when given (test-time augmentation:
    faces are nearly symmetric, so the two views' errors partly cancel). `inputs` is an array of
    descriptors or a tf.data.Dataset of pixel batches (then the mirror view is made here)."""
    if isinstance(inputs, tf.data.Dataset):
        outputs = []
        for images in inputs:
            probabilities = model(images, training=False).numpy()
            if mirrored_inputs:
                probabilities = (probabilities + model(tf.reverse(images, axis=[2]), training=False).numpy()) / 2
            outputs.append(probabilities)
        return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]), np.float32)
    probabilities = model.predict(inputs, batch_size=batch_size, verbose=0)
    if mirrored_inputs is not None:
        probabilities = (probabilities + model.predict(mirrored_inputs, batch_size=batch_size, verbose=0)) / 2
    return probabilities


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def evaluate(year_probabilities: np.ndarray, true_ages, groups: AgeGroups, max_age: int, population_shares=None) -> dict:
    """Accuracy, one-off accuracy (within one adjacent group), macro-F1 and balanced accuracy over the
    groups present, accuracy weighted by a population's group shares (when given: what accuracy would
    be on people drawn from that population), per-group recall (None for a group with no test images),
    the confusion matrix (rows: true), and the MAE in years of the expected age."""
    true_ages = np.asarray(true_ages, float)
    classes = len(groups.labels)
    true_groups = np.array([groups.index_of(a) for a in true_ages])
    predicted = (year_probabilities @ group_matrix(groups, max_age)).argmax(axis=1)
    confusion = np.zeros((classes, classes), int)
    np.add.at(confusion, (true_groups, predicted), 1)
    recall, f1 = {}, []
    for index, label in enumerate(groups.labels):
        support, hits, predicted_count = confusion[index].sum(), confusion[index, index], confusion[:, index].sum()
        recall[label] = None if support == 0 else float(hits / support)
        if support:
            precision = hits / predicted_count if predicted_count else 0.0
            f1.append(0.0 if hits == 0 else float(2 * precision * recall[label] / (precision + recall[label])))
    present = [r for r in recall.values() if r is not None]
    weighted = None
    if population_shares is not None:
        shares = np.array([s if recall[label] is not None else 0.0 for label, s in zip(groups.labels, population_shares)])
        weighted = float(sum(s * (recall[label] or 0.0) for label, s in zip(groups.labels, shares)) / shares.sum())
    return {
        "images": int(len(true_groups)),
        "accuracy": float((predicted == true_groups).mean()),
        "one_off_accuracy": float((np.abs(predicted - true_groups) <= 1).mean()),
        "macro_f1": float(np.mean(f1)) if f1 else None,
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "population_weighted_accuracy": weighted,
        "mae_years": float(np.abs(expected_age(year_probabilities) - true_ages).mean()),
        "per_group_recall": recall,
        "groups_without_test_images": [label for label, value in recall.items() if value is None],
        "confusion_matrix": confusion.tolist(),
    }


def population_shares(target_csv: str | None, groups: AgeGroups, what: str = "target_csv") -> list[float] | None:
    """Group shares of the demographics stage's target CSV (group, share) when it is given; None, said
    in the log, when it is given but not there yet (run australian_population.ipynb)."""
    if not target_csv:
        return None
    if not Path(target_csv).exists():
        log.warning("%s %s not found (run australian_population.ipynb): no population-weighted figures", what, target_csv)
        return None
    table = read_metadata_csv(target_csv, what, required=("group", "share"))
    shares = pd.to_numeric(table["share"], errors="coerce")
    if list(table["group"]) != groups.labels or shares.isna().any() or (shares < 0).any() or shares.sum() <= 0:
        raise UserError(f"{what} {target_csv} does not hold a share for each configured group {groups.labels}")
    return shares.astype(float).tolist()
