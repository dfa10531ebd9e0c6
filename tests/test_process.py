"""The processing stage on the generated sample: what it repairs, rejects and leaves alone."""

import hashlib
import shutil

import cv2
import pandas as pd
import pytest

from conftest import PROJECT, kill_processing_part_way, process, read_csv, run


@pytest.fixture(scope="session")
def processed_rows(processed, manifest):
    frame = read_csv(processed / "processed.csv")
    return frame.merge(manifest[["file", "defect", "broken"]], on="file", how="left")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_one_row_per_input_row_with_a_known_status(processed_rows, metadata):
    assert list(processed_rows["file"]) == list(metadata["file"])
    assert set(processed_rows["status"]) <= {"kept", "repaired", "rejected", "unreadable", "unlabelled"}
    assert processed_rows["reason"][processed_rows["status"] == "rejected"].notna().all()


def test_planted_defects_are_mostly_repaired_and_the_rest_rejected_with_reasons(processed_rows):
    faces = processed_rows[processed_rows["broken"].isna()]
    table = pd.crosstab(faces["defect"], faces["status"])
    print("\n" + table.to_string())
    for defect in ("blur", "noise", "dark", "bright", "low_contrast"):
        repaired = table.loc[defect].get("repaired", 0) / table.loc[defect].sum()
        assert repaired >= 0.85, f"only {repaired:.0%} of {defect} images repaired"
    # low resolution cannot be repaired by any configured operation: none may slip through
    assert table.loc["low_resolution"].get("repaired", 0) == 0 and table.loc["low_resolution"].get("kept", 0) == 0


def test_repaired_images_pass_every_check_when_measured_again(processed_rows):
    from agepipe.quality.image_metrics import measure_array
    from image_reader import failing_checks, load_explore_config
    from process_images import Processor, load_process_config

    config, explore = load_process_config(
        PROJECT / "configs/process_images.yaml", explore=load_explore_config(PROJECT / "configs/explore_images.yaml")
    )
    processor = Processor(config, explore)
    repaired = processed_rows[processed_rows["status"] == "repaired"]
    assert len(repaired) > 100
    for path in repaired["path"]:
        assert failing_checks(measure_array(cv2.imread(path), processor.settings), processor.checks) == [], path


def test_no_repair_changes_colour_raises_noise_or_washes_out_beyond_the_limits(
    processed_rows, metadata, explored, tmp_path
):
    """Passing every check is not enough: a repair that casts a colour, multiplies noise (JPEG
    artefacts brightened) or lifts a dark scene into a washed-out grey is rejected with the reason. With
    no tolerance at all, every repair that moves any of them is; with the default limits, every repaired
    image stays within them."""
    before = metadata.set_index("file")[["colourfulness", "noise", "contrast"]]
    repaired = processed_rows[processed_rows["status"] == "repaired"].join(before, on="file")
    assert (
        (repaired["after_colourfulness"] - repaired["colourfulness"]).abs()
        <= 0.25 * repaired["colourfulness"].clip(lower=1)
    ).all()
    assert (repaired["after_noise"] - repaired["noise"] <= 1.0).all()
    assert (repaired["after_contrast"] >= 0.7 * repaired["contrast"]).all()

    process(
        explored / "image_metadata.csv",
        tmp_path,
        "never_worse.max_colourfulness_change=0",
        "never_worse.max_noise_increase=0",
        "never_worse.max_contrast_loss=0",
    )
    strict = read_csv(tmp_path / "processed.csv").join(before, on="file")
    worse = strict[strict["reason"].fillna("").str.startswith("every repair made it worse: ")]
    assert len(worse) >= len(repaired) / 2
    assert worse["reason"].str.contains(r"(?:colourfulness|noise|contrast) [\d.]+ -> [\d.]+").all()
    still = strict[strict["status"] == "repaired"]
    assert (still["after_noise"] <= still["noise"]).all() and (still["after_contrast"] >= still["contrast"]).all()
    assert (still["after_colourfulness"] == still["colourfulness"]).all()


