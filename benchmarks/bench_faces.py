"""Benchmark face detectors side by side: found on real face crops (per race group), false faces on
non-face images, and speed on one core beside plain decoding.

    python benchmarks/bench_faces.py DIR [--non-faces 300]
    python benchmarks/bench_faces.py --tiny      # a check that it runs: generated faces, 10 non-faces

DIR holds face crops with UTKFace names (age_gender_race_...), every one of which shows a face. The
non-face set is built offline from scikit-image's bundled pictures: the 100 non-face patches of its
LFW subset, and random crops of its photographs without people (coffee, rocket, coins, a cat...).
Detectors, each given the same decoded images on one thread:
- haar: OpenCV's Viola-Jones cascade (haarcascade_frontalface_alt2), as the explore stage used before;
- dlib_hog: dlib's HOG + linear SVM frontal detector (dlib-bin);
- blazeface: detector.FaceDetector with the settings of configs/explore_images.yaml, whose
  min_score and border_fraction were chosen on the even-numbered crops of ../shared/data/utkface_sample
  and the 250 random crops of a 600-image non-face set of another size; its rate on the odd-numbered
  crops is printed apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.faces.detector import DetectorSettings, FaceDetector  # noqa: E402
from image_reader import load_explore_config  # noqa: E402
from runs import add_dataset_arguments, dataset_of  # noqa: E402
from scenes import non_face_images  # noqa: E402

RACES = {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Other"}


def haar_detector():
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_alt2.xml"))

    def count(bgr):  # the explore stage's former settings: 100 px, 25% replicated border, faces >= 25 px
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        scale = 100 / min(gray.shape)
        gray = cv2.resize(
            gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA
        )
        gray = cv2.copyMakeBorder(gray, 25, 25, 25, 25, cv2.BORDER_REPLICATE)
        return len(cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3, minSize=(25, 25)))

    return count


def dlib_hog_detector():
    import dlib

    detector = dlib.get_frontal_face_detector()

    def count(bgr):
        pad = min(bgr.shape[:2]) // 4
        rgb = cv2.cvtColor(cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_REPLICATE), cv2.COLOR_BGR2RGB)
        return len(detector(rgb, 0))

    return count


def blazeface_detector(settings: DetectorSettings):
    detector = FaceDetector(settings)
    return lambda bgr: int(detector.detect(bgr).scores.size)


def timed_counts(count, images) -> tuple[np.ndarray, float]:
    count(images[0])  # load models before timing
    start = time.perf_counter()
    found = np.array([count(image) for image in images])
    return found, len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--non-faces", type=int, default=300)
    args = parser.parse_args()
    if args.tiny:
        args.non_faces = 10
    with tempfile.TemporaryDirectory(prefix="bench-faces-") as work:
        benchmark(dataset_of(args, parser, Path(work)), args.non_faces)


def benchmark(dataset_dir: Path, non_faces: int) -> None:
    cv2.setNumThreads(1)
    faces_config = load_explore_config(PROJECT / "configs/explore_images.yaml").faces.detector.model_dump()
    settings = DetectorSettings(**faces_config)

    files = sorted(
        p for p in dataset_dir.iterdir() if p.name.split("_")[0].isdigit() and p.suffix.lower() in (".jpg", ".png")
    )
    start = time.perf_counter()
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in files]
    decode_rate = len(files) / (time.perf_counter() - start)
    kept = [i for i, image in enumerate(images) if image is not None]
    images = [images[i] for i in kept]
    races = np.array([files[i].name.split("_")[2] if files[i].name.count("_") >= 3 else "?" for i in kept])
    others = non_face_images(non_faces)
    print(
        f"{len(images)} face crops in {dataset_dir}, {len(others)} non-face images; one thread; "
        f"plain cv2.imread {decode_rate:.0f} img/s"
    )
    print(f"blazeface settings: {faces_config}")

    detectors = {"haar": haar_detector(), "dlib_hog": dlib_hog_detector(), "blazeface": blazeface_detector(settings)}
    header = (
        f"{'detector':10s} {'found':>7s}  "
        + " ".join(f"{r:>7s}" for r in RACES.values())
        + f"  {'false':>9s} {'img/s':>7s} {'vs haar':>8s} {'vs imread':>9s}"
    )
    print(header)
    haar_rate = None
    for name, count in detectors.items():
        found, rate = timed_counts(count, images)
        false, _ = timed_counts(count, others)
        haar_rate = haar_rate or rate
        per_race = " ".join(
            f"{(found[races == code] > 0).mean():7.2%}" if (races == code).any() else f"{'-':>7s}" for code in RACES
        )
        print(
            f"{name:10s} {(found > 0).mean():7.2%}  {per_race}  {int((false > 0).sum()):4d}/{len(others):<4d} "
            f"{rate:7.0f} "
            f"{rate / haar_rate:7.2f}x {rate / decode_rate:8.2f}x"
        )
        if name == "blazeface":
            # min_score and border_fraction were chosen on the even-numbered crops: the odd ones are unseen
            unseen, unseen_races = found[1::2] > 0, races[1::2]
            worst = min(
                (unseen[unseen_races == code].mean(), RACES[code]) for code in RACES if (unseen_races == code).any()
            )
            print(
                f"  on the {len(unseen)} odd-numbered crops, not used to choose its settings: found "
                f"{unseen.mean():.2%}, "
                f"worst group {worst[1]} {worst[0]:.2%}"
            )
            print("  missed: " + ", ".join(files[kept[i]].name for i in np.flatnonzero(found == 0)[:10]))


if __name__ == "__main__":
    main()
