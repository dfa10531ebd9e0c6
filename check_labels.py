"""Label check: find the faces whose age label is likely wrong.

Exploration checks every image's pixels, not its label, and in face-age datasets the label is the
weakest part. This stage predicts every labelled face of the processed CSV with the project's own
face features and head, each by a network trained on the other folds only (out-of-fold, k folds
stratified by age group, seeded; the face descriptors are the ones training shares), and scores how
likely its given age is under that prediction (`label_quality`, 0..1, lower is more suspect):

- `year_window` (the default) keeps the year-level information: the predicted probability that the
  face's age lies within `window_years` of its given age;
- `cleanlab` is cleanlab's self-confidence of the given age group (get_label_quality_scores).

The folds' networks learn from the wrong labels too, which blurs their predictions; so, by default, a
second round of folds is trained without the `second_pass_leave_out` share of faces whose labels the
first round found least likely, and predicts every face again (measured in benchmarks/README.md).

It writes one row per input row to `output_csv`: the input's columns, then `predicted_age`,
`label_quality`, `suspected_label_error` (label_quality below `threshold`), `label_check` (why a row
was not checked) and the out-of-fold probability of each age group (`oof_p_<group>`). Nothing is
deleted or renamed: resampling and training leave the suspected rows out (`exclude_suspected_labels`),
and the quality report shows them.

    python check_labels.py
    python check_labels.py --set threshold=0.05 --set folds=10
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pandas as pd

from agepipe.config.loading import load_config
from agepipe.config.model_stages import LabelCheckConfig, TrainConfig
from agepipe.config.schema import AgeRange
from agepipe.data.age_groups import AgeGroups, age_groups_from
from agepipe.data.datasets import read_metadata_csv, unusable_ages
from agepipe.data.vocabulary import TRAINABLE_STATUSES
from agepipe.errors import UserError
from agepipe.model.backbones import backbone_for
from agepipe.model.estimates import answers, group_matrix
from agepipe.model.training import out_of_fold
from agepipe.running.console import progress_bar
from agepipe.running.output_guard import OutputGuard
from agepipe.running.parallel import Engine
from agepipe.running.writes import write_csv, write_run_record
from utils import require_workspace, run_script, setup_logging

log = logging.getLogger("agepipe.labels")


def year_window_quality(year_probabilities: np.ndarray, ages, window: int) -> np.ndarray:
    """The predicted probability that each face's age lies within `window` years of its given age.

    Examples
    --------
    >>> years = np.zeros((1, 101))
    >>> years[0, 30:41] = 1 / 11  # the network says 30 to 40
    >>> year_window_quality(years, [35], 2).round(2).tolist(), year_window_quality(years, [60], 2).tolist()
    ([0.45], [0.0])
    """
    ages = np.clip(np.asarray(ages, int), 0, year_probabilities.shape[1] - 1)
    cumulative = np.concatenate([np.zeros((len(ages), 1)), np.cumsum(year_probabilities, axis=1)], axis=1)
    rows, last = np.arange(len(ages)), year_probabilities.shape[1]
    return np.clip(
        cumulative[rows, np.minimum(ages + window + 1, last)] - cumulative[rows, np.maximum(ages - window, 0)], 0, 1
    )


def label_quality(
    year_probabilities: np.ndarray, ages, groups: AgeGroups, max_age: int, config: LabelCheckConfig
) -> np.ndarray:
    """Each face's label_quality by the config's `score` (see the module's docstring)."""
    if config.score == "year_window":
        return year_window_quality(year_probabilities, ages, config.window_years)
    from cleanlab.rank import get_label_quality_scores

    group_probabilities = year_probabilities @ group_matrix(groups, max_age)
    labels = np.array([groups.index_of(a) for a in ages])
    return get_label_quality_scores(labels, group_probabilities / group_probabilities.sum(axis=1, keepdims=True))


def checked_rows(frame: pd.DataFrame, age_range: AgeRange) -> pd.Series:
    """Why each row is not checked (None where it is): only usable, labelled images are."""
    reasons = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    if "status" in frame.columns:
        reasons[~frame["status"].isin(TRAINABLE_STATUSES)] = "not checked: " + frame["status"].astype(str)
    unlabelled = unusable_ages(frame["age"], age_range) | frame["path"].isna()
    reasons[reasons.isna() & unlabelled] = "not checked: no usable age label"
    return reasons


def check(config: LabelCheckConfig, train: TrainConfig, frame: pd.DataFrame, cache, scratch: str) -> pd.DataFrame:
    """The output table: `frame` with predicted_age, label_quality, suspected_label_error and label_check."""
    groups = age_groups_from(train)
    reasons = checked_rows(frame, config.age_range)
    candidates = frame[reasons.isna()].assign(
        age=lambda t: pd.to_numeric(t["age"]).astype(int), source=lambda t: t["file"]
    )
    candidates = candidates.assign(group_index=[groups.index_of(a) for a in candidates["age"]])
    backbone = backbone_for(train)
    rows = backbone.prepare(candidates.reset_index(names="_row"), Engine.of(config), cache, training=True)
    usable = rows[rows["inputs"].notna()].reset_index(drop=True)
    reasons[rows.loc[rows["inputs"].isna(), "_row"].to_numpy()] = "not checked: " + rows.loc[
        rows["inputs"].isna(), "problem"
    ].astype(str)
    if len(usable) < 2 * config.folds:
        raise UserError(
            f"too few usable labelled faces ({len(usable)}) for {config.folds} folds: give fewer folds (--set "
            "folds=2) or more faces"
        )
    counts = np.bincount(usable["group_index"], minlength=len(groups.labels))
    for label, count in zip(groups.labels, counts):
        if 0 < count < config.folds:
            log.warning(
                "age group %s has %d faces, fewer than the %d folds: some folds' networks never saw it",
                label,
                count,
                config.folds,
            )
    passes = 2 if config.second_pass_leave_out else 1
    with progress_bar(passes * config.folds, "folds", "fold")(None) as bar:  # a bar updated by hand
        years = out_of_fold(train, backbone, usable, groups, config.folds, config.seed, scratch, progress=bar)
        quality = label_quality(years, usable["age"], groups, train.max_age, config)
        if passes == 2:  # the networks learn the wrong labels too: train again without the likeliest ones
            kept = quality > np.quantile(quality, config.second_pass_leave_out)
            years = out_of_fold(
                train, backbone, usable, groups, config.folds, config.seed, scratch, trained_on=kept, progress=bar
            )
            quality = label_quality(years, usable["age"], groups, train.max_age, config)
    answer = answers(years, groups, train.max_age, rule="median")
    result = frame.assign(
        predicted_age=np.nan,
        label_quality=np.nan,
        suspected_label_error=pd.NA,
        label_check=reasons,
        **{f"oof_p_{label}": np.nan for label in groups.labels},
    )
    result.loc[usable["_row"], [f"oof_p_{label}" for label in groups.labels]] = np.round(answer.group_probabilities, 5)
    result.loc[usable["_row"], "predicted_age"] = answer.age
    result.loc[usable["_row"], "label_quality"] = np.round(quality, 6)
    result.loc[usable["_row"], "suspected_label_error"] = quality < config.threshold
    return result


def with_check_training(train: TrainConfig, config: LabelCheckConfig) -> TrainConfig:
    """The training config with the check's lighter schedule for the folds' networks."""
    features = train.model.face_features.model_copy(update={"ensemble": config.training.ensemble})
    schedule = train.training.model_copy(
        update={"epochs": config.training.epochs, "batch_size": config.training.batch_size}
    )
    # deterministic: a run killed mid-way, run again, gives the same rows
    return train.model_copy(
        update={
            "model": train.model.model_copy(update={"face_features": features}),
            "training": schedule,
            "deterministic": True,
        }
    )


def main(args) -> None:
    config = load_config(LabelCheckConfig, args.config, args.overrides)
    require_workspace(config.workspace)
    setup_logging(config.log_level)
    common = [
        f"{key}={value}"
        for key, value in (
            ("workspace", config.workspace),
            ("descriptor_cache", config.descriptor_cache),
            ("num_workers", config.num_workers),
        )
        if value is not None
    ]
    train = with_check_training(load_config(TrainConfig, config.train_config, common), config)
    start = time.perf_counter()
    frame = read_metadata_csv(
        config.input_csv,
        "input CSV",
        "run process_images.py first",
        ("file", "path", "age"),
        dtype={"file": str, "path": str},
    )
    image_folders = sorted({os.path.dirname(p) for p in frame["path"].dropna()})
    with OutputGuard(inputs=[config.input_csv, config.train_config, *image_folders]) as guard:
        output = guard.file(config.output_csv, "output_csv")
        cache = guard.journal(config.descriptor_cache, "descriptor_cache")
        with guard.scratch_beside(output) as scratch:
            result = check(config, train, frame, cache, scratch)
        write_csv(result, output)
        write_run_record({"check_labels": config, "train": train}, output)
    checked = result["label_quality"].notna()
    suspected = int(result["suspected_label_error"].fillna(False).astype(bool).sum())
    print(
        f"checked {int(checked.sum())} labelled faces with {config.folds} folds"
        f"{', in two rounds' if config.second_pass_leave_out else ''} in {time.perf_counter() - start:.0f}s: "
        f"{suspected} suspected label errors ({suspected / max(1, checked.sum()):.1%}), {int((~checked).sum())} rows "
        f"not checked; wrote {output}"
    )


if __name__ == "__main__":
    run_script(
        main,
        "Find the faces whose age label is likely wrong.",
        "check_labels.yaml",
        LabelCheckConfig,
        [
            "python check_labels.py",
            "python check_labels.py --set threshold=0.05 --set folds=10",
            "python check_labels.py --set score=cleanlab --set output_csv=/tmp/checked.csv",
        ],
    )
