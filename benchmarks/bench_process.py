"""Benchmark the processing stage: the whole stage's rate, and each repair's cost per image.

    python benchmarks/bench_process.py DIR [--images 300]
    python benchmarks/bench_process.py --tiny      # a check that it runs: generated faces

In one run: explores DIR (or re-uses the cached measurements), times process_images.py over the result
with the default config, then times each repair operation alone on --images decoded images of DIR, and
plain cv2.imread of the same images as the reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.data.image_files import IMAGE_EXTENSIONS  # noqa: E402
from agepipe.quality.image_metrics import measure_array  # noqa: E402
from image_processor import adjust_exposure, denoise, enhance_texture, sharpen, stretch_contrast  # noqa: E402
from image_reader import load_explore_config  # noqa: E402
from process_images import Processor, load_process_config  # noqa: E402
from runs import add_dataset_arguments, dataset_of  # noqa: E402


def script(name: str, *overrides: str) -> float:
    command = [sys.executable, name] + [a for o in overrides for a in ("--set", o)]
    start = time.perf_counter()
    subprocess.run(command, cwd=PROJECT, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def per_image_ms(function, images) -> float:
    start = time.perf_counter()
    for image in images:
        function(image)
    return (time.perf_counter() - start) / len(images) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser, "a folder of images")
    parser.add_argument("--images", type=int, default=300, help="images per repair timing")
    args = parser.parse_args()
    config, explore = load_process_config(
        PROJECT / "configs/process_images.yaml", explore=load_explore_config(PROJECT / "configs/explore_images.yaml")
    )
    repairs = config.repairs

    with tempfile.TemporaryDirectory() as tmp:
        args.dataset_dir = dataset_of(args, parser, Path(tmp))
        script(
            "explore_images.py",
            f"dataset_dir={args.dataset_dir}",
            f"output_csv={tmp}/m.csv",
            f"summary_csv={tmp}/s.csv",
        )
        seconds = script(
            "process_images.py", f"input_csv={tmp}/m.csv", f"output_dir={tmp}/out", f"output_csv={tmp}/p.csv"
        )
        result = pd.read_csv(f"{tmp}/p.csv")
        counts = result["status"].value_counts().to_dict()
        print(
            f"process_images.py on {len(result)} images: {seconds:.1f} s, {len(result) / seconds:.0f} images/s (all "
            f"cores); {counts}"
        )

        paths = sorted(p for p in args.dataset_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.images]
        cv2.setNumThreads(1)
        reference = per_image_ms(lambda p: cv2.imread(str(p)), paths)
        images = [
            image for image in map(cv2.imread, map(str, paths)) if image is not None
        ]  # broken files have no pixels to repair
        settings = Processor(config, explore).settings
        timings = {
            "plain cv2.imread (reference)": reference,
            "re-measure (all metrics)": per_image_ms(lambda i: measure_array(i, settings), images),
            "denoise (h = 1.2 x 10)": per_image_ms(lambda i: denoise(i, 10.0, **repairs["noisy"]["denoise"]), images),
            "adjust_exposure": per_image_ms(lambda i: adjust_exposure(i, **repairs["dark"]["adjust_exposure"]), images),
            "stretch_contrast": per_image_ms(
                lambda i: stretch_contrast(i, **repairs["low_contrast"]["stretch_contrast"]), images
            ),
            "enhance_texture (CLAHE)": per_image_ms(
                lambda i: enhance_texture(i, **repairs["low_contrast"]["enhance_texture"]), images
            ),
            "sharpen": per_image_ms(lambda i: sharpen(i, **repairs["blurry"]["sharpen"]), images),
        }
        print(f"per image, one core, {len(images)} images of {args.dataset_dir}:")
        for name, ms in timings.items():
            print(f"  {name:30s} {ms:7.2f} ms   {ms / reference:6.1f} x decode")


if __name__ == "__main__":
    main()
