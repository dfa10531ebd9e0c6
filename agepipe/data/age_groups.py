"""Age groups: binning ages into the configured groups (`age_groups.edges` in configs/common.yaml)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class AgeGroups:
    """Age groups from their lower edges: edges [0, 10, 70] give groups 0-9, 10-69 and 70+."""

    edges: tuple[int, ...]

    @property
    def labels(self) -> list[str]:
        uppers = [f"{b - 1}" for b in self.edges[1:]]
        return [f"{a}-{u}" for a, u in zip(self.edges, uppers)] + [f"{self.edges[-1]}+"]

    def bounds(self, max_age: int) -> list[tuple[int, int]]:
        """(lower, upper) inclusive ages of each group; the open last group ends at `max_age`."""
        uppers = [b - 1 for b in self.edges[1:]] + [max_age]
        return list(zip(self.edges, uppers))

    def index_of(self, age: float) -> int:
        """Group index of an age, or -1 below the first edge."""
        if age is None or (isinstance(age, float) and math.isnan(age)) or age < self.edges[0]:
            return -1
        return sum(age >= edge for edge in self.edges) - 1

    def label_of(self, age: float) -> str | None:
        index = self.index_of(age)
        return None if index < 0 else self.labels[index]


def age_groups_from(config: BaseModel) -> AgeGroups:
    """The age groups of any config (every config has the common `age_groups`)."""
    return AgeGroups(tuple(config.age_groups.edges))
