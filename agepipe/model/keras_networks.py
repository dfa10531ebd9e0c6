"""The Keras side of the age model: the networks (a head on face descriptors, or a network on pixels),
the pixel input pipeline with its augmentation (one decoding function, `load_pixels`, for training and
prediction), prediction with the mirror view, and saving and loading a model with its metadata inside.

Every network predicts a distribution over single years 0..max_age; estimates.py turns it into
the answers users read. TensorFlow loads when this module is imported: scripts import it after their
worker pools have forked (TensorFlow is not fork-safe), and its start-up chatter is silenced.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

from agepipe.config.model_stages import FaceFeaturesBackbone, PixelsBackbone, TrainingAugmentation
from agepipe.data.age_groups import AgeGroups
from agepipe.errors import UserError
from agepipe.model.saved_models import LITE_HEAD_ENTRY, METADATA_ENTRY, ModelMetadata, read_model_metadata
from agepipe.running.console import native_stderr_silenced

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
with native_stderr_silenced():
    import keras
    import tensorflow as tf

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from agepipe.data.image_files import FileLimits, read_image  # noqa: E402
from agepipe.model.estimates import group_matrix  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Pixel input: one decoding function for training and prediction
# --------------------------------------------------------------------------------------------------
def load_pixels(path: str, size: int, limits: FileLimits) -> np.ndarray:
    """An image file as a size x size x 3 RGB uint8 array (area-resampled), the way training and
    prediction both see it. Raises image_files.UnreadableImage with the reason."""
    bgr, _ = read_image(path, limits.max_pixels, limits.max_file_bytes)
    return np.ascontiguousarray(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[..., ::-1])


def pixel_dataset(
    paths,
    size: int,
    batch_size: int,
    limits: FileLimits,
    *,
    targets=None,
    weights=None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    cache: str | None = None,
    augment: keras.Sequential | None = None,
) -> tf.data.Dataset:
    """Images of `paths` decoded by `load_pixels` in parallel, batched as float32 0-255, with their
    `targets` (and sample `weights`) when given; shuffled with `shuffle_buffer`, augmented with `augment`.

    `cache`: a file path caches the small decoded images on disk, so memory stays flat however large the
    dataset; "" caches in memory; None not at all."""

    def decode(path):
        return load_pixels(path.decode(), size, limits)

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
            keras.layers.RandomZoom(config.max_scale_change, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomTranslation(
                config.max_shift_fraction, config.max_shift_fraction, fill_mode="reflect", seed=seed + 3
            ),
            keras.layers.RandomBrightness(config.max_brightness_shift, value_range=(0, 255), seed=seed + 4),
            keras.layers.RandomContrast(config.max_contrast_change, seed=seed + 5),
        ],
        name="augmentation",
    )


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="agepipe")
class AgeNetworkAnswer(keras.layers.Layer):
    """The pretrained age network's own answer, read from the descriptor: its log-probabilities over
    `classes` ages (columns `first` on) as a distribution over the years 0..max_age, its last class (the
    age network's "classes - 1 and over") spread evenly over the years from there."""

    def __init__(self, first: int, classes: int, max_age: int, **kwargs):
        super().__init__(**kwargs)
        self.first, self.classes, self.max_age = first, classes, max_age
        to_years = np.zeros((classes, max_age + 1), np.float32)
        to_years[np.arange(classes - 1), np.arange(classes - 1)] = 1
        to_years[classes - 1, classes - 1 :] = 1 / (max_age + 2 - classes)
        self.to_years = to_years

    def call(self, descriptor):
        logits = descriptor[:, self.first : self.first + self.classes]
        return keras.ops.matmul(keras.ops.softmax(logits, axis=-1), self.to_years)

    def get_config(self):
        return {**super().get_config(), "first": self.first, "classes": self.classes, "max_age": self.max_age}


def build_descriptor_model(
    config: FaceFeaturesBackbone,
    max_age: int,
    mean: np.ndarray,
    variance: np.ndarray,
    age_columns: tuple[int, int] | None = None,
) -> keras.Model:
    """A Keras head on face descriptors: standardise, `head_units` dense layers with dropout, softmax
    over years. `ensemble` > 1 builds that many independently initialised heads and averages their
    outputs (one model, one file). With the age network's columns (`age_columns`: first, count) and an
    `age_network_share`, that share of every answer is the pretrained age network's own (the head,
    trained through the mix, learns what to add to it): it has seen far more kinds of faces than any
    training set, and keeps answers sound where the head's training faces were unlike the user's."""
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
    share = config.age_network_share
    if age_columns is not None and share > 0:
        pretrained = AgeNetworkAnswer(*age_columns, max_age, name="age_network_answer")(inputs)
        outputs = keras.layers.Add(name="mixed_years")(
            [
                keras.layers.Rescaling(1 - share, name="head_share")(outputs),
                keras.layers.Rescaling(share, name="age_network_share")(pretrained),
            ]
        )
    return keras.Model(inputs, outputs, name="age_from_face_descriptor")


def build_pixel_model(config: PixelsBackbone, max_age: int) -> keras.Model:
    """Raw 0-255 RGB pixels in, a distribution over years out.

    `network: cnn` is a compact VGG-style network defined here: per stage `convs_per_stage` 3x3
    convolutions with batch normalisation, then pooling; global average pooling, dropout and a softmax.
    Any other value names a keras.applications model whose `weights` is a local weights file or null.
    """
    size = config.image_size
    inputs = keras.Input((size, size, 3), name="image")
    if config.network == "cnn":
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
        application = getattr(keras.applications, config.network, None)
        if application is None:
            raise UserError(f"model.pixels.network: {config.network!r} is neither 'cnn' nor a keras.applications model")
        backbone = application(include_top=False, weights=config.weights, input_shape=(size, size, 3), pooling="avg")
        preprocess = getattr(keras.applications, _application_module(config.network)).preprocess_input
        x = backbone(preprocess(inputs))
    x = keras.layers.Dropout(config.dropout)(x)
    outputs = keras.layers.Dense(max_age + 1, activation="softmax", name="years")(x)
    return keras.Model(inputs, outputs, name="age_from_pixels")


def _application_module(name: str) -> str:
    """keras.applications.MobileNetV3Small's preprocess_input lives in keras.applications.mobilenet_v3."""
    module = getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]
    if not hasattr(getattr(keras.applications, module, None), "preprocess_input"):
        raise UserError(f"model.pixels.network: cannot find the preprocessing of {name}")
    return module


