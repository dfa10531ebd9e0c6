"""Demographic targets and resampling: the logic behind australian_population.ipynb and resampling.ipynb.

- `population_by_band` / `target_distribution`: ABS population counts by age band, shared out over the
  configured age groups (a band cut by a group edge is shared evenly across its single years).
- `plan_resampling`: per group, how many images to keep, how many augmented copies to add (capped per
  source image), and the shortfall where the cap or an empty group stops a group reaching its target.
- `select_images` / `execute_plan`: pick the images (best quality first when down-sampling, seeded) and
  write the resampled dataset with one CSV row per output image, tracing every copy to its source.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from agepipe.config.data_stages import ResamplingAugmentation, ResamplingConfig
from agepipe.config.loading import config_fingerprint
from agepipe.data.age_groups import AgeGroups
from agepipe.data.datasets import read_metadata_csv, read_table, without_suspected_labels
from agepipe.data.vocabulary import TRAINABLE_STATUSES
from agepipe.errors import UserError
from agepipe.running.output_guard import OutputGuard, confined
from agepipe.running.parallel import Engine
from agepipe.running.resume import ResumableStage
from agepipe.running.writes import copy_file, write_bytes, write_csv, write_run_record
from image_processor import encode_image, random_augmentation

log = logging.getLogger("agepipe.resampling")


# --------------------------------------------------------------------------------------------------
# Target distribution
# --------------------------------------------------------------------------------------------------
def read_population(path: str | os.PathLike, year: int) -> pd.DataFrame:
    """Bands (age_lower, age_upper or NaN for the open band) and their population in `year`."""
    table = read_table(path, "population CSV", comment="#")
    if str(year) not in table.columns:
        years = [c for c in table.columns if c.isdigit()]
        raise ValueError(f"{path} has no figures for {year} (years: {', '.join(years)})")
    return pd.DataFrame(
        {"age_lower": table["age_lower"], "age_upper": table["age_upper"], "population": table[str(year)].astype(float)}
    )


def split_open_band(bands: pd.DataFrame, detail: pd.DataFrame) -> pd.DataFrame:
    """Replace the main table's open top band (e.g. 80+) by the finer bands of `detail` (e.g. 80-84 ...
    100+), scaled so they sum to the main table's count: the detail table gives only the proportions."""
    top = bands[bands["age_upper"].isna()].iloc[0]
    finer = detail[detail["age_lower"] >= top["age_lower"]].copy()
    finer["population"] = finer["population"] / finer["population"].sum() * top["population"]
    return pd.concat([bands[bands["age_upper"].notna()], finer], ignore_index=True)


def single_years(bands: pd.DataFrame, max_age: int) -> pd.Series:
    """Population per single year of age, each band shared evenly across its years; the open top band
    is spread over its lower age to `max_age`."""
    years = {}
    for lower, upper, population in bands[["age_lower", "age_upper", "population"]].itertuples(index=False):
        upper = max_age if pd.isna(upper) else int(upper)
        span = range(int(lower), upper + 1)
        for age in span:
            years[age] = years.get(age, 0.0) + population / len(span)
    return pd.Series(years).sort_index()


def target_distribution(
    bands: pd.DataFrame, detail: pd.DataFrame | None, groups: AgeGroups, max_age: int
) -> pd.DataFrame:
    """Population and share of each configured age group: group, lower_age, upper_age, population, share.

    Bands that a group edge cuts are shared evenly across their single years. When an edge falls inside
    the main table's open top band, that band is first split using `detail`'s proportions.
    """
    open_lower = bands.loc[bands["age_upper"].isna(), "age_lower"]
    if len(open_lower) and any(edge > open_lower.iloc[0] for edge in groups.edges):
        if detail is None:
            raise ValueError(
                f"age groups split the open band {int(open_lower.iloc[0])}+ but no detailed table was given"
            )
        bands = split_open_band(bands, detail)
    per_year = single_years(bands, max_age)
    rows = []
    for label, (lower, upper) in zip(groups.labels, groups.bounds(max_age)):
        rows.append(
            {"group": label, "lower_age": lower, "upper_age": upper, "population": per_year.loc[lower:upper].sum()}
        )
    table = pd.DataFrame(rows)
    table["share"] = table["population"] / table["population"].sum()
    return table


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Whole counts proportional to `shares` that sum exactly to `total` (Hamilton's method)."""
    shares = np.asarray(shares, float) / np.sum(shares)
    exact = shares * total
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: total - counts.sum()]] += 1
    return counts


