"""Exploration stage: measure every image of a face dataset and flag the low-quality ones.

Reads configs/explore_images.yaml and writes one CSV row per image file found (ok, low quality with the
failed checks, unreadable with the error, unlabelled with the reason), plus a summary of counts per
check and per age group.

    python explore_images.py
    python explore_images.py --set dataset_dir=../shared/data/utkface_sample --set checks.blurry.below=60

Measurements are cached beside the output CSV (keyed by file name, size and modification time): an
interrupted run continues where it stopped, and re-running after editing a threshold takes seconds.
"""
from __future__ import annotations

import logging
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
    compute_images_quality_metrics,
    flag_column,
    load_dataset,
    load_explore_config,
    score_column,
)
from utils import (
    AgeGroups,
    Journal,
    age_groups_from,
    check_output_csv,
    config_fingerprint,
    ensure_writable_dir,
    engine_name,
    run_lock,
    run_script,
    setup_logging,
    write_csv_atomic,
    write_run_record,
)

log = logging.getLogger("agepipe.explore")

def summarise(frame: pd.DataFrame, checks: list[str], groups: AgeGroups) -> pd.DataFrame:
    """Counts per status, per failed check and per age group (all labelled, and ok only)."""
    rows = [("status", s.value, int((frame["status"] == s).sum())) for s in Status]
    rows += [("check", c, int(frame[flag_column(c)].sum())) for c in checks]
    for label in groups.labels:
        in_group = frame["age_group"] == label
        rows.append(("age_group_labelled", label, int(in_group.sum())))
        rows.append(("age_group_ok", label, int((in_group & (frame["status"] == Status.OK)).sum())))
    rows.append(("total", "files", len(frame)))
    return pd.DataFrame(rows, columns=["section", "name", "images"])


def explore(config: ExploreConfig, groups: AgeGroups, output: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Find, measure and check every image; write the CSV and its summary; return them and the checks."""
    dataset = load_dataset(config.dataset_dir, config.labels, config.age_range, groups)
    log.info("found %d image files in %s", len(dataset), config.dataset_dir)
    settings = ReaderSettings.from_config(config)
    cache = Journal(output.with_suffix(".cache.jsonl"), config_fingerprint(config.metrics, config.images))
    measured = compute_images_quality_metrics(dataset, settings, config.num_workers, cache, config.scheduler, config.scheduler_chunk_files)
    checked = check_images_quality(measured, config.checks, config.duplicates)

    checks = list(config.checks) + ([Check.DUPLICATE, Check.AGE_CONFLICT] if config.duplicates.enabled else [])
    verdicts = [column for c in checks for column in (flag_column(c), score_column(c)) if column in checked.columns]
    leading = LABEL_COLUMNS + ["status", "reason", "failed_checks"] + verdicts
    trailing = ["error", "label_error", "path"]
    middle = [c for c in checked.columns if c not in leading + trailing and not c.startswith("_")]
    result = checked[leading + middle + trailing]
    write_csv_atomic(result, output)
    summary = summarise(result, checks, groups)
    write_csv_atomic(summary, config.summary_csv)
    write_run_record(config, output)
    return result, summary, checks


def main(args) -> None:
    config = load_explore_config(args.config, args.overrides)
    setup_logging(config.log_level)
    groups = age_groups_from(config)
    output = check_output_csv(config.output_csv, "output_csv", inputs=[config.dataset_dir])
    check_output_csv(config.summary_csv, "summary_csv", inputs=[config.dataset_dir, output])
    ensure_writable_dir(output.parent, "output folder")
    ensure_writable_dir(Path(config.summary_csv).parent, "summary folder")
    start = time.perf_counter()
    with run_lock(output):
        result, summary, checks = explore(config, groups, output)

    elapsed = time.perf_counter() - start
    counts = dict(zip(summary["name"][summary["section"] == "status"], summary["images"][summary["section"] == "status"]))
    failed = summary[(summary["section"] == "check") & (summary["images"] > 0)]
    print(
        f"explored {len(result)} files in {elapsed:.1f}s with {engine_name(config)}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    if len(failed):
        print("failed checks: " + ", ".join(f"{n} {c}" for c, n in zip(failed["name"], failed["images"])))
    print(f"wrote {output} and {config.summary_csv}")


if __name__ == "__main__":
    run_script(main, "Measure and check the quality of every image in a face dataset.", "explore_images.yaml")
