"""The models of the data stages' YAML files in configs/ (exploration, processing, the quality report,
resampling, the sample dataset): one pydantic model per file, every section a model too, built of
agepipe.config.schema's parts and by its rules.

Settings that depend on code registries (each metric's parameters, each repair's) are validated
against those registries' own models when a stage loads its config.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from agepipe.config.schema import (
    Bounded,
    Byte,
    Common,
    Jitter,
    OrderedRange,
    PoseJitter,
    ProjectPath,
    Section,
    WorkspacePath,
)

# --------------------------------------------------------------------------------------------------
# configs/explore_images.yaml
# --------------------------------------------------------------------------------------------------
# one column name, or the names a column may have
ColumnNames = Annotated[
    list[Annotated[str, Field(min_length=1)]],
    Field(min_length=1),
    BeforeValidator(lambda names: [names] if isinstance(names, str) else names),
]


class Labels(Section):
    source: Literal["auto", "filename", "csv"]
    """'auto' (the labels CSV when csv_path is set, else UTKFace names), 'filename' or 'csv'."""
    csv_path: WorkspacePath | None
    """A labels CSV: each image's path relative to dataset_dir, and its age."""
    file_column: ColumnNames
    """The labels CSV's column of image paths: the first of these names it has, in any case."""
    age_column: ColumnNames
    """The labels CSV's column of ages: the first of these names it has, in any case."""

    @model_validator(mode="after")
    def csv_needs_a_path(self) -> "Labels":
        if self.source == "csv" and not self.csv_path:
            raise ValueError("expected csv_path when source is 'csv', got null")
        return self

    @property
    def from_csv(self) -> bool:
        """Whether ages come from the labels CSV ("auto": when one is given) or from UTKFace file names."""
        return self.source == "csv" or (self.source == "auto" and bool(self.csv_path))


class ImageLimits(Section):
    max_aspect_ratio: Bounded(float, 1)
    """More elongated images are refused."""
    analysis_side: Bounded(int, 16, 4096)
    """Pixel metrics are measured with the shorter side scaled down to this, so they mean the same at any size."""
    face_region_scale: Bounded(float, 1, 4)
    """Where a face is found, pixel metrics judge a square this many times its box: the face, not the frame."""


class CheckRule(Section):
    """Flag an image whose `metric` is below `below` or above `above` (every metric is >= 0)."""

    metric: str
    """The metric (a CSV column) the check tests."""
    below: Bounded(float, 0) | None
    """Flag an image whose metric is below this (null: no lower limit)."""
    above: Bounded(float, 0) | None
    """Flag an image whose metric is above this (null: no upper limit)."""
    informational: bool = False
    """Flag and score only: a flagged image stays usable (its status is not low_quality)."""

    @model_validator(mode="after")
    def has_a_threshold(self) -> "CheckRule":
        if self.below is None and self.above is None:
            raise ValueError("expected a 'below' or an 'above' threshold, got neither")
        return self


class Duplicates(Section):
    enabled: bool
    """Search for exact and near-duplicate images."""
    max_hash_distance: Bounded(int, 0, 64)
    """Perceptual hashes this many bits apart (of 256) or fewer are the same picture."""
    max_age_difference: Bounded(int, 0)
    """Duplicates whose ages differ by more are flagged age_conflict."""


class ExploreConfig(Common):
    dataset_dir: WorkspacePath
    """The folder of images to explore (searched recursively)."""
    output_csv: WorkspacePath
    """One row per image file found."""
    summary_csv: WorkspacePath
    """Counts per status, check and age group."""
    labels: Labels
    """Where the ages come from."""
    images: ImageLimits
    """Limits on what is decoded."""
    metrics: dict[str, dict[str, Any] | None]  # name -> parameters, checked against each metric's own model
    """The metrics to compute, each with its parameters (agepipe/quality/image_metrics.py registers them)."""
    checks: dict[str, CheckRule]
    """Named threshold rules, each a flag_<name> and a score_<name> column."""
    duplicates: Duplicates
    """The duplicate search."""

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
    """Tries per image before it is rejected."""
    strength_factor: Bounded(float, 1.0, 10.0)
    """Each retry multiplies every operation's main strength by this."""


