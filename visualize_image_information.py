"""Visualization stage: plots of the exploration (and processing) metadata, and an index page.

Reads csv/image_metadata.csv, and csv/processed_metadata.csv and the label check's
csv/checked_metadata.csv when they exist, plus the thresholds the exploration ran with, and saves into
reports/quality/: a histogram per metric with its thresholds and the number of images beyond them, the
age distribution, metrics by age group, grids of the images each check
flags (worst first), before/after pairs per repair, the faces whose age label is suspect (least likely
first) and their share per age group, and a summary of every check and status. `index.html` opens
with a table of contents and the summary tables (each check with a link to a gallery of every image it
flags, worst first), then the figures in sections, with links to the CSVs and the model's report card.

    python visualize_image_information.py [--set output_dir=reports/other --set formats=[png,svg]]
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

from agepipe.config.data_stages import ExploreConfig, VisualizeConfig
from agepipe.config.loading import load_config
from agepipe.data.age_groups import age_groups_from
from agepipe.data.datasets import MissingColumn, read_metadata_csv
from agepipe.data.vocabulary import ProcessStatus, flag_column
from agepipe.errors import UserError
from agepipe.report.figures import save_figure
from agepipe.report.pages import render
from agepipe.report.quality_site import flagged_rows, galleries, summary, write_gallery
from agepipe.running.output_guard import OutputFolder, OutputGuard
from image_processor import repair_order
from image_reader import exploration_keys, exploration_settings
from image_visualizer import (
    before_after_grid,
    image_grid,
    plot_age_distribution,
    plot_metric_by_age_group,
    plot_summary,
    plot_suspected_labels_by_age_group,
    suspected_labels_grid,
    visualize_distribution,
)
from utils import require_workspace, run_script, setup_logging

log = logging.getLogger("agepipe.visualize")


def read_metadata(path: str, what: str) -> pd.DataFrame:
    frame = read_metadata_csv(path, what, low_memory=False)
    if frame.empty:
        raise UserError(f"{what} {path} has no rows")
    return frame


def thresholds_by_metric(checks: dict) -> dict[str, list[dict]]:
    """For each metric, the thresholds the checks put on it: [{check, value, side}]."""
    found: dict[str, list[dict]] = {}
    for name, rule in checks.items():
        for side in ("below", "above"):
            if getattr(rule, side) is not None:
                found.setdefault(rule.metric, []).append({"check": name, "value": getattr(rule, side), "side": side})
    return found


def make_figures(
    config: VisualizeConfig,
    explore: ExploreConfig,
    exploration: pd.DataFrame,
    processed: pd.DataFrame | None,
    checked: pd.DataFrame | None,
):
    """Yield (name, caption, figure) for every plot the config asks for: the metrics' plots, then the
    grids of images."""
    yield from metric_figures(config, explore, exploration, processed)
    yield from image_figures(config, explore, exploration, processed, checked)


def metric_figures(
    config: VisualizeConfig, explore: ExploreConfig, exploration: pd.DataFrame, processed: pd.DataFrame | None
):
    """The summary, the age distribution, each metric's histogram with its thresholds and per age group."""
    fig = config.figure
    size, dpi = (fig.width_inches, fig.height_inches), fig.dpi
    groups = age_groups_from(config)
    thresholds = thresholds_by_metric(explore.checks)

    yield "summary", "Every status and failed check, counted.", plot_summary(exploration, processed, size, dpi)
    yield (
        "age_distribution",
        "Labelled images per age group and per year of age.",
        plot_age_distribution(exploration, groups, size, dpi),
    )
    for metric in config.distributions:
        marks = thresholds.get(metric, [])
        flagged = [
            f"{t['check']} {'<' if t['side'] == 'below' else '>'} {t['value']:g}: "
            f"{int(exploration[flag_column(t['check'])].sum())} images"
            for t in marks
            if flag_column(t["check"]) in exploration.columns
        ]
        caption = f"Distribution of {metric}" + (
            f"; dashed, the exploration's thresholds: {'; '.join(flagged)}." if flagged else "."
        )
        yield (
            f"distribution_{metric}",
            caption,
            visualize_distribution(exploration, metric, marks, size, dpi, fig.bins, fig.log_scale_span),
        )
    for metric in config.by_age_group:
        yield (
            f"by_age_group_{metric}",
            f"{metric} per age group; the percentages are the share flagged.",
            plot_metric_by_age_group(
                exploration, metric, groups, thresholds.get(metric, []), size, dpi, fig.log_scale_span
            ),
        )


def image_figures(
    config: VisualizeConfig,
    explore: ExploreConfig,
    exploration: pd.DataFrame,
    processed: pd.DataFrame | None,
    checked: pd.DataFrame | None,
):
    """A grid of each check's flagged images, the repairs before and after, the suspected labels."""
    fig, grids = config.figure, config.grids
    size, dpi = (fig.width_inches, fig.height_inches), fig.dpi
    for check in grids.checks:
        if flag_column(check) not in exploration.columns:
            raise MissingColumn(
                f"column {flag_column(check)!r} is not in the CSV: grids.checks names a check the exploration did "
                "not run"
            )
        if not flagged_rows(exploration, check).any():
            continue  # the summary table says "none flagged"
        rule = explore.checks.get(check)
        metric = rule.metric if rule else "age"
        yield (
            f"grid_{check}",
            f"Images flagged {check}, worst first, with file names and {metric}.",
            image_grid(exploration, check, metric, grids.columns, grids.rows, grids.thumbnail_pixels, fig.dpi),
        )
    if processed is not None:
        pairs = config.before_after
        repaired = processed[processed["status"] == ProcessStatus.REPAIRED]
        for operation in repair_order():  # a panel per operation that repaired an image: none is drawn empty
            if repaired["operations"].fillna("").str.contains(operation + "(", regex=False).any():
                yield (
                    f"before_after_{operation}",
                    f"Images repaired with {operation}: original left, result right.",
                    before_after_grid(
                        processed, operation, pairs.pairs, pairs.columns, grids.thumbnail_pixels, fig.dpi
                    ),
                )
    if checked is not None and checked["label_quality"].notna().any():  # some faces were checked
        yield (
            "suspected_labels",
            "Faces whose age label the label check suspects, least likely first, with given and predicted age.",
            suspected_labels_grid(checked, grids.columns, grids.rows, grids.thumbnail_pixels, fig.dpi),
        )
        yield (
            "suspected_labels_by_age_group",
            "Share of each given age group's checked faces suspected of a wrong label.",
            plot_suspected_labels_by_age_group(checked, age_groups_from(config), size, dpi),
        )


