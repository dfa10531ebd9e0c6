"""The funnel of a training set: from the files found to the faces trained on, stage by stage, with the
reasons rows left. It follows the run records back from the training CSV (each stage's record names
the CSV it read) and counts each stage's `status` and `reason` columns a chunk at a time, so memory
does not grow with the dataset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from agepipe.data.datasets import read_metadata_chunks
from agepipe.data.vocabulary import TRAINABLE_STATUSES
from agepipe.errors import UserError
from agepipe.running.writes import recorded_config

UPSTREAM_KEYS = ("processed_csv", "exploration_csv", "input_csv")  # what each stage's config calls its input
ROWS_PER_CHUNK = 50_000
MAX_STAGES = 8  # more than the pipeline has: a loop of run records ends here


def upstream_csv(csv: Path) -> Path | None:
    """The CSV the stage that wrote `csv` read, from its run record; None without one."""
    config = recorded_config(csv)
    if config is None:
        return None
    if not {"input", *UPSTREAM_KEYS} & config.keys():
        # a stage that records several configs ({"process": ..., "explore": ...}) lists its own first
        config = next((value for value in config.values() if isinstance(value, dict)), {})
    chosen = f"{config['input']}_csv" if isinstance(config.get("input"), str) else None  # resampling's `input:`
    for key in (chosen, *UPSTREAM_KEYS) if chosen else UPSTREAM_KEYS:
        value = config.get(key)
        if isinstance(value, str) and Path(value).is_file() and Path(value) != csv:
            return Path(value)
    return None


def stage_counts(csv: Path) -> dict:
    """One CSV's rows, those fit to train on, and the other rows' reasons (their status where none)."""
    rows, usable, reasons = 0, 0, Counter()
    chunks = read_metadata_chunks(
        csv, "stage CSV", "", ("file",), ROWS_PER_CHUNK, usecols=lambda c: c in ("file", "status", "reason")
    )
    try:
        for chunk in chunks:
            rows += len(chunk)
            fit = chunk["status"].isin(TRAINABLE_STATUSES) if "status" in chunk else pd.Series(True, chunk.index)
            usable += int(fit.sum())
            if "status" in chunk:
                left = chunk[~fit]
                reasons.update(
                    (left["reason"].fillna(left["status"]) if "reason" in left else left["status"]).astype(str)
                )
    except UserError:  # a stage's CSV gone, or not one: the funnel says it cannot count it
        return {"csv": str(csv), "rows": None, "usable": None, "reasons": []}
    return {"csv": str(csv), "rows": rows, "usable": usable, "reasons": reasons.most_common()}


def training_funnel(input_csv: str | Path) -> list[dict]:
    """Each stage's counts (stage_counts), from the first CSV the run records lead back to, to `input_csv`."""
    chain = [Path(input_csv)]
    while len(chain) < MAX_STAGES and (previous := upstream_csv(chain[-1])) is not None and previous not in chain:
        chain.append(previous)
    return [stage_counts(csv) for csv in reversed(chain)]
