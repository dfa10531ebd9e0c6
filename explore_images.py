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

from image_reader import (
    STATUSES,
    ReaderSettings,
    check_images_quality,
    compute_images_quality_metrics,
    load_dataset,
    metrics_schema,
    validate_checks,
)
from utils import (
    AgeGroups,
    Bool,
    ConfigError,
    Int,
    Journal,
    MapOf,
    Mapping,
    Number,
    Optional,
    Str,
    age_groups_from,
    check_output_csv,
    config_fingerprint,
    ensure_writable_dir,
    load_config,
    resolve_workers,
    run_lock,
    run_script,
    setup_logging,
    validate,
    write_csv_atomic,
)

log = logging.getLogger("agepipe.explore")

SCHEMA = {
    "dataset_dir": Str(),
    "output_csv": Str(),
    "summary_csv": Str(),
    "labels": {
        "source": Str(["filename", "csv"]),
        "csv_path": Optional(Str()),
        "file_column": Str(),
        "age_column": Str(),
    },
    "images": {"max_pixels": Int(1), "max_file_mb": Number(0.001), "max_aspect_ratio": Number(1), "analysis_side": Int(16, 4096)},
    "metrics": MapOf(Mapping()),  # each metric's parameters are checked against its own schema
    "checks": MapOf({"metric": Str(), "below": Optional(Number()), "above": Optional(Number())}),
    "duplicates": {"enabled": Bool(), "max_hash_distance": Int(0, 64), "max_age_difference": Int(0)},
}
LABEL_COLUMNS = ["file", "age", "age_group", "gender", "race"]


def load_explore_config(path, overrides=()) -> dict:
    """Load and validate the explore config, including each metric's own parameters."""
    config = load_config(SCHEMA, path, overrides)
    known = metrics_schema()
    for name, params in config["metrics"].items():
        if name not in known:
            raise ConfigError(f"{path}: metrics.{name}: unknown metric (known: {', '.join(known)})")
        config["metrics"][name] = validate(params, known[name], f"metrics.{name}")
    available = ["width", "height", "min_side", "file_size", "channels", "bit_depth"] + [
        m for m in config["metrics"] if m != "phash"
    ]
    try:
        validate_checks(config["checks"], available)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if config["labels"]["source"] == "csv" and not config["labels"]["csv_path"]:
        raise ConfigError(f"{path}: labels.csv_path: expected a path when labels.source is 'csv', got null")
    if config["duplicates"]["enabled"] and "phash" not in config["metrics"]:
        raise ConfigError(f"{path}: duplicates.enabled: needs the phash metric in metrics")
    return config


def summarise(frame: pd.DataFrame, checks: list[str], groups: AgeGroups) -> pd.DataFrame:
    """Counts per status, per failed check and per age group (all labelled, and ok only)."""
    rows = [("status", s, int((frame["status"] == s).sum())) for s in STATUSES]
    rows += [("check", c, int(frame[f"flag_{c}"].sum())) for c in checks]
    for label in groups.labels:
        in_group = frame["age_group"] == label
        rows.append(("age_group_labelled", label, int(in_group.sum())))
        rows.append(("age_group_ok", label, int((in_group & (frame["status"] == "ok")).sum())))
    rows.append(("total", "files", len(frame)))
    return pd.DataFrame(rows, columns=["section", "name", "images"])


def explore(config: dict, groups: AgeGroups, output: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Find, measure and check every image; write the CSV and its summary; return them and the checks."""
    dataset = load_dataset(config["dataset_dir"], config["labels"], config["age_range"], groups)
    log.info("found %d image files in %s", len(dataset), config["dataset_dir"])
    settings = ReaderSettings.from_config(config)
    cache = Journal(output.with_suffix(".cache.jsonl"), config_fingerprint(config["metrics"], config["images"]))
    measured = compute_images_quality_metrics(dataset, settings, config["num_workers"], cache)
    checked = check_images_quality(measured, config["checks"], config["duplicates"])

    checks = [c[len("flag_"):] for c in checked.columns if c.startswith("flag_")]
    leading = LABEL_COLUMNS + ["status", "reason", "failed_checks"] + [f"flag_{c}" for c in checks]
    trailing = ["error", "label_error", "path"]
    middle = [c for c in checked.columns if c not in leading + trailing and not c.startswith("_")]
    result = checked[leading + middle + trailing]
    write_csv_atomic(result, output)
    summary = summarise(result, checks, groups)
    write_csv_atomic(summary, config["summary_csv"])
    return result, summary, checks


def main(args) -> None:
    config = load_explore_config(args.config, args.overrides)
    setup_logging(config["log_level"])
    groups = age_groups_from(config)
    output = check_output_csv(config["output_csv"], "output_csv", inputs=[config["dataset_dir"]])
    check_output_csv(config["summary_csv"], "summary_csv", inputs=[config["dataset_dir"], output])
    ensure_writable_dir(output.parent, "output folder")
    ensure_writable_dir(Path(config["summary_csv"]).parent, "summary folder")
    start = time.perf_counter()
    with run_lock(output):
        result, summary, checks = explore(config, groups, output)

    elapsed = time.perf_counter() - start
    counts = dict(zip(summary["name"][summary["section"] == "status"], summary["images"][summary["section"] == "status"]))
    failed = summary[(summary["section"] == "check") & (summary["images"] > 0)]
    print(
        f"explored {len(result)} files in {elapsed:.1f}s with {resolve_workers(config['num_workers'])} workers: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    if len(failed):
        print("failed checks: " + ", ".join(f"{n} {c}" for c, n in zip(failed["name"], failed["images"])))
    print(f"wrote {output} and {config['summary_csv']}")


if __name__ == "__main__":
    run_script(main, "Measure and check the quality of every image in a face dataset.", "explore_images.yaml")