def test_images_that_passed_are_copied_unchanged_and_originals_untouched(processed_rows, sample, manifest):
    kept = processed_rows[processed_rows["status"] == "kept"]
    assert len(kept) > 350
    for source, output in zip(kept["source_path"], kept["path"]):
        assert digest(source) == digest(output)
    # the sample folder holds exactly what the generator wrote: nothing added, nothing changed
    assert sorted(p.name for p in sample.iterdir() if not p.name.startswith(".agepipe")) == sorted(
        list(manifest["file"]) + ["manifest.csv"]
    )


def test_output_folder_mirrors_the_csv_exactly(processed, processed_rows):
    written = processed_rows[processed_rows["path"].notna()]
    on_disk = sorted(
        str(p) for p in (processed / "images").rglob("*") if p.is_file() and not p.name.startswith(".agepipe")
    )
    assert on_disk == sorted(written["path"]) and set(written["status"]) == {"kept", "repaired"}
    assert (written["age"].notna()).all() and written["file"].str.match(r"^\d+_").all()  # labels survive


def test_vanished_and_changed_files_are_reported_not_fatal(sample, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    faces = sorted(p for p in sample.iterdir() if p.name.endswith(".chip.jpg"))[:12]
    for face in faces:
        shutil.copy(face, data / face.name)
    run("explore_images.py", f"dataset_dir={data}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    (data / faces[0].name).unlink()
    shutil.copy(faces[5], data / faces[1].name)  # same name, other picture
    process(tmp_path / "m.csv", tmp_path / "out")
    rows = read_csv(tmp_path / "out/processed.csv").set_index("file")
    assert rows.loc[faces[0].name, "status"] == "unreadable" and "vanished" in rows.loc[faces[0].name, "reason"]
    assert (
        rows.loc[faces[1].name, "status"] == "rejected"
        and "changed since exploration" in rows.loc[faces[1].name, "reason"]
    )
    assert rows["status"].isin(["kept", "repaired", "rejected"]).sum() == 11


def test_refuses_to_write_into_the_input_dataset(explored, sample):
    result = run(
        "process_images.py", f"input_csv={explored / 'image_metadata.csv'}", f"output_dir={sample}/cleaned", check=False
    )
    assert result.returncode == 2 and "overlaps the input folder" in result.stderr


def test_missing_or_foreign_csv_gives_a_clear_message(tmp_path):
    result = process(tmp_path / "nope.csv", tmp_path, check=False)
    assert result.returncode == 2 and "run explore_images.py first" in result.stderr
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    result = process(tmp_path / "other.csv", tmp_path, check=False)
    assert result.returncode == 2 and "lacks column 'file'" in result.stderr


def test_unknown_repair_operation_names_the_key(explored, tmp_path):
    result = process(explored / "image_metadata.csv", tmp_path, "repairs.blurry={deblur: {}}", check=False)
    assert result.returncode == 2 and "repairs.blurry.deblur: unknown repair" in result.stderr


def test_killed_run_resumes_and_matches_an_uninterrupted_run(explored, processed, tmp_path):
    out = tmp_path / "killed"
    kill_processing_part_way(explored, out, lines=120)
    assert not (out / "processed.csv").exists()
    resumed = process(explored / "image_metadata.csv", out, "chunk_files=20")
    assert "were finished by an earlier run" in resumed.stderr
    whole = read_csv(processed / "processed.csv")
    again = read_csv(out / "processed.csv")
    for frame, root in ((whole, str(processed / "images")), (again, str(out / "images"))):
        frame["path"] = frame["path"].str.replace(root, "OUT", regex=False)
    pd.testing.assert_frame_equal(whole, again)
    for a, b in zip(whole["path"].dropna(), again["path"].dropna()):
        assert digest(a.replace("OUT", str(processed / "images"))) == digest(b.replace("OUT", str(out / "images")))
    assert not list((out / "images").rglob("*.tmp"))