SECTIONS = (
    ("overview", "Overview", ("summary", "age_distribution")),
    ("flagged", "Flagged images, worst first", ("grid_",)),
    ("labels", "Label check", ("suspected_labels",)),
    ("repairs", "Repairs: before and after", ("before_after_",)),
    ("distributions", "Metric distributions and thresholds", ("distribution_",)),
    ("by_age_group", "Metrics by age group", ("by_age_group_",)),
)


def sections(entries: list[tuple[str, str]], gallery_pages: dict[str, str]) -> list[dict]:
    """The index's sections in reading order, each with its figures (and a link to the gallery behind a grid)."""
    found = []
    for key, title, prefixes in SECTIONS:
        figures = [
            {"name": name, "caption": caption, "gallery": gallery_pages.get(name.removeprefix("grid_"))}
            for name, caption in entries
            if name.startswith(prefixes)
        ]
        if figures:
            found.append({"key": key, "title": title, "figures": figures})
    return found


def write_site(
    folder: OutputFolder,
    config: VisualizeConfig,
    explore: ExploreConfig,
    entries,
    summary_tables: dict,
    gallery_list,
    sources: list[str],
) -> Path:
    """Every gallery's pages (their thumbnails show the face, as the exploration judged it), then the index:
    the summary tables, the sections, links to the CSVs and the card."""
    thumbnails: dict[str, str | None] = {}
    gallery_pages = {}
    for gallery in gallery_list:
        site = config.site
        write_gallery(
            folder, gallery, site.gallery_page_size, site.thumbnail_pixels, thumbnails, explore.images.face_region_scale
        )
        gallery_pages[gallery.key] = gallery.page_name(1)
    model_card = config.model_report if config.model_report and Path(config.model_report).is_file() else None
    suspected = next((len(g.rows) for g in gallery_list if g.key == "suspected_labels"), 0)
    page = render(
        "quality_index.html",
        summary=summary_tables,
        sections=sections(entries, gallery_pages),
        gallery_pages=gallery_pages,
        suspected=suspected,
        figure_format=config.formats[0],  # the plots are written in each format; the page shows the first
        sources=[{"name": s, "href": os.path.relpath(s, folder.path)} for s in sources],
        model_card=os.path.relpath(model_card, folder.path) if model_card else None,
    )
    return folder.write_text("index.html", page)


def main(args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    own, theirs = exploration_keys(args.overrides, VisualizeConfig)
    config = load_config(VisualizeConfig, args.config, own)
    require_workspace(config.workspace)
    setup_logging(config.log_level)
    start = time.perf_counter()
    explore = exploration_settings(config.exploration_csv, theirs)  # the thresholds the exploration ran with
    exploration = read_metadata(config.exploration_csv, "exploration CSV")
    sources = [config.exploration_csv]
    optional = {}
    for name, path in (("processed", config.processed_csv), ("checked", config.checked_csv)):
        optional[name] = read_metadata(path, f"{name} CSV") if path and Path(path).exists() else None
        sources += [path] if optional[name] is not None else []
    processed, checked = optional["processed"], optional["checked"]
    image_folders = {
        os.path.dirname(p)
        for frame in (exploration, processed, checked)
        if frame is not None and "path" in frame
        for p in frame["path"].dropna()
    }
    with OutputGuard(inputs=[*sources, *sorted(image_folders)]) as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        entries = []
        try:
            for name, caption, figure in make_figures(config, explore, exploration, processed, checked):
                save_figure(figure, folder, name, config.formats)
                entries.append((name, caption))
        except MissingColumn as exc:
            raise UserError(f"{exc} (is it an agepipe CSV?)") from None
        gallery_list = galleries(exploration, explore.checks, checked)
        index = write_site(
            folder,
            config,
            explore,
            entries,
            summary(exploration, explore.checks, age_groups_from(config)),
            gallery_list,
            sources,
        )
        folder.finish()
    shown = sum(len(g.rows) for g in gallery_list)
    print(
        f"wrote {len(entries)} plots ({', '.join(config.formats)}) and {len(gallery_list)} galleries ({shown:,} "
        "flagged images) "
        f"to {folder.path}/ in {time.perf_counter() - start:.0f}s; open {index}"
    )


if __name__ == "__main__":
    run_script(
        main,
        "Plot the quality metadata of a dataset.",
        "visualize_image_information.yaml",
        VisualizeConfig,
        [
            "python visualize_image_information.py",
            "python visualize_image_information.py --set formats=[png,svg] --set output_dir=reports/other",
        ],
    )
