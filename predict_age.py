"""Prediction: find the faces in any photo, folder or table of images, and give each an answer that never
contradicts itself. One CSV row per image file (its largest face), or one per face (`row_per_face`):

    file, faces_found                   the image (as given) and how many faces were found in it
    face_x, face_y, face_width, face_height    its face's box: top-left corner and size, in image pixels
    age                                 the true age, when the input tells it (a table's age column, labels_csv,
                                        UTKFace names): `age` is a label in every CSV of the pipeline
    predicted_age_group, predicted_age_group_confidence    the likeliest age group and its (calibrated) probability
    predicted_age                       an age inside predicted_age_group
    predicted_age_p10, predicted_age_p90    the interval holding `interval` (0.8) of the probability: its percentiles
    p_<group>                           each group's probability
    reason                              why a row has no answer (no face found, unreadable...): never a guess

When true ages are known, the same metrics as train_model.py are printed, so any labelled folder or
table is an independent test set. The default input is the test split of the default model: faces it
never saw.

    python predict_age.py --set inputs=[~/photos] --set model_path=models/age_group_classifier/model.keras
    python predict_age.py --set inputs=[~/photos] --set labels_csv=~/photos/labels.csv   # scored against your labels
    python predict_age.py --set prior_csv=csv/target_age_distribution.csv                # for Australia's age mix

Faces are described once and cached by content (`descriptor_cache`, shared with training).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from agepipe.config.loading import load_config
from agepipe.config.model_stages import PredictConfig
from agepipe.data.datasets import iter_labelled_images
from agepipe.data.image_files import FileLimits
from agepipe.model.backbones import BOX_COLUMNS, saved_backbone
from agepipe.model.estimates import (
    Answers,
    answer_columns,
    answers,
    correct_prior,
    evaluate_answers,
    population_shares,
    tempered,
)
from agepipe.model.saved_models import ModelMetadata, read_model_metadata
from agepipe.running.output_guard import OutputGuard
from agepipe.running.parallel import Engine
from agepipe.running.writes import atomic_write, record_written, recorded_config, write_run_record
from utils import require_workspace, run_script, setup_logging

log = logging.getLogger("agepipe.predict")
SHOWN_INPUTS = 3  # the earlier inputs a summary line names (a list of 10,000 files would flood it)


def main(args) -> None:
    config = load_config(PredictConfig, args.config, args.overrides)
    require_workspace(config.workspace)
    setup_logging(config.log_level)
    start = time.perf_counter()
    with OutputGuard(inputs=[*config.inputs, config.model_path, config.prior_csv, config.labels_csv]) as guard:
        output_csv = guard.file(config.output_csv, "output_csv")
        replaced = earlier_inputs(output_csv, config.inputs)
        cache = guard.journal(config.descriptor_cache, "descriptor_cache")
        metadata = read_model_metadata(config.model_path)
        prior = population_shares(config.prior_csv, metadata.groups, "prior_csv")  # a bad prior: one line, at once
        unseen = [g for g, share in zip(metadata.groups.labels, metadata.training_group_shares) if share <= 0]
        if prior is not None and unseen:
            log.warning("the model was trained on no face aged %s: prior_csv moves no answer there", ", ".join(unseen))
        images = iter_labelled_images(config.inputs, config.labels_csv, config.age_range)
        backbone = saved_backbone(metadata, FileLimits.from_config(config.file_limits))
        with guard.spool_beside(output_csv) as spool:
            chunks = backbone.prepare_batches(
                images, Engine.of(config), cache, spool, config.images_per_chunk, all_faces=config.row_per_face
            )  # describes every image before TensorFlow: the pool forks
            tally = write_predictions(chunks, backbone, metadata, config, prior, output_csv)
        write_run_record({"predict": config, "model": metadata.config}, output_csv)
    print(
        f"predicted {tally.answered} of {tally.rows} {'faces' if config.row_per_face else 'images'} "
        f"({tally.rows - tally.answered} without an answer, each with its reason) in "
        f"{time.perf_counter() - start:.0f}s; wrote {output_csv}"
        + (f", replacing the predictions for {replaced}" if replaced else "")
    )
    if tally.scored:
        true_ages = np.concatenate(tally.true_ages)
        scores = evaluate_answers(Answers.concatenate(tally.scored), true_ages, metadata.groups, metadata.max_age)
        print(
            f"true ages known for {len(true_ages)} answered rows: accuracy {scores['accuracy']:.1%}, one-off "
            f"{scores['one_off_accuracy']:.1%}, macro-F1 {scores['macro_f1']:.3f}, MAE {scores['mae_years']:.1f} "
            "years, "
            f"calibration error {scores['calibration_error']:.3f}, {metadata.interval:.0%} interval coverage "
            f"{scores['interval_coverage']:.1%}"
        )


def earlier_inputs(output_csv, inputs: list[str]) -> str | None:
    """What an earlier prediction into `output_csv` predicted, when it was other inputs than these (its
    run record says): a summary line that replaces it says so."""
    predicted = (recorded_config(output_csv) or {}).get("predict")
    earlier = predicted.get("inputs") if isinstance(predicted, dict) else None
    if not isinstance(earlier, list) or earlier == list(inputs):
        return None
    named = ", ".join(map(str, earlier[:SHOWN_INPUTS]))
    return named + (f" and {len(earlier) - SHOWN_INPUTS} more" if len(earlier) > SHOWN_INPUTS else "")


@dataclass
class Tally:
    """What the chunks written so far add up to: rows, answered rows, and the answers whose true age
    is known (compact: 18 bytes a row) with those ages."""

    rows: int = 0
    answered: int = 0
    scored: list = field(default_factory=list)
    true_ages: list = field(default_factory=list)


def write_predictions(
    chunks, backbone, metadata: ModelMetadata, config: PredictConfig, prior: list[float] | None, output_csv
) -> Tally:
    """Predict each chunk of prepared rows and append it to the output CSV (written atomically). The
    model is loaded only when a chunk has a face to predict (TensorFlow only for a model without a
    LiteRT copy of its network). `prior`: the population's age-group shares to correct answers to, if any."""
    tally, model = Tally(), None
    with atomic_write(output_csv, newline="", encoding="utf-8") as out:
        for rows in chunks:
            if model is None and rows["inputs"].notna().any():
                model = backbone.load(config.model_path, metadata)
            table, answer = predicted(rows, backbone, metadata, config, model, prior)
            table.to_csv(out, header=tally.rows == 0, index=False)
            answered = table["predicted_age"].notna().to_numpy()
            labelled = answered & table["age"].notna().to_numpy()
            tally.rows, tally.answered = tally.rows + len(table), tally.answered + int(answered.sum())
            if labelled.any():
                tally.scored.append(answer.compact(labelled))
                tally.true_ages.append(table.loc[labelled, "age"].to_numpy(np.float32))
    record_written(output_csv)
    return tally


