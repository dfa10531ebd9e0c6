"""The models of the YAML files in configs/: one pydantic model per file, every section a model too.

Unknown keys are errors (a typo in a threshold's name must not leave the real threshold at its old
value), types are strict (`true` is not a number, "5" is not an integer), bounds sit beside each
field, and rules that join fields are validators beside them. `utils.load_config` reads the common
settings, the script's file and the `--set` overrides, validates them against a model, and turns the
first problem into one line naming the key path and what was wrong.

Settings that depend on code registries (each metric's parameters, each repair's) are validated
against those registries' own models by the loaders that know them (`image_reader.load_explore_config`,
`process_images.load_process_config`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config import PROJECT, WORKSPACE


class Section(BaseModel):
    """A config section: exactly its fields, strictly typed, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def Bounded(kind: type, ge: float | None = None, le: float | None = None) -> Any:
    """An int or float with inclusive bounds."""
    return Annotated[kind, Field(ge=ge, le=le)]


Byte = Bounded(int, 0, 255)
# A file or folder: relative in a config file, to the workspace (the project folder unless `workspace`
# is set); typed on the command line, to the current folder (config.resolve_paths).
WorkspacePath = Annotated[str, WORKSPACE]
# One of the project's own data files: relative to the project folder.
ProjectPath = Annotated[str, PROJECT]


# --------------------------------------------------------------------------------------------------
# configs/common.yaml: the settings every script shares
# --------------------------------------------------------------------------------------------------
class AgeGroupEdges(Section):
    edges: list[Bounded(int, 0, 150)] = Field(min_length=2)

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
    max: Bounded(int, 0, 150)


class Common(Section):
    workspace: WorkspacePath | None
    age_groups: AgeGroupEdges
    age_range: AgeRange
    num_workers: Bounded(int, 0)
    scheduler: str
    scheduler_timeout_seconds: Bounded(float, 0.1)
    overwrite_output: bool
    chunk_files: Bounded(int, 1)
    task_timeout_seconds: Bounded(float, 0.1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]

    @field_validator("scheduler")
    @classmethod
    def local_or_address(cls, scheduler: str) -> str:
        if scheduler != "local" and "://" not in scheduler:
            raise ValueError("expected 'local' or a Dask scheduler address such as tcp://host:8786")
        return scheduler


# --------------------------------------------------------------------------------------------------
# configs/explore_images.yaml
# --------------------------------------------------------------------------------------------------
class Labels(Section):
    source: Literal["filename", "csv"]
    csv_path: WorkspacePath | None
    file_column: str
    age_column: str

    @model_validator(mode="after")
    def csv_needs_a_path(self) -> "Labels":
        if self.source == "csv" and not self.csv_path:
            raise ValueError("expected csv_path when source is 'csv', got null")
        return self


class ImageLimits(Section):
    max_pixels: Bounded(int, 1)
    max_file_mb: Bounded(float, 0.001)
    max_aspect_ratio: Bounded(float, 1)
    analysis_side: Bounded(int, 16, 4096)


class CheckRule(Section):
    """Flag an image whose `metric` is below `below` or above `above` (every metric is >= 0)."""

    metric: str
    below: Bounded(float, 0) | None
    above: Bounded(float, 0) | None

    @model_validator(mode="after")
    def has_a_threshold(self) -> "CheckRule":
        if self.below is None and self.above is None:
            raise ValueError("expected a 'below' or an 'above' threshold, got neither")
        return self


class Duplicates(Section):
    enabled: bool
    max_hash_distance: Bounded(int, 0, 64)
    max_age_difference: Bounded(int, 0)


class ExploreConfig(Common):
    dataset_dir: WorkspacePath
    output_csv: WorkspacePath
    summary_csv: WorkspacePath
    labels: Labels
    images: ImageLimits
    metrics: dict[str, dict[str, Any] | None]  # name -> parameters, checked against each metric's own model
    checks: dict[str, CheckRule]
    duplicates: Duplicates

    @field_validator("metrics")
    @classmethod
    def empty_parameters(cls, metrics: dict) -> dict:
        return {name: params or {} for name, params in metrics.items()}

    @model_validator(mode="after")
    def duplicates_need_the_hash(self) -> "ExploreConfig":
        if self.duplicates.enabled and "phash" not in self.metrics:
            raise ValueError("duplicates.enabled needs the phash metric in metrics")
        return self


# --------------------------------------------------------------------------------------------------
# configs/process_images.yaml
# --------------------------------------------------------------------------------------------------
class Retry(Section):
    attempts: Bounded(int, 1, 20)
    strength_factor: Bounded(float, 1.0, 10.0)