def model_bytes(model: keras.Model, metadata: dict, folder, lite: bool = False) -> bytes:
    """The model in the native .keras format with `metadata` (age groups, backbone and its settings,
    input size, training age mix, the resolved config) inside the same file, and with `lite` the
    network converted to LiteRT too (saved_models.LiteHead), saved through a scratch folder of the
    output folder (output_guard.OutputFolder.scratch): Keras writes only to a path."""
    with folder.scratch() as scratch:
        path = Path(scratch) / "model.keras"
        model.save(path)
        head = lite_bytes(model) if lite else None
        if head is not None:
            metadata = {**metadata, "lite_head_sha256": hashlib.sha256(head).hexdigest()}
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2, default=str))
            if head is not None:
                archive.writestr(LITE_HEAD_ENTRY, head)
        return path.read_bytes()


def lite_bytes(model: keras.Model) -> bytes:
    """The network as a LiteRT flat buffer (float32, the same numbers to about 1e-6). The converter
    prints where it saved its intermediate model and logs from C++: neither is for the user."""
    with contextlib.redirect_stdout(io.StringIO()), native_stderr_silenced():
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def load_with_metadata(path: str | os.PathLike) -> tuple[keras.Model, ModelMetadata]:
    """A saved model and its metadata; a damaged file, or a model whose shape its metadata does not
    describe, is one UserError line."""
    metadata = read_model_metadata(path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        raise UserError(
            f"model file {path} cannot be loaded: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        ) from None
    expected_input = (metadata.input_size, metadata.input_size, 3) if metadata.input_size else None
    if model.output_shape[-1] != metadata.max_age + 1 or (
        expected_input and tuple(model.input_shape[1:]) != expected_input
    ):
        raise UserError(
            f"model file {path}: its metadata (max_age {metadata.max_age}, input size {metadata.input_size}) does not "
            f"describe its network (input {model.input_shape[1:]}, output {model.output_shape[-1]}); it was edited "
            "or damaged"
        )
    return model, metadata


def predict_years(model: keras.Model, images: tf.data.Dataset, mirrored: bool = False) -> np.ndarray:
    """Year probabilities of a dataset of pixel batches; with `mirrored`, averaged with those of the
    mirror images (test-time augmentation: faces are nearly symmetric, so the two views' errors
    partly cancel)."""
    outputs = []
    for batch in images:
        probabilities = model(batch, training=False).numpy()
        if mirrored:
            probabilities = (probabilities + model(tf.reverse(batch, axis=[2]), training=False).numpy()) / 2
        outputs.append(probabilities)
    return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]), np.float32)
