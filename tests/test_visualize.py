"""The numbers drawn are the numbers in the data, the PNG files are real, non-blank images, and the
report's site reaches every flagged image through links that resolve."""

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agepipe.data.age_groups import AgeGroups
from conftest import read_csv, run
from image_visualizer import plot_age_distribution, plot_metric_by_age_group, visualize_distribution

GROUPS = AgeGroups((0, 10, 20, 30, 40, 50, 60, 70))


def test_threshold_counts_written_on_the_histogram_match_the_rows(metadata):
    thresholds = [{"check": "dark", "value": 50, "side": "below"}, {"check": "bright", "value": 205, "side": "above"}]
    figure = visualize_distribution(metadata, "brightness", thresholds, (8, 4), 80, 40, 30)
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    values = metadata["brightness"].dropna()
    dark, bright = int((values < 50).sum()), int((values > 205).sum())
    assert dark == 30 and bright == 30  # what the generator planted, as the exploration test also checks
    assert legend == [
        f"dark < 50: {dark:,} images ({dark / len(values):.1%})",
        f"bright > 205: {bright:,} images ({bright / len(values):.1%})",
    ]


def test_skewed_metrics_get_a_log_axis(metadata):
    figure = visualize_distribution(metadata, "blurriness", [], (8, 4), 80, 40, 30)
    assert figure.axes[0].get_xscale() == "log"
    figure = visualize_distribution(metadata, "brightness", [], (8, 4), 80, 40, 30)
    assert figure.axes[0].get_xscale() == "linear"


def test_age_bars_sum_to_the_labelled_images(metadata):
    figure = plot_age_distribution(metadata, GROUPS, (8, 4), 80)
    heights = [patch.get_height() for patch in figure.axes[0].patches]
    assert len(heights) == 8 and sum(heights) == metadata["age"].notna().sum()
    expected = metadata["age_group"].value_counts().reindex(GROUPS.labels, fill_value=0).tolist()
    assert heights == expected


def test_flagged_share_per_age_group_in_tick_labels():
    frame = pd.DataFrame({"age_group": ["0-9"] * 4 + ["70+"] * 2, "faces": [1, 0, 1, 1, 0, 0]})
    figure = plot_metric_by_age_group(
        frame, "faces", GROUPS, [{"check": "no_face", "value": 1, "side": "below"}], (6, 4), 80, 30
    )
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert ticks == ["0-9\n25.0% flagged\nn=4", "70+\n100.0% flagged\nn=2"]


