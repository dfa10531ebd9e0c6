"""The quality report as a small static site: the index's summary tables, and one gallery per check
holding every image it flags, worst first, in pages of thumbnails.

`summary` counts files, statuses, each check's flags and the usable share per age group;
`galleries` lists, per check (and for the label check's suspects), the flagged rows in order with a
caption; `write_gallery` writes a gallery's pages and thumbnails into the report folder. The pages are
rendered by pages.render; visualize_image_information.py puts it together.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import cv2
import pandas as pd

from agepipe.data.age_groups import AgeGroups
from agepipe.data.datasets import suspected_labels
from agepipe.data.image_files import UnreadableImage, read_image
from agepipe.data.vocabulary import TRAINABLE_STATUSES, Check, flag_column, score_column
from agepipe.faces.alignment import square_about
from agepipe.report.pages import render
from agepipe.running.output_guard import OutputFolder

THUMBNAIL_MAX_PIXELS = (
    50_000_000  # an image larger than this is shown as unreadable rather than decoded for a thumbnail
)
THUMBNAIL_MAX_BYTES = 200 * 2**20
THUMBNAIL_QUALITY = 85
FACE_BOX = ("face_x", "face_y", "face_width", "face_height")


@dataclass
class Gallery:
    """Every image one check flags, in the order shown (worst first), with a caption line or two each."""

    key: str
    title: str
    rows: pd.DataFrame
    captions: list[list[str]] = field(default_factory=list)

    def page_name(self, page: int) -> str:
        return f"gallery/{self.key}-{page}.html"


DUPLICATE_CHECKS = {
    Check.DUPLICATE: "the same picture as an earlier file",
    Check.AGE_CONFLICT: "duplicates whose ages disagree",
}


def check_rules(checks: dict, exploration: pd.DataFrame) -> list[dict]:
    """Every check the exploration ran: name, the rule in words, its metric (None for the duplicate
    search's), and whether it only informs."""
    rules = []
    for name, rule in checks.items():
        sides = [
            f"{rule.metric} {sign} {value:g}"
            for sign, value in (("<", rule.below), (">", rule.above))
            if value is not None
        ]
        rules.append(
            {
                "name": name,
                "rule": " or ".join(sides) + (" (informational)" if rule.informational else ""),
                "metric": rule.metric,
            }
        )
    rules += [
        {"name": str(name), "rule": text, "metric": None}
        for name, text in DUPLICATE_CHECKS.items()
        if flag_column(name) in exploration
    ]
    return rules


def flagged_rows(exploration: pd.DataFrame, check: str) -> pd.Series:
    column = flag_column(check)
    return (
        exploration[column].fillna(False).astype(bool)
        if column in exploration
        else pd.Series(False, index=exploration.index)
    )


def summary(exploration: pd.DataFrame, checks: dict, groups: AgeGroups) -> dict:
    """The index's tables: files, each status with its count and share, each check (its rule, how many
    it flags and their share), and per age group the labelled files and the share usable for training."""
    files = len(exploration)
    statuses = exploration["status"].value_counts()
    check_rows = []
    for rule in check_rules(checks, exploration):
        flagged = int(flagged_rows(exploration, rule["name"]).sum())
        check_rows.append({**rule, "flagged": flagged, "share": flagged / max(1, files)})
    ages = pd.to_numeric(exploration.get("age"), errors="coerce")
    labelled = exploration[ages.notna()]
    by_group = []
    group_of = pd.Series([groups.label_of(a) for a in ages.dropna()], index=labelled.index, dtype=object)
    for label in groups.labels:
        members = labelled[group_of == label]
        by_group.append(
            {
                "group": label,
                "files": len(members),
                "usable": (members["status"].isin(TRAINABLE_STATUSES).mean() if len(members) else None),
            }
        )
    return {
        "files": files,
        "statuses": [{"status": s, "files": int(n), "share": n / max(1, files)} for s, n in statuses.items()],
        "checks": check_rows,
        "by_age_group": by_group,
    }


def galleries(exploration: pd.DataFrame, checks: dict, checked: pd.DataFrame | None) -> list[Gallery]:
    """A gallery per check that flags any image (worst first: lowest score_<check>), and one of the label
    check's suspects (least likely label first) when there are any."""
    found = []
    for rule in check_rules(checks, exploration):
        name, metric = rule["name"], rule["metric"]
        flagged = exploration[flagged_rows(exploration, name)]
        if flagged.empty:
            continue
        if metric is None:  # the duplicate search's: shown with the file each one repeats
            flagged = flagged.sort_values(["duplicate_of", "file"], kind="stable", na_position="first")
            captions = [
                [f"same as {other}" if isinstance(other, str) else "first of its group", f"age {age}"]
                for other, age in zip(flagged.get("duplicate_of", pd.Series(index=flagged.index)), flagged.get("age"))
            ]
        else:
            flagged = flagged.sort_values(
                [score_column(name) if score_column(name) in flagged else metric, "file"], kind="stable"
            )
            captions = [[f"{metric} {value:.4g}" if pd.notna(value) else metric] for value in flagged[metric]]
        found.append(
            Gallery(name, f"{name}: {len(flagged):,} images flagged ({rule['rule']}), worst first", flagged, captions)
        )
    if checked is not None:
        suspects = suspected_labels(checked)
        if len(suspects):
            captions = [
                [f"given {int(a)}, predicted {p:.0f}", f"label quality {q:.2g}"]
                for a, p, q in zip(suspects["age"], suspects["predicted_age"], suspects["label_quality"])
            ]
            found.append(
                Gallery(
                    "suspected_labels",
                    f"Suspected label errors: {len(suspects):,} faces, least likely label first",
                    suspects,
                    captions,
                )
            )
    return found


def thumbnail(
    path: str, side: int, face: tuple[float, float, float, float] | None = None, scale: float = 1.0
) -> bytes | None:
    """The image, or its face (the part inside the image of a square of `scale` times the box x, y,
    width, height) when it has one, shrunk to fit `side` x `side` pixels as JPEG bytes; None when it
    cannot be read."""
    try:
        image, _ = read_image(path, THUMBNAIL_MAX_PIXELS, THUMBNAIL_MAX_BYTES)
    except (UnreadableImage, OSError):
        return None
    if face is not None:
        x, y, square, _ = square_about(face, scale)
        region = image[max(0, round(y)) : round(y + square), max(0, round(x)) : round(x + square)]
        image = region if min(region.shape[:2]) > 0 else image
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    scale = min(1.0, side / max(image.shape[:2]))
    if scale < 1:
        image = cv2.resize(
            image,
            (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
    if image.dtype != "uint8":
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(1.0, float(image.max())))
    ok, data = cv2.imencode(".jpg", image[..., :3], [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    return data.tobytes() if ok else None


def face_box(row) -> tuple[float, float, float, float] | None:
    """The face box (x, y, width, height) an exploration row holds, or None."""
    box = tuple(pd.to_numeric(pd.Series([row.get(c) for c in FACE_BOX]), errors="coerce"))
    return None if any(pd.isna(v) for v in box) else box


def write_gallery(
    folder: OutputFolder,
    gallery: Gallery,
    page_size: int,
    side: int,
    thumbnails: dict[str, str | None],
    face_scale: float,
) -> int:
    """Write the gallery's pages (gallery/<key>-<n>.html) and the thumbnails they show (thumbs/, each
    image's once across galleries: `thumbnails` maps a path to its thumbnail's name, None when it
    cannot be read), each showing the face where one was found (`face_scale` times its box, as the
    exploration judged it); return the number of pages."""
    pages = max(1, math.ceil(len(gallery.rows) / page_size))
    for page in range(1, pages + 1):
        chunk = slice((page - 1) * page_size, page * page_size)
        items = []
        for (_, row), caption in zip(gallery.rows.iloc[chunk].iterrows(), gallery.captions[chunk]):
            path = row.get("path")
            if isinstance(path, str) and path not in thumbnails:
                name = f"thumbs/{hashlib.sha1(path.encode()).hexdigest()[:20]}.jpg"
                data = thumbnail(path, side, face_box(row), face_scale)
                if data is not None:
                    folder.write_bytes(name, data)
                thumbnails[path] = name if data is not None else None
            items.append(
                {
                    "file": row["file"],
                    "thumbnail": thumbnails.get(path) if isinstance(path, str) else None,
                    "target": os.path.relpath(path, folder.path / "gallery") if isinstance(path, str) else None,
                    "caption": caption,
                }
            )
        folder.write_text(
            gallery.page_name(page),
            render(
                "gallery.html",
                gallery=gallery,
                items=items,
                page=page,
                pages=pages,
                first=chunk.start + 1,
                last=min(chunk.stop, len(gallery.rows)),
            ),
        )
    return pages
