"""Benchmark training: is decoding or the model the bottleneck?

    python benchmarks/bench_train.py METADATA_CSV [--steps 30] [--set key=value ...]

With the training config (plus --set overrides), in one run over the same images:
1. the input pipeline alone: decode, resize, augment, batch, with no cache, images per second;
2. the same pipeline read from its cache (as from the second epoch on);
3. training steps (forward, backward, update) on batches already in memory, images per second;
4. fit on the cached pipeline, end to end.
The slowest of (2) and (3) bounds the end-to-end rate from the second epoch on.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from age_model import augmentation_layers, build_model, label_distribution_matrix, make_dataset  # noqa: E402
from train_model import SCHEMA, read_training_csv  # noqa: E402
from utils import age_groups_from, load_config  # noqa: E402


def rate(iterable, batch_size: int, steps: int) -> float:
    iterator = iter(iterable)
    next(iterator)  # warm-up: graph tracing, thread pools
    start = time.perf_counter()
    count = 0
    for _ in range(steps):
        try:
            next(iterator)
        except StopIteration:
            break
        count += batch_size
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metadata_csv")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(SCHEMA, PROJECT / "configs/train_model.yaml", args.overrides)
    import keras

    groups = age_groups_from(config)
    frame = read_training_csv(args.metadata_csv, groups)
    size, batch = config["input"]["image_size"], config["input"]["batch_size"]
    targets = label_distribution_matrix(groups, config["max_age"], config["training"]["label_sigma_years"])
    augment = augmentation_layers(config["augmentation"], 0)
    # enough images for the steps, repeated so the pipeline never runs dry
    paths = np.resize(frame["path"].to_numpy(str), batch * (args.steps + 2))
    ages = np.resize(frame["age"].to_numpy(), len(paths))
    model = build_model(config["model"], size, len(groups.labels))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    print(f"{config['model']['backbone']} {model.count_params():,} parameters, input {size}x{size}, batch {batch}")

    def pipeline(cache):
        return make_dataset(paths, ages, targets, None, size, batch, 1024, True, 0, augment, cache)

    uncached = rate(pipeline(None), batch, args.steps)
    print(f"input pipeline, decode + resize + augment:   {uncached:8.0f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        cached = pipeline(f"{tmp}/cache")
        for _ in cached:  # fill the cache once
            pass
        from_cache = rate(cached, batch, args.steps)
        print(f"input pipeline from its cache + augment:     {from_cache:8.0f} images/s")
        images, labels = next(iter(cached))
        step = rate(iter(lambda: model.train_on_batch(images, labels), None), batch, args.steps)
        print(f"training steps on in-memory batches:         {step:8.0f} images/s")
        start = time.perf_counter()
        model.fit(cached, epochs=1, verbose=0, shuffle=False)
        print(f"fit, end to end on the cached pipeline:      {len(paths) / (time.perf_counter() - start):8.0f} images/s")
    bottleneck = "the model" if step < from_cache else "the input pipeline"
    print(f"bottleneck from the second epoch on: {bottleneck} ({min(step, from_cache) / max(step, from_cache):.0%} of the other's rate)")


if __name__ == "__main__":
    main()