class DenoiseParameters(Section):
    strength: Bounded(float, 0.01, 20)
    template_window: Bounded(int, 3, 21)
    search_window: Bounded(int, 3, 51)


class ExposureParameters(Section):
    target_brightness: Bounded(float, 1, 254)


class ContrastParameters(Section):
    target_contrast: Bounded(float, 1, 128)


class TextureParameters(Section):
    clip_limit: Bounded(float, 0.1, 40)
    tile_grid: Bounded(int, 1, 64)


class SharpenParameters(Section):
    amount: Bounded(float, 0.01, 20)
    radius: Bounded(float, 0.1, 20)


# The parameters each repair operation may be given in `repairs:` (noise_sigma comes from the image).
REPAIR_PARAMETERS = {"denoise": DenoiseParameters, "adjust_exposure": ExposureParameters, "stretch_contrast": ContrastParameters,
                     "enhance_texture": TextureParameters, "sharpen": SharpenParameters}


class ProcessConfig(Common):
    input_csv: WorkspacePath
    explore_config: ProjectPath
    output_dir: WorkspacePath
    output_csv: WorkspacePath
    resize: Bounded(int, 16, 4096) | None
    jpeg_quality: Bounded(int, 1, 100)
    repairs: dict[str, dict[str, dict[str, Any]]]  # check -> operation -> parameters, checked against REPAIRS
    retry: Retry


# --------------------------------------------------------------------------------------------------
# configs/visualize_image_information.yaml
# --------------------------------------------------------------------------------------------------
class FigureSettings(Section):
    width_inches: Bounded(float, 2, 40)
    height_inches: Bounded(float, 2, 40)
    dpi: Bounded(int, 30, 600)
    bins: Bounded(int, 5, 500)
    log_scale_span: Bounded(float, 1)


class Grids(Section):
    columns: Bounded(int, 1, 20)
    rows: Bounded(int, 1, 20)
    thumbnail_pixels: Bounded(int, 16, 512)
    checks: list[str]


class BeforeAfter(Section):
    pairs: Bounded(int, 1, 50)
    columns: Bounded(int, 2, 20)


class VisualizeConfig(Common):
    exploration_csv: WorkspacePath
    processed_csv: WorkspacePath | None
    explore_config: ProjectPath
    output_dir: WorkspacePath
    formats: list[Literal["png", "svg"]] = Field(min_length=1)
    figure: FigureSettings
    distributions: list[str]
    by_age_group: list[str]
    grids: Grids
    before_after: BeforeAfter


# --------------------------------------------------------------------------------------------------
# configs/resampling.yaml (both notebooks)
# --------------------------------------------------------------------------------------------------
class QualityScore(Section):
    metric: str
    higher_is_better: bool


class ResamplingAugmentation(Section):
    flip_probability: Bounded(float, 0, 1)
    max_rotation_degrees: Bounded(float, 0, 30)
    max_scale_change: Bounded(float, 0, 0.5)
    max_shift_fraction: Bounded(float, 0, 0.3)
    max_brightness_shift: Bounded(float, 0, 0.5)
    max_contrast_change: Bounded(float, 0, 0.9)
    max_gamma_change: Bounded(float, 0, 0.9)
    blur_probability: Bounded(float, 0, 1)
    max_blur_sigma: Bounded(float, 0, 5)
    noise_probability: Bounded(float, 0, 1)
    max_noise_sigma: Bounded(float, 0, 30)


class ResamplingConfig(Common):
    population_csv: ProjectPath
    population_detail_csv: ProjectPath
    reference_year: Bounded(int, 1900, 2100)
    max_age: Bounded(int, 1, 130)
    target_csv: WorkspacePath
    input: Literal["processed", "exploration"]
    processed_csv: WorkspacePath
    exploration_csv: WorkspacePath
    output_dir: WorkspacePath
    output_csv: WorkspacePath
    target_size: Bounded(int, 1) | None
    seed: Bounded(int, 0)
    quality_score: QualityScore
    max_copies_per_image: Bounded(int, 0, 100)
    tolerance: Bounded(float, 0, 1)
    jpeg_quality: Bounded(int, 1, 100)
    augmentation: ResamplingAugmentation


# --------------------------------------------------------------------------------------------------
# configs/train_model.yaml
# --------------------------------------------------------------------------------------------------
class Split(Section):
    validation: Bounded(float, 0.0, 0.5)
    test: Bounded(float, 0.0, 0.5)


