"""What train_model.py stores inside a .keras file beside Keras' own files, and reading it back without
TensorFlow (prediction reads it before starting its worker pool, which must fork before TensorFlow
loads). The metadata is validated like a config: a model file whose metadata was edited or damaged is
one line naming the key, never a traceback. A face-features model also holds its head converted to
LiteRT (`LiteHead`): prediction then never imports TensorFlow, whose start-up costs seconds."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from agepipe.config.loading import validate_section
from agepipe.config.model_stages import AnswerRule, Descriptor
from agepipe.config.schema import AgeGroupEdges, Bounded, Faces, Section
from agepipe.data.age_groups import AgeGroups
from agepipe.errors import ConfigError, UserError

FACE_FEATURES, PIXELS = "face_features", "pixels"  # the backbone kinds (backbones.py)
METADATA_ENTRY = "agepipe.json"  # stored inside the .keras zip, beside Keras' own files
MAX_METADATA_BYTES = 10_000_000
LITE_HEAD_ENTRY = "agepipe_head.tflite"  # the same network as LiteRT runs it, beside it
MAX_LITE_HEAD_BYTES = 500_000_000
# The most numbers any one tensor of the head may hold for one input row (train_model.py's heads hold a
# few thousand): a shape edited in the file is refused before LiteRT allocates for it.
MAX_HEAD_TENSOR_ELEMENTS = 1_000_000


class SavedDescriptor(Descriptor):
    """The descriptor settings saved in a model, with the `faces` section its faces were found by."""

    faces: Faces

    @model_validator(mode="before")
    @classmethod
    def current_face_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and "faces" not in data:  # saved before one face path served every stage
            raise ValueError("saved by an earlier agepipe, whose faces were found another way: train it again")
        return data


class ModelMetadata(Section):
    """The metadata of a saved model: its age groups, its backbone and that backbone's settings, the
    training set's age mix, how its answers are read (rule, interval, calibration temperature), and the
    run record of the training that made it."""

    age_group_edges: list[Bounded(int, 0, 150)] = Field(min_length=2)
    labels: list[str]
    max_age: Bounded(int, 1, 130)
    backbone: str
    descriptor: SavedDescriptor | None
    input_size: Bounded(int, 16, 512) | None
    network: str | None = None
    lite_head_sha256: str | None = None  # the LiteRT head's digest: a head edited or damaged is never parsed
    training_group_shares: list[Bounded(float, 0, 1)]
    answer_rule: AnswerRule = "group_first"
    interval: Bounded(float, 0.05, 0.99) = 0.8
    temperature: Bounded(float, 0.01, 100) = 1.0
    config: dict[str, Any]
    python: str
    packages: dict[str, str | None]

    @model_validator(mode="before")
    @classmethod
    def legacy_backbone_names(cls, data: Any) -> Any:
        """Models saved before the backbone factory named their network where the kind now stands."""
        if isinstance(data, dict) and data.get("backbone") not in (FACE_FEATURES, PIXELS, None):
            old = data["backbone"]
            data = {**data, "backbone": FACE_FEATURES if old == "dlib_face_descriptor" else PIXELS}
            if data["backbone"] == PIXELS:
                data["network"] = old
        return data

    @model_validator(mode="after")
    def consistent(self) -> "ModelMetadata":
        AgeGroupEdges(edges=self.age_group_edges)  # increasing
        if self.labels != self.groups.labels:
            raise ValueError(f"labels {self.labels} are not those of the edges {self.age_group_edges}")
        if len(self.training_group_shares) != len(self.labels):
            raise ValueError("training_group_shares: expected one share per age group")
        if self.backbone not in (FACE_FEATURES, PIXELS):
            raise ValueError(f"backbone: expected {FACE_FEATURES} or {PIXELS}")
        if (self.backbone == FACE_FEATURES) != (self.descriptor is not None) or (self.backbone == PIXELS) != (
            self.input_size is not None
        ):
            raise ValueError("expected descriptor settings for face features, or an input size for pixels")
        return self

    @property
    def groups(self) -> AgeGroups:
        return AgeGroups(tuple(self.age_group_edges))


def read_model_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The metadata train_model.py stores inside a .keras file (read without TensorFlow), or UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.getinfo(METADATA_ENTRY).file_size > MAX_METADATA_BYTES:
                raise UserError(
                    f"model file {path} holds metadata of over {MAX_METADATA_BYTES:,} bytes: it was not saved by "
                    "train_model.py"
                )
            data = json.loads(archive.read(METADATA_ENTRY))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise UserError(f"model file {path} was not saved by train_model.py (no {METADATA_ENTRY} inside)") from None
    try:
        return validate_section(ModelMetadata, data, "metadata")
    except ConfigError as exc:
        raise UserError(f"model file {path} has damaged metadata: {exc}") from None


class LiteHead:
    """A model's network as LiteRT runs it, with Keras' `predict` call (a 2-D float array in, the
    output rows out), so that prediction can use either."""

    def __init__(self, content: bytes, outputs: int, origin: Path):
        # lite_head refuses a head whose digest is not the one saved; one crafted with its digest can still
        # crash LiteRT itself (a segmentation fault at allocation, past every check below): it is loaded and
        # run once in a forked child first, so most such files are one line, not a crash
        child = os.fork()
        if child == 0:
            try:
                self._load(content, outputs, origin)
            finally:
                os._exit(0)  # errors are the parent's to report, by the same checks
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):
            raise UserError(
                f"model file {origin} holds a {LITE_HEAD_ENTRY} that crashes LiteRT: it was edited or damaged"
            )
        self._load(content, outputs, origin)

    def _load(self, content: bytes, outputs: int, origin: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from agepipe.running.console import native_stderr_silenced

        try:
            with native_stderr_silenced():
                self._interpreter = Interpreter(model_content=content)
        except (ValueError, RuntimeError):
            raise UserError(
                f"model file {origin} holds a damaged {LITE_HEAD_ENTRY}: it was edited or damaged"
            ) from None
        self._origin = origin
        self._input, self._output = self._interpreter.get_input_details()[0], self._interpreter.get_output_details()[0]
        if tuple(self._output["shape"])[-1:] != (outputs,) or len(self._input["shape"]) != 2:
            raise UserError(
                f"model file {origin}: its {LITE_HEAD_ENTRY} does not give the {outputs} outputs its metadata describes"
            )
        for tensor in self._interpreter.get_tensor_details():
            # the shape as stored and its signature (-1: the batch) are separate fields: both are checked
            sizes = [int(d) for d in tensor["shape"]]
            signature = [int(d) for d in tensor.get("shape_signature", sizes)]
            elements = max(np.prod([max(d, 1) for d in dims], dtype=float) for dims in (sizes, signature))
            if any(d < -1 for d in sizes + signature) or elements > MAX_HEAD_TENSOR_ELEMENTS:
                raise UserError(
                    f"model file {origin}: its {LITE_HEAD_ENTRY} declares a tensor of shape {sizes}, beyond what "
                    "train_model.py writes: it was edited or damaged"
                )
        self._run(np.zeros((1, int(self._input["shape"][1])), np.float32))  # fails here, before any work

    def _run(self, batch: np.ndarray) -> np.ndarray:
        from agepipe.running.console import native_stderr_silenced

        try:
            with native_stderr_silenced():  # LiteRT announces its XNNPACK delegate when it first runs
                self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
                self._interpreter.allocate_tensors()
                self._interpreter.set_tensor(self._input["index"], batch)
                self._interpreter.invoke()
        except (ValueError, RuntimeError, IndexError):
            raise UserError(
                f"model file {self._origin} holds a {LITE_HEAD_ENTRY} LiteRT cannot run: it was edited or damaged"
            ) from None
        return self._interpreter.get_tensor(self._output["index"]).copy()

    def predict(self, inputs: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        outputs = [
            self._run(np.ascontiguousarray(inputs[start : start + batch_size], np.float32))
            for start in range(0, len(inputs), batch_size)
        ]
        return np.concatenate(outputs) if outputs else np.zeros((0, self._output["shape"][-1]), np.float32)


def lite_head(path: str | os.PathLike, metadata: ModelMetadata) -> LiteHead | None:
    """The LiteRT copy of the network a .keras file holds, or None when it holds none or its metadata
    records no digest of it (models saved before either existed, and pixel models, are run by Keras).
    A head whose bytes are not those its metadata records is one line before LiteRT reads any of it."""
    if metadata.lite_head_sha256 is None:
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if LITE_HEAD_ENTRY not in archive.namelist():
                return None
            if archive.getinfo(LITE_HEAD_ENTRY).file_size > MAX_LITE_HEAD_BYTES:
                raise UserError(f"model file {path} holds a {LITE_HEAD_ENTRY} of over {MAX_LITE_HEAD_BYTES:,} bytes")
            content = archive.read(LITE_HEAD_ENTRY)
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"model file {path} cannot be read as a .keras archive") from None
    if hashlib.sha256(content).hexdigest() != metadata.lite_head_sha256:
        raise UserError(
            f"model file {path} holds a {LITE_HEAD_ENTRY} other than the one saved: it was edited or damaged"
        )
    return LiteHead(content, metadata.max_age + 1, Path(path))
