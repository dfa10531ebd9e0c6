"""Hostile input, third round (issue 35): each case planted, and what a trustworthy tool does asserted:
one line naming the cause, or the right result."""

import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from agepipe.config.data_stages import ExploreConfig
from agepipe.config.loading import CONFIG_DIR, load_config
from agepipe.data.image_files import read_image
from agepipe.errors import UserError
from conftest import read_csv, run


@pytest.fixture
def explored_copy(explored, tmp_path):
    """A copy of the session's exploration CSV, whose run record the test may replace."""
    shutil.copy(explored / "image_metadata.csv", tmp_path / "m.csv")
    return tmp_path / "m.csv"


def test_a_run_record_that_is_a_fifo_is_one_line_not_a_hang(explored_copy, tmp_path):
    os.mkfifo(f"{explored_copy}.run.json")
    for script, overrides in (
        ("process_images.py", [f"output_dir={tmp_path}/p", f"output_csv={tmp_path}/p.csv"]),
        ("visualize_image_information.py", [f"output_dir={tmp_path}/report"]),
    ):
        key = "input_csv" if script == "process_images.py" else "exploration_csv"
        result = run(script, f"{key}={explored_copy}", *overrides, check=False, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert "is not the run record of an exploration" in lines[0]


def test_paths_typed_with_set_are_file_names_not_yaml():
    def loaded(*overrides):
        return load_config(ExploreConfig, CONFIG_DIR / "explore_images.yaml", overrides)

    assert loaded("dataset_dir=/data/photos #2").dataset_dir == "/data/photos #2"  # not a YAML comment
    assert loaded("workspace=~").workspace == os.path.expanduser("~")  # not YAML's null
    assert loaded("dataset_dir=/data/a\nb").dataset_dir == "/data/a\nb"  # not folded into a space
    assert loaded("workspace=null").workspace is None and loaded("labels.csv_path=null").labels.csv_path is None


def test_what_transparency_hides_is_not_judged(sample, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    face = cv2.imread(str(sorted(sample.glob("*.chip.jpg"))[0]))
    hidden = np.dstack([face, np.zeros(face.shape[:2], np.uint8)])  # the face under alpha 0
    cv2.imwrite(str(folder / "hidden.png"), hidden)
    half = np.dstack([face, np.full(face.shape[:2], 128, np.uint8)])
    cv2.imwrite(str(folder / "half.png"), half)
    shown, _ = read_image(str(folder / "hidden.png"), 10**8, 10**8)
    assert (shown == 255).all()  # as a viewer shows it: white
    blended, _ = read_image(str(folder / "half.png"), 10**8, 10**8)
    expected = face.astype(float) * 128 / 255 + 255 * 127 / 255
    assert np.abs(blended - expected).max() <= 1
    opaque = folder / "opaque.png"
    cv2.imwrite(str(opaque), face)
    assert (read_image(str(opaque), 10**8, 10**8)[0] == face).all()  # no alpha: decoded as it is
    run(
        "explore_images.py",
        f"dataset_dir={folder}",
        f"output_csv={tmp_path}/out/m.csv",
        f"summary_csv={tmp_path}/out/s.csv",
        "labels.source=filename",
    )
    rows = read_csv(tmp_path / "out" / "m.csv").set_index("file")
    assert rows.loc["hidden.png", "faces"] == 0 and rows.loc["opaque.png", "faces"] >= 1


@pytest.mark.parametrize("age", ["1e30", "1e19", "250", "-3"])
def test_an_impossible_age_in_a_training_csv_is_one_line(sample, tmp_path, age):
    faces = sorted(sample.glob("*.chip.jpg"))[:6]
    table = pd.DataFrame({"file": [f.name for f in faces], "path": [str(f) for f in faces], "age": ["30"] * 6})
    table.loc[3, "age"] = age
    table.to_csv(tmp_path / "t.csv", index=False)
    result = run("train_model.py", f"input_csv={tmp_path}/t.csv", f"output_dir={tmp_path}/model", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "within age_range 0-120" in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "model").exists()


def test_a_file_named_like_mathtext_is_a_caption_in_full_not_tex(sample, tmp_path):
    import io

    import image_visualizer

    names = ["$\\nope$.jpg", "a_very_long_file_name_that_once_lost_its_end_to_an_ellipsis.jpg"]
    for name, face in zip(names, sorted(sample.glob("*.chip.jpg"))):
        shutil.copy(face, tmp_path / name)
    frame = pd.DataFrame(
        {
            "file": names,
            "path": [str(tmp_path / n) for n in names],
            "flag_blurry": [True, True],
            "blurriness": [1.0, 2.0],
        }
    )
    figure = image_visualizer.image_grid(frame, "blurry", "blurriness", 2, 1, 96, 72)
    figure.savefig(io.BytesIO(), format="png")  # drawing is where TeX would fail
    titles = [axes.get_title() for axes in figure.axes]
    assert titles[0].startswith("$\\nope$.jpg") and "ellipsis.jpg" in titles[1].replace("\n", "")


def test_the_funnel_follows_run_records_whichever_way_a_stage_records_its_config(tmp_path):
    import json

    from agepipe.report.funnel import training_funnel

    def stage(name, statuses, config):
        csv = tmp_path / name
        pd.DataFrame({"file": [f"{i}.jpg" for i in range(len(statuses))], "status": statuses}).to_csv(csv, index=False)
        (tmp_path / f"{name}.run.json").write_text(json.dumps({"config": config, "packages": {}}))
        return str(csv)

    explored = stage("explored.csv", ["ok", "ok", "unreadable"], {"dataset_dir": "/data"})
    processed = stage("processed.csv", ["kept", "rejected"], {"process": {"input_csv": explored}, "explore": {}})
    checked = stage("checked.csv", ["kept"], {"check_labels": {"input_csv": processed}, "train": {}})
    resampled = stage(
        "resampled.csv", ["kept"], {"input": "processed", "processed_csv": checked, "exploration_csv": explored}
    )
    assert [s["rows"] for s in training_funnel(resampled)] == [3, 2, 1, 1]
    assert training_funnel(resampled)[0]["reasons"] == [("unreadable", 1)]


# --------------------------------------------------------------------------------------------------
# Ownership: what proves a file is agepipe's is its content, and the manifest's names are checked first
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def small_exploration(explored, tmp_path):
    """The first rows of the session's exploration, with its run record: a processing run of seconds."""
    rows = read_csv(explored / "image_metadata.csv").head(12)
    rows.to_csv(tmp_path / "m.csv", index=False)
    shutil.copy(explored / "image_metadata.csv.run.json", tmp_path / "m.csv.run.json")
    return tmp_path / "m.csv"


def process_small(exploration, out, check=True):
    return run(
        "process_images.py",
        f"input_csv={exploration}",
        f"output_dir={out}/images",
        f"output_csv={out}/p.csv",
        check=check,
    )


def explore_refused(dataset, output_csv, tmp_path):
    """Explore `dataset` into `output_csv` (a minute at most), expecting a refusal: the completed run."""
    return run(
        "explore_images.py",
        f"dataset_dir={dataset}",
        f"output_csv={output_csv}",
        f"summary_csv={tmp_path}/s.csv",
        check=False,
        timeout=60,
    )


def one_line_refusal(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize(
    "tampering",
    [
        "INSERT INTO files (name) VALUES ('../../victim/report')",
        "INSERT INTO files (name) VALUES ('/etc/passwd')",
        "INSERT INTO files (name) VALUES (NULL)",
        "ALTER TABLE files DROP COLUMN run",
    ],
)
def test_a_tampered_manifest_is_refused_in_one_line_and_touches_nothing_outside(small_exploration, tmp_path, tampering):
    import sqlite3

    out = tmp_path / "p"
    process_small(small_exploration, out)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".report.abcdefgh.tmp").write_text("the user's")  # named like one of agepipe's temporaries
    db = sqlite3.connect(out / "images" / ".agepipe-outputs.sqlite")
    db.execute(tampering)
    db.commit()
    db.close()
    one_line_refusal(process_small(small_exploration, out, check=False), ".agepipe-outputs.sqlite", "move it away")
    assert (victim / ".report.abcdefgh.tmp").read_text() == "the user's"


def test_a_planned_name_is_agepipes_only_while_no_file_has_it(tmp_path):
    """A killed run leaves its planned names listed without digests: a file the user puts under such a
    name afterwards is theirs. What the run renamed into place before it was killed stays its own."""
    from agepipe.running.output_guard import OutputGuard
    from agepipe.running.writes import write_bytes

    out = tmp_path / "out"
    with OutputGuard() as guard:  # a run killed after planning, and after writing one file it never listed
        folder = guard.folder(out, "output_dir")
        folder.begin(["planned.jpg", "written.jpg"])
        write_bytes(b"agepipe's", out / "written.jpg")
    (out / "planned.jpg").write_bytes(b"the user's")
    with OutputGuard() as guard:
        folder = guard.folder(out, "output_dir")
        assert folder.owns("written.jpg") and not folder.owns("planned.jpg")
        with pytest.raises(UserError, match="planned.jpg"):
            folder.begin(["planned.jpg"])
        folder.begin(["written.jpg"])
        assert folder.finish() == 1  # the killed run's file, not the user's
    assert (out / "planned.jpg").read_bytes() == b"the user's" and not (out / "written.jpg").exists()


def test_an_output_csv_edited_by_hand_is_the_users_and_never_replaced(small_exploration, tmp_path):
    out = tmp_path / "p"
    process_small(small_exploration, out)
    corrected = (out / "p.csv").read_text() + "hand-corrected,row\n"
    (out / "p.csv").write_text(corrected)
    one_line_refusal(process_small(small_exploration, out, check=False), "output_csv", "changed since")
    assert (out / "p.csv").read_text() == corrected


def test_a_json_lines_file_of_the_users_is_never_taken_for_a_cache(tmp_path):
    from agepipe.running.output_guard import OutputGuard

    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"fingerprint": "mine", "note": "my notes"}\n{"row": 1}\n')
    with OutputGuard() as guard, pytest.raises(UserError, match="not one of agepipe's journals"):
        guard.journal(notes, "descriptor_cache")
    assert notes.read_text().startswith('{"fingerprint": "mine"')


def test_a_second_run_on_a_shared_cache_or_output_is_refused_before_touching_the_first_runs_files(sample, tmp_path):
    from agepipe.running.output_guard import run_lock

    in_flight = tmp_path / ".m.csv.abcdefgh.tmp"  # the first run's CSV, being written
    in_flight.write_text("half a CSV")
    with run_lock(tmp_path / "m.csv"):
        result = explore_refused(sample, tmp_path / "m.csv", tmp_path)
    one_line_refusal(result, "another run is writing", "m.csv")
    assert in_flight.read_text() == "half a CSV"
    for locked in ("cache.jsonl", "p.csv"):  # a prediction running: its cache, its output
        with run_lock(tmp_path / locked):
            result = run(
                "predict_age.py",
                f"model_path={tmp_path}/none.keras",
                f"inputs=[{sample}]",
                f"output_csv={tmp_path}/p.csv",
                f"descriptor_cache={tmp_path}/cache.jsonl",
                check=False,
            )
        one_line_refusal(result, "another run is writing", locked)


def test_cached_descriptors_no_network_could_produce_are_described_again(sample, tmp_path):
    import json

    from agepipe.data.image_files import FileLimits
    from agepipe.faces.alignment import FaceSettings
    from agepipe.faces.describer import DESCRIPTOR_SIZE, DescriptorSettings
    from agepipe.faces.descriptor_cache import describe_files
    from agepipe.faces.detector import DetectorSettings, FinderSettings
    from agepipe.running.parallel import Engine

    faces_found = FaceSettings(FinderSettings(DetectorSettings(0.7, 0.3, 0.15), 1, 0.5), 1.0, 0.2, 40, "square", 24)
    settings = DescriptorSettings(faces_found, 0.25, ("image", "mirror"), "every_view", True, 1e-6)
    faces = [str(p) for p in sorted(sample.glob("*.chip.jpg"))[:3]]
    cache = tmp_path / "cache.jsonl"

    def described():
        return [
            image.first.vector
            for image in describe_files(faces, settings, cache, Engine(num_workers=1), FileLimits(10**8, 10**9))
        ]

    clean = described()
    lines = cache.read_text().splitlines()
    edits = (
        lambda v: np.concatenate([v[:, :DESCRIPTOR_SIZE], -v[:, DESCRIPTOR_SIZE:]], axis=1),  # log-probabilities > 0
        lambda v: np.concatenate([v[:, :DESCRIPTOR_SIZE] * 50, v[:, DESCRIPTOR_SIZE:]], axis=1),  # a scaled descriptor
        lambda v: np.concatenate([v[:, :DESCRIPTOR_SIZE], v[:, DESCRIPTOR_SIZE:] - 1], axis=1),  # sums to e^-1
    )
    with open(cache, "a", encoding="utf-8") as f:
        for line, edit in zip(lines[1:], edits):
            row = json.loads(line)
            for face in row["faces"]:
                face["descriptor"] = edit(np.asarray(face["descriptor"])).round(6).tolist()
            f.write(json.dumps(row) + "\n")
    for before, after in zip(clean, described()):
        np.testing.assert_allclose(before, after, atol=1e-5)


def test_a_prior_never_moves_answers_into_groups_the_model_never_saw(tmp_path):
    from agepipe.data.age_groups import AgeGroups
    from agepipe.model.estimates import correct_prior, group_matrix, population_shares

    groups = AgeGroups((0, 18, 65))
    years = np.full((4, 101), 1e-6)
    years[:, 30:40] = 0.1  # a model that saw only adults
    years /= years.sum(axis=1, keepdims=True)
    corrected = correct_prior(years, groups, 100, [0.0, 1.0, 0.0], [0.3, 0.4, 0.3]) @ group_matrix(groups, 100)
    np.testing.assert_allclose(corrected, [[0.0, 1.0, 0.0]] * 4, atol=1e-6)
    table = tmp_path / "prior.csv"
    table.write_text("group,share\n0-17,1e308\n18-64,1e308\n65+,1e308\n")
    assert population_shares(str(table), groups) == pytest.approx([1 / 3] * 3)  # huge, yet finite shares
    table.write_text("group,share\n0-17,inf\n18-64,1\n65+,1\n")
    with pytest.raises(UserError, match="share for each configured group"):
        population_shares(str(table), groups)


def test_an_output_csv_naming_another_stages_output_is_refused_whatever_the_manifest_says(sample, tmp_path):
    from agepipe.running.output_guard import OutputGuard

    with OutputGuard() as guard:  # the report and a model, agepipe's own outputs
        folder = guard.folder(tmp_path / "out", "output_dir")
        for name in ("index.html", "model.keras"):
            folder.write_text(name, f"agepipe's {name}")
        folder.finish()
    for name in ("index.html", "model.keras"):
        one_line_refusal(explore_refused(sample, tmp_path / "out" / name, tmp_path), "not a .csv file name")
        assert (tmp_path / "out" / name).read_text() == f"agepipe's {name}"


def test_phone_formats_get_a_row_with_the_reason_and_other_files_are_counted(sample, tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    face = sorted(sample.glob("*.chip.jpg"))[0]
    shutil.copy(face, folder / "30_1_0_a.jpg")
    Image.open(face).save(folder / "30_1_0_b.gif")
    (folder / "30_1_0_c.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))  # an iPhone photo's container
    (folder / "notes.txt").write_text("not an image")
    result = run(
        "explore_images.py", f"dataset_dir={folder}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv"
    )
    rows = read_csv(tmp_path / "m.csv").set_index("file")
    assert sorted(rows.index) == ["30_1_0_a.jpg", "30_1_0_b.gif", "30_1_0_c.heic"]
    assert rows.loc["30_1_0_b.gif", "status"] != "unreadable" and rows.loc["30_1_0_b.gif", "faces"] >= 1
    assert rows.loc["30_1_0_c.heic", "status"] == "unreadable" and "HEIF" in rows.loc["30_1_0_c.heic", "reason"]
    assert "left out 1 file of" in result.stderr and "(1 .txt)" in result.stderr


def test_a_photo_over_the_pixel_limit_names_a_setting_every_stage_has(tmp_path):
    from agepipe.config.model_stages import PredictConfig, TrainConfig
    from agepipe.data.image_files import UnreadableImage

    cv2.imwrite(str(tmp_path / "phone.jpg"), np.full((120, 90, 3), 128, np.uint8))  # 10,800 pixels
    for model, name in ((PredictConfig, "predict_age.yaml"), (TrainConfig, "train_model.yaml")):
        config = load_config(model, CONFIG_DIR / name, ["file_limits.max_pixels=10000"])
        with pytest.raises(UnreadableImage, match=r"over file_limits\.max_pixels"):
            read_image(str(tmp_path / "phone.jpg"), config.file_limits.max_pixels, 10**8)


def test_a_killed_notebook_run_leaves_its_kernels_key_only_in_its_own_folder_and_the_next_run_clears_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import PROJECT

    out, shared_temporary = tmp_path / "nb", tmp_path / "shared-tmp"  # the system's temporary folder, for it alone
    shared_temporary.mkdir()
    command = [sys.executable, "run_notebook.py", "australian_population.ipynb", "--output-dir", str(out)]
    command += ["--set", f"target_csv={tmp_path}/t.csv"]
    environment = {**os.environ, "TMPDIR": str(shared_temporary)}
    child = subprocess.Popen(
        command,
        cwd=PROJECT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".scratch*/*.json")):
        time.sleep(0.05)
    connection = list(out.glob(".scratch*/*.json"))
    os.killpg(child.pid, signal.SIGKILL)  # kill -9; the kernel, in a session of its own, must die with it
    child.wait()
    assert connection, "the kernel's connection file was not written in the run's scratch folder"
    # a surviving kernel would recreate the scratch folder after the next run cleared it
    time.sleep(0.2)
    survivors = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not survivors, "the killed run's kernel outlived it"
    assert not list(shared_temporary.rglob("*.json"))
    assert subprocess.run(command, cwd=PROJECT, env=environment, capture_output=True).returncode == 0
    assert not list(out.glob(".scratch*"))  # the killed run's key is gone


# --------------------------------------------------------------------------------------------------
# Fourth round, against what the third added: lock files that are not files
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "dangling link", "link to a file of the user's"])
def test_a_lock_file_that_is_a_fifo_or_a_link_is_one_line_never_a_hang_nor_followed(sample, tmp_path, kind):
    lock = tmp_path / ".agepipe.m.csv.lock"
    victim = tmp_path / "victim.txt"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "dangling link":
        lock.symlink_to(victim)
    else:
        victim.write_text("the user's")
        lock.symlink_to(victim)
    one_line_refusal(explore_refused(sample, tmp_path / "m.csv", tmp_path), "cannot be agepipe's lock file")
    assert (not victim.exists()) if kind == "dangling link" else (kind == "fifo" or victim.read_text() == "the user's")


def test_the_label_check_keeps_an_impossible_age_as_a_row_saying_so():
    from agepipe.config.schema import AgeRange
    from check_labels import checked_rows

    frame = pd.DataFrame({"age": [30.0, 1e30, 1e19, 250.0, -3.0], "path": ["a.jpg"] * 5, "status": ["ok"] * 5})
    reasons = checked_rows(frame, AgeRange(min=0, max=120))
    assert reasons.iloc[0] is None and (reasons.iloc[1:] == "not checked: no usable age label").all()
