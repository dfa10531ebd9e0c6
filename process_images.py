"""Processing stage: repair what the exploration metrics flag, prove the result is better, keep the rest.

Reads csv/image_metadata.csv (from explore_images.py) and configs/process_images.yaml, and writes a clean
copy of the dataset to processed_dataset/ (the input's relative paths, mirrored) plus
csv/processed_metadata.csv with one row per input row:

- kept        passed exploration: copied byte for byte (or only resized, if `resize` is set);
- repaired    failed checks that `repairs` maps to operations; after repairing, the image is measured
              with the exploration stage's own metrics and thresholds and passes every check;
- rejected    could not be repaired within `retry.attempts`, a repair broke another check, the image is
              a duplicate or has conflicting age labels, or the file changed since exploration;
- unreadable, unlabelled   as reported by exploration (or the file has vanished since).

Originals are never modified, and the stage refuses to write into its input folder. Writes are atomic,
and finished images are journalled: a killed run, re-run, continues where it stopped.

    python process_images.py [--config configs/process_images.yaml] [--set retry.attempts=5]
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cli import run_script, setup_logging
from config import config_fingerprint, load_config, validate_section
from config_models import ExploreConfig, NeverWorse, ProcessConfig
from dataset import read_metadata_csv
from errors import ConfigError, UserError
from image_io import UnreadableImage, read_image
from image_processor import REPAIRS, ProcessStatus, encode_image, repair_order, resize_square
from image_reader import Check, Status, exploration_keys, exploration_settings, failing_checks
from metrics import SIZE_COLUMNS, ReaderSettings, measure_array, measured_columns
from outputs import OutputFolder, OutputGuard, confined, run_lock
from writes import copy_file, write_bytes, write_csv, write_run_record
from parallel import Engine
from resume import ResumableStage

log = logging.getLogger("agepipe.process")

REQUIRED_COLUMNS = ["file", "path", "age", "age_group", "status", "failed_checks", "content_hash"]


def load_process_config(path, overrides=(), explore: ExploreConfig | None = None) -> tuple[ProcessConfig, ExploreConfig]:
    """The processing config, and the settings of the exploration that wrote its input CSV (read from
    its run record, image_reader.exploration_settings), whose metrics and checks it re-applies; a
    library caller may give the exploration's settings itself."""
    own, theirs = exploration_keys(overrides, ProcessConfig)
    config = load_config(ProcessConfig, path, own)
    explore = explore or exploration_settings(config.input_csv, theirs)
    unused = [check for check in config.repairs if check not in explore.checks]
    if unused:
        log.info("repairs of checks the exploration did not run are unused: %s", ", ".join(unused))
    for check, operations in config.repairs.items():
        for operation, params in operations.items():
            if operation not in REPAIRS:
                raise ConfigError(f"{path}: repairs.{check}.{operation}: unknown repair (known: {', '.join(REPAIRS)})")
            operations[operation] = validate_section(REPAIRS[operation].params, params, f"repairs.{check}.{operation}").model_dump()
    return config, explore


def repair_plan(failed: list[str], repairs: dict) -> list[tuple[str, dict]]:
    """The repairs (with parameters) of these failed checks, each once, in the order repairs run."""
    chosen: dict[str, dict] = {}
    for check in failed:
        for operation, params in repairs.get(check, {}).items():
            chosen.setdefault(operation, params)
    return [(op, chosen[op]) for op in repair_order() if op in chosen]


def escalate(plan: list[tuple[str, dict]], attempt: int, factor: float) -> list[tuple[str, dict]]:
    """The plan for retry number `attempt` (0 = first try): each operation's strength x factor**attempt."""
    stronger = []
    for operation, params in plan:
        params = dict(params)
        key = REPAIRS[operation].escalated
        if key:
            params[key] = params[key] * factor**attempt
        stronger.append((operation, params))
    return stronger


