"""The models of configs/train_model.yaml and configs/predict_age.yaml: the age model's settings, a
section per backbone kind (agepipe/model/backbones.py), built of schema.py's parts and by its rules (unknown keys
are errors, strict types, bounds beside each field, one docstring of meaning under each)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agepipe.config.schema import Bounded, Common, Jitter, ProjectPath, Section, WorkspacePath

# The age a row reports: the median within the likeliest group, the distribution's median, or its mean.
AnswerRule = Literal["group_first", "median", "mean"]


# --------------------------------------------------------------------------------------------------
# configs/train_model.yaml
# --------------------------------------------------------------------------------------------------
class Split(Section):
    method: Literal["held_out", "cross_validation"]
    """'held_out': test on a held-out split (or test_inputs); 'cross_validation': each original out of fold."""
    folds: Bounded(int, 2, 50)
    """cross_validation: the number of folds."""
    validation: Bounded(float, 0.0, 0.5)
    """Share of sources for validation: it calibrates the confidence and draws the held-out learning curve."""
    test: Bounded(float, 0.0, 0.5)
    """Share of sources held out for the test (ignored with test_inputs)."""


class TrainingAugmentation(Jitter):
    enabled: bool
    """Augment pixel inputs on the fly (training only)."""


VIEW_NAMES = Literal["grey", "sepia", "blur", "jpeg", "colour_cast", "low_resolution"]


class Descriptor(Section):
    padding: Bounded(float, 0, 1)
    """Margin around the aligned face chip."""
    mirrored: bool
    """Also describe the mirror image: a second training view, averaged at test (false: the fast profile)."""
    face_descriptor: Literal["every_view", "first_view", "none"]
    """dlib's descriptor on every view, the image's only for its mirror view, or none (the age network alone)."""
    age_network: bool
    """Append the pretrained age network's 81 log-probabilities."""
    age_probability_floor: Bounded(float, 1e-30, 1)
    """Its probabilities are floored at this before the log."""
    training_views: list[VIEW_NAMES]
    """Training also describes each face in these views (faces/views.py), each one more training sample."""

    @model_validator(mode="after")
    def described_by_something(self) -> "Descriptor":
        if self.face_descriptor == "none" and not self.age_network:
            raise ValueError("face_descriptor none needs age_network true: a face would be described by nothing")
        return self


class FaceFeaturesBackbone(Section):
    descriptor: Descriptor
    """How faces are described."""
    age_network_share: Bounded(float, 0, 1)
    """This share of every answer is the pretrained age network's own (0: the head's alone; needs age_network)."""
    head_units: list[Bounded(int, 1, 8192)]
    """Dense layers of the head."""
    ensemble: Bounded(int, 1, 20)
    """Independently initialised heads, averaged."""
    dropout: Bounded(float, 0, 0.9)
    """Dropout after each dense layer."""
    weight_decay: Bounded(float, 0, 1)
    """AdamW's decoupled weight decay."""


class PixelsBackbone(Section):
    network: str
    """'cnn' (trained from scratch) or a keras.applications model."""
    weights: WorkspacePath | None
    """keras.applications: a local weights file or null (nothing downloads)."""
    image_size: Bounded(int, 16, 512)
    """Images are resized to this many pixels square."""
    filters: list[Bounded(int, 1, 2048)] = Field(min_length=1)
    """The CNN's filters per stage."""
    convs_per_stage: Bounded(int, 1, 4)
    """The CNN's convolutions per stage."""
    batch_norm_momentum: Bounded(float, 0, 0.999)
    """Batch normalisation's momentum."""
    spatial_dropout: Bounded(float, 0, 0.9)
    """Spatial dropout after each stage."""
    dropout: Bounded(float, 0, 0.9)
    """Dropout before the output."""
    weight_decay: Bounded(float, 0, 1)
    """AdamW's decoupled weight decay."""
    shuffle_buffer: Bounded(int, 1)
    """Images shuffled at once."""
    cache: Literal["disk", "memory", "none"]
    """Decoded images: 'disk' (a scratch file), 'memory' or 'none'."""
    augmentation: TrainingAugmentation
    """On-the-fly augmentation."""


class ModelSettings(Section):
    backbone: Literal["face_features", "pixels"]
    """'face_features' (pretrained face descriptors + a Keras head) or 'pixels' (a network on the image)."""
    face_features: FaceFeaturesBackbone
    """Settings of the face_features backbone."""
    pixels: PixelsBackbone
    """Settings of the pixels backbone."""

    @property
    def section(self) -> FaceFeaturesBackbone | PixelsBackbone:
        """The settings of the backbone in use."""
        return getattr(self, self.backbone)


class Training(Section):
    epochs: Bounded(int, 1, 10000)
    """Training runs this many epochs (warm-up, then cosine decay)."""
    batch_size: Bounded(int, 1, 4096)
    """Samples per step."""
    learning_rate: Bounded(float, 1e-7, 10)
    """The peak learning rate."""
    warmup_epochs: Bounded(int, 0, 100)
    """Epochs of linear warm-up."""
    class_weighting: bool
    """Weigh each group by 1 / its share of the training split."""
    label_sigma_years: Bounded(float, 0, 50)
    """Width of the Gaussian over years around each true age (0: one-hot)."""


