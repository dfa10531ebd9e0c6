"""Exploration stage: measure every image of a face dataset and flag the low-quality ones.

Reads configs/explore_images.yaml and writes one CSV row per image file found (ok, low quality with the
failed checks, unreadable with the error, unlabelled with the reason), plus a summary of counts per
check and per age group.

    python explore_images.py
    python explore_images.py --set dataset_dir=../shared/data/utkface_sample --set checks.blurry.below=60

Measurements are kept beside the output CSV, in part files of a chunk of files each (in output_csv's
name + ".parts"), keyed by the files' names, sizes and modification times and by the measuring
settings: an interrupted run continues where it stopped, and re-running after editing a threshold takes
seconds. Memory stays flat however many files there are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from agepipe.config.data_stages import ExploreConfig, Labels
from agepipe.config.loading import config_fingerprint
from agepipe.data.age_groups import AgeGroups, age_groups_from
from agepipe.data.datasets import LABEL_COLUMNS
from agepipe.data.vocabulary import Check, Status, flag_column, score_column
from agepipe.errors import UserError
from agepipe.quality.duplicates import duplicate_groups
from agepipe.quality.image_metrics import ReaderSettings
from agepipe.running.output_guard import OutputGuard
from agepipe.running.parallel import Engine
from agepipe.running.resume import PartStore
from agepipe.running.writes import atomic_write, record_written, recorded_config, write_csv, write_run_record
from image_reader import check_images_quality, compute_images_quality_metrics, load_dataset, load_explore_config
from utils import run_script, setup_logging

log = logging.getLogger("agepipe.explore")


def summarise(frame: pd.DataFrame, checks: list[str], groups: AgeGroups) -> pd.DataFrame:
    """Counts per status, per failed check and per age group (all labelled, and ok only). The counts of
    a whole table are the sums of those of its chunks."""
    rows = [("status", s.value, int((frame["status"] == s).sum())) for s in Status]
    rows += [("check", c, int(frame[flag_column(c)].sum())) for c in checks]
    for label in groups.labels:
        in_group = frame["age_group"] == label
        rows.append(("age_group_labelled", label, int(in_group.sum())))
        rows.append(("age_group_ok", label, int((in_group & (frame["status"] == Status.OK)).sum())))
    rows.append(("total", "files", len(frame)))
    return pd.DataFrame(rows, columns=["section", "name", "images"])


def column_order(frame: pd.DataFrame, checks: list[str]) -> list[str]:
    """Labels, verdicts (each flag with its score), measurements, then errors and the path."""
    verdicts = [column for c in checks for column in (flag_column(c), score_column(c)) if column in frame.columns]
    leading = LABEL_COLUMNS + ["status", "reason", "failed_checks"] + verdicts
    trailing = ["error", "label_error", "path"]
    return leading + [c for c in frame.columns if c not in leading + trailing] + trailing


def explore(
    config: ExploreConfig, groups: AgeGroups, output: Path, summary_csv: Path, parts: PartStore
) -> pd.DataFrame:
    """Find, measure and check every image; write the CSV and its summary; return the summary.

    The files go through in chunks, in three passes over a spool of the labelled file list: measure
    the chunks not measured yet (each into its part file), gather the hashes for the duplicate search,
    then check each chunk and append it to the CSV. Memory depends on the chunk size, not on the
    number of files (apart from a few bytes per file for the hashes).
    """
    settings = ReaderSettings.from_config(config)
    checks = list(config.checks) + ([Check.DUPLICATE, Check.AGE_CONFLICT] if config.duplicates.enabled else [])
    with load_dataset(
        config.dataset_dir, config.labels, config.age_range, groups, parts, config.chunk_files
    ) as dataset:
        log.info("found %d image files in %s", dataset.files, config.dataset_dir)
        compute_images_quality_metrics(dataset, settings, Engine.of(config))
        duplicates = (
            duplicate_groups(dataset.tables(), dataset.files, config.duplicates) if config.duplicates.enabled else None
        )

        summary, root_names, start = None, {}, 0
        with atomic_write(output, newline="", encoding="utf-8") as csv:
            for table in dataset.tables():
                found = duplicates.columns(start, table["file"], root_names) if duplicates else None
                checked = check_images_quality(table, config.checks, found)
                checked[column_order(checked, checks)].to_csv(csv, header=start == 0, index=False)
                counts = summarise(checked, checks, groups)
                summary = counts if summary is None else summary.assign(images=summary["images"] + counts["images"])
                start += len(table)
        record_written(output)
        parts.keep_only({chunk.part for chunk in dataset.chunks})
    write_csv(summary, summary_csv)
    write_run_record(config, output)
    return summary


def with_recorded_dataset(config: ExploreConfig, overrides: list[str]) -> ExploreConfig:
    """The dataset a run explores: the one typed with --set; else the one this workspace's last exploration
    explored (the run record beside output_csv), so that a re-run does not fall back to the YAML's; else
    the YAML's."""
    typed = {assignment.partition("=")[0].strip() for assignment in overrides}
    if "dataset_dir" in typed or any(key == "labels" or key.startswith("labels.") for key in typed):
        return config
    recorded = recorded_config(config.output_csv)
    try:
        dataset_dir, labels = recorded["dataset_dir"], Labels.model_validate(recorded["labels"])
    except (KeyError, TypeError, ValueError):
        return config  # no exploration here yet (or not one to follow): the YAML's dataset
    if dataset_dir == config.dataset_dir and labels == config.labels:
        return config
    if not Path(dataset_dir).is_dir():
        raise UserError(
            f"this workspace last explored {dataset_dir}, which no longer exists: name the dataset with "
            "--set dataset_dir=..."
        )
    log.info("exploring %s again, as the last exploration of this workspace did", dataset_dir)
    return config.model_copy(update={"dataset_dir": dataset_dir, "labels": labels})


def main(args) -> None:
    config = load_explore_config(args.config, args.overrides)
    setup_logging(config.log_level)
    config = with_recorded_dataset(config, args.overrides)
    groups = age_groups_from(config)
    start = time.perf_counter()
    with OutputGuard(inputs=[config.dataset_dir, config.labels.csv_path if config.labels.from_csv else None]) as guard:
        output = guard.file(config.output_csv, "output_csv")
        summary_csv = guard.file(config.summary_csv, "summary_csv")
        parts = guard.folder(f"{output}.parts", "the measurements beside output_csv", self_identifying=True)
        store = PartStore(parts.path, config_fingerprint(config.metrics, config.images))
        summary = explore(config, groups, output, summary_csv, store)

    elapsed = time.perf_counter() - start
    counts = dict(
        zip(summary["name"][summary["section"] == "status"], summary["images"][summary["section"] == "status"])
    )
    files = int(summary["images"][summary["section"] == "total"].iloc[0])
    failed = summary[(summary["section"] == "check") & (summary["images"] > 0)]
    print(
        f"explored {files} files in {elapsed:.1f}s with {Engine.of(config).name}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    if len(failed):
        print("failed checks: " + ", ".join(f"{n} {c}" for c, n in zip(failed["name"], failed["images"])))
    print(f"wrote {output} and {summary_csv}")


if __name__ == "__main__":
    run_script(
        main,
        "Measure and check the quality of every image in a face dataset.",
        "explore_images.yaml",
        ExploreConfig,
        [
            "python explore_images.py",
            "python explore_images.py --set dataset_dir=../shared/data/utkface_sample --set checks.blurry.below=10 "
            "--set num_workers=1",
            "python explore_images.py --set workspace=/tmp/agepipe-run --set dataset_dir=sample_dataset",
        ],
    )
