"""The age model's backbones: what an image becomes before the network that predicts a distribution over
years sees it. One interface, two kinds, so that train_model.py and predict_age.py hold no branch on
the kind (`backbone_for` makes the one a config or a saved model names):

- `FaceFeatures` (the default): the faces are found and described once by pretrained networks
  (describer.py: dlib's descriptor and the age network, cached by content), and a small Keras
  head learns the age from those numbers;
- `Pixels`: the whole image, resized, goes through a network trained here (a compact CNN, or any
  keras.applications model), with the same decoding (keras_networks.load_pixels) in training and prediction.

`prepare` runs before TensorFlow is imported (it may start a worker pool, which must fork first); the
other methods import age_model, and with it TensorFlow, when they are called, except the face
features' `load` and `predict` of a model holding a LiteRT copy of its head (saved_models.LiteHead).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
import pandas as pd

from agepipe.data.image_files import FileLimits, UnreadableImage, read_image
from agepipe.faces.alignment import FaceSettings
from agepipe.faces.describer import AGE_CLASSES, DESCRIPTOR_SIZE, DescriptorSettings, ImageFaces
from agepipe.faces.descriptor_cache import DescriptorCache, content_hash, describe_files
from agepipe.model.saved_models import FACE_FEATURES, PIXELS, lite_head
from agepipe.running.console import progress_bar
from agepipe.running.parallel import Engine, batched_lists
from agepipe.running.resume import json_line, json_table

BOX_COLUMNS = ["face_x", "face_y", "face_width", "face_height"]
IMAGE, MIRROR = "image", "mirror"  # the views prediction describes a face in (faces/views.py)


class FaceFeatures:
    """Pretrained face descriptors and a Keras head on them (config section `model.face_features`)."""

    kind = FACE_FEATURES
    lite = True  # train_model.py stores a LiteRT copy of the head: prediction runs without TensorFlow

    def __init__(
        self, descriptor: DescriptorSettings, limits: FileLimits, head=None, training_views: tuple[str, ...] = ()
    ):
        self.descriptor, self.limits, self.head, self.training_views = descriptor, limits, head, training_views

    def prepare(
        self, rows: pd.DataFrame, engine: Engine, cache: Path, all_faces: bool = False, training: bool = False
    ) -> pd.DataFrame:
        """`rows` (one per image, with `path`) as one row per face described, with `inputs` (the
        descriptor, views x numbers, or None), `problem`, `faces_found` and the face's box. An image
        without a face described keeps one row, with the reason. In `training`, each face is also
        described in the training views, after the views prediction uses."""
        views = self.descriptor.views + (self.training_views if training else ())
        settings = dataclasses.replace(self.descriptor, all_faces=all_faces, views=views)
        return _face_rows(rows, describe_files(list(rows["path"]), settings, cache, engine, self.limits), all_faces)

    def prepare_batches(
        self,
        images: Iterable[dict],
        engine: Engine,
        cache: Path,
        spool: TextIO,
        batch_rows: int,
        all_faces: bool = False,
    ) -> Iterator[pd.DataFrame]:
        """`prepare`'s rows for a stream of images (dicts with `path`), `batch_rows` images at a time,
        with memory that does not grow with their number: each image goes to `spool` (an empty
        temporary file) with its content hash, every image not in the cache is described, and only
        then, batch by batch, are the descriptions read back. Every image is described when this
        returns (the pool has come and gone before TensorFlow is imported)."""
        cached = DescriptorCache(cache, dataclasses.replace(self.descriptor, all_faces=all_faces))
        todo, count = {}, 0
        for image in progress_bar(None, "listing images")(images):
            digest = content_hash(image["path"], self.limits.max_file_bytes)
            if digest and not cached.has(digest):
                todo.setdefault(digest, image["path"])
            spool.write(json_line({**image, DIGEST: digest}))
            count += 1
        cached.describe(todo.items(), len(todo), engine, self.limits)
        del todo
        spool.seek(0)
        chunks = (json_table([json.loads(line) for line in lines]) for lines in batched_lists(spool, batch_rows))
        return (
            _face_rows(rows.drop(columns=DIGEST), cached.images(list(rows[DIGEST])), all_faces)
            for rows in progress_bar(-(-count // batch_rows), "answering", unit="chunk")(chunks)
        )

    def build(self, train_inputs: np.ndarray, max_age: int):
        from agepipe.model.keras_networks import build_descriptor_model

        views = _views(train_inputs)
        stacked = np.concatenate(views)
        settings = self.descriptor
        age_columns = (
            (DESCRIPTOR_SIZE * (settings.face_descriptor != "none"), AGE_CLASSES) if settings.age_network else None
        )
        return build_descriptor_model(self.head, max_age, stacked.mean(axis=0), stacked.var(axis=0) + 1e-6, age_columns)

    def single(self) -> "FaceFeatures":
        """The same backbone with one head instead of an ensemble: for the many networks of a calibration."""
        return FaceFeatures(
            self.descriptor, self.limits, self.head.model_copy(update={"ensemble": 1}), self.training_views
        )

    def look_alikes(self, rows: pd.DataFrame, folds: int, seed: int) -> np.ndarray | None:
        """A fold number per row: clusters of look-alike faces (k-means on each source image's description,
        standardised; its augmented copies follow it), for a calibration on faces unlike those a network
        trained on. None when there are too few faces for `folds` clusters."""
        from scipy.cluster.vq import kmeans2

        sources = rows.drop_duplicates("source")
        first = _views(sources["inputs"])[0]
        if len(first) < 2 * folds:
            return None
        standardised = (first - first.mean(axis=0)) / (first.std(axis=0) + 1e-6)
        _, cluster = kmeans2(standardised.astype(np.float64), folds, seed=seed, minit="++")
        if len(np.unique(cluster)) < folds:
            return None
        return rows["source"].map(dict(zip(sources["source"], cluster))).to_numpy()

    def fit_data(
        self,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        targets,
        weights,
        batch: int,
        seed: int,
        scratch: str,
        replicas: int = 1,
    ) -> tuple[dict, int]:
        """model.fit's arguments and the steps per epoch: each view of a training face (the image, its
        mirror image, the training views) is a training sample. With several replicas, each array is cut
        to a multiple of their number (at most replicas - 1 samples): a last batch they cannot share
        evenly stops tf.distribute."""
        views = _views(train["inputs"])
        x = np.concatenate(views)
        y = np.tile(targets(train["age"]), (len(views), 1))
        w = None if weights is None else np.tile(weights, len(views))
        even = len(x) - len(x) % replicas
        data = dict(
            x=x[:even], y=y[:even], sample_weight=None if w is None else w[:even], batch_size=batch, shuffle=True
        )
        if len(validation):
            held_out = len(validation) - len(validation) % replicas
            data["validation_data"] = (
                _views(validation["inputs"])[0][:held_out],
                targets(validation["age"])[:held_out],
            )
        return data, int(np.ceil(even / batch))

    def predict(self, model, rows: pd.DataFrame, flip: bool, batch: int) -> np.ndarray:
        """Year probabilities of each row's face, averaged over its views with `flip` (a Keras model
        or a saved_models.LiteHead: both `predict`)."""
        views = _views(rows["inputs"])
        probabilities = model.predict(views[0], batch_size=batch, verbose=0)
        if flip and MIRROR in self.descriptor.views:
            mirrored = model.predict(views[self.descriptor.views.index(MIRROR)], batch_size=batch, verbose=0)
            probabilities = (probabilities + mirrored) / 2
        return probabilities

    def load(self, path: Path, metadata):
        """The saved model to predict with: its LiteRT copy when it holds one (no TensorFlow), else Keras."""
        head = lite_head(path, metadata)
        return head if head is not None else _keras_model(path)

    def metadata(self) -> dict:
        settings = self.descriptor
        descriptor = {
            "faces": settings.faces.as_config(),
            "padding": settings.padding,
            "mirrored": MIRROR in settings.views,
            "face_descriptor": settings.face_descriptor,
            "age_network": settings.age_network,
            "age_probability_floor": settings.age_probability_floor,
            "training_views": list(self.training_views),
        }
        return {"backbone": self.kind, "descriptor": descriptor, "input_size": None, "network": None}


class Pixels:
    """A network on the image's pixels, trained here (config section `model.pixels`)."""

    kind = PIXELS
    lite = False

    def __init__(self, settings, limits: FileLimits):
        self.settings, self.limits = settings, limits

    def prepare(
        self,
        rows: pd.DataFrame,
        engine: Engine,
        cache: Path | None = None,
        all_faces: bool = False,
        training: bool = False,
    ) -> pd.DataFrame:
        """`rows` with `inputs` (the path of each image that decodes, checked once now: a bad file inside
        TensorFlow's pipeline would stop it) and `problem`."""
        problems = {}
        for path in rows["path"].unique():
            try:
                read_image(path, self.limits.max_pixels, self.limits.max_file_bytes)
            except UnreadableImage as exc:
                problems[path] = f"unreadable: {exc}"
        return rows.assign(
            inputs=[None if p in problems else p for p in rows["path"]],
            problem=[problems.get(p) for p in rows["path"]],
            faces_found=None,
            **{column: None for column in BOX_COLUMNS},
        ).reset_index(drop=True)

    def prepare_batches(
        self,
        images: Iterable[dict],
        engine: Engine,
        cache: Path | None,
        spool: TextIO,
        batch_rows: int,
        all_faces: bool = False,
    ) -> Iterator[pd.DataFrame]:
        """`prepare`'s rows for a stream of images, `batch_rows` at a time (nothing to describe first)."""
        return (self.prepare(pd.DataFrame(batch), engine) for batch in batched_lists(images, batch_rows))

    def look_alikes(self, rows: pd.DataFrame, folds: int, seed: int) -> None:
        """None: pixels give no cheap measure of which faces look alike (the validation split calibrates)."""
        return None

    def build(self, train_inputs, max_age: int):
        from agepipe.model.keras_networks import build_pixel_model

        return build_pixel_model(self.settings, max_age)

    def fit_data(
        self,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        targets,
        weights,
        batch: int,
        seed: int,
        scratch: str,
        replicas: int = 1,
    ) -> tuple[dict, int]:
        from agepipe.model.keras_networks import augmentation_layers, pixel_dataset

        settings = self.settings
        augment = augmentation_layers(settings.augmentation, seed) if settings.augmentation.enabled else None
        cache_to = {"disk": str(Path(scratch) / "train"), "memory": "", "none": None}[settings.cache]
        data = dict(
            x=pixel_dataset(
                train["inputs"],
                settings.image_size,
                batch,
                self.limits,
                targets=targets(train["age"]),
                weights=weights,
                shuffle_buffer=settings.shuffle_buffer,
                seed=seed,
                cache=cache_to,
                augment=augment,
            ),
            shuffle=False,
        )  # the dataset shuffles itself, seeded
        if len(validation):
            data["validation_data"] = pixel_dataset(
                validation["inputs"], settings.image_size, batch, self.limits, targets=targets(validation["age"])
            )
        return data, int(np.ceil(len(train) / batch))

    def predict(self, model, rows: pd.DataFrame, flip: bool, batch: int) -> np.ndarray:
        from agepipe.model.keras_networks import pixel_dataset, predict_years

        pixels = pixel_dataset(rows["inputs"], self.settings.image_size, batch, self.limits)
        return predict_years(model, pixels, mirrored=flip)

    def load(self, path: Path, metadata):
        return _keras_model(path)

    def metadata(self) -> dict:
        return {
            "backbone": self.kind,
            "descriptor": None,
            "input_size": self.settings.image_size,
            "network": self.settings.network,
        }