class InputPipeline(Section):
    image_size: Bounded(int, 16, 512)
    batch_size: Bounded(int, 1, 4096)
    shuffle_buffer: Bounded(int, 1)
    cache: Literal["disk", "memory", "none"]


class TrainingAugmentation(Section):
    enabled: bool
    max_rotation_degrees: Bounded(float, 0, 30)
    max_zoom: Bounded(float, 0, 0.5)
    max_shift: Bounded(float, 0, 0.3)
    max_brightness: Bounded(float, 0, 1)
    max_contrast: Bounded(float, 0, 1)


class Descriptor(Section):
    face_box: Literal["whole_image", "detector"]
    on_no_landmarks: Literal["whole_image", "skip"]
    min_eye_distance: Bounded(float, 0, 1)
    max_roll_degrees: Bounded(float, 0, 90)
    padding: Bounded(float, 0, 1)
    mirrored: bool
    age_network: bool
    age_probability_floor: Bounded(float, 1e-30, 1)


class ModelSettings(Section):
    backbone: str
    descriptor: Descriptor
    head_units: list[Bounded(int, 1, 8192)]
    ensemble: Bounded(int, 1, 20)
    weights: WorkspacePath | None
    filters: list[Bounded(int, 1, 2048)] = Field(min_length=1)
    convs_per_stage: Bounded(int, 1, 4)
    batch_norm_momentum: Bounded(float, 0, 0.999)
    spatial_dropout: Bounded(float, 0, 0.9)
    dropout: Bounded(float, 0, 0.9)
    weight_decay: Bounded(float, 0, 1)


class Training(Section):
    epochs: Bounded(int, 1, 10000)
    learning_rate: Bounded(float, 1e-7, 10)
    warmup_epochs: Bounded(int, 0, 100)
    class_weighting: bool
    label_sigma_years: Bounded(float, 0, 50)


class Evaluation(Section):
    flip_test_time_augmentation: bool
    prior_csv: WorkspacePath | None


class Distribution(Section):
    strategy: Literal["default", "mirrored", "multi_worker"]
    logical_cpus: Bounded(int, 1, 64)


class TrainConfig(Common):
    input_csv: WorkspacePath
    test_dataset_dir: WorkspacePath | None
    target_csv: WorkspacePath | None
    descriptor_cache: WorkspacePath
    output_dir: WorkspacePath
    max_age: Bounded(int, 1, 130)
    seed: Bounded(int, 0)
    deterministic: bool
    split: Split
    input: InputPipeline
    augmentation: TrainingAugmentation
    model: ModelSettings
    training: Training
    evaluation: Evaluation
    distribution: Distribution


# --------------------------------------------------------------------------------------------------
# configs/predict_age.yaml
# --------------------------------------------------------------------------------------------------
class PredictConfig(Common):
    model_path: WorkspacePath
    inputs: list[WorkspacePath] = Field(min_length=1)
    output_csv: WorkspacePath
    batch_size: Bounded(int, 1, 4096)
    flip_test_time_augmentation: bool
    prior_csv: WorkspacePath | None
    descriptor_cache: WorkspacePath


# --------------------------------------------------------------------------------------------------
# configs/make_sample_dataset.yaml
# --------------------------------------------------------------------------------------------------
Range = Annotated[list[Bounded(float, 0)], Field(min_length=2, max_length=2)]
Colour = Annotated[list[Byte], Field(min_length=3, max_length=3)]


class Ages(OrderedRange):
    min: Bounded(int, 0, 120)
    max: Bounded(int, 1, 120)
    decade_weights: list[Bounded(float, 0)] = Field(min_length=1)


class Pose(Section):
    max_tilt_degrees: Bounded(float, 0, 45)
    max_scale_change: Bounded(float, 0, 0.5)
    max_shift_fraction: Bounded(float, 0, 0.3)


class Defects(Section):
    fraction: Bounded(float, 0, 1)
    blur_sigma: Range
    noise_sigma: Range
    dark_gain: Range
    bright_headroom: Range
    low_resolution_size: Range
    low_contrast_scale: Range


class SampleConfig(Common):
    output_dir: WorkspacePath
    seed: Bounded(int, 0)
    num_images: Bounded(int, 10)
    image_size: Bounded(int, 32, 1024)
    jpeg_quality: Bounded(int, 1, 100)
    ages: Ages
    skin_tones: list[Colour] = Field(min_length=1)
    hair_colours: list[Colour] = Field(min_length=1)
    camera_noise_sigma: Bounded(float, 0)
    pose: Pose
    defects: Defects
    near_duplicate_brightness_shift: float