def apply_plan(bgr: np.ndarray, plan: list[tuple[str, dict]], measurements: dict) -> np.ndarray:
    """The image after each repair of the plan, in turn; a repair's measured parameters (Repair.measured)
    come from the image's exploration `measurements` (0 when unmeasured)."""
    for operation, params in plan:
        repair = REPAIRS[operation]
        measured = {name: float(measurements.get(metric) or 0.0) for name, metric in repair.measured.items()}
        bgr = repair.function(bgr, **params, **measured)
    return bgr


def plan_text(plan: list[tuple[str, dict]]) -> str:
    return "; ".join(f"{op}({', '.join(f'{k}={v:g}' for k, v in params.items())})" for op, params in plan)


# --------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------
class Processor:
    """Everything a worker needs to process one exploration row; sent to each worker once."""

    def __init__(self, config: ProcessConfig, explore: ExploreConfig):
        self.settings = ReaderSettings.from_config(explore)
        self.checks = explore.checks
        self.repairs = config.repairs
        self.attempts = config.retry.attempts
        self.factor = config.retry.strength_factor
        self.resize = config.resize
        self.jpeg_quality = config.jpeg_quality
        self.never_worse = config.never_worse
        self.output_dir = Path(config.output_dir)

    def __call__(self, row: dict) -> dict:
        result = {"status": row["status"], "reason": row.get("reason"), "operations": None, "attempts": 0,
                  "output_file": None, "output_digest": None, "failed_checks_after": None, "after": None}
        if row["status"] in (Status.UNREADABLE, Status.UNLABELLED):
            return result
        if not os.path.exists(row["path"]):
            return {**result, "status": ProcessStatus.UNREADABLE, "reason": "file vanished since exploration"}
        try:
            bgr, info = read_image(row["path"], self.settings.max_pixels, self.settings.max_file_bytes, self.settings.max_aspect_ratio)
        except UnreadableImage as exc:
            return {**result, "status": ProcessStatus.UNREADABLE, "reason": f"since exploration: {exc}"}
        if info["content_hash"] != row["content_hash"]:
            return {**result, "status": ProcessStatus.REJECTED, "reason": "file changed since exploration; re-run explore_images.py"}
        target = confined(self.output_dir, row["file"])
        try:
            result.update((self.keep if row["status"] == Status.OK else self.repair)(row, bgr, target))
        except UnreadableImage as exc:  # re-measuring failed
            return {**result, "status": ProcessStatus.REJECTED, "reason": str(exc)}
        return {**result, "output_file": row["file"] if result["output_digest"] else None}

    def keep(self, row: dict, bgr: np.ndarray, target: Path) -> dict:
        if self.resize is None:
            return {"status": ProcessStatus.KEPT, "reason": None, "output_digest": copy_file(row["path"], target), "failed_checks_after": ""}
        data, after = self.encode_and_measure(resize_square(bgr, self.resize), target.suffix)
        failed = failing_checks(after, self.checks)
        return {"status": ProcessStatus.KEPT, "reason": None, "operations": f"resize_square(size={self.resize})",
                "output_digest": write_bytes(data, target), "failed_checks_after": ";".join(failed), "after": after}

    def encode_and_measure(self, bgr: np.ndarray, suffix: str) -> tuple[bytes, dict]:
        """Encode as it will be written, and measure the decoded result: what is judged is the file."""
        data = encode_image(bgr, suffix, self.jpeg_quality)
        return data, measure_array(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), self.settings)

    def repair(self, row: dict, bgr: np.ndarray, target: Path) -> dict:
        failed_before = [c for c in str(row["failed_checks"]).split(";") if c]
        dataset_level = [c for c in failed_before if c in (Check.DUPLICATE, Check.AGE_CONFLICT)]
        if dataset_level:
            return {"status": ProcessStatus.REJECTED, "reason": f"{' and '.join(dataset_level).replace('_', ' ')}: not repairable"}
        plan = repair_plan(failed_before, self.repairs)
        if not plan:
            return {"status": ProcessStatus.REJECTED, "reason": f"no repair configured for {', '.join(failed_before)}"}
        if self.resize is not None:
            bgr = resize_square(bgr, self.resize)
        for attempt in range(self.attempts):
            attempt_plan = escalate(plan, attempt, self.factor)
            data, after = self.encode_and_measure(apply_plan(bgr, attempt_plan, row), target.suffix)
            failed, worse = failing_checks(after, self.checks), made_worse(row, after, self.never_worse)
            if not failed and not worse:
                return {"status": ProcessStatus.REPAIRED, "reason": None, "operations": plan_text(attempt_plan), "attempts": attempt + 1,
                        "output_digest": write_bytes(data, target), "failed_checks_after": "", "after": after}
        if failed:
            broken = [c for c in failed if c not in failed_before]
            reason = f"still fails {', '.join(failed)} after {self.attempts} attempts"
            if broken:
                reason += f" (the repair broke {', '.join(broken)})"
        else:
            reason = f"every repair made it worse: {'; '.join(worse)}"
        return {"status": ProcessStatus.REJECTED, "reason": reason, "operations": plan_text(attempt_plan), "attempts": self.attempts,
                "failed_checks_after": ";".join(failed), "after": after}