def total_variation_distance(p, q) -> float:
    """Half the L1 distance between two distributions (0 = identical, 1 = disjoint)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------
def plan_resampling(available: pd.Series, target: pd.DataFrame, size: int, max_copies: int) -> pd.DataFrame:
    """Per age group: available images, target count, originals kept, augmented copies, achieved count,
    shortfall and the resampling factor (achieved / available).

    A group above its target keeps `target` originals (down-sampling); a group below keeps all and adds
    augmented copies, at most `max_copies` per original. What the cap or an empty group leaves missing is
    the shortfall: it is reported, never filled from other groups.
    """
    plan = target[["group", "share"]].copy()
    plan["available"] = available.reindex(plan["group"]).fillna(0).astype(int).to_numpy()
    plan["target"] = largest_remainder(plan["share"], size)
    plan["kept"] = np.minimum(plan["available"], plan["target"])
    plan["augmented"] = np.minimum(plan["target"] - plan["kept"], plan["available"] * max_copies)
    plan["achieved"] = plan["kept"] + plan["augmented"]
    plan["shortfall"] = plan["target"] - plan["achieved"]
    plan["factor"] = np.where(plan["available"] > 0, plan["achieved"] / plan["available"].clip(lower=1), np.nan)
    return plan


def stable_seed(seed: int, *parts) -> np.random.SeedSequence:
    """A seed derived from `seed` and names: the same image gets the same draw in any order or process."""
    return np.random.SeedSequence([seed] + [zlib.crc32(str(p).encode()) for p in parts])


def select_images(
    frame: pd.DataFrame, plan: pd.DataFrame, score: str, higher_is_better: bool, seed: int
) -> pd.DataFrame:
    """The output rows: for each group, the originals kept (best `score` first, seeded ties) and the
    augmented copies spread evenly over that group's originals, each with a copy number."""
    outputs = []
    for row in plan.itertuples(index=False):
        members = frame[frame["age_group"] == row.group]
        if members.empty:
            continue
        jitter = np.random.default_rng(stable_seed(seed, "ties", row.group)).random(len(members))
        scores = (
            pd.to_numeric(members[score], errors="coerce").fillna(-np.inf if higher_is_better else np.inf).to_numpy()
        )
        order = np.lexsort((jitter, -scores if higher_is_better else scores))
        kept = members.iloc[order[: row.kept]]
        outputs.append(kept.assign(copy=0))
        if row.augmented:
            sources = kept.iloc[np.arange(row.augmented) % len(kept)]  # round-robin: copies differ by at most 1
            copy_numbers = np.arange(row.augmented) // len(kept) + 1
            outputs.append(sources.assign(copy=copy_numbers))
    return pd.concat(outputs, ignore_index=True) if outputs else frame.head(0).assign(copy=0)


def output_name(file: str, copy: int) -> str:
    """Originals keep their name; copies insert .augNN before the suffix, keeping the UTKFace age prefix."""
    if copy == 0:
        return file
    stem, suffix = os.path.splitext(file)
    return f"{stem}.aug{copy:02d}{suffix}"


