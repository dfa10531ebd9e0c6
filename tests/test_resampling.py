"""Target distribution and resampling: hand-worked arithmetic, augmentations, and both notebooks run
headlessly on the generated sample with their outputs checked."""

import os

import cv2
import numpy as np
import pandas as pd
import pytest

from agepipe.config.data_stages import ResamplingAugmentation
from agepipe.data.age_groups import AgeGroups
from conftest import PROJECT, notebook_text, read_csv, run_notebook
from image_processor import random_augmentation
from resampling import (
    largest_remainder,
    output_name,
    plan_resampling,
    read_population,
    select_images,
    single_years,
    target_distribution,
    total_variation_distance,
)

BANDS = pd.DataFrame({"age_lower": [0, 5, 10], "age_upper": [4, 9, np.nan], "population": [500.0, 1000.0, 600.0]})
RANGES = ResamplingAugmentation(
    flip_probability=0.5,
    max_rotation_degrees=10,
    max_scale_change=0.1,
    max_shift_fraction=0.05,
    max_brightness_shift=0.08,
    max_contrast_change=0.15,
    max_gamma_change=0.15,
    blur_probability=0.3,
    max_blur_sigma=1.0,
    noise_probability=0.3,
    max_noise_sigma=4.0,
)


def test_bands_are_shared_evenly_across_single_years():
    # 0-4: 100 a year, 5-9: 200 a year, 10+ spread over 10..15: 100 a year
    assert single_years(BANDS, max_age=15).tolist() == [100.0] * 5 + [200.0] * 5 + [100.0] * 6
    target = target_distribution(BANDS, None, AgeGroups((0, 3, 7)), max_age=15)
    assert target["population"].tolist() == [300.0, 2 * 100 + 2 * 200, 3 * 200 + 600]  # 0-2, 3-6, 7+
    assert target["share"].sum() == pytest.approx(1.0) and target["upper_age"].tolist() == [2, 6, 15]


def test_open_band_is_split_with_the_detailed_table_only_when_needed():
    detail = pd.DataFrame(
        {"age_lower": [0, 5, 10, 15], "age_upper": [4, 9, 14, np.nan], "population": [1.0, 1.0, 30.0, 10.0]}
    )
    target = target_distribution(BANDS, detail, AgeGroups((0, 10, 15)), max_age=19)
    # 10+ (600) splits 3:1 like the detail's 10-14 : 15+
    assert target["population"].tolist() == [1500.0, 450.0, 150.0]
    with pytest.raises(ValueError, match="split the open band 10\\+"):
        target_distribution(BANDS, None, AgeGroups((0, 12)), max_age=19)


def test_abs_figures_give_shares_that_sum_to_one():
    bands = read_population(PROJECT / "data/abs_erp_australia_by_age.csv", 2023)
    detail = read_population(PROJECT / "data/abs_erp_australia_2020_to_100plus.csv", 2020)
    assert bands["population"].sum() == 26_659_922  # the published total
    target = target_distribution(bands, detail, AgeGroups((0, 10, 20, 30, 40, 50, 60, 70)), 100)
    assert target["share"].sum() == pytest.approx(1.0)
    assert target["population"].iloc[0] == 1512632 + 1610402  # 0-9 is exactly two bands
    assert target["population"].sum() == pytest.approx(26_659_922)


@pytest.mark.parametrize("total", [1, 7, 100, 547, 10_001])
def test_target_counts_sum_to_the_requested_size(total):
    counts = largest_remainder([0.117, 0.122, 0.137, 0.148, 0.127, 0.12, 0.107, 0.122], total)
    assert counts.sum() == total and (counts >= 0).all()


def test_plan_caps_copies_and_reports_shortfalls():
    target = pd.DataFrame({"group": ["a", "b", "c"], "share": [0.5, 0.3, 0.2]})
    plan = plan_resampling(pd.Series({"a": 100, "b": 5}), target, size=100, max_copies=3).set_index("group")
    assert plan.loc["a", ["target", "kept", "augmented", "shortfall"]].tolist() == [50, 50, 0, 0]  # down-sampled
    assert plan.loc["b", ["target", "kept", "augmented", "achieved", "shortfall"]].tolist() == [
        30,
        5,
        15,
        20,
        10,
    ]  # capped
    assert plan.loc["c", ["available", "achieved", "shortfall"]].tolist() == [0, 0, 20]  # empty group
    assert plan.loc["b", "factor"] == 4.0


def test_selection_keeps_the_best_and_is_seeded():
    frame = pd.DataFrame(
        {
            "file": [f"{i}.jpg" for i in range(10)],
            "age_group": ["a"] * 8 + ["b"] * 2,
            "score": [5, 9, 1, 7, 7, 3, 8, 2, 4, 6],
        }
    )
    plan = pd.DataFrame({"group": ["a", "b"], "kept": [3, 2], "augmented": [0, 5]})
    first = select_images(frame, plan, "score", True, seed=1)
    best = set(first.loc[first["age_group"] == "a", "file"])
    assert {"1.jpg", "6.jpg"} < best and best - {"1.jpg", "6.jpg"} <= {"3.jpg", "4.jpg"}  # scores 9, 8, then a tie at 7
    copies = first[first["copy"] > 0]
    assert len(copies) == 5 and copies["file"].value_counts().tolist() == [3, 2]  # spread evenly
    pd.testing.assert_frame_equal(first, select_images(frame, plan, "score", True, seed=1))


def test_output_names_keep_the_utkface_age():
    assert output_name("25_1_0_2017.jpg.chip.jpg", 0) == "25_1_0_2017.jpg.chip.jpg"
    assert output_name("25_1_0_2017.jpg.chip.jpg", 2) == "25_1_0_2017.jpg.chip.aug02.jpg"