def descriptor_settings(descriptor, faces) -> DescriptorSettings:
    """The settings prediction describes a face with: a `model.descriptor` config section (or a saved
    model's copy) and the `faces` section it finds and aligns faces by."""
    views = (IMAGE, MIRROR) if descriptor.mirrored else (IMAGE,)
    return DescriptorSettings(
        FaceSettings.from_config(faces),
        descriptor.padding,
        views,
        descriptor.face_descriptor,
        descriptor.age_network,
        descriptor.age_probability_floor,
    )


def backbone_for(config) -> FaceFeatures | Pixels:
    """The backbone a training config's `model` section names (its faces found by the config's `faces`,
    its files read within the config's `file_limits`)."""
    limits = FileLimits.from_config(config.file_limits)
    if config.model.backbone == FACE_FEATURES:
        section = config.model.face_features
        descriptor = descriptor_settings(section.descriptor, config.faces)
        return FaceFeatures(descriptor, limits, section, tuple(section.descriptor.training_views))
    return Pixels(config.model.pixels, limits)


def saved_backbone(metadata, limits: FileLimits) -> FaceFeatures | Pixels:
    """The backbone a saved model was trained with (saved_models.ModelMetadata), for prediction of files
    within `limits` (the prediction config's)."""
    if metadata.backbone == FACE_FEATURES:
        return FaceFeatures(descriptor_settings(metadata.descriptor, metadata.descriptor.faces), limits)
    return Pixels(SavedPixels(metadata.network, metadata.input_size), limits)


