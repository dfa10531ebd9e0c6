"""Visualization stage: plots of the exploration (and processing) metadata, and an index page.

Reads csv/image_metadata.csv, and csv/processed_metadata.csv when it exists, plus the thresholds of the
explore config, and saves into reports/quality/: a histogram per metric with its thresholds and the
number of images beyond them, the age distribution, metrics by age group, grids of the images each check
flags (worst first), before/after pairs per repair, and a summary of every check and status.
`index.html` shows them all with a one-line caption each.

    python visualize_image_information.py [--set output_dir=reports/other --set formats=[png,svg]]
"""
from __future__ import annotations

import html
import logging
import os
from pathlib import Path

import pandas as pd

from image_reader import exploration_keys, exploration_settings, flag_column
from image_processor import repair_order
from image_visualizer import (
    MissingColumn,
    before_after_grid,
    image_grid,
    plot_age_distribution,
    plot_metric_by_age_group,
    plot_summary,
    save_figure,
    visualize_distribution,
)
from config_models import ExploreConfig, VisualizeConfig
from age_groups import age_groups_from
from cli import run_script, setup_logging
from config import load_config
from dataset import read_metadata_csv
from errors import UserError
from outputs import OutputFolder, OutputGuard

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


def make_figures(config: VisualizeConfig, explore: ExploreConfig, exploration: pd.DataFrame, processed: pd.DataFrame | None):
    """Yield (name, caption, figure) for every plot the config asks for."""
    fig = config.figure
    size, dpi = (fig.width_inches, fig.height_inches), fig.dpi
    groups = age_groups_from(config)
    thresholds = thresholds_by_metric(explore.checks)

    yield "summary", "Every status and failed check, counted.", plot_summary(exploration, processed, size, dpi)
    yield "age_distribution", "Labelled images per age group and per year of age.", plot_age_distribution(exploration, groups, size, dpi)
    for metric in config.distributions:
        marks = thresholds.get(metric, [])
        flagged = [f"{t['check']} {'<' if t['side'] == 'below' else '>'} {t['value']:g}: {int(exploration[flag_column(t['check'])].sum())} images"
                   for t in marks if flag_column(t["check"]) in exploration.columns]
        caption = f"Distribution of {metric}" + (f"; dashed, the exploration's thresholds: {'; '.join(flagged)}." if flagged else ".")
        yield f"distribution_{metric}", caption, visualize_distribution(exploration, metric, marks, size, dpi, fig.bins, fig.log_scale_span)
    for metric in config.by_age_group:
        yield (f"by_age_group_{metric}", f"{metric} per age group; the percentages are the share flagged.",
               plot_metric_by_age_group(exploration, metric, groups, thresholds.get(metric, []), size, dpi, fig.log_scale_span))
    grids = config.grids
    for check in grids.checks:
        if flag_column(check) not in exploration.columns:
            raise MissingColumn(f"column {flag_column(check)!r} is not in the CSV: grids.checks names a check the exploration did not run")
        rule = explore.checks.get(check)
        metric = rule.metric if rule else "age"
        yield (f"grid_{check}", f"Images flagged {check}, worst first, with file names and {metric}.",
               image_grid(exploration, check, metric, grids.columns, grids.rows, grids.thumbnail_pixels, fig.dpi))
    if processed is not None:
        pairs = config.before_after
        for operation in repair_order():
            if processed["operations"].fillna("").str.contains(operation + "(", regex=False).any():
                yield (f"before_after_{operation}", f"Images repaired with {operation}: original left, result right.",
                       before_after_grid(processed, operation, pairs.pairs, pairs.columns, grids.thumbnail_pixels, fig.dpi))


def write_index(folder: OutputFolder, entries: list[tuple[str, str]], sources: list[str]) -> Path:
    items = "\n".join(
        f'<figure><img src="{html.escape(name)}.png" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, caption in entries
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agepipe quality report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
figure{{margin:0 0 2.5em}}img{{max-width:100%;border:1px solid #ddd}}figcaption{{color:#555}}</style></head>
<body><h1>Image quality report</h1><p>From {html.escape(', '.join(sources))}.</p>
{items}
</body></html>
"""
    return folder.write_text("index.html", page)


def main(args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    own, theirs = exploration_keys(args.overrides, VisualizeConfig)
    config = load_config(VisualizeConfig, args.config, own)
    setup_logging(config.log_level)
    explore = exploration_settings(config.exploration_csv, theirs)  # the thresholds the exploration ran with
    exploration = read_metadata(config.exploration_csv, "exploration CSV")
    sources = [config.exploration_csv]
    processed = None
    if config.processed_csv and Path(config.processed_csv).exists():
        processed = read_metadata(config.processed_csv, "processed CSV")
        sources.append(config.processed_csv)
    image_folders = {os.path.dirname(p) for frame in (exploration, processed) if frame is not None and "path" in frame for p in frame["path"].dropna()}
    with OutputGuard(inputs=[*sources, *sorted(image_folders)]) as guard:
        folder = guard.folder(config.output_dir, "output_dir", overwrite=config.overwrite_output)
        entries = []
        try:
            for name, caption, figure in make_figures(config, explore, exploration, processed):
                save_figure(figure, folder, name, config.formats)
                entries.append((name, caption))
        except MissingColumn as exc:
            raise UserError(f"{exc} (is it an agepipe CSV?)") from None
        index = write_index(folder, entries, sources)
        folder.finish()
    print(f"wrote {len(entries)} plots ({', '.join(config.formats)}) to {folder.path}/; open {index}")


if __name__ == "__main__":
    run_script(main, "Plot the quality metadata of a dataset.", "visualize_image_information.yaml", VisualizeConfig, [
        "python visualize_image_information.py", "python visualize_image_information.py --set formats=[png,svg] --set output_dir=reports/other"])