# --------------------------------------------------------------------------------------------------
# Execute
# --------------------------------------------------------------------------------------------------
class Augmenter:
    """Writes one output of the plan: a byte-for-byte copy of an original, or an augmented copy."""

    def __init__(self, output_dir: Path, seed: int, ranges: ResamplingAugmentation, jpeg_quality: int):
        self.output_dir, self.seed, self.ranges, self.jpeg_quality = output_dir, seed, ranges, jpeg_quality

    def __call__(self, row: dict) -> dict:
        target = confined(self.output_dir, row["output_file"])
        if row["copy"] == 0:
            return {
                "augmentation": None,
                "output_file": row["output_file"],
                "output_digest": copy_file(row["path"], target),
            }
        image = cv2.imread(row["path"], cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError(f"{row['path']}: cannot be decoded any more")
        rng = np.random.default_rng(stable_seed(self.seed, row["file"], row["copy"]))
        augmented, description = random_augmentation(image, rng, self.ranges)
        digest = write_bytes(encode_image(augmented, target.suffix, self.jpeg_quality), target)
        return {"augmentation": description, "output_file": row["output_file"], "output_digest": digest}


def _augment_task(augmenter: Augmenter, task: tuple[str, dict]) -> tuple[str, dict]:
    key, row = task
    return key, augmenter(row)


def execute_plan(selected: pd.DataFrame, config: ResamplingConfig, guard: OutputGuard) -> pd.DataFrame:
    """Write the selected originals and augmented copies into output_dir (resumable, atomic) and return
    one row per output image: file, path, age, age_group, gender and race (when known), source,
    source_path, copy, augmentation.

    The output folder may not overlap the folders the images come from; names from the CSV must stay
    inside it; only files agepipe wrote there before are ever replaced or deleted (OutputFolder)."""
    guard.add_inputs(sorted({os.path.dirname(p) for p in selected["path"]}))
    folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
    output_csv = guard.file(config.output_csv, "output_csv")
    journal = guard.journal(output_csv.with_suffix(".journal.jsonl"), "the journal beside output_csv")
    selected = selected.assign(output_file=[output_name(f, c) for f, c in zip(selected["file"], selected["copy"])])
    for file in selected["output_file"]:
        folder.target(file)
    fingerprint = config_fingerprint(
        config.model_dump(include={"seed", "augmentation", "jpeg_quality"}), str(folder.path.resolve())
    )
    folder.begin(selected["output_file"])
    stage = ResumableStage(folder, journal, fingerprint)
    rows = selected[["file", "path", "copy", "output_file"]].to_dict("records")
    tasks = [(f"{r['output_file']}|{r['path']}", r) for r in rows]
    augmenter = Augmenter(folder.path, config.seed, config.augmentation, config.jpeg_quality)
    done = stage.run(
        tasks, _augment_task, Engine.of(config), state=augmenter, label="resampling", chunksize=8, on_failure=None
    )
    resampled = (
        pd.DataFrame(
            {
                "file": selected["output_file"].to_numpy(),
                "path": [os.path.abspath(folder.path / f) for f in selected["output_file"]],
                "age": selected["age"].to_numpy(),
                "age_group": selected["age_group"].to_numpy(),
                **{
                    c: selected[c].to_numpy() for c in ("gender", "race") if c in selected.columns
                },  # for the report card's fairness table
                "source": selected["file"].to_numpy(),
                "source_path": selected["path"].to_numpy(),
                "copy": selected["copy"].to_numpy(),
                "augmentation": done["augmentation"].to_numpy() if len(done) else [],
            }
        )
        .sort_values(["age_group", "file"], kind="stable")
        .reset_index(drop=True)
    )
    write_csv(resampled, output_csv)
    write_run_record(config, output_csv)
    stage.finish(done if len(done) else pd.DataFrame({"output_file": [], "output_digest": []}))
    return resampled


def load_input(config: ResamplingConfig) -> tuple[pd.DataFrame, int]:
    """The usable images of the chosen stage's CSV, with metric columns under their plain names, and how
    many the label check's suspicion left out (exclude_suspected_labels)."""
    required = ("file", "path", "age", "age_group", "status")
    if config.input == "processed":
        hint = "run process_images.py, then check_labels.py (which writes the checked CSV), first"
        frame = read_metadata_csv(config.processed_csv, "processed CSV", hint, required)
        frame = frame.rename(columns=lambda c: c[len("after_") :] if c.startswith("after_") else c)
    else:
        frame = read_metadata_csv(config.exploration_csv, "exploration CSV", "run explore_images.py first", required)
    frame, suspected = without_suspected_labels(
        frame[frame["status"].isin(TRAINABLE_STATUSES)], config.exclude_suspected_labels
    )
    if config.quality_score.metric not in frame.columns:
        raise UserError(f"quality_score.metric: the {config.input} CSV has no metric {config.quality_score.metric!r}")
    return frame.reset_index(drop=True), suspected