@dataclasses.dataclass
class SavedPixels:
    """What prediction needs of a pixel backbone's settings."""

    network: str
    image_size: int


def _keras_model(path: Path):
    from agepipe.model.keras_networks import load_with_metadata

    return load_with_metadata(path)[0]


def _face_rows(rows: pd.DataFrame, described: list[ImageFaces], all_faces: bool) -> pd.DataFrame:
    """`rows` (one per image) as one row per described face (see FaceFeatures.prepare)."""
    out = []
    for position, image in enumerate(described):
        faces = image.faces if all_faces else image.faces[:1]
        for face_index, face in enumerate(faces or [None]):
            box = face.box if face is not None and face.box is not None else (None,) * 4
            out.append(
                {
                    "_row": position,
                    "face": face_index if face is not None else None,
                    "faces_found": image.found,
                    "inputs": None if face is None else face.vector,
                    "problem": (image.problem if face is None else face.problem),
                    **dict(zip(BOX_COLUMNS, box)),
                }
            )
    faces = pd.DataFrame(out)
    return rows.iloc[faces["_row"]].reset_index(drop=True).assign(**faces.drop(columns="_row"))


DIGEST = "_content_hash"  # a spooled image's content hash, its key in the descriptor cache


def _views(inputs) -> list[np.ndarray]:
    """Descriptors (images x views x numbers) as one array per view."""
    stacked = np.stack(list(inputs))
    return [stacked[:, v] for v in range(stacked.shape[1])]