def made_worse(before: dict, after: dict, limits: NeverWorse) -> list[str]:
    """What a repair made worse beyond the limits, in words (empty when nothing; a metric the
    exploration did not measure is not judged)."""
    def values(metric):
        pair = (pd.to_numeric(before.get(metric), errors="coerce"), pd.to_numeric(after.get(metric), errors="coerce"))
        return None if pd.isna(pair[0]) or pd.isna(pair[1]) else tuple(map(float, pair))

    problems = []
    colour = values("colourfulness")
    if colour and abs(colour[1] - colour[0]) > limits.max_colourfulness_change * max(colour[0], 1.0):
        problems.append(f"colourfulness {colour[0]:.1f} -> {colour[1]:.1f}")
    noise = values("noise")
    if noise and noise[1] - noise[0] > limits.max_noise_increase:
        problems.append(f"noise {noise[0]:.2f} -> {noise[1]:.2f}")
    return problems


def _process_task(processor: Processor, task: tuple[str, dict]) -> tuple[str, dict]:
    key, row = task
    result = processor(row)
    after = result.pop("after") or {}
    return key, {**result, **{f"after_{k}": v for k, v in after.items()}}


def failed_row(task: tuple[str, dict], reason: str) -> tuple[str, dict]:
    """The result of an image whose worker timed out or died: rejected, with the reason."""
    return task[0], {"status": ProcessStatus.REJECTED, "reason": f"processing failed: {reason}", "operations": None, "attempts": 0,
                     "output_file": None, "output_digest": None, "failed_checks_after": None}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def read_exploration_csv(path: str) -> pd.DataFrame:
    frame = read_metadata_csv(path, "input CSV", "run explore_images.py first", REQUIRED_COLUMNS,
                              dtype={"file": str, "path": str, "content_hash": str, "failed_checks": str})
    nameless = frame["file"].isna() | frame["path"].isna()
    if nameless.any():
        raise UserError(f"input CSV {path}: row {int(nameless.to_numpy().argmax()) + 2} names no file; is it an exploration CSV?")
    frame["failed_checks"] = frame["failed_checks"].fillna("")
    return frame


def dataset_roots(frame: pd.DataFrame) -> set[str]:
    """The dataset folders the CSV's images live in (each `path` ends with its relative `file`)."""
    return {path[: len(path) - len(file)] for path, file in zip(frame["path"], frame["file"])}


