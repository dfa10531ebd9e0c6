"""What every config model is made of, and the settings every stage shares (configs/common.yaml).

Unknown keys are errors (a typo in a threshold's name must not leave the real threshold at its old
value), types are strict (`true` is not a number, "5" is not an integer), bounds sit beside each
field, and rules that join fields are validators beside them. `agepipe.config.loading.load_config`
reads the common settings, the script's file and the `--set` overrides, validates them against a
model, and turns the first problem into one line naming the key path and what was wrong.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agepipe.config.loading import PROJECT, WORKSPACE

# A Dask scheduler's address: tcp://, a host name or address (IPv6 in brackets) and a port.
SCHEDULER_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


class Section(BaseModel):
    """A config section: exactly its fields, strictly typed, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)


def Bounded(kind: type, ge: float | None = None, le: float | None = None) -> Any:
    """An int or float with inclusive bounds."""
    return Annotated[kind, Field(ge=ge, le=le)]


Byte = Bounded(int, 0, 255)
# A file or folder: relative in a config file, to the workspace (the project folder unless `workspace`
# is set); typed on the command line, to the current folder (loading.resolve_paths).
WorkspacePath = Annotated[str, WORKSPACE]
# One of the project's own data files: relative to the project folder.
ProjectPath = Annotated[str, PROJECT]


# --------------------------------------------------------------------------------------------------
# configs/common.yaml: the settings every script shares
# --------------------------------------------------------------------------------------------------
class AgeGroupEdges(Section):
    edges: list[Bounded(int, 0, 150)] = Field(min_length=2)
    """Lower edge of each age group; the last group is open: [0, 10, 70] gives 0-9, 10-69, 70+."""

    @field_validator("edges")
    @classmethod
    def increasing(cls, edges: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError("expected the lower edges in increasing order")
        return edges


class OrderedRange(Section):
    """A section with `min` and `max` fields (declared by each subclass, with its bounds): min < max."""

    @model_validator(mode="after")
    def ordered(self):
        if self.min >= self.max:
            raise ValueError(f"expected min < max, got min {self.min} and max {self.max}")
        return self


class AgeRange(OrderedRange):
    min: Bounded(int, 0, 150)
    """The youngest age that is a plausible label."""
    max: Bounded(int, 0, 150)
    """The oldest plausible label; ages outside min-max are labelling errors (the row is kept, unlabelled)."""


class PoseJitter(Section):
    """Random changes of a face's pose, each drawn uniformly up to its maximum either way: one model, and
    one set of names, for the sample generator's faces and every augmentation."""

    max_rotation_degrees: Bounded(float, 0, 30)
    """Largest rotation either way."""
    max_scale_change: Bounded(float, 0, 0.5)
    """Largest zoom in or out, as a share."""
    max_shift_fraction: Bounded(float, 0, 0.3)
    """Largest shift, as a share of width and height."""


class Jitter(PoseJitter):
    """Random changes of pose and tone, each drawn uniformly up to its maximum either way."""

    max_brightness_shift: Bounded(float, 0, 0.5)
    """Largest brightness change, as a share of the full range."""
    max_contrast_change: Bounded(float, 0, 0.9)
    """Largest contrast change, as a share."""


class DetectorParameters(Section):
    min_score: Bounded(float, 0, 1)
    """Detections scoring less are not faces."""
    iou_threshold: Bounded(float, 0, 1)
    """Overlapping detections beyond this are one face."""
    border_fraction: Bounded(float, 0, 1)
    """Margin added around the image, as a share of its longer side."""


class Faces(Section):
    """How every stage finds and aligns a face (agepipe/faces/alignment.py)."""

    detector: DetectorParameters
    """BlazeFace's settings."""
    tile_levels: Bounded(int, 0, 4)
    """Besides the whole image: squares of its shorter side (1), and of half that (2)..."""
    retry_border_fraction: Bounded(float, 0, 2)
    """An image where nothing was found is searched again inside a margin of this share of its longer side."""
    box_scale: Bounded(float, 0.5, 4)
    """Landmarks are searched in a square this many times the detected face box."""
    min_eye_distance: Bounded(float, 0, 1)
    """Landmarks with eyes closer than this share of the face width are implausible."""
    max_roll_degrees: Bounded(float, 0, 90)
    """Landmarks whose eye line tilts more than this are implausible."""
    on_no_landmarks: Literal["square", "skip"]
    """'square': cut a face without plausible landmarks as its square, unaligned; 'skip': leave it out."""
    min_face_pixels: Bounded(int, 0, 100_000)
    """A face narrower than this is too small to judge."""


class FileLimitsSection(Section):
    """What any stage reads of an image file at most (image_files.FileLimits)."""

    max_pixels: Bounded(int, 1)
    """Images whose header claims more pixels are refused before decoding (decompression bombs)."""
    max_file_mb: Bounded(float, 0.001)
    """Larger files are refused, not read."""


class Common(Section):
    workspace: WorkspacePath | None
    """Where every stage writes, and where relative paths in config files point (null: the project folder)."""
    age_groups: AgeGroupEdges
    """The age groups of every stage."""
    age_range: AgeRange
    """Plausible ages."""
    num_workers: Bounded(int, 0)
    """Worker processes for image work; 0: every core."""
    scheduler: str
    """Where image work runs: 'local' (this machine's process pool) or a Dask scheduler address (tcp://host:8786)."""
    scheduler_timeout_seconds: Bounded(float, 0.1)
    """Seconds to wait for the Dask scheduler before stopping with one line."""
    overwrite_output: bool
    """Allow writing into a non-empty output folder agepipe did not create (nothing of yours is ever replaced)."""
    chunk_files: Bounded(int, 1)
    """Files per chunk, the unit of work: one Dask task; in exploration also one part file of measurements."""
    task_timeout_seconds: Bounded(float, 0.1)
    """Seconds one image may take in a worker before it gets a row saying so."""
    descriptor_cache: WorkspacePath
    """Face descriptors cached by image content, shared by training, prediction and the label check."""
    exclude_suspected_labels: bool
    """Resampling and training leave out the rows check_labels.py suspects of a wrong age label."""
    faces: Faces
    """How every stage finds and aligns faces."""
    file_limits: FileLimitsSection
    """The largest image file, and image, any stage reads."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    """DEBUG, INFO, WARNING or ERROR."""

    @field_validator("scheduler")
    @classmethod
    def local_or_address(cls, scheduler: str) -> str:
        if scheduler != "local" and not SCHEDULER_ADDRESS.fullmatch(scheduler):
            raise ValueError(
                "expected 'local' or a Dask scheduler address such as tcp://host:8786 (a host and a port; "
                "agepipe connects over tcp:// only)"
            )
        return scheduler
