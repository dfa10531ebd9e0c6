"""Processing stage: repair what the exploration metrics flag, prove the result is better, keep the rest.

Reads csv/image_metadata.csv (from explore_images.py) and configs/process_images.yaml, and writes a clean
copy of the dataset to processed_dataset/ (the input's relative paths, mirrored) plus
csv/processed_metadata.csv with one row per input row:

- kept        passed exploration: written as its face, aligned and cropped (`output: faces`, the
              default), or copied byte for byte (`output: images`; only resized, if `resize` is set);
- repaired    failed checks that `repairs` maps to operations; after repairing, the image is measured
              with the exploration stage's own metrics and thresholds and passes every check;
- rejected    could not be repaired within `retry.attempts`, a repair broke another check, the image is
              a duplicate or has conflicting age labels, or the file changed since exploration;
- unreadable, unlabelled   as reported by exploration (or the file has vanished since).

Originals are never modified, and the stage refuses to write into its input folder. Writes are atomic.
The exploration CSV is read `chunk_files` rows at a time, and each finished chunk's results go to a
part file beside the output CSV: memory does not grow with the dataset, and a killed run, re-run,
continues where it stopped (redoing any chunk whose outputs changed since).

    python process_images.py [--config configs/process_images.yaml] [--set retry.attempts=5]
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import pandas as pd

from agepipe.config.data_stages import ExploreConfig, NeverWorse, ProcessConfig
from agepipe.config.loading import config_fingerprint, load_config, validate_section
from agepipe.data.datasets import read_metadata_chunks
from agepipe.data.image_files import UnreadableImage, read_image
from agepipe.data.vocabulary import Check, ProcessStatus, Status
from agepipe.errors import ConfigError, UserError
from agepipe.faces.alignment import FacePath, FaceSettings
from agepipe.quality.image_metrics import SIZE_COLUMNS, ReaderSettings, measure_array, measured_columns
from agepipe.running.console import progress_bar
from agepipe.running.manifest import file_digest
from agepipe.running.output_guard import OutputFolder, OutputGuard, confined
from agepipe.running.parallel import Engine
from agepipe.running.resume import PartStore, fill_parts, json_table
from agepipe.running.writes import atomic_write, copy_file, record_written, write_bytes, write_run_record
from image_processor import REPAIRS, encode_image, repair_order, resize_square
from image_reader import exploration_keys, exploration_settings, failing_checks
from utils import require_workspace, run_script, setup_logging

log = logging.getLogger("agepipe.process")

REQUIRED_COLUMNS = ["file", "path", "age", "age_group", "status", "failed_checks", "content_hash"]


def load_process_config(
    path, overrides=(), explore: ExploreConfig | None = None
) -> tuple[ProcessConfig, ExploreConfig]:
    """The processing config, and the settings of the exploration that wrote its input CSV (read from
    its run record, image_reader.exploration_settings), whose metrics and checks it re-applies; a
    library caller may give the exploration's settings itself."""
    own, theirs = exploration_keys(overrides, ProcessConfig)
    config = load_config(ProcessConfig, path, own)
    require_workspace(config.workspace)
    explore = explore or exploration_settings(config.input_csv, theirs)
    unused = [check for check in config.repairs if check not in explore.checks]
    if unused:
        log.info("repairs of checks the exploration did not run are unused: %s", ", ".join(unused))
    for check, operations in config.repairs.items():
        for operation, params in operations.items():
            if operation not in REPAIRS:
                raise ConfigError(f"{path}: repairs.{check}.{operation}: unknown repair (known: {', '.join(REPAIRS)})")
            operations[operation] = validate_section(
                REPAIRS[operation].params, params, f"repairs.{check}.{operation}"
            ).model_dump()
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
        self.crop = config.face_crop if config.output == "faces" else None
        self.face_path = FacePath(FaceSettings.from_config(explore.faces)) if self.crop else None

    def __call__(self, row: dict) -> dict:
        result = {
            "status": row["status"],
            "reason": row.get("reason"),
            "operations": None,
            "attempts": 0,
            "output_file": None,
            "output_digest": None,
            "failed_checks_after": None,
            "after": None,
        }
        if row["status"] in (Status.UNREADABLE, Status.UNLABELLED):
            return result
        if not os.path.exists(row["path"]):
            return {**result, "status": ProcessStatus.UNREADABLE, "reason": "file vanished since exploration"}
        try:
            bgr, info = read_image(
                row["path"], self.settings.max_pixels, self.settings.max_file_bytes, self.settings.max_aspect_ratio
            )
        except UnreadableImage as exc:
            return {**result, "status": ProcessStatus.UNREADABLE, "reason": f"since exploration: {exc}"}
        if info["content_hash"] != row["content_hash"]:
            return {
                **result,
                "status": ProcessStatus.REJECTED,
                "reason": "file changed since exploration; re-run explore_images.py",
            }
        target = confined(self.output_dir, row["file"])
        if self.crop:
            bgr, problem = self.face_of(bgr)
            if bgr is None:
                return {**result, "status": ProcessStatus.REJECTED, "reason": problem}
        try:
            result.update((self.keep if row["status"] == Status.OK else self.repair)(row, bgr, target))
        except UnreadableImage as exc:  # re-measuring failed
            return {**result, "status": ProcessStatus.REJECTED, "reason": str(exc)}
        return {**result, "output_file": row["file"] if result["output_digest"] else None}

    def face_of(self, bgr: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """The image's largest face, aligned and cropped as `face_crop` says (its own resolution when
        smaller), in BGR; or None and why there is none."""
        found = self.face_path.find(bgr)
        if not found.scores.size:
            return None, "no face found to crop"
        x0, y0, x1, y1 = found.boxes[0]
        box = (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        face = self.face_path.align(rgb, box)
        problem = self.face_path.too_small(box) or (None if self.face_path.usable(face) else face.problem)
        if problem:
            return None, problem
        side = self.face_path.native_side(face, self.crop.side, self.crop.padding)
        return np.ascontiguousarray(
            self.face_path.cut(rgb, face, side, self.crop.padding, extend_edges=True)[..., ::-1]
        ), None

    def keep(self, row: dict, bgr: np.ndarray, target: Path) -> dict:
        if self.crop:
            data, after = self.encode_and_measure(bgr, target.suffix)
            operations = f"face_crop(side={bgr.shape[0]}, padding={self.crop.padding:g})"
            return {
                "status": ProcessStatus.KEPT,
                "reason": None,
                "operations": operations,
                "output_digest": write_bytes(data, target),
                "failed_checks_after": ";".join(failing_checks(after, self.checks)),
                "after": after,
            }
        if self.resize is None:
            return {
                "status": ProcessStatus.KEPT,
                "reason": None,
                "output_digest": copy_file(row["path"], target),
                "failed_checks_after": "",
            }
        data, after = self.encode_and_measure(resize_square(bgr, self.resize), target.suffix)
        failed = failing_checks(after, self.checks)
        return {
            "status": ProcessStatus.KEPT,
            "reason": None,
            "operations": f"resize_square(size={self.resize})",
            "output_digest": write_bytes(data, target),
            "failed_checks_after": ";".join(failed),
            "after": after,
        }

    def encode_and_measure(self, bgr: np.ndarray, suffix: str) -> tuple[bytes, dict]:
        """Encode as it will be written, and measure the decoded result: what is judged is the file."""
        data = encode_image(bgr, suffix, self.jpeg_quality)
        return data, measure_array(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), self.settings)

    def repair(self, row: dict, bgr: np.ndarray, target: Path) -> dict:
        failed_before = [c for c in str(row["failed_checks"]).split(";") if c]
        dataset_level = [c for c in failed_before if c in (Check.DUPLICATE, Check.AGE_CONFLICT)]
        if dataset_level:
            return {
                "status": ProcessStatus.REJECTED,
                "reason": f"{' and '.join(dataset_level).replace('_', ' ')}: not repairable",
            }
        plan = repair_plan(failed_before, self.repairs)
        if not plan:
            return {"status": ProcessStatus.REJECTED, "reason": f"no repair configured for {', '.join(failed_before)}"}
        if self.resize is not None and not self.crop:
            bgr = resize_square(bgr, self.resize)
        for attempt in range(self.attempts):
            attempt_plan = escalate(plan, attempt, self.factor)
            data, after = self.encode_and_measure(apply_plan(bgr, attempt_plan, row), target.suffix)
            failed, worse = failing_checks(after, self.checks), made_worse(row, after, self.never_worse)
            if not failed and not worse:
                return {
                    "status": ProcessStatus.REPAIRED,
                    "reason": None,
                    "operations": plan_text(attempt_plan),
                    "attempts": attempt + 1,
                    "output_digest": write_bytes(data, target),
                    "failed_checks_after": "",
                    "after": after,
                }
        if failed:
            broken = [c for c in failed if c not in failed_before]
            reason = f"still fails {', '.join(failed)} after {self.attempts} attempts"
            if broken:
                reason += f" (the repair broke {', '.join(broken)})"
        else:
            reason = f"every repair made it worse: {'; '.join(worse)}"
        return {
            "status": ProcessStatus.REJECTED,
            "reason": reason,
            "operations": plan_text(attempt_plan),
            "attempts": self.attempts,
            "failed_checks_after": ";".join(failed),
            "after": after,
        }


def made_worse(before: dict, after: dict, limits: NeverWorse) -> list[str]:
    """What a repair made worse beyond the limits, in words (empty when nothing; a metric the
    exploration did not measure is not judged)."""

    def values(metric):
        pair = (pd.to_numeric(before.get(metric), errors="coerce"), pd.to_numeric(after.get(metric), errors="coerce"))
        return None if pd.isna(pair[0]) or pd.isna(pair[1]) else tuple(map(float, pair))

    problems = []
    colour, noise, contrast = values("colourfulness"), values("noise"), values("contrast")
    if colour and abs(colour[1] - colour[0]) > limits.max_colourfulness_change * max(colour[0], 1.0):
        problems.append(f"colourfulness {colour[0]:.1f} -> {colour[1]:.1f}")
    if noise and noise[1] - noise[0] > limits.max_noise_increase:
        problems.append(f"noise {noise[0]:.2f} -> {noise[1]:.2f}")
    if contrast and contrast[1] < (1 - limits.max_contrast_loss) * contrast[0]:
        problems.append(f"contrast {contrast[0]:.1f} -> {contrast[1]:.1f} (washed out)")
    return problems


def _process_task(processor: Processor, row: dict) -> dict:
    result = processor(row)
    after = result.pop("after") or {}
    return {**result, **{f"after_{k}": v for k, v in after.items()}}


def failed_row(row: dict, reason: str) -> dict:
    """The result of an image whose worker timed out or died: rejected, with the reason."""
    return {
        "status": ProcessStatus.REJECTED,
        "reason": f"processing failed: {reason}",
        "operations": None,
        "attempts": 0,
        "output_file": None,
        "output_digest": None,
        "failed_checks_after": None,
    }


# --------------------------------------------------------------------------------------------------
# The stage, chunk by chunk: the exploration CSV is read in passes, so memory does not grow with it
# --------------------------------------------------------------------------------------------------
def exploration_chunks(path: str, rows: int) -> Iterator[pd.DataFrame]:
    """The exploration CSV, `rows` rows at a time, as text: each value goes into the processed CSV
    exactly as exploration wrote it, whatever else its chunk holds (empty cells are NaN)."""
    for number, chunk in enumerate(
        read_metadata_chunks(path, "input CSV", "run explore_images.py first", REQUIRED_COLUMNS, rows, dtype=str)
    ):
        nameless = chunk["file"].isna() | chunk["path"].isna()
        if nameless.any():
            raise UserError(
                f"input CSV {path}: row {number * rows + int(nameless.to_numpy().argmax()) + 2} names no file; "
                "is it an exploration CSV?"
            )
        chunk["failed_checks"] = chunk["failed_checks"].fillna("")
        yield chunk


def dataset_roots(frame: pd.DataFrame) -> set[str]:
    """The dataset folders the CSV's images live in (each `path` ends with its relative `file`)."""
    return {path[: len(path) - len(file)] for path, file in zip(frame["path"], frame["file"])}


def part_name(parts: PartStore, frame: pd.DataFrame) -> str:
    """The part file of a chunk: named by its rows' files, contents and statuses (and the settings)."""
    return parts.part_name(f"{f}|{h}|{s}" for f, h, s in zip(frame["file"], frame["content_hash"], frame["status"]))


def plan_chunks(chunks: Iterable[pd.DataFrame], folder: OutputFolder, parts: PartStore) -> list[tuple[str, int]]:
    """Check that every output lands inside the folder and over no file of the user's, list the
    outputs as planned, and return each chunk's part name and rows."""
    plan = []
    for frame in chunks:
        candidates = frame.loc[frame["status"].isin([Status.OK, Status.LOW_QUALITY]), "file"]
        for file in candidates:
            folder.target(file)
        folder.begin(candidates)
        plan.append((part_name(parts, frame), len(frame)))
    return plan


def outputs_intact(parts: PartStore, name: str, folder: OutputFolder) -> bool:
    """Whether every output a part lists is still in the folder as written: resuming trusts contents."""
    return all(
        not isinstance(row.get("output_file"), str)
        or file_digest(folder.path / row["output_file"]) == row.get("output_digest")
        for row in parts.rows(name)
    )


def process_chunks(
    chunks: Iterable[pd.DataFrame],
    plan: list[tuple[str, int]],
    parts: PartStore,
    processor: Processor,
    folder: OutputFolder,
    engine: Engine,
) -> None:
    """Process the rows of every chunk whose part is missing, or lists an output gone or changed since."""
    todo = [not parts.has(name) or not outputs_intact(parts, name, folder) for name, _ in plan]
    rows, total = sum(count for (_, count), needed in zip(plan, todo) if needed), sum(count for _, count in plan)
    if rows < total:
        log.info("continuing: %d of %d rows were finished by an earlier run", total - rows, total)
    work = ((name, frame.to_dict("records")) for (name, _), needed, frame in zip(plan, todo, chunks) if needed)
    fill_parts(
        parts,
        work,
        _process_task,
        engine,
        state=processor,
        chunksize=4,
        on_failure=failed_row,
        progress=progress_bar(rows, "processing"),
    )


def write_processed(
    chunks: Iterable[pd.DataFrame],
    plan: list[tuple[str, int]],
    parts: PartStore,
    explore: ExploreConfig,
    folder: OutputFolder,
    output_csv: Path,
) -> Counter:
    """Write the processed CSV chunk by chunk, list each chunk's outputs as written, and count the rows
    per status."""
    counts: Counter = Counter()
    with atomic_write(output_csv, newline="", encoding="utf-8") as out:
        for number, ((name, _), frame) in enumerate(zip(plan, chunks)):
            results = json_table(list(parts.rows(name)))
            if part_name(parts, frame) != name or len(results) != len(frame):
                raise UserError("the input CSV changed while this run read it; re-run the same command")
            output = processed_table(frame, results, explore, folder)
            output.to_csv(out, header=number == 0, index=False)
            written = results["output_file"].map(lambda v: isinstance(v, str)).to_numpy(bool)
            folder.record(zip(results.loc[written, "output_file"], results.loc[written, "output_digest"]))
            counts.update(output["status"])
    record_written(output_csv)
    return counts


def main(args) -> None:
    config, explore = load_process_config(args.config, args.overrides)
    setup_logging(config.log_level)

    def chunks() -> Iterator[pd.DataFrame]:
        return exploration_chunks(config.input_csv, config.chunk_files)

    roots = sorted(set().union(*map(dataset_roots, chunks())))
    start = time.perf_counter()
    with OutputGuard(inputs=[config.input_csv, *roots]) as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        output_csv = guard.file(config.output_csv, "output_csv")
        parts_folder = guard.folder(f"{output_csv}.parts", "the results beside output_csv", self_identifying=True)
        fingerprint = config_fingerprint(
            config.model_dump(
                include={"repairs", "retry", "resize", "jpeg_quality", "never_worse", "output", "face_crop"}
            ),
            explore.metrics,
            explore.faces,
            explore.checks,
            str(folder.path.resolve()),
        )
        parts = PartStore(parts_folder.path, fingerprint)
        plan = plan_chunks(chunks(), folder, parts)
        process_chunks(chunks(), plan, parts, Processor(config, explore), folder, Engine.of(config))
        counts = write_processed(chunks(), plan, parts, explore, folder, output_csv)
        write_run_record({"process": config, "explore": explore}, output_csv)
        removed = folder.finish(())
        # a finished run leaves nothing to resume: a re-run processes again, as the files are now
        parts.keep_only(set())
        if removed:
            log.info("removed %d files agepipe wrote in %s in runs with other settings", removed, folder.path)

    elapsed = time.perf_counter() - start
    print(
        f"processed {sum(counts.values())} rows in {elapsed:.1f}s with {Engine.of(config).name}: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ProcessStatus)
    )
    print(
        f"wrote {counts[ProcessStatus.KEPT] + counts[ProcessStatus.REPAIRED]} images to {folder.path}/ and {output_csv}"
    )


def processed_table(
    frame: pd.DataFrame, results: pd.DataFrame, explore: ExploreConfig, folder: OutputFolder
) -> pd.DataFrame:
    """The processed CSV's rows of one chunk: one row per exploration row, with what processing did,
    the metrics before and (re-measured) after."""
    metric_columns = SIZE_COLUMNS + measured_columns(explore.metrics)
    before = frame[metric_columns].add_prefix("before_")
    after = pd.DataFrame(
        {f"after_{m}": results[f"after_{m}"] if f"after_{m}" in results.columns else np.nan for m in metric_columns},
        index=results.index,
    ).astype(object)
    # a byte-for-byte copy measures what the original measured
    kept_copy = ((results["status"] == ProcessStatus.KEPT) & results["operations"].isna()).to_numpy()
    after.loc[kept_copy] = frame.loc[kept_copy, metric_columns].to_numpy()
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
    return pd.concat([output, before, after], axis=1)


if __name__ == "__main__":
    run_script(
        main,
        "Repair flagged images and write a clean copy of the dataset.",
        "process_images.yaml",
        ProcessConfig,
        [
            "python process_images.py",
            "python process_images.py --set retry.attempts=5 --set resize=128",
            "python process_images.py --set workspace=/tmp/agepipe-run",
        ],
    )
