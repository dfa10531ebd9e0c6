"""The words the pipeline's CSVs share: each stage's `status` values, the checks computed in code, the
names of a check's flag and score columns, and which statuses are fit to train on. Every stage that
writes or reads these columns takes them from here, so a name means one thing everywhere."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """What exploration says of a file (its `status` column); the first problem found wins."""

    OK = "ok"
    LOW_QUALITY = "low_quality"  # fails at least one check
    UNLABELLED = "unlabelled"  # no usable age
    UNREADABLE = "unreadable"  # not a decodable image; `reason` says why


class Check(StrEnum):
    """The checks computed in code rather than configured as thresholds in `checks:`."""

    DUPLICATE = "duplicate"  # a copy (exact or near) of an earlier file
    AGE_CONFLICT = "age_conflict"  # in a duplicate group whose ages disagree


def flag_column(check: str) -> str:
    """The boolean column saying whether a file fails `check`."""
    return f"flag_{check}"


def score_column(check: str) -> str:
    """The numeric column of a threshold check's margin: negative when failed, lowest is worst."""
    return f"score_{check}"


class ProcessStatus(StrEnum):
    """What processing did with an image (its `status` column in the processed CSV)."""

    KEPT = "kept"  # passed every check: copied (or only resized)
    REPAIRED = "repaired"  # failed checks, repaired, re-measured, now passes them all
    REJECTED = "rejected"  # not repairable, or still failing after the repairs; `reason` says why
    UNREADABLE = "unreadable"
    UNLABELLED = "unlabelled"


# The statuses, of any stage's CSV, whose images are fit to train on: the one definition.
TRAINABLE_STATUSES = (Status.OK, ProcessStatus.KEPT, ProcessStatus.REPAIRED)
