"""Plots of the quality metadata: each function takes a data frame and returns a matplotlib figure.

The entry script chooses the non-interactive Agg backend, so everything runs on servers without a display;
the house style applies inside each plot function only, so importing this module changes no global state.
`save_figure` writes a figure to PNG (and optionally SVG) atomically.
"""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from agepipe.data.age_groups import AgeGroups
from agepipe.data.datasets import require, suspected_labels, suspected_labels_mask
from agepipe.data.vocabulary import TRAINABLE_STATUSES, ProcessStatus, flag_column, score_column
from agepipe.faces.detector import KEYPOINTS

STYLE = {
    "figure.facecolor": "white",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "font.size": 10,
}
BAR_COLOUR, FLAG_COLOUR, OK_COLOUR = "#4C72B0", "#C44E52", "#55A868"
THRESHOLD_COLOURS = ["#C44E52", "#DD8452", "#8172B3", "#937860"]


def styled(plot):
    """Draw inside the house style, leaving matplotlib's global settings as the caller had them."""

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        with plt.style.context(STYLE):
            return plot(*args, **kwargs)

    return draw


def new_figure(size: tuple[float, float], dpi: int):
    return plt.figure(figsize=size, dpi=dpi, layout="constrained")


def needs_log_scale(values: pd.Series, span: float) -> bool:
    """True when positive values spread over more than `span` times from the 1st to the 99th percentile."""
    positive = values[values > 0]
    if len(positive) < len(values) * 0.95 or len(positive) < 10:
        return False
    low, high = np.percentile(positive, [1, 99])
    return high / low > span