def predicted(
    rows: pd.DataFrame, backbone, metadata: ModelMetadata, config: PredictConfig, model, prior: list[float] | None
) -> tuple[pd.DataFrame, Answers]:
    """The output table (the answer to each prepared face, or the reason there is none) and the
    answers read from each row's distribution over years (a flat one where there is no answer)."""
    groups, max_age = metadata.groups, metadata.max_age
    usable = rows["inputs"].notna().to_numpy()
    years = np.full((len(rows), max_age + 1), np.nan)
    if usable.any():
        years[usable] = tempered(
            backbone.predict(model, rows[usable], config.flip_test_time_augmentation, config.batch_size),
            metadata.temperature,
            groups,
            max_age,
        )
    finite = np.isfinite(years).all(axis=1)
    reasons = np.array(rows["problem"].where(~usable, None), dtype=object)
    reasons[usable & ~finite] = "the model gave no finite prediction for this image"
    if prior is not None and finite.any():
        years[finite] = correct_prior(years[finite], groups, max_age, metadata.training_group_shares, prior)
    answer = answers(
        np.where(finite[:, None], years, 1.0 / (max_age + 1)), groups, max_age, metadata.answer_rule, metadata.interval
    )
    table = rows[["file", "faces_found", *BOX_COLUMNS]].assign(
        faces_found=rows["faces_found"].astype("Int64"),
        age=rows["age"].astype("Int64") if "age" in rows else pd.array([pd.NA] * len(rows), "Int64"),
        **answer_columns(answer, groups, metadata.interval, finite),
        reason=reasons,
    )
    return table, answer


if __name__ == "__main__":
    run_script(
        main,
        "Find faces and predict their age group and age with a saved model.",
        "predict_age.yaml",
        PredictConfig,
        [
            "python predict_age.py",
            "python predict_age.py --set inputs=[sample_dataset] --set row_per_face=true --set "
            "output_csv=/tmp/faces.csv",
            "python predict_age.py --set inputs=[sample_dataset,csv/processed_metadata.csv] --set "
            "output_csv=/tmp/predictions.csv",
        ],
    )