def process_rows(frame: pd.DataFrame, config: ProcessConfig, explore: ExploreConfig, folder: OutputFolder, journal: Path) -> pd.DataFrame:
    """Process every row, continuing an interrupted run from its journal, and return the results."""
    processor = Processor(config, explore)
    fingerprint = config_fingerprint(
        config.model_dump(include={"repairs", "retry", "resize", "jpeg_quality"}), explore.metrics, explore.checks, str(folder.path.resolve())
    )
    stage = ResumableStage(folder, journal, fingerprint)
    rows = frame.to_dict("records")
    tasks = [(f"{r['file']}|{r['content_hash']}|{r['status']}", r) for r in rows]
    results = stage.run(tasks, _process_task, Engine.of(config), state=processor, label="processing", chunksize=4, on_failure=failed_row)
    return stage, results


def main(args) -> None:
    config, explore = load_process_config(args.config, args.overrides)
    setup_logging(config.log_level)
    frame = read_exploration_csv(config.input_csv)
    roots = sorted(dataset_roots(frame))
    start = time.perf_counter()
    with OutputGuard(inputs=[config.input_csv, *roots]) as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        output_csv = guard.file(config.output_csv, "output_csv")
        journal = guard.journal(output_csv.with_suffix(".journal.jsonl"), "the journal beside output_csv")
        candidates = frame["status"].isin([Status.OK, Status.LOW_QUALITY])
        for file in frame.loc[candidates, "file"]:
            folder.target(file)
        with run_lock(output_csv):
            folder.begin(frame.loc[candidates, "file"])
            stage, results = process_rows(frame, config, explore, folder, journal)
            output = processed_table(frame, results, explore, folder)
            write_csv(output, output_csv)
            write_run_record({"process": config, "explore": explore}, output_csv)
            removed = stage.finish(results)
            if removed:
                log.info("removed %d files agepipe wrote in %s in earlier runs with other settings", removed, folder.path)

    counts = output["status"].value_counts()
    elapsed = time.perf_counter() - start
    print(
        f"processed {len(output)} rows in {elapsed:.1f}s with {Engine.of(config).name}: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ProcessStatus)
    )
    print(f"wrote {int(output['path'].notna().sum())} images to {folder.path}/ and {output_csv}")


def processed_table(frame: pd.DataFrame, results: pd.DataFrame, explore: ExploreConfig, folder: OutputFolder) -> pd.DataFrame:
    """The processed CSV: one row per exploration row, with what processing did, the metrics before and
    (re-measured) after."""
    metric_columns = SIZE_COLUMNS + measured_columns(explore.metrics)
    before = frame[metric_columns].add_prefix("before_")
    for column in [f"after_{m}" for m in metric_columns]:
        if column not in results.columns:
            results[column] = np.nan
    kept_copy = (results["status"] == ProcessStatus.KEPT) & results["operations"].isna()
    for metric in metric_columns:  # a byte-for-byte copy measures what the original measured
        results.loc[kept_copy, f"after_{metric}"] = frame.loc[kept_copy, metric]
    output = pd.DataFrame(
        {
            "file": frame["file"],
            "path": [os.path.abspath(folder.path / f) if isinstance(f, str) else None for f in results["output_file"]],
            "source_path": frame["path"],
            "age": frame["age"],
            "age_group": frame["age_group"],
            # carried for the model's report card (fairness per gender and race)
            "gender": frame["gender"] if "gender" in frame.columns else None,
            "race": frame["race"] if "race" in frame.columns else None,
            "status": results["status"],
            "reason": results["reason"],
            "failed_checks_before": frame["failed_checks"],
            "failed_checks_after": results["failed_checks_after"],
            "operations": results["operations"],
            "attempts": results["attempts"].astype("Int64"),
        }
    )
    return pd.concat([output, before, results[[f"after_{m}" for m in metric_columns]]], axis=1)


if __name__ == "__main__":
    run_script(main, "Repair flagged images and write a clean copy of the dataset.", "process_images.yaml", ProcessConfig, [
        "python process_images.py", "python process_images.py --set retry.attempts=5 --set resize=128",
        "python process_images.py --set workspace=/tmp/agepipe-run"])