@styled
def visualize_distribution(
    frame: pd.DataFrame, metric: str, thresholds: list[dict], size, dpi: int, bins: int, log_span: float
):
    """Histogram of one metric with each threshold drawn, and the number and share of images beyond it.

    `thresholds`: dicts with `check` (name), `value`, and `side` ("below" or "above"). A metric whose
    values span more than `log_span` times is drawn on a logarithmic axis.
    """
    require(frame, metric)
    values = pd.to_numeric(frame[metric], errors="coerce").dropna()
    figure = new_figure(size, dpi)
    axes = figure.add_subplot()
    if values.empty:
        axes.text(0.5, 0.5, f"no measured values of {metric}", ha="center", transform=axes.transAxes)
        return figure
    log = needs_log_scale(values, log_span)
    counts = not log and (values == values.round()).all() and values.max() - values.min() <= bins
    if log:
        edges = np.geomspace(values[values > 0].min(), values.max() * 1.0001, bins + 1)
        axes.set_xscale("log")
    elif counts:  # such as faces found: a bar per value, and a threshold drawn between the bars it separates
        edges = np.arange(values.min() - 0.5, values.max() + 1.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        edges = np.linspace(values.min(), values.max() + 1e-9, bins + 1)
        axes.ticklabel_format(axis="x", useOffset=False)
    axes.hist(values, bins=edges, color=BAR_COLOUR, alpha=0.85, rwidth=0.9 if counts else None)
    axes.set(
        xlabel=metric.replace("_", " ") + (" (log scale)" if log else ""),
        ylabel="images",
        title=f"{metric.replace('_', ' ').capitalize()} of {len(values):,} images",
    )
    for threshold, colour in zip(thresholds, THRESHOLD_COLOURS):
        count = int(_beyond_one(values, threshold).sum())
        arrow = "<" if threshold["side"] == "below" else ">"
        between = (
            (-0.5 if threshold["side"] == "below" else 0.5)
            if counts and threshold["value"] == round(threshold["value"])
            else 0
        )
        axes.axvline(
            threshold["value"] + between,
            color=colour,
            linestyle="--",
            linewidth=2,
            label=f"{threshold['check']} {arrow} {threshold['value']:g}: {count:,} images ({count / len(values):.1%})",
        )
    if thresholds:
        axes.legend(loc="best", framealpha=0.95, title="flagged by threshold")
    return figure


def _beyond_one(values, threshold: dict):
    return values < threshold["value"] if threshold["side"] == "below" else values > threshold["value"]


@styled
def plot_age_distribution(frame: pd.DataFrame, groups: AgeGroups, size, dpi: int):
    """Labelled images per age group (bars, with counts) and per single year of age."""
    require(frame, "age")
    ages = pd.to_numeric(frame["age"], errors="coerce").dropna()
    labels = groups.labels
    counts = pd.Series([groups.label_of(a) for a in ages]).value_counts().reindex(labels, fill_value=0)
    figure = new_figure(size, dpi)
    by_group, by_year = figure.subplots(1, 2, width_ratios=[1, 1.4])
    bars = by_group.bar(labels, counts.values, color=BAR_COLOUR)
    by_group.bar_label(bars, labels=[f"{c:,}" for c in counts.values], padding=2)
    by_group.set(xlabel="age group", ylabel="images", title=f"{len(ages):,} labelled images by age group")
    by_group.tick_params(axis="x", rotation=45)
    if len(ages):
        by_year.hist(ages, bins=np.arange(ages.min(), ages.max() + 2) - 0.5, color=BAR_COLOUR)
    for edge in groups.edges[1:]:
        by_year.axvline(edge - 0.5, color="grey", linewidth=0.8, linestyle=":")
    by_year.set(xlabel="age (years); dotted lines: group edges", ylabel="images", title="By single year of age")
    return figure


@styled
def plot_metric_by_age_group(
    frame: pd.DataFrame, metric: str, groups: AgeGroups, thresholds: list[dict], size, dpi: int, log_span: float
):
    """One metric per age group, with the share of each group flagged by the metric's thresholds in the
    tick labels: a quality problem concentrated in one group biases a classifier. Box plots for
    continuous metrics; for counts with few values (such as faces found), the mean per group as bars."""
    require(frame, metric, "age_group")
    values = pd.to_numeric(frame[metric], errors="coerce")
    present = [g for g in groups.labels if ((frame["age_group"] == g) & values.notna()).any()]
    data = [values[(frame["age_group"] == g) & values.notna()] for g in present]
    ticks = [
        g + (f"\n{_flagged_share(d, thresholds):.1%} flagged" if thresholds else "") + f"\nn={len(d):,}"
        for g, d in zip(present, data)
    ]
    figure = new_figure(size, dpi)
    axes = figure.add_subplot()
    if values.nunique() <= 5:
        bars = axes.bar(ticks, [d.mean() for d in data], color=BAR_COLOUR)
        axes.bar_label(bars, fmt="%.2f", padding=2)
        axes.set_ylabel(f"mean {metric.replace('_', ' ')}")
    else:
        axes.boxplot(
            data, tick_labels=ticks, flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": FLAG_COLOUR}
        )
        axes.set_ylabel(metric.replace("_", " "))
        if needs_log_scale(values.dropna(), log_span):
            axes.set_yscale("log")
    for threshold, colour in zip(thresholds, THRESHOLD_COLOURS):
        arrow = "<" if threshold["side"] == "below" else ">"
        axes.axhline(
            threshold["value"],
            color=colour,
            linestyle="--",
            linewidth=1.5,
            label=f"{threshold['check']} {arrow} {threshold['value']:g}",
        )
    if thresholds:
        axes.legend(loc="best", framealpha=0.95)
    axes.set(xlabel="age group", title=f"{metric.replace('_', ' ').capitalize()} by age group")
    return figure


def _flagged_share(values: pd.Series, thresholds: list[dict]) -> float:
    flagged = pd.Series(False, index=values.index)
    for threshold in thresholds:
        flagged |= _beyond_one(values, threshold)
    return float(flagged.mean()) if len(values) else 0.0


def _thumbnail(path: str, side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The image squeezed to side x side pixels (grey when unreadable), and its x and y scale."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path and Path(path).is_file() else None
    if image is None:
        return np.full((side, side, 3), 0.85), (1.0, 1.0)
    scale = (side / image.shape[1], side / image.shape[0])
    image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0, scale


def face_overlays(frame: pd.DataFrame) -> list[dict | None]:
    """Per row, the best face's box (x, y, width, height) and keypoints from the exploration's face
    columns, in image pixels; None where no face was found or the CSV has no face columns."""
    box_columns = ["face_x", "face_y", "face_width", "face_height"]
    if not set(box_columns) <= set(frame.columns):
        return [None] * len(frame)
    point_columns = [f"face_{name}" for name in KEYPOINTS if f"face_{name}_x" in frame.columns]
    overlays = []
    for _, row in frame.iterrows():
        box = pd.to_numeric(row[box_columns], errors="coerce").to_numpy(float)
        points = [(row[p + "_x"], row[p + "_y"]) for p in point_columns]
        overlays.append(
            {"box": box, "points": np.array(points, float).reshape(-1, 2)} if np.isfinite(box).all() else None
        )
    return overlays


@styled
def image_grid(frame: pd.DataFrame, check: str, metric: str, columns: int, rows: int, thumb: int, dpi: int):
    """The images a check flags, worst first (lowest `score_<check>`, else lowest `metric`), with their
    file names and values: what the threshold catches. The best face found is drawn on each: its box,
    and its keypoints as dots."""
    require(frame, flag_column(check), metric, "path", "file")
    flagged = frame[frame[flag_column(check)].astype(bool)]
    order = score_column(check) if score_column(check) in frame.columns else metric
    flagged = flagged.sort_values(order).head(columns * rows)
    captions = [[f, f"{metric} {v:.3g}"] for f, v in zip(flagged["file"], flagged[metric])]
    return _grid(
        list(zip(flagged["path"], captions, face_overlays(flagged))),
        f"{check}: {int(frame[flag_column(check)].sum()):,} images flagged, worst first",
        columns,
        thumb,
        dpi,
    )


@styled
def before_after_grid(frame: pd.DataFrame, operation: str, pairs: int, columns: int, thumb: int, dpi: int):
    """Original and repaired image side by side, for the repaired images whose plan used `operation`."""
    require(frame, "status", "operations", "source_path", "path")
    with_operation = frame["operations"].fillna("").str.contains(operation + "(", regex=False)
    used = with_operation & (frame["status"] == ProcessStatus.REPAIRED)
    repaired = frame[used].head(pairs)
    cells = []
    for _, row in repaired.iterrows():
        cells.append(
            (row["source_path"], [row["file"], "before: " + row["failed_checks_before"].replace(";", ", ")], None)
        )
        operations = [step.split("(")[0].strip() for step in row["operations"].split(";")]
        cells.append((row["path"], ["after"] + operations, None))
    return _grid(
        cells, f"Repairs using {operation}: before | after ({len(repaired)} of {int(used.sum())})", columns, thumb, dpi
    )


@styled
def suspected_labels_grid(frame: pd.DataFrame, columns: int, rows: int, thumb: int, dpi: int):
    """The faces check_labels.py suspects of a wrong age label, least likely label first, each with its
    given and its predicted age: a person can tell at a glance which label is wrong."""
    suspected = suspected_labels(frame)
    shown = suspected.head(columns * rows)
    captions = [
        [f, f"given {int(a)}, predicted {p:.0f}", f"label quality {q:.2g}"]
        for f, a, p, q in zip(shown["file"], shown["age"], shown["predicted_age"], shown["label_quality"])
    ]
    checked = int(frame["label_quality"].notna().sum())
    return _grid(
        list(zip(shown["path"], captions, face_overlays(shown))),
        f"Suspected label errors: {len(suspected):,} of {checked:,} checked faces, least likely label first",
        columns,
        thumb,
        dpi,
    )


@styled
def plot_suspected_labels_by_age_group(frame: pd.DataFrame, groups: AgeGroups, size, dpi: int):
    """The share of each given age group's checked faces that the label check suspects, with counts:
    errors concentrated in one group bias the classifier there."""
    suspected_labels(frame)  # the columns it needs
    checked = frame[frame["label_quality"].notna()]
    group = pd.Series([groups.label_of(a) for a in checked["age"]], index=checked.index, dtype=object)
    flagged = suspected_labels_mask(checked)
    totals = group.value_counts().reindex(groups.labels, fill_value=0)
    counts = group[flagged].value_counts().reindex(groups.labels, fill_value=0)
    shares = counts / totals.clip(lower=1) * 100
    figure = new_figure(size, dpi)
    axes = figure.add_subplot()
    bars = axes.bar(groups.labels, shares.values, color=FLAG_COLOUR)
    axes.bar_label(bars, labels=[f"{c:,} of {t:,}" for c, t in zip(counts, totals)], padding=2, fontsize=8)
    axes.set(
        xlabel="given age group",
        ylabel="suspected (% of checked faces)",
        title=f"Suspected label errors per age group: {int(flagged.sum()):,} of {len(checked):,} checked faces",
    )
    axes.set_ylim(0, max(1.0, float(shares.max()) * 1.2))
    return figure


def _wrapped(caption: list[str], width: int = 22) -> str:
    """A thumbnail's caption in full, wrapped to lines of `width` characters (file names break anywhere)."""
    return "\n".join(line for text in caption for line in textwrap.wrap(str(text), width) or [""])


def _grid(cells: list[tuple[str, list[str], dict | None]], title: str, columns: int, thumb: int, dpi: int):
    rows = max(1, math.ceil(len(cells) / columns))
    inch = thumb / dpi
    figure = plt.figure(figsize=(columns * inch * 1.05, rows * inch * 1.35 + 0.5), dpi=dpi, layout="constrained")
    figure.suptitle(title, fontweight="bold")
    if not cells:
        figure.text(0.5, 0.5, "no images", ha="center")
        return figure
    for index, (path, caption, face) in enumerate(cells):
        axes = figure.add_subplot(rows, columns, index + 1)
        image, (sx, sy) = _thumbnail(path, thumb)
        axes.imshow(image)
        if face is not None:
            x, y, width, height = face["box"]
            axes.add_patch(
                plt.Rectangle((x * sx, y * sy), width * sx, height * sy, fill=False, edgecolor=OK_COLOUR, linewidth=1.2)
            )
            axes.scatter(face["points"][:, 0] * sx, face["points"][:, 1] * sy, s=4, color=FLAG_COLOUR, zorder=3)
            axes.set(xlim=(0, thumb), ylim=(thumb, 0))  # a box beyond a tight crop must not rescale the thumbnail
        axes.set_axis_off()
        # plain text: a file named like mathtext ($\\nope$.jpg) is a name, not TeX
        axes.set_title(_wrapped(caption), fontsize=6.5, fontweight="normal", parse_math=False)
    return figure


@styled
def plot_summary(exploration: pd.DataFrame, processed: pd.DataFrame | None, size, dpi: int):
    """Counts of every status and every failed check, as horizontal bars with their numbers."""
    require(exploration, "status")
    flags = [c for c in exploration.columns if c.startswith(flag_column(""))]
    panels = [
        ("Exploration", exploration["status"].value_counts()),
        ("Failed checks", exploration[flags].astype(bool).sum().rename(lambda c: c[5:]).sort_values()),
    ]
    if processed is not None:
        require(processed, "status")
        panels.append(("Processing", processed["status"].value_counts()))
    figure = new_figure(size, dpi)
    for axes, (title, counts) in zip(figure.subplots(1, len(panels)), panels):
        colours = [OK_COLOUR if name in TRAINABLE_STATUSES else FLAG_COLOUR for name in counts.index]
        bars = axes.barh([str(i) for i in counts.index], counts.values, color=colours)
        axes.bar_label(bars, labels=[f"{v:,}" for v in counts.values], padding=2)
        axes.set(title=title, xlabel="images")
        axes.margins(x=0.2)
    figure.suptitle(f"Status of {len(exploration):,} files (an image may fail several checks)", fontweight="bold")
    return figure