class NeverWorse(Section):
    max_colourfulness_change: Bounded(float, 0, 10)
    """A repair may change colourfulness by at most this share of the original's (no repair targets colour)."""
    max_noise_increase: Bounded(float, 0, 100)
    """A repair may raise the noise level (grey levels) by at most this much."""
    max_contrast_loss: Bounded(float, 0, 1)
    """A repair may lower the contrast by at most this share of the original's (a dark scene brightened
    into a washed-out grey is worse, whatever its brightness)."""


class FaceCrop(Section):
    side: Bounded(int, 32, 2048)
    """Side of a crop, in pixels; a smaller face is cut at its own resolution, never upscaled."""
    padding: Bounded(float, 0, 2)
    """Margin around the aligned face, as a share of it (dlib's convention: 0.25 is a tight chip)."""


class ProcessConfig(Common):
    input_csv: WorkspacePath
    """The exploration CSV (its run record gives the thresholds)."""
    output_dir: WorkspacePath
    """The clean copy of the dataset."""
    output_csv: WorkspacePath
    """One row per input row: what processing did."""
    output: Literal["faces", "images"]
    """'faces': each kept image is written as its face, aligned and cropped ('images': the whole image)."""
    face_crop: FaceCrop
    """The face crops of output 'faces'."""
    resize: Bounded(int, 16, 4096) | None
    """output 'images': every output this many pixels square (null: sizes kept, passing images copied byte for byte)."""
    jpeg_quality: Bounded(int, 1, 100)
    """For repaired images written as JPEG."""
    repairs: dict[
        str, dict[str, dict[str, Any]]
    ]  # check -> repair -> parameters, checked against image_processor.REPAIRS
    """For each check, the operations that repair it, with their parameters."""
    retry: Retry
    """How often, and how much stronger, a repair is tried again."""
    never_worse: NeverWorse
    """What a repair may not make worse, beside passing every check."""


# --------------------------------------------------------------------------------------------------
# configs/visualize_image_information.yaml
# --------------------------------------------------------------------------------------------------
class FigureSettings(Section):
    width_inches: Bounded(float, 2, 40)
    """Figure width."""
    height_inches: Bounded(float, 2, 40)
    """Figure height."""
    dpi: Bounded(int, 30, 600)
    """Resolution of PNG figures."""
    bins: Bounded(int, 5, 500)
    """Histogram bins."""
    log_scale_span: Bounded(float, 1)
    """A metric spanning more than this ratio (1st to 99th percentile) gets a log axis."""


class Grids(Section):
    columns: Bounded(int, 1, 20)
    """Thumbnails per row."""
    rows: Bounded(int, 1, 20)
    """Rows of thumbnails in a report grid."""
    thumbnail_pixels: Bounded(int, 16, 512)
    """Side of each thumbnail."""
    checks: list[str]
    """The checks that get a grid of the images they flag, worst first."""


class BeforeAfter(Section):
    pairs: Bounded(int, 1, 50)
    """Before/after pairs shown per repair operation."""
    columns: Bounded(int, 2, 20)
    """Images per row."""


class Site(Section):
    gallery_page_size: Bounded(int, 10, 5000)
    """Thumbnails per gallery page."""
    thumbnail_pixels: Bounded(int, 32, 1024)
    """Longest side of a gallery thumbnail."""


class VisualizeConfig(Common):
    exploration_csv: WorkspacePath
    """The exploration CSV (its run record gives the thresholds drawn)."""
    processed_csv: WorkspacePath | None
    """The processed CSV, used when it exists (null: never)."""
    checked_csv: WorkspacePath | None
    """The label check's CSV (check_labels.py), used when it exists (null: never)."""
    output_dir: WorkspacePath
    """The report folder."""
    formats: list[Literal["png", "svg"]] = Field(min_length=1)
    """png, and svg for vector copies."""
    figure: FigureSettings
    """Figure size and histograms."""
    distributions: list[str]
    """Metrics that get a histogram with their thresholds."""
    by_age_group: list[str]
    """Metrics that get a plot per age group."""
    grids: Grids
    """Grids of flagged images."""
    before_after: BeforeAfter
    """Repairs, original beside result."""
    site: Site
    """The galleries of every flagged image."""
    model_report: WorkspacePath | None
    """The model's report card, linked from the index when it exists."""


# --------------------------------------------------------------------------------------------------
# configs/resampling.yaml (both notebooks)
# --------------------------------------------------------------------------------------------------
class QualityScore(Section):
    metric: str
    """Down-sampling keeps the best images by this metric."""
    higher_is_better: bool
    """Whether a higher value of it is better."""