class Evaluation(Section):
    flip_test_time_augmentation: bool
    """Average the image's and its mirror image's predictions."""
    prior_csv: WorkspacePath | None
    """A target CSV (group, share): predictions re-weighted to that population's age mix."""
    answer_rule: AnswerRule
    """The age a row reports: 'group_first' (median within the likeliest group), 'median' or 'mean'."""
    interval: Bounded(float, 0.05, 0.99)
    """The age interval holds this share of the probability."""
    calibrate: bool
    """Fit a temperature so that confidences are honest (on look-alike folds, or the validation split)."""
    calibration_folds: Bounded(int, 0, 20)
    """Calibrate on this many clusters of look-alike faces, each answered by a network trained on the rest (0: none)."""
    min_test_images: Bounded(int, 1)
    """A figure resting on fewer test faces (the whole test set, an age group's recall) is greyed and warned of."""


class Fairness(Section):
    min_images: Bounded(int, 1)
    """A value of an attribute with fewer test images is listed but not ranked."""
    attributes: dict[str, dict[int, str]]
    """Per demographic column of the test rows (from UTKFace names or a labels CSV), the name of each code."""


class Distribution(Section):
    strategy: Literal["default", "mirrored", "multi_worker"]
    """'default' (one device), 'mirrored' (all GPUs, or logical_cpus CPU replicas), 'multi_worker' (TF_CONFIG)."""
    logical_cpus: Bounded(int, 1, 64)
    """CPU replicas of 'mirrored' without a GPU."""


class TrainConfig(Common):
    input_csv: WorkspacePath
    """Any stage's CSV with file, path and age (default: the processed set)."""
    test_inputs: list[WorkspacePath]
    """Folders or image tables to test on instead of a test split."""
    labels_csv: WorkspacePath | None
    """A labels CSV (file, age) for test_inputs."""
    target_csv: WorkspacePath | None
    """Population mix for the weighted accuracy (null: not reported)."""
    output_dir: WorkspacePath
    """The model folder."""
    max_age: Bounded(int, 1, 130)
    """The model predicts a distribution over years 0..max_age."""
    seed: Bounded(int, 0)
    """Seed of the split and of training."""
    deterministic: bool
    """Make TensorFlow's operations deterministic (slower)."""
    split: Split
    """Validation and test shares."""
    model: ModelSettings
    """The backbone and its settings."""
    training: Training
    """The training schedule."""
    evaluation: Evaluation
    """How answers are read and scored."""
    fairness: Fairness
    """The report card's figures per gender and race."""
    distribution: Distribution
    """tf.distribute strategy."""


# --------------------------------------------------------------------------------------------------
# configs/predict_age.yaml
# --------------------------------------------------------------------------------------------------
class PredictConfig(Common):
    model_path: WorkspacePath
    """The model to apply."""
    inputs: list[WorkspacePath] = Field(min_length=1)
    """Folders, image files, or tables of images (a path column, and age when known)."""
    labels_csv: WorkspacePath | None
    """A labels CSV (file, age; files relative to the input folder) to score the predictions."""
    output_csv: WorkspacePath
    """One row per image, or per face."""
    row_per_face: bool
    """A row for every face found, not only the largest."""
    batch_size: Bounded(int, 1, 4096)
    """Faces predicted at once."""
    images_per_chunk: Bounded(int, 1, 1_000_000)
    """Images read back, predicted and written at a time: memory depends on this, not on the input's size."""
    flip_test_time_augmentation: bool
    """Average the image's and its mirror image's predictions."""
    prior_csv: WorkspacePath | None
    """A target CSV (group, share): adjust to that population's age mix."""


# --------------------------------------------------------------------------------------------------
# configs/check_labels.yaml
# --------------------------------------------------------------------------------------------------
class LabelCheckTraining(Section):
    epochs: Bounded(int, 1, 10000)
    """Epochs of each fold's network (fewer than training's: the check ranks faces, it ships no model)."""
    batch_size: Bounded(int, 1, 4096)
    """Samples per step."""
    ensemble: Bounded(int, 1, 20)
    """Heads per fold's network."""


class LabelCheckConfig(Common):
    input_csv: WorkspacePath
    """The processing stage's CSV (any stage's CSV with file, path and age works)."""
    output_csv: WorkspacePath
    """One row per input row, with predicted_age, label_quality and suspected_label_error."""
    train_config: ProjectPath
    """The training config whose backbone and head the check uses: the project's own face features."""
    folds: Bounded(int, 2, 50)
    """Out-of-fold predictions from this many folds, stratified by age group."""
    seed: Bounded(int, 0)
    """Seed of the folds and the networks."""
    score: Literal["year_window", "cleanlab"]
    """'year_window': probability of an age within window_years of the label; 'cleanlab': its self-confidence."""
    window_years: Bounded(int, 0, 20)
    """year_window: how many years either side of the given age count as agreeing with it."""
    second_pass_leave_out: Bounded(float, 0, 0.5)
    """The share of faces with the least likely labels left out of a second round of folds' training (0: one round)."""
    threshold: Bounded(float, 0, 1)
    """A label_quality below this is a suspected label error."""
    training: LabelCheckTraining
    """The folds' networks."""
