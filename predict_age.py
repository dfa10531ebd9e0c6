"""Apply a saved age-group classifier to images: one CSV row per image file.

Each row holds the predicted group, the probability of every group and the expected age (probabilities
x group mid-points); an unreadable image gets a row with the error instead. If the file names carry
ages (UTKFace form), the same metrics as train_model.py are printed, so any labelled folder can serve
as an independent test set.

    python predict_age.py --set inputs=[path/to/folder] --set model_path=models/age_group_classifier/model.keras
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from image_reader import IMAGE_EXTENSIONS, UnreadableImage, display_name, find_image_files, parse_utkface_name, read_image
from utils import AgeGroups, Bool, Int, ListOf, Str, UserError, ensure_writable_dir, load_config, run_script, setup_logging, write_csv_atomic

log = logging.getLogger("agepipe.predict")

SCHEMA = {
    "model_path": Str(),
    "inputs": ListOf(Str(), min_length=1),
    "output_csv": Str(),
    "batch_size": Int(1, 4096),
    "flip_test_time_augmentation": Bool(),
}
# Decoding for prediction accepts anything exploration accepts, with generous guards.
MAX_PIXELS, MAX_FILE_BYTES = 100_000_000, 200_000_000


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
    config = load_config(SCHEMA, args.config, args.overrides)
    setup_logging(config["log_level"])
    files = list_images(config["inputs"])
    ensure_writable_dir(Path(config["output_csv"]).parent, "output folder")

    from age_model import evaluate, load_with_metadata, predict_probabilities
    import tensorflow as tf

    model, metadata = load_with_metadata(config["model_path"])
    groups, size, max_age = AgeGroups(tuple(metadata["age_group_edges"])), metadata["input_size"], metadata["max_age"]

    rows, images = [], []
    for name, real in files:
        row = {"file": name, "error": None}
        try:
            bgr, _ = read_image(real, MAX_PIXELS, MAX_FILE_BYTES)
            rgb = tf.image.resize(bgr[..., ::-1].copy(), (size, size), method="area", antialias=True)
            images.append(tf.cast(tf.clip_by_value(tf.round(rgb), 0, 255), tf.float32))
        except UnreadableImage as exc:
            row["error"] = str(exc)
        rows.append(row)
    readable = [r for r in rows if r["error"] is None]
    if images:
        dataset = tf.data.Dataset.from_tensor_slices(tf.stack(images)).batch(config["batch_size"])
        probabilities = predict_probabilities(model, dataset, config["flip_test_time_augmentation"])
    else:
        probabilities = np.zeros((0, len(groups.labels)))
    midpoints = np.asarray(groups.midpoints(max_age))
    for row, p in zip(readable, probabilities):
        row["predicted_group"] = groups.labels[int(p.argmax())]
        row["expected_age"] = round(float(p @ midpoints), 1)
        row.update({f"p_{label}": round(float(v), 4) for label, v in zip(groups.labels, p)})
    frame = pd.DataFrame(rows)
    columns = ["file", "predicted_group", "expected_age"] + [f"p_{label}" for label in groups.labels] + ["error"]
    frame = frame.reindex(columns=columns)
    write_csv_atomic(frame, config["output_csv"])
    print(f"predicted {len(readable)} of {len(rows)} images ({len(rows) - len(readable)} unreadable); wrote {config['output_csv']}")

    ages = [parse_utkface_name(os.path.basename(r["file"]))["age"] for r in readable]
    labelled = [i for i, a in enumerate(ages) if a is not None and groups.index_of(a) >= 0]
    if labelled:
        true_ages = np.array([ages[i] for i in labelled])
        metrics = evaluate(probabilities[labelled], np.array([groups.index_of(a) for a in true_ages]), true_ages, groups, max_age)
        print(f"names carry ages: on {metrics['images']} images, accuracy {metrics['accuracy']:.1%}, one-off "
              f"{metrics['one_off_accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f}, MAE {metrics['mae_years']:.1f} years")


if __name__ == "__main__":
    run_script(main, "Predict age groups of images with a saved model.", "predict_age.yaml")