def test_total_variation_distance():
    assert total_variation_distance([1, 1], [2, 2]) == 0
    assert total_variation_distance([1, 0], [0, 1]) == 1
    assert total_variation_distance([3, 1], [1, 1]) == pytest.approx(0.25)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_augmentation_is_deterministic_and_keeps_size_dtype_and_uprightness(dtype):
    face = np.zeros((120, 100, 3), dtype)
    face[:60] = np.iinfo(dtype).max // 2  # bright top half: a vertical flip or large rotation would show
    for seed in range(20):
        a, text_a = random_augmentation(face, np.random.default_rng(seed), RANGES)
        b, text_b = random_augmentation(face, np.random.default_rng(seed), RANGES)
        assert np.array_equal(a, b) and text_a == text_b
        assert a.shape == face.shape and a.dtype == face.dtype
        assert a[:40].mean() > a[80:].mean() + np.iinfo(dtype).max * 0.2


# --------------------------------------------------------------------------------------------------
# The notebooks, executed headlessly on the generated sample
# --------------------------------------------------------------------------------------------------
def test_population_notebook_writes_the_target(resampled):
    tmp, population, _ = resampled
    target = read_csv(tmp / "target.csv")
    assert target["group"].tolist() == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    assert target["share"].sum() == pytest.approx(1.0)
    images = [
        o
        for c in population.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2  # the age structure and the target, drawn


def test_both_notebooks_run_in_a_real_kernel_as_opened_in_jupyter_in_the_workspace_of_the_environment(
    processed, tmp_path
):
    """What a user does after `make pipeline WORKSPACE=W`: `make lab WORKSPACE=W`, open each notebook and
    run it top to bottom with its defaults, in the project's kernel. Everything lands in the workspace."""
    import shutil
    import subprocess
    import sys

    jupyter = [sys.executable, "-m", "jupyter"]
    assert subprocess.run([*jupyter, "lab", "--version"], capture_output=True, text=True).returncode == 0
    workspace = tmp_path / "workspace"
    (workspace / "csv").mkdir(parents=True)
    shutil.copy(processed / "processed.csv", workspace / "csv" / "checked_metadata.csv")
    git_status = ["git", "status", "--porcelain", "--ignored"]
    before = subprocess.run(git_status, cwd=PROJECT, capture_output=True, text=True).stdout
    environment = {**os.environ, "AGEPIPE_WORKSPACE": str(workspace), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    for notebook in ("australian_population.ipynb", "resampling.ipynb"):
        result = subprocess.run(
            [*jupyter, "execute", notebook], cwd=PROJECT, env=environment, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
    target = read_csv(workspace / "csv" / "target_age_distribution.csv")
    resampled = read_csv(workspace / "csv" / "resampled_metadata.csv")
    assert target["share"].sum() == pytest.approx(1.0) and len(resampled) > 0
    assert all((workspace / "resampled_dataset" / f).is_file() for f in resampled["file"])
    assert subprocess.run(git_status, cwd=PROJECT, capture_output=True, text=True).stdout == before


def test_resampled_distribution_matches_the_target(resampled, processed):
    tmp, _, notebook = resampled
    target = read_csv(tmp / "target.csv")
    rows = read_csv(tmp / "resampled.csv")
    usable = read_csv(processed / "processed.csv").query("status in ['kept', 'repaired']")
    after = rows["age_group"].value_counts().reindex(target["group"]).fillna(0)
    distance = total_variation_distance(after, target["share"])
    assert distance <= 0.02 and len(rows) == len(usable)  # tolerance of configs/resampling.yaml; size kept
    assert "every group reaches its target" in notebook_text(notebook)
    assert f"after {distance:.3f}" in notebook_text(notebook)


def test_every_output_image_exists_decodes_and_traces_to_a_real_source(resampled, processed):
    tmp, _, _ = resampled
    rows = read_csv(tmp / "resampled.csv")
    usable = read_csv(processed / "processed.csv").query("status in ['kept', 'repaired']").set_index("file")
    assert rows["file"].is_unique and rows["source"].isin(usable.index).all()
    assert (rows["source_path"] == usable.loc[rows["source"], "path"].to_numpy()).all()
    assert (rows["age"] == usable.loc[rows["source"], "age"].to_numpy()).all()
    assert (
        rows.loc[rows["copy"] > 0, "augmentation"].notna().all()
        and rows.loc[rows["copy"] == 0, "augmentation"].isna().all()
    )
    assert rows.groupby("source")["copy"].max().max() <= 3
    for path in rows["path"]:
        assert cv2.imread(path) is not None, path
    on_disk = sorted(p.name for p in (tmp / "images").iterdir() if not p.name.startswith(".agepipe"))
    assert on_disk == sorted(rows["file"])


@pytest.mark.slow
def test_a_target_beyond_the_cap_reports_the_shortfall(processed, tmp_path):
    common = [
        f"target_csv={tmp_path}/target.csv",
        f"processed_csv={processed}/processed.csv",
        f"output_dir={tmp_path}/images",
        f"output_csv={tmp_path}/resampled.csv",
    ]
    run_notebook("australian_population.ipynb", tmp_path, *common)
    notebook = run_notebook("resampling.ipynb", tmp_path, *common, "target_size=3000", "max_copies_per_image=1")
    text = notebook_text(notebook)
    assert "SHORTFALL: group 70+ reaches" in text and "NOT matched" in text
    rows = read_csv(tmp_path / "resampled.csv")
    assert rows.groupby("source")["copy"].max().max() <= 1 and len(rows) < 3000
