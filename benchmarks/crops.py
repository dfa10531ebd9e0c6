"""The benchmarks' data: the labelled crops of a folder, the configured age groups, which crops are
held out (each age group in proportion, seeded) and folders of links to them (the crops themselves
are never copied or changed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from agepipe.config.loading import load_config  # noqa: E402
from agepipe.config.schema import Common  # noqa: E402
from agepipe.data.age_groups import AgeGroups  # noqa: E402
from agepipe.data.datasets import find_image_files, parse_utkface_name  # noqa: E402


def configured_groups() -> AgeGroups:
    """The age groups of configs/common.yaml."""
    return AgeGroups(tuple(load_config(Common, PROJECT / "configs/common.yaml").age_groups.edges))


def labelled_crops(folder: Path) -> list[tuple[str, str]]:
    """(name, path) of every image below `folder` whose UTKFace name carries an age."""
    return [(name, path) for name, path in find_image_files(folder) if parse_utkface_name(name)["age"] is not None]


def held_out(files: list[str], groups: AgeGroups, count: int, seed: int) -> set[str]:
    """`count` of the UTKFace-named `files`, each age group in proportion, seeded."""
    rng = np.random.default_rng(seed)
    index = np.array([groups.index_of(parse_utkface_name(f)["age"]) for f in files])
    chosen = []
    for group in np.unique(index):
        members = np.flatnonzero(index == group)
        rng.shuffle(members)
        chosen += members[: round(count * len(members) / len(files))].tolist()
    return {files[i] for i in chosen}


def link_folder(folder: Path, paths: list[str]) -> Path:
    """`folder` of links to `paths`; a link a previous run in the same --work-dir made is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link, target = folder / Path(path).name, Path(path).resolve()
        if not (link.is_symlink() and link.readlink() == target):
            link.symlink_to(target)
    return folder