@pytest.fixture(scope="module")
def report(explored, processed, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run(
        "visualize_image_information.py",
        f"exploration_csv={explored}/image_metadata.csv",
        f"processed_csv={processed}/processed.csv",
        "checked_csv=null",  # not the project's own csv/checked_metadata.csv, which `make pipeline` leaves
        f"output_dir={out}",
        "formats=[png, svg]",
        "site.gallery_page_size=10",
    )
    return out


def local_links(page: Path) -> list[Path]:
    """The files a page's href and src attributes point at (links to other sites and anchors left out)."""
    links = re.findall(r'(?:href|src)="([^"#]+)"', page.read_text())
    return [(page.parent / unquote(link)).resolve() for link in links if "://" not in link]


def test_every_flagged_image_is_two_clicks_from_the_index_and_every_link_resolves(report, explored):
    index = report / "index.html"
    text = index.read_text()
    assert (
        'id="summary"' in text
        and "Contents" in text
        and text.index("Summary") < text.index("distribution_blurriness.png")
    )
    galleries = {link for link in local_links(index) if link.parent.name == "gallery"}
    reached = set(galleries)
    for first in galleries:  # one click: the gallery's first page; two: any other page of it
        reached |= {link for link in local_links(first) if link.suffix == ".html" and link.parent.name == "gallery"}
    for page in [index, *reached]:
        missing = [link for link in local_links(page) if not link.exists()]
        assert not missing, f"{page.name} links to missing {missing[:3]}"
    shown = {}
    for page in reached:
        check = page.stem.rsplit("-", 1)[0]
        shown.setdefault(check, set()).update(re.findall(r'alt="([^"]+)"', page.read_text()))
    metadata = read_csv(explored / "image_metadata.csv")
    for column in [c for c in metadata.columns if c.startswith("flag_")]:
        flagged = set(metadata.loc[metadata[column].fillna(False).astype(bool), "file"])
        assert shown.get(column.removeprefix("flag_"), set()) == flagged, column
    assert len(shown["blurry"]) > 10 and (report / "gallery" / "blurry-2.html").exists()  # paged: 10 a page


def test_svg_only_and_names_that_mean_something_in_a_link_still_resolve(sample, tmp_path):
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["30_1_0_a #2.jpg", "30_1_0_b?.jpg", "30_1_0_%2e.jpg", "30_1_0_c\\d.jpg"]
    for name, face in zip(names, sorted(sample.glob("*.chip.jpg"))):
        cv2.imwrite(str(folder / name), cv2.GaussianBlur(cv2.imread(str(face)), (0, 0), 6))  # flagged blurry
    run("explore_images.py", f"dataset_dir={folder}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    out = tmp_path / "report"
    run("visualize_image_information.py", f"exploration_csv={tmp_path}/m.csv", f"output_dir={out}", "formats=[svg]")
    assert not list(out.glob("*.png")) and list(out.glob("*.svg"))
    pages = [out / "index.html", *sorted((out / "gallery").glob("*.html"))]
    targets = {link for page in pages for link in local_links(page)}
    assert not [link for link in targets if not link.exists()]
    assert {p.name for p in targets if p.parent == folder} == set(names)  # each photo linked, by its own name


@pytest.mark.skipif(not shutil.which("chromium"), reason="Chromium is not installed (apt install chromium)")
def test_the_index_opens_in_headless_chromium(report):
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={report.parent / 'chromium-profile'}",
        "--dump-dom",
        (report / "index.html").as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert 'nav class="toc"' in dom and dom.count("<figure") >= 20 and "gallery/blurry-1.html" in dom


def test_every_plot_is_a_valid_non_blank_png_of_the_configured_size(report):
    pngs = sorted(report.glob("*.png"))
    names = {p.stem for p in pngs}
    assert {
        "summary",
        "age_distribution",
        "distribution_blurriness",
        "by_age_group_noise",
        "grid_blurry",
        "before_after_denoise",
        "before_after_adjust_exposure",
    } <= names
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert pixels.std() > 10, f"{png.name} looks blank"
        if not png.stem.startswith(("grid_", "before_after_")):
            assert pixels.shape == (round(5.5 * 110), 10 * 110), png.name  # figure size x dpi from the config
    assert len(list(report.glob("*.svg"))) == len(pngs)
    index = (report / "index.html").read_text()
    assert all(f'src="{p.name}"' in index for p in pngs)


def test_exploration_csv_alone_is_enough(explored, tmp_path):
    run(
        "visualize_image_information.py",
        f"exploration_csv={explored}/image_metadata.csv",
        f"processed_csv={tmp_path}/not_yet.csv",
        f"output_dir={tmp_path}/out",
    )
    assert (tmp_path / "out/summary.png").exists() and not list((tmp_path / "out").glob("before_after_*"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("file,status\n", "has no rows"),
        ("name,score\na.jpg,3\n", "column 'status' is not in the CSV"),
    ],
)
def test_bad_csvs_give_a_clear_message(tmp_path, content, message):
    (tmp_path / "bad.csv").write_text(content)
    result = run(
        "visualize_image_information.py",
        f"exploration_csv={tmp_path}/bad.csv",
        "processed_csv=null",
        f"output_dir={tmp_path}/out",
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_metric_column_is_named(explored, tmp_path):
    frame = read_csv(explored / "image_metadata.csv").drop(columns=["noise"])
    frame.to_csv(tmp_path / "m.csv", index=False)
    result = run(
        "visualize_image_information.py",
        f"exploration_csv={tmp_path}/m.csv",
        "processed_csv=null",
        f"output_dir={tmp_path}/out",
        check=False,
    )
    assert result.returncode == 2 and "column 'noise' is not in the CSV" in result.stderr
