"""Fitting the age network, shared by train_model.py and check_labels.py: the splits by source
(`split_by_source`, `stratified_folds`: each age group in proportion, an image's copies together), the
tf.distribute strategy, the learning-rate schedule, `fit` (a network trained on rows a backbone
prepared, backbones.py), and `out_of_fold` (every labelled face predicted by a network that never saw
it: k folds, stratified by age group, seeded). TensorFlow is imported when these are called, after the
worker pools have forked.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import numpy as np
import pandas as pd

from agepipe.config.model_stages import Distribution, TrainConfig, Training
from agepipe.data.age_groups import AgeGroups
from agepipe.model.estimates import year_targets

log = logging.getLogger("agepipe.training")


def distribution_strategy(settings: Distribution):
    """The tf.distribute strategy of the config, one per process: the devices are set up before
    TensorFlow touches one, and every network trained in the run (the model, the calibration folds)
    shares its collective ops, which two strategies side by side would mix up."""
    return strategy_of(settings.strategy, settings.logical_cpus)


@functools.cache
def strategy_of(kind: str, logical_cpus: int):
    from agepipe.model.keras_networks import tf  # TensorFlow, loaded where its start-up log is quieted

    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def learning_rate_schedule(training: Training, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero over the remaining epochs."""
    from agepipe.model.keras_networks import keras

    total = training.epochs * steps_per_epoch
    warmup = min(training.warmup_epochs * steps_per_epoch, total - 1)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else training.learning_rate,
        decay_steps=max(1, total - warmup),
        warmup_target=training.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def fit(
    config: TrainConfig,
    backbone,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    groups: AgeGroups,
    scratch: str,
    weights=None,
    strategy=None,
    training: Training | None = None,
):
    """A network trained on the prepared `train` rows (the learning curves also on `validation`), by the
    config's schedule (or `training`'s); returns the network, its history (a row per epoch), the seconds
    it took and the replicas it ran on."""
    from agepipe.model.keras_networks import group_accuracy_metric, keras, tf

    strategy = strategy or distribution_strategy(config.distribution)

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    training, max_age = training or config.training, config.max_age
    replicas = strategy.num_replicas_in_sync
    targets = lambda ages: year_targets(ages, max_age, training.label_sigma_years)  # noqa: E731
    data, steps = backbone.fit_data(
        train, validation, targets, weights, training.batch_size * replicas, config.seed, scratch, replicas
    )
    with strategy.scope():
        model = backbone.build(train["inputs"], max_age)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate_schedule(training, steps), weight_decay=config.model.section.weight_decay
            ),
            loss=keras.losses.KLDivergence(),
            metrics=[group_accuracy_metric(groups, max_age)],
        )
    log.debug("model: %s, %s parameters, %d replicas", backbone.kind, f"{model.count_params():,}", replicas)
    start = time.perf_counter()
    fitted = model.fit(
        **data, epochs=training.epochs, verbose=1 if os.isatty(2) and log.isEnabledFor(logging.INFO) else 0
    )
    return model, pd.DataFrame(fitted.history).rename_axis("epoch").reset_index(), time.perf_counter() - start, replicas


def shuffled_sources(frame: pd.DataFrame, seed: int):
    """Each age group's sources (original images: the `source` column), shuffled, seeded."""
    rng = np.random.default_rng(seed)
    sources = frame.groupby("source")["group_index"].first()
    for _, members in sources.groupby(sources):
        names = members.index.to_numpy().copy()
        rng.shuffle(names)
        yield names


def split_by_source(frame: pd.DataFrame, validation: float, test: float, seed: int) -> pd.Series:
    """'train', 'validation' or 'test' per row. Sources (original images) are shuffled within each age
    group and cut by the fractions, so every split has each group in proportion; all copies of a
    source follow it, and augmented copies are dropped from the test split ('unused')."""
    assignment = {}
    for names in shuffled_sources(frame, seed):
        n_test, n_validation = round(len(names) * test), round(len(names) * validation)
        if len(names) >= 3:  # every split gets at least one source of a group that has a few
            n_test, n_validation = max(n_test, 1 if test > 0 else 0), max(n_validation, 1 if validation > 0 else 0)
        for index, name in enumerate(names):
            assignment[name] = "test" if index < n_test else "validation" if index < n_test + n_validation else "train"
    split = frame["source"].map(assignment)
    return split.where(~((split == "test") & (frame["copy"] > 0)), "unused")


def stratified_folds(frame: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """A fold number per row: each age group's sources (original images) shuffled, seeded, and dealt in
    turn, so every fold holds each group in proportion and an image's copies stay with it.

    Examples
    --------
    >>> frame = pd.DataFrame({"source": list("abcdefgh"), "group_index": [0, 0, 0, 0, 1, 1, 1, 1]})
    >>> sorted(np.bincount(stratified_folds(frame, 2, seed=0)).tolist())
    [4, 4]
    """
    fold_of = {}
    for names in shuffled_sources(frame, seed):
        fold_of.update({name: position % folds for position, name in enumerate(names)})
    return frame["source"].map(fold_of).to_numpy()


def out_of_fold(
    config: TrainConfig,
    backbone,
    rows: pd.DataFrame,
    groups: AgeGroups,
    folds: int,
    seed: int,
    scratch: str,
    training: Training | None = None,
    trained_on: np.ndarray | None = None,
    progress=None,
    fold: np.ndarray | None = None,
) -> np.ndarray:
    """Year probabilities for every prepared row, each from a network trained on the other folds only
    (and of those, on the rows `trained_on` marks, when given). The folds are stratified by age group,
    seeded, unless `fold` gives each row's."""
    strategy = distribution_strategy(config.distribution)
    fold = stratified_folds(rows, folds, seed) if fold is None else fold
    probabilities = np.zeros((len(rows), config.max_age + 1), np.float32)
    flip, batch = config.evaluation.flip_test_time_augmentation, config.training.batch_size
    trained_on = np.ones(len(rows), bool) if trained_on is None else trained_on
    for k in range(folds):
        held_out = fold == k
        model, _, _, _ = fit(
            config,
            backbone,
            rows[~held_out & trained_on],
            rows.iloc[:0],
            groups,
            scratch,
            strategy=strategy,
            training=training,
        )
        probabilities[held_out] = backbone.predict(model, rows[held_out], flip, batch)
        if progress is not None:
            progress.update(1)
    return probabilities
