"""Apply a saved age classifier to images: one CSV row per image file.

Each row holds the predicted group, the probability of every group and the expected age (the mean of
the predicted distribution over years); an image that cannot be read or described gets a row with the
reason instead. If the file names carry ages (UTKFace form), the same metrics as train_model.py are
printed, so any labelled folder can serve as an independent test set.

    python predict_age.py --set inputs=[path/to/folder] --set model_path=models/age_group_classifier/model.keras
    python predict_age.py --set prior_csv=csv/target_age_distribution.csv   # for Australia's age mix

Images are streamed in batches (pixel models) or described once and cached beside the output CSV
(face-descriptor models, in `descriptor_cache`, shared with training), so memory does not grow with the number of images.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from face_analysis import DESCRIPTOR_BACKBONE, MAX_FILE_BYTES, MAX_PIXELS, DescriptorSettings, describe_files
from image_io import UnreadableImage
from dataset import display_name, find_image_files, parse_utkface_name
from image_io import IMAGE_EXTENSIONS
from config_models import PredictConfig
from cli import run_script, setup_logging
from config import load_config
from errors import UserError
from model_files import ModelMetadata, read_model_metadata
from outputs import OutputGuard, write_csv, write_run_record
from parallel import Engine

log = logging.getLogger("agepipe.predict")

def list_images(inputs: list[str]) -> list[tuple[str, str]]:
    """(name shown in the CSV, real path) of every image in the given folders and files."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [(str(path / name), real) for name, real in find_image_files(path)]
        elif path.is_file():
            found.append((display_name(str(path)), str(path)))
        else:
            raise UserError(f"input {item} does not exist")
    if not found:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(inputs)}")
    return found


def main(args) -> None:
    config = load_config(PredictConfig, args.config, args.overrides)
    setup_logging(config.log_level)
    with OutputGuard(inputs=[*config.inputs, config.model_path, config.prior_csv]) as guard:
        output_csv = guard.file(config.output_csv, "output_csv")
        cache = guard.journal(config.descriptor_cache, "descriptor_cache")
        metadata = read_model_metadata(config.model_path)  # before TensorFlow: the descriptor pool forks
        predict(config, metadata, list_images(config.inputs), output_csv, cache)


def predict(config: PredictConfig, metadata: ModelMetadata, files: list[tuple[str, str]], output_csv: Path, cache: Path) -> None:
    paths = [real for _, real in files]
    flip = config.flip_test_time_augmentation

    groups, max_age = metadata.groups, metadata.max_age
    errors: list[str | None] = [None] * len(files)
    probabilities = np.full((len(files), max_age + 1), np.nan, np.float32)
    if metadata.backbone == DESCRIPTOR_BACKBONE:
        settings = DescriptorSettings(**metadata.descriptor.model_dump())
        descriptors, problems = describe_files(paths, settings, cache, Engine.of(config), MAX_PIXELS, MAX_FILE_BYTES)
        from age_model import load_with_metadata, predict_years

        model, _ = load_with_metadata(config.model_path)
        described = [i for i, d in enumerate(descriptors) if d is not None]
        for i, (d, problem) in enumerate(zip(descriptors, problems)):
            errors[i] = problem if d is None else None
        if described:
            stacked = np.stack([descriptors[i] for i in described])
            second = stacked[:, 1] if flip and stacked.shape[1] > 1 else None
            probabilities[described] = predict_years(model, stacked[:, 0], second, config.batch_size)
    else:
        from age_model import load_pixels, load_with_metadata, predict_years
        import tensorflow as tf

        model, _ = load_with_metadata(config.model_path)
        size = metadata.input_size
        for start in range(0, len(files), config.batch_size):  # streamed: one batch of pixels in memory
            batch, where = [], []
            for i in range(start, min(start + config.batch_size, len(files))):
                try:
                    batch.append(load_pixels(paths[i], size))
                    where.append(i)
                except UnreadableImage as exc:
                    errors[i] = str(exc)
            if batch:
                images = tf.data.Dataset.from_tensors(np.stack(batch).astype(np.float32))
                probabilities[where] = predict_years(model, images, mirrored_inputs=flip)

    from age_model import correct_prior, evaluate, group_matrix, population_shares

    for i in np.flatnonzero(~np.isfinite(probabilities).all(axis=1)):
        errors[i] = errors[i] or "the model gave no finite prediction for this image"
    prior = population_shares(config.prior_csv, groups)
    readable = np.array([e is None for e in errors])
    if prior is not None and readable.any():
        probabilities[readable] = correct_prior(probabilities[readable], groups, max_age, metadata.training_group_shares, prior)
    group_probabilities = probabilities @ group_matrix(groups, max_age)
    frame = pd.DataFrame({"file": [name for name, _ in files]})
    frame["predicted_group"] = [groups.labels[int(p.argmax())] if ok else None for p, ok in zip(group_probabilities, readable)]
    frame["expected_age"] = np.round(probabilities @ np.arange(max_age + 1), 1)
    for index, label in enumerate(groups.labels):
        frame[f"p_{label}"] = np.round(group_probabilities[:, index], 4)
    frame["error"] = errors
    write_csv(frame, output_csv)
    write_run_record({"predict": config, "model": metadata.config}, output_csv)
    print(f"predicted {int(readable.sum())} of {len(files)} images ({int((~readable).sum())} without a prediction); wrote {output_csv}")

    ages = np.array([parse_utkface_name(os.path.basename(name))["age"] for name, _ in files], dtype=object)
    labelled = [i for i in np.flatnonzero(readable) if ages[i] is not None and 0 <= ages[i] <= max_age and groups.index_of(ages[i]) >= 0]
    if labelled:
        metrics = evaluate(probabilities[labelled], ages[labelled].astype(float), groups, max_age)
        print(f"names carry ages: on {metrics['images']} images, accuracy {metrics['accuracy']:.1%}, one-off "
              f"{metrics['one_off_accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f}, MAE {metrics['mae_years']:.1f} years")


if __name__ == "__main__":
    run_script(main, "Predict the age group and age of faces with a saved model.", "predict_age.yaml")
