"""Prediction: find the faces in any photo, folder or table of images, and give each an answer that never
contradicts itself. One CSV row per image file (its largest face), or one per face (`row_per_face`):

    file, faces_found, face_x, face_y, face_width, face_height   where the face is, in image pixels
    age_group, age_group_confidence     the likeliest age group and its (calibrated) probability
    age, age_low, age_high              an age inside age_group, and an interval holding `interval` of the probability
    p_<group>                           each group's probability
    true_age                            when the input tells it (a table's age column, labels_csv, UTKFace names)
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
import numpy as np
import pandas as pd

from age_estimates import answers, correct_prior, evaluate, population_shares, tempered
from backbones import BOX_COLUMNS, saved_backbone
from cli import run_script, setup_logging
from config import load_config
from model_configs import PredictConfig
from dataset import labelled_images
from model_files import ModelMetadata, read_model_metadata
from outputs import OutputGuard
from writes import write_csv, write_run_record
from parallel import Engine

log = logging.getLogger("agepipe.predict")


def main(args) -> None:
    config = load_config(PredictConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    with OutputGuard(inputs=[*config.inputs, config.model_path, config.prior_csv, config.labels_csv]) as guard:
        output_csv = guard.file(config.output_csv, "output_csv")
        cache = guard.journal(config.descriptor_cache, "descriptor_cache")
        metadata = read_model_metadata(config.model_path)
        images = labelled_images(config.inputs, config.labels_csv, config.age_range)
        backbone = saved_backbone(metadata)
        rows = backbone.prepare(images, Engine.of(config), cache, all_faces=config.row_per_face)  # before TensorFlow: the pool forks
        table, years = predicted(rows, backbone, metadata, config)
        write_csv(table, output_csv)
        write_run_record({"predict": config, "model": metadata.config}, output_csv)
    answered = table["age"].notna()
    print(f"predicted {int(answered.sum())} of {len(table)} {'faces' if config.row_per_face else 'images'} "
          f"({int((~answered).sum())} without an answer, each with its reason); wrote {output_csv}")
    labelled = answered & table["true_age"].notna()
    if labelled.any():
        scores = evaluate(years[labelled.to_numpy()], table.loc[labelled, "true_age"], metadata.groups, metadata.max_age,
                          rule=metadata.answer_rule, interval=metadata.interval)
        print(f"true ages known for {int(labelled.sum())} answered rows: accuracy {scores['accuracy']:.1%}, one-off "
              f"{scores['one_off_accuracy']:.1%}, macro-F1 {scores['macro_f1']:.3f}, MAE {scores['mae_years']:.1f} years, "
              f"calibration error {scores['calibration_error']:.3f}, {metadata.interval:.0%} interval coverage {scores['interval_coverage']:.1%}")


def predicted(rows: pd.DataFrame, backbone, metadata: ModelMetadata, config: PredictConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """The output table (the answer to each prepared face, or the reason there is none) and each row's
    year probabilities (NaN where there is no answer)."""
    from age_model import load_with_metadata

    groups, max_age = metadata.groups, metadata.max_age
    usable = rows["inputs"].notna().to_numpy()
    years = np.full((len(rows), max_age + 1), np.nan)
    if usable.any():
        model, _ = load_with_metadata(config.model_path)
        years[usable] = tempered(backbone.predict(model, rows[usable], config.flip_test_time_augmentation, config.batch_size), metadata.temperature)
    finite = np.isfinite(years).all(axis=1)
    reasons = np.array(rows["problem"].where(~usable, None), dtype=object)
    reasons[usable & ~finite] = "the model gave no finite prediction for this image"
    prior = population_shares(config.prior_csv, groups, "prior_csv")
    if prior is not None and finite.any():
        years[finite] = correct_prior(years[finite], groups, max_age, metadata.training_group_shares, prior)
    answer = answers(np.where(finite[:, None], years, 1.0 / (max_age + 1)), groups, max_age, metadata.answer_rule, metadata.interval)
    table = rows[["file", "faces_found", *BOX_COLUMNS]].assign(
        faces_found=rows["faces_found"].astype("Int64"), age_group=np.where(finite, [groups.labels[g] for g in answer.group], None),
        age_group_confidence=np.where(finite, np.round(answer.confidence, 4), np.nan), age=np.where(finite, answer.age, np.nan),
        age_low=np.where(finite, answer.low, np.nan), age_high=np.where(finite, answer.high, np.nan))
    for index, label in enumerate(groups.labels):
        table[f"p_{label}"] = np.where(finite, np.round(answer.group_probabilities[:, index], 4), np.nan)
    table["true_age"] = rows["age"].astype("Int64") if "age" in rows else pd.array([pd.NA] * len(rows), "Int64")
    table["reason"] = reasons
    return table, years


if __name__ == "__main__":
    run_script(main, "Find faces and predict their age group and age with a saved model.", "predict_age.yaml", PredictConfig, [
        "python predict_age.py",
        "python predict_age.py --set inputs=[sample_dataset] --set row_per_face=true --set output_csv=/tmp/faces.csv",
        "python predict_age.py --set inputs=[sample_dataset,csv/processed_metadata.csv] --set output_csv=/tmp/predictions.csv",
    ])
