"""The label check: planted label errors are found, every row comes back, the suspects are left out of
training and shown in the report, and bad input gets one line."""

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import PROJECT, read_csv, run

FOLDS = "folds=3"


def check(input_csv, output_csv, cache, *extra, check=True):
    return run(
        "check_labels.py",
        f"input_csv={input_csv}",
        f"output_csv={output_csv}",
        f"descriptor_cache={cache}",
        FOLDS,
        *extra,
        check=check,
    )


def area_under_roc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative (ties count half)."""
    above = (scores[positive][:, None] > scores[~positive][None, :]).mean()
    ties = (scores[positive][:, None] == scores[~positive][None, :]).mean()
    return float(above + ties / 2)


@pytest.fixture(scope="module")
def planted(processed, descriptor_cache, tmp_path_factory):
    """The processed sample with 5% of its usable labels moved by 25 years or more (seeded), one row
    without a label, and the label check's output over it."""
    folder = tmp_path_factory.mktemp("labels")
    frame = read_csv(processed / "processed.csv")
    usable = frame.index[frame["status"].isin(["kept", "repaired"])]
    rng = np.random.default_rng(3)
    wrong = rng.choice(usable, round(0.05 * len(usable)), replace=False)
    frame["true_age"] = frame["age"]
    frame.loc[wrong, "age"] = [age + 40 if age < 40 else age - 40 for age in frame.loc[wrong, "age"]]
    frame.loc[usable[-1], "age"] = np.nan
    frame.to_csv(folder / "planted.csv", index=False)
    result = check(folder / "planted.csv", folder / "checked.csv", descriptor_cache)
    return folder, frame, set(wrong), result


def test_planted_label_errors_rank_first_and_every_row_comes_back(planted):
    folder, frame, wrong, result = planted
    checked = read_csv(folder / "checked.csv")
    assert len(checked) == len(frame) and list(checked["file"]) == list(frame["file"])
    scored = checked[checked["label_quality"].notna()]
    assert scored["label_quality"].between(0, 1).all() and scored["predicted_age"].between(0, 100).all()
    positive = scored.index.isin(list(wrong))
    assert area_under_roc(-scored["label_quality"].to_numpy(), positive) >= 0.9
    top = scored.nsmallest(len(wrong), "label_quality")
    assert top.index.isin(list(wrong)).mean() >= 0.6
    # the threshold is set for real faces (recall 0.82 there, benchmarks/README.md); the sample's drawn faces
    # give broader predictions, so fewer pass it here: what it flags must still be the planted errors
    threshold = yaml.safe_load((PROJECT / "configs" / "check_labels.yaml").read_text())["threshold"]
    flagged = checked["suspected_label_error"].astype(str) == "True"
    assert (flagged == (checked["label_quality"] < threshold)).all()
    assert flagged.sum() >= 5 and flagged[flagged].index.isin(list(wrong)).mean() >= 0.8
    assert f"{int(flagged.sum())} suspected label errors" in result.stdout
    assert (
        "oneDNN" not in result.stderr and "cuda" not in result.stderr.lower()
    )  # TensorFlow's start-up chatter stays hidden

    # rows that cannot be checked pass through, with their reason, and are never suspected
    unchecked = checked[checked["label_quality"].isna()]
    assert (
        unchecked["label_check"].notna().all() and not (unchecked["suspected_label_error"].astype(str) == "True").any()
    )
    assert "not checked: no usable age label" in set(unchecked["label_check"])
    assert (
        unchecked["label_check"].str.startswith("not checked: ").all()
        and len(unchecked) >= 1 + (frame["status"] == "rejected").sum()
    )


@pytest.mark.slow
def test_a_second_run_gives_the_same_rows(planted, descriptor_cache):
    folder, _, _, _ = planted
    check(folder / "planted.csv", folder / "again.csv", descriptor_cache)
    pd.testing.assert_frame_equal(read_csv(folder / "checked.csv"), read_csv(folder / "again.csv"))


def test_training_leaves_the_suspects_out_and_says_how_many(planted, descriptor_cache, tmp_path):
    folder, _, _, _ = planted
    suspected = int((read_csv(folder / "checked.csv")["suspected_label_error"].astype(str) == "True").sum())
    common = [
        f"input_csv={folder}/checked.csv",
        f"descriptor_cache={descriptor_cache}",
        "target_csv=null",
        "training.epochs=2",
    ]
    result = run("train_model.py", *common, f"output_dir={tmp_path}/without")
    assert f"; {suspected} suspected label errors left out)" in result.stdout
    split = read_csv(tmp_path / "without" / "split.csv")
    result = run("train_model.py", *common, f"output_dir={tmp_path}/all", "exclude_suspected_labels=false")
    assert "; 0 suspected label errors left out)" in result.stdout
    assert len(read_csv(tmp_path / "all" / "split.csv")) == len(split) + suspected


def test_the_report_shows_the_suspects_worst_first(planted, explored, tmp_path):
    folder, _, _, _ = planted
    run(
        "visualize_image_information.py",
        f"exploration_csv={explored}/image_metadata.csv",
        "processed_csv=null",
        f"checked_csv={folder}/checked.csv",
        f"output_dir={tmp_path}/report",
        "grids.checks=[]",
        "distributions=[]",
        "by_age_group=[]",
    )
    for name in ("suspected_labels", "suspected_labels_by_age_group"):
        pixels = np.asarray(Image.open(tmp_path / "report" / f"{name}.png").convert("L"), float)
        assert pixels.std() > 20, name  # drawn, not blank
        assert f'src="{name}.png"' in (tmp_path / "report" / "index.html").read_text()

    from agepipe.data.datasets import suspected_labels

    checked = read_csv(folder / "checked.csv")
    order = suspected_labels(checked)["label_quality"].to_numpy()
    assert len(order) and (np.diff(order) >= 0).all()


def test_bad_inputs_get_one_line(planted, descriptor_cache, tmp_path):
    folder, frame, _, _ = planted
    frame.head(4).to_csv(tmp_path / "few.csv", index=False)  # fewer than 2 faces a fold
    result = check(tmp_path / "few.csv", tmp_path / "out.csv", descriptor_cache, check=False)
    assert (
        result.returncode == 2
        and "too few usable labelled faces" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "out.csv").exists()
    result = check(folder / "planted.csv", tmp_path / "out.csv", descriptor_cache, "folds=1", check=False)
    assert result.returncode == 2 and "folds" in result.stderr and "Traceback" not in result.stderr
    result = check(tmp_path / "missing.csv", tmp_path / "out.csv", descriptor_cache, check=False)
    assert result.returncode == 2 and "run process_images.py first" in result.stderr