class ResamplingAugmentation(Jitter):
    flip_probability: Bounded(float, 0, 1)
    """Chance of a mirror image."""
    max_gamma_change: Bounded(float, 0, 0.9)
    """Largest gamma change, as a share."""
    blur_probability: Bounded(float, 0, 1)
    """Chance of a mild blur."""
    max_blur_sigma: Bounded(float, 0, 5)
    """Largest blur, pixels."""
    noise_probability: Bounded(float, 0, 1)
    """Chance of mild noise."""
    max_noise_sigma: Bounded(float, 0, 30)
    """Largest noise, grey levels."""


class ResamplingConfig(Common):
    population_csv: ProjectPath
    """ABS Estimated Resident Population by 5-year band (shipped in data/)."""
    population_detail_csv: ProjectPath
    """ABS population to 100+, to split 80+ when a group edge lies above 80."""
    reference_year: Bounded(int, 1900, 2100)
    """The year of the population figures."""
    max_age: Bounded(int, 1, 130)
    """Upper age of the open last group."""
    target_csv: WorkspacePath
    """The target age distribution (written by australian_population.ipynb)."""
    input: Literal["processed", "exploration"]
    """'processed' (kept and repaired images of processed_csv) or 'exploration' (status ok in exploration_csv)."""
    processed_csv: WorkspacePath
    """The processing stage's CSV."""
    exploration_csv: WorkspacePath
    """The exploration stage's CSV."""
    output_dir: WorkspacePath
    """The resampled dataset."""
    output_csv: WorkspacePath
    """One row per output image, with its source and augmentation."""
    target_size: Bounded(int, 1) | None
    """Images in the resampled dataset (null: as many as now)."""
    seed: Bounded(int, 0)
    """Seed of every random choice."""
    quality_score: QualityScore
    """What down-sampling keeps first."""
    max_copies_per_image: Bounded(int, 0, 100)
    """Augmented copies one image may get."""
    tolerance: Bounded(float, 0, 1)
    """Total variation distance to the target counted as matched."""
    jpeg_quality: Bounded(int, 1, 100)
    """For augmented copies written as JPEG."""
    augmentation: ResamplingAugmentation
    """The face-safe augmentations of up-sampling."""


# --------------------------------------------------------------------------------------------------
# configs/make_sample_dataset.yaml
# --------------------------------------------------------------------------------------------------
Range = Annotated[list[Bounded(float, 0)], Field(min_length=2, max_length=2)]
Colour = Annotated[list[Byte], Field(min_length=3, max_length=3)]


class Ages(OrderedRange):
    min: Bounded(int, 0, 120)
    """The youngest age drawn."""
    max: Bounded(int, 1, 120)
    """The oldest age drawn."""
    decade_weights: list[Bounded(float, 0)] = Field(min_length=1)
    """Relative frequency of each decade."""


class Defects(Section):
    fraction: Bounded(float, 0, 1)
    """Share of faces with one planted defect."""
    blur_sigma: Range
    """[low, high] Gaussian blur, pixels."""
    noise_sigma: Range
    """[low, high] noise, grey levels."""
    dark_gain: Range
    """[low, high] factor darkening pixel values."""
    bright_headroom: Range
    """[low, high] factor of each pixel's distance to white."""
    low_resolution_size: Range
    """[low, high] side the image is shrunk to."""
    low_contrast_scale: Range
    """[low, high] factor of deviations from the mean."""


class SampleConfig(Common):
    output_dir: WorkspacePath
    """The sample dataset folder."""
    seed: Bounded(int, 0)
    """Same seed, byte-identical files."""
    num_images: Bounded(int, 10)
    """Faces drawn."""
    image_size: Bounded(int, 32, 1024)
    """Side of each image."""
    jpeg_quality: Bounded(int, 1, 100)
    """JPEG quality."""
    ages: Ages
    """The ages drawn."""
    skin_tones: list[Colour] = Field(min_length=1)
    """RGB skin tones by UTKFace race code."""
    hair_colours: list[Colour] = Field(min_length=1)
    """RGB hair colours."""
    camera_noise_sigma: Bounded(float, 0)
    """Gaussian sensor noise on every image."""
    pose: PoseJitter
    """Tilt, scale and shift."""
    defects: Defects
    """Planted defects."""
    near_duplicate_brightness_shift: float
    """Brightening of the near duplicate planted with another age."""
