"""The exploration stage on the generated sample: the manifest of planted defects is the oracle."""

import pandas as pd
import pytest

from agepipe.data.image_files import IMAGE_EXTENSIONS
from conftest import kill_part_way, read_csv, run

# The check each planted defect must trip.
EXPECTED_CHECK = {
    "blur": "blurry",
    "noise": "noisy",
    "dark": "dark",
    "bright": "bright",
    "low_resolution": "low_resolution",
    "low_contrast": "low_contrast",
}
FACE_CHECKS = ("no_face", "multiple_faces", "face_too_small", "face_tilted")


def clean_faces(metadata):
    return metadata[(metadata["defect"] == "none") & metadata["broken"].isna()]


def test_every_input_file_has_exactly_one_row(sample, metadata):
    on_disk = sorted(p.name for p in sample.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert sorted(metadata["file"]) == on_disk
    assert metadata["file"].is_unique and metadata["status"].notna().all()


def test_planted_defects_are_found_and_clean_images_are_not_flagged(metadata):
    clean = clean_faces(metadata)
    lines = [f"{'check':15s} {'recall':>8s} {'precision':>10s}  (false positives counted on clean faces)"]
    for defect, check in EXPECTED_CHECK.items():
        planted = metadata["defect"] == defect
        flagged = metadata[f"flag_{check}"]
        true_pos, false_pos = int((planted & flagged).sum()), int(clean[f"flag_{check}"].sum())
        recall, precision = true_pos / planted.sum(), true_pos / max(1, true_pos + false_pos)
        lines.append(
            f"{check:15s} {recall:8.3f} {precision:10.3f}  ({true_pos}/{planted.sum()} found, {false_pos} false)"
        )
        assert recall == 1.0, f"{check}: found {true_pos} of {planted.sum()} planted {defect} images"
        assert false_pos == 0, f"{check}: flagged {false_pos} clean images"
    print("\n" + "\n".join(lines))
    for check in ("underexposed", "overexposed", "grayscale") + FACE_CHECKS:
        assert clean[f"flag_{check}"].sum() == 0, check
    assert (clean["faces"] == 1).all() and clean["face_width"].notna().all()


def test_broken_files_are_reported_with_reasons(metadata):
    broken = metadata.set_index("broken")
    expected = {
        "empty": ("unreadable", "empty file"),
        "truncated": ("unreadable", "truncated JPEG"),
        "not_an_image": ("unreadable", "not an image"),
        "no_age_in_name": ("unlabelled", "no age in the file name"),
    }
    for kind, (status, reason) in expected.items():
        assert broken.loc[kind, "status"] == status and reason in broken.loc[kind, "reason"], kind


def test_duplicates_and_conflicting_ages_are_found(metadata):
    by_file = metadata.set_index("file")
    exact = metadata[metadata["broken"] == "exact_duplicate"].iloc[0]
    pair = by_file.loc[[exact["file"], exact["source"]]]
    assert pair["duplicate_group"].nunique() == 1 and pair["duplicate_group"].notna().all()
    assert pair["flag_duplicate"].sum() == 1 and not pair["flag_age_conflict"].any()  # same age: keep one

    near = metadata[metadata["broken"] == "near_duplicate_other_age"].iloc[0]
    pair = by_file.loc[[near["file"], near["source"]]]
    assert pair["duplicate_group"].nunique() == 1 and pair["flag_age_conflict"].all()
    # nothing else is grouped: distinct synthetic faces are not mistaken for copies
    assert metadata["duplicate_group"].notna().sum() == 4


def test_summary_counts_match_the_csv(explored, metadata):
    summary = read_csv(explored / "summary.csv")
    counts = {(s, n): c for s, n, c in summary.itertuples(index=False)}
    for status, count in metadata["status"].value_counts().items():
        assert counts[("status", status)] == count
    assert counts[("check", "blurry")] == metadata["flag_blurry"].sum()
    labelled = metadata["age_group"].value_counts()
    assert all(counts[("age_group_labelled", g)] == n for g, n in labelled.items())
    assert counts[("total", "files")] == len(metadata)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small") / "data"
    run("make_sample_dataset.py", f"output_dir={folder}", "num_images=80", "seed=3")
    return folder


def explore(dataset, out, *extra):
    return run(
        "explore_images.py", f"dataset_dir={dataset}", f"output_csv={out}/m.csv", f"summary_csv={out}/s.csv", *extra
    )


def test_one_and_two_workers_and_reruns_give_identical_csvs(small_sample, tmp_path):
    explore(small_sample, tmp_path / "one", "num_workers=1")
    explore(small_sample, tmp_path / "two", "num_workers=2")
    first = (tmp_path / "one/m.csv").read_bytes()
    assert first == (tmp_path / "two/m.csv").read_bytes()
    explore(small_sample, tmp_path / "one", "num_workers=2")  # re-run over the cached measurements
    assert first == (tmp_path / "one/m.csv").read_bytes()


def test_changed_threshold_reuses_measurements_and_changes_flags(small_sample, tmp_path):
    explore(small_sample, tmp_path)
    strict = explore(small_sample, tmp_path, "checks.blurry.below=1000000")
    assert "re-using measurements of 86 unchanged files" in strict.stderr
    frame = read_csv(tmp_path / "m.csv")
    assert frame.loc[frame["error"].isna(), "flag_blurry"].all()


def test_interrupted_run_continues_and_matches_an_uninterrupted_one(sample, tmp_path):
    """Kill a run part-way (SIGKILL: no clean-up at all), re-run, compare with a run never stopped."""
    explore(sample, tmp_path / "whole", "num_workers=1")
    out = tmp_path / "killed"
    done = kill_part_way(
        "explore_images.py",
        [
            f"dataset_dir={sample}",
            f"output_csv={out}/m.csv",
            f"summary_csv={out}/s.csv",
            "num_workers=1",
            "chunk_files=40",
        ],
        out / "m.csv.parts",
        lines=150,
    )
    assert 0 < done < 606 and not (out / "m.csv").exists(), f"killed after {done} images"
    resumed = explore(sample, out, "num_workers=2", "chunk_files=40")
    assert f"re-using measurements of {done} unchanged files" in resumed.stderr
    assert (out / "m.csv").read_bytes() == (tmp_path / "whole/m.csv").read_bytes()


def test_a_new_file_costs_one_chunk_and_old_parts_are_cleared(small_sample, tmp_path):
    """Chunk boundaries depend on the file names before them, so adding a file re-measures one chunk;
    parts no run needs any more are deleted, files agepipe did not write never."""
    data = tmp_path / "data"
    data.mkdir()
    for image in small_sample.glob("*.jpg"):
        (data / image.name).symlink_to(image)
    explore(data, tmp_path, "chunk_files=10")
    parts = tmp_path / "m.csv.parts"
    before = {p.name for p in parts.glob("*.jsonl")}
    (parts / "notes.jsonl").write_text("the user's own file\n")
    newcomer = sorted(small_sample.glob("*.jpg"))[40]
    (data / ("7_" + newcomer.name)).symlink_to(newcomer)
    again = explore(data, tmp_path, "chunk_files=10")
    reused = int(again.stderr.split("re-using measurements of ")[1].split()[0])
    after = {p.name for p in parts.glob("*.jsonl")}
    # the chunk it joins is replaced (by two when the newcomer's name ends a chunk itself)
    assert len(before) >= 4 and len(before - after) == 1 and len(after - before) in (1, 2), (len(before), len(after))
    assert reused >= len(list(data.iterdir())) - 1 - 4 * 10  # all but the newcomer's chunk (at most 4 x chunk_files)
    assert (parts / "notes.jsonl").exists() and len(read_csv(tmp_path / "m.csv")) == len(list(data.iterdir()))


def test_labels_from_a_csv(small_sample, tmp_path):
    files = sorted(p.name for p in small_sample.iterdir() if p.name.endswith(".jpg"))
    labels = pd.DataFrame({"image": files[:-1], "years": [5] * (len(files) - 1)})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    explore(
        small_sample,
        tmp_path,
        "labels.source=csv",
        f"labels.csv_path={tmp_path}/labels.csv",
        "labels.file_column=image",
        "labels.age_column=years",
    )
    frame = read_csv(tmp_path / "m.csv").set_index("file")
    assert (frame.loc[files[:-1], "age"] == 5).all()
    assert frame.loc[files[-1], "label_error"] == "not listed in the labels CSV"


def test_a_labels_csv_with_common_column_names_needs_no_key_and_others_get_the_columns_and_the_key(
    small_sample, tmp_path
):
    files = sorted(p.name for p in small_sample.iterdir() if p.name.endswith(".jpg"))
    pd.DataFrame({"Filename": files, "Age": [7] * len(files)}).to_csv(tmp_path / "labels.csv", index=False)
    explore(small_sample, tmp_path, f"labels.csv_path={tmp_path}/labels.csv")
    assert (read_csv(tmp_path / "m.csv")["age"] == 7).all()
    pd.DataFrame({"picture": files, "Age": [7] * len(files)}).to_csv(tmp_path / "odd.csv", index=False)
    result = run(
        "explore_images.py",
        f"dataset_dir={small_sample}",
        f"output_csv={tmp_path}/o.csv",
        f"summary_csv={tmp_path}/os.csv",
        f"labels.csv_path={tmp_path}/odd.csv",
        check=False,
    )
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "has none of the columns file, filename, path, image, image_path (it has picture, Age): "
        "name yours with --set labels.file_column=COLUMN"
    ), result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checks.blurry.below=soft"], "checks.blurry.below: expected a number, got 'soft'"),
        (["checks.blurry.metric=blurines"], "checks.blurry.metric: expected one of"),
        (["metrics.sharpness={}"], "metrics.sharpness: unknown metric"),
        (["metrics.noise.flat_fraction=2"], "metrics.noise.flat_fraction: expected a value <= 1, got 2"),
        (["num_workers=-1"], "num_workers: expected a value >= 0, got -1"),
        (["age_groups.edges=[0, 20, 10]"], "age_groups.edges: expected the lower edges in increasing order"),
        (["labels.source=database"], "labels.source: expected one of 'auto', 'filename' or 'csv', got 'database'"),
        (["dataset_dir=/no/such/folder"], "dataset folder /no/such/folder does not exist"),
        (["output_csv=/etc/hostname/m.csv"], "/etc/hostname is not writable"),
        (["treshold=3"], "--set treshold: unknown key"),
        (["workspce=/tmp"], "--set workspce: unknown key (did you mean workspace?)"),
    ],
)
def test_bad_config_or_paths_stop_at_start_with_one_line(overrides, message, tmp_path):
    result = run("explore_images.py", f"summary_csv={tmp_path}/s.csv", *overrides, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "s.csv").exists()


def test_empty_dataset_folder_stops_with_a_message(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("explore_images.py", f"dataset_dir={tmp_path}/empty", check=False)
    assert result.returncode == 2 and "holds no image files" in result.stderr


def test_each_threshold_check_has_a_score_beside_its_flag_negative_exactly_when_flagged(metadata):
    from conftest import PROJECT
    from image_reader import load_explore_config

    checks = load_explore_config(PROJECT / "configs/explore_images.yaml").checks
    columns = list(metadata.columns)
    for check, rule in checks.items():
        assert columns.index(f"score_{check}") == columns.index(f"flag_{check}") + 1
        measured = metadata[rule.metric].notna()
        flags, scores = metadata.loc[measured, f"flag_{check}"].astype(bool), metadata.loc[measured, f"score_{check}"]
        assert (flags == (scores < 0)).all(), check
    blurry = metadata[metadata["defect"] == "blur"]  # planted: blurred far below the threshold
    assert (blurry["score_blurry"] < 0).all() and metadata["score_blurry"].idxmin() in blurry.index
