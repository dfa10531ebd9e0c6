"""Exploration stage: measure every image of a face dataset and flag the low-quality ones.

Reads configs/explore_images.yaml and writes one CSV row per image file found (ok, low quality with the
failed checks, unreadable with the error, unlabelled with the reason), plus a summary of counts per
check and per age group.

    python explore_images.py
    python explore_images.py --set dataset_dir=../shared/data/utkface_sample --set checks.blurry.below=60

Measurements are kept beside the output CSV, in part files of a chunk of files each (output_csv with
the suffix .parts), keyed by the files' names, sizes and modification times and by the measuring
settings: an interrupted run continues where it stopped, and re-running after editing a threshold takes
seconds. Memory stays flat however many files there are.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from config_models import ExploreConfig
from image_reader import (
    LABEL_COLUMNS,
    Check,
    Status,
    ReaderSettings,
    check_images_quality,
    chunk_tables,
    duplicate_groups,
    flag_column,
    iter_dataset,
    load_explore_config,
    measure_chunks,
    plan_chunks,
    score_column,
)
from utils import (
    AgeGroups,
    PartStore,
    UserError,
    age_groups_from,
    check_output_csv,
    config_fingerprint,
    ensure_writable_dir,
    engine_name,
    atomic_write,
    overlaps,
    run_lock,
    run_script,
    setup_logging,
    write_csv_atomic,
    write_run_record,
)

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


def explore(config: ExploreConfig, groups: AgeGroups, output: Path, parts: PartStore) -> pd.DataFrame:
    """Find, measure and check every image; write the CSV and its summary; return the summary.

    The files go through in chunks, in three passes over a spool of the labelled file list: measure
    the chunks not measured yet (each into its part file), gather the hashes for the duplicate search,
    then check each chunk and append it to the CSV. Memory depends on the chunk size, not on the
    number of files (apart from a few bytes per file for the hashes).
    """
    dataset = iter_dataset(config.dataset_dir, config.labels, config.age_range, groups)
    settings = ReaderSettings.from_config(config)
    checks = list(config.checks) + ([Check.DUPLICATE, Check.AGE_CONFLICT] if config.duplicates.enabled else [])
    with tempfile.TemporaryFile("w+", encoding="utf-8", dir=parts.folder) as spool:
        chunks = plan_chunks(dataset, spool, parts, config.chunk_files)
        files = sum(chunk.files for chunk in chunks)
        log.info("found %d image files in %s", files, config.dataset_dir)
        measure_chunks(spool, chunks, parts, settings, config.num_workers, config.scheduler)
        duplicates = duplicate_groups(chunk_tables(spool, chunks, parts), files, config.duplicates) if config.duplicates.enabled else None

        summary, root_names, start = None, {}, 0
        with atomic_write(output, newline="", encoding="utf-8") as csv:
            for table in chunk_tables(spool, chunks, parts):
                found = duplicates.columns(start, table["file"], root_names) if duplicates else None
                checked = check_images_quality(table, config.checks, found)
                checked[column_order(checked, checks)].to_csv(csv, header=start == 0, index=False)
                counts = summarise(checked, checks, groups)
                summary = counts if summary is None else summary.assign(images=summary["images"] + counts["images"])
                start += len(table)
    write_csv_atomic(summary, config.summary_csv)
    write_run_record(config, output)
    parts.keep_only({chunk.part for chunk in chunks})
    return summary


def main(args) -> None:
    config = load_explore_config(args.config, args.overrides)
    setup_logging(config.log_level)
    groups = age_groups_from(config)
    output = check_output_csv(config.output_csv, "output_csv", inputs=[config.dataset_dir])
    check_output_csv(config.summary_csv, "summary_csv", inputs=[config.dataset_dir, output])
    ensure_writable_dir(output.parent, "output folder")
    ensure_writable_dir(Path(config.summary_csv).parent, "summary folder")
    start = time.perf_counter()
    parts_folder = output.with_suffix(".parts")
    if overlaps(parts_folder, config.dataset_dir):
        raise UserError(f"{parts_folder} (the measurements beside output_csv) overlaps the dataset folder: choose another output_csv")
    ensure_writable_dir(parts_folder, "measurements folder")
    with run_lock(output):
        summary = explore(config, groups, output, PartStore(parts_folder, config_fingerprint(config.metrics, config.images)))

    elapsed = time.perf_counter() - start
    counts = dict(zip(summary["name"][summary["section"] == "status"], summary["images"][summary["section"] == "status"]))
    files = int(summary["images"][summary["section"] == "total"].iloc[0])
    failed = summary[(summary["section"] == "check") & (summary["images"] > 0)]
    print(
        f"explored {files} files in {elapsed:.1f}s with {engine_name(config)}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    if len(failed):
        print("failed checks: " + ", ".join(f"{n} {c}" for c, n in zip(failed["name"], failed["images"])))
    print(f"wrote {output} and {config.summary_csv}")


if __name__ == "__main__":
    run_script(main, "Measure and check the quality of every image in a face dataset.", "explore_images.yaml")
