"""Data safety and hostile input: a run never touches what it did not write, never hangs, and gives every
file a row. Each test plants the danger (a user's files, a tampered CSV, a FIFO...) and checks the oracle."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from agepipe.errors import UserError
from agepipe.running.manifest import MANIFEST
from agepipe.running.output_guard import FOLDER_LOCK, OutputGuard, run_lock
from agepipe.running.parallel import Engine, parallel_map
from conftest import PROJECT, kill_processing_part_way, process, read_csv, run


def snapshot(folder):
    """Every file below folder with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def faces(sample, tmp_path):
    """A folder of 12 sample faces and its exploration CSV."""
    data = tmp_path / "data"
    data.mkdir()
    for face in sorted(sample.glob("*.chip.jpg"))[:12]:
        shutil.copy(face, data / face.name)
    run("explore_images.py", f"dataset_dir={data}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    return data


def test_a_folder_of_the_users_files_is_refused_and_never_emptied(faces, tmp_path):
    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    (mine / "notes.txt").write_text("precious too")
    before = snapshot(mine)
    result = run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={mine}",
        f"output_csv={tmp_path}/p.csv",
        check=False,
    )
    assert result.returncode == 2 and "holds files agepipe did not write" in result.stderr and snapshot(mine) == before
    # with the user's explicit word the stage writes there, and still deletes nothing of theirs
    run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={mine}",
        f"output_csv={tmp_path}/p.csv",
        "overwrite_output=true",
    )
    after = snapshot(mine)
    assert all(after[name] == digest for name, digest in before.items()) and len(after) > len(before)
    # a second run with other settings deletes its own earlier outputs only
    run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={mine}",
        f"output_csv={tmp_path}/p.csv",
        "resize=64",
    )
    assert all(snapshot(mine)[name] == digest for name, digest in before.items())


@pytest.mark.parametrize(
    "output_dir, message",
    [(".", "holds the project itself"), (".git/x", "lies inside a .git folder"), ("..", "holds the project itself")],
)
def test_the_project_and_its_git_are_never_an_output_folder(faces, tmp_path, output_dir, message):
    git = snapshot(PROJECT / ".git" / "refs")
    result = run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={output_dir}",
        f"output_csv={tmp_path}/p.csv",
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr and snapshot(PROJECT / ".git" / "refs") == git


def test_output_csvs_that_would_destroy_an_input_are_refused(faces, tmp_path):
    image = next(faces.iterdir())
    before = image.read_bytes()
    for output_csv, message in (
        (image, "overlaps the input folder"),
        (tmp_path / "photo.jpg", "not a .csv file name"),
        (faces / "m.csv", "overlaps the input folder"),
        (tmp_path, "is a folder"),
    ):
        result = run(
            "explore_images.py",
            f"dataset_dir={faces}",
            f"output_csv={output_csv}",
            f"summary_csv={tmp_path}/s.csv",
            check=False,
        )
        assert result.returncode == 2 and message in result.stderr and image.read_bytes() == before
    original = (tmp_path / "m.csv").read_bytes()
    result = run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={tmp_path}/out",
        f"output_csv={tmp_path}/m.csv",
        check=False,
    )
    assert (
        result.returncode == 2 and "would overwrite" in result.stderr and (tmp_path / "m.csv").read_bytes() == original
    )
    result = run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={tmp_path}/out",
        f"output_csv={tmp_path}/out/p.csv",
        check=False,
    )
    assert result.returncode == 2 and "overlaps the output folder" in result.stderr


@pytest.mark.parametrize("tampered", ["../escaped.jpg", "/tmp/agepipe-escaped.jpg", "sub/../../escaped.jpg"])
def test_a_tampered_csv_cannot_make_a_stage_write_outside_its_folder(faces, tmp_path, tampered):
    frame = read_csv(tmp_path / "m.csv")
    frame.loc[0, "file"] = tampered
    frame.to_csv(tmp_path / "tampered.csv", index=False)
    result = run(
        "process_images.py",
        f"input_csv={tmp_path}/tampered.csv",
        f"output_dir={tmp_path}/out",
        f"output_csv={tmp_path}/p.csv",
        check=False,
    )
    assert result.returncode == 2 and "leads outside" in result.stderr
    assert not (tmp_path / "escaped.jpg").exists() and not os.path.exists("/tmp/agepipe-escaped.jpg")


def test_resume_redoes_outputs_deleted_since_the_journal_recorded_them(explored, tmp_path):
    out = tmp_path / "killed"
    kill_processing_part_way(explored, out, lines=100)
    shutil.rmtree(out / "images")
    process(explored / "image_metadata.csv", out, "chunk_files=20")
    rows = read_csv(out / "processed.csv")
    written = rows["path"].dropna()
    assert len(written) > 500 and all(os.path.isfile(p) for p in written)


def write_hostile_files(folder):
    """Files that used to hang, crash or vanish from the CSV, and the reason each must be given."""
    folder.mkdir()
    face = np.full((40, 40, 3), 128, np.uint8)
    cv2.imwrite(str(folder / "20_0_0_ok.jpg"), face)
    long_strip = cv2.imencode(".jpg", np.full((1, 30000, 3), 128, np.uint8))[1].tobytes()
    (folder / "21_0_0_strip.jpg").write_bytes(long_strip)
    os.mkfifo(folder / "22_0_0_fifo.jpg")
    (folder / "23_0_0_zero.jpg").symlink_to("/dev/zero")
    cv2.imwrite(str(folder / ".24_0_0_hidden.jpg"), face)
    cv2.imwrite(str(folder / "25_0_0_line\nbreak.jpg"), face)
    cv2.imwrite(str(folder / "26_0_0_carriage\rreturn.jpg"), face)
    cv2.imwrite(str(folder / ("27_0_0_" + "x" * 240 + ".jpg")), face)
    return {
        "20_0_0_ok.jpg": "ok",
        "21_0_0_strip.jpg": "more elongated",
        "22_0_0_fifo.jpg": "not a regular file",
        "23_0_0_zero.jpg": "not a regular file",
        ".24_0_0_hidden.jpg": "unlabelled",  # a row, though its name carries no age
        "25_0_0_line\\nbreak.jpg": "control characters",
        "26_0_0_carriage\\rreturn.jpg": "control characters",
        "27_0_0_" + "x" * 240 + ".jpg": "ok",
    }


def test_hostile_files_each_get_a_row_with_the_reason_and_nothing_hangs(tmp_path):
    expected = write_hostile_files(tmp_path / "data")
    command = [
        sys.executable,
        "explore_images.py",
        "--set",
        f"dataset_dir={tmp_path}/data",
        "--set",
        f"output_csv={tmp_path}/m.csv",
        "--set",
        f"summary_csv={tmp_path}/s.csv",
        "--set",
        "checks={}",
        "--set",
        "duplicates.enabled=false",
    ]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    rows = read_csv(tmp_path / "m.csv").set_index("file")
    assert (
        sorted(rows.index) == sorted(expected)
        and len((tmp_path / "m.csv").read_text().splitlines()) == len(expected) + 1
    )
    for name, reason in expected.items():
        if reason in ("ok", "unlabelled"):
            assert rows.loc[name, "status"] == reason, name
        else:
            assert rows.loc[name, "status"] == "unreadable" and reason in rows.loc[name, "reason"], name
    # and processing the result writes the readable ones, including the 251-character name
    process(tmp_path / "m.csv", tmp_path / "out")
    assert (tmp_path / "out/images" / ("27_0_0_" + "x" * 240 + ".jpg")).exists()


def test_a_folder_of_only_unreadable_files_is_reported_not_a_crash(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "1_0_0_a.jpg").write_bytes(b"")
    (data / "2_0_0_b.png").write_bytes(b"not a png")
    run("explore_images.py", f"dataset_dir={data}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    assert (read_csv(tmp_path / "m.csv")["status"] == "unreadable").all()


def _die_on_thirteen(state, item):
    x, fifo = item
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    if x == 7:
        open(fifo).read()  # blocks forever without the time limit
    return x * 2


def _die_on_thirteen_in_a_batch(state, items):
    return [_die_on_thirteen(state, item) for item in items]


@pytest.mark.parametrize("batched", [False, True])
def test_a_killed_worker_or_a_hang_costs_one_item_not_the_run(tmp_path, batched):
    """Also when the task function takes its items four at a time: the batch holding a culprit is run
    again an item at a time."""
    os.mkfifo(tmp_path / "fifo")
    items = [(x, str(tmp_path / "fifo")) for x in range(30)]
    results = list(
        parallel_map(
            _die_on_thirteen_in_a_batch if batched else _die_on_thirteen,
            items,
            Engine(num_workers=2, task_timeout=2),
            chunksize=4,
            batched=batched,
            on_failure=lambda item, why: (item[0], why),
        )
    )
    failures = dict(r for r in results if isinstance(r, tuple))
    assert sorted(r for r in results if not isinstance(r, tuple)) == [x * 2 for x in range(30) if x not in (7, 13)]
    assert "worker process died" in failures[13] and "took longer than task_timeout_seconds (2 s)" in failures[7]


def test_a_second_run_on_the_same_output_stops_with_one_line(faces, tmp_path):
    with run_lock(tmp_path / "m2.csv"):
        result = run(
            "explore_images.py",
            f"dataset_dir={faces}",
            f"output_csv={tmp_path}/m2.csv",
            f"summary_csv={tmp_path}/s2.csv",
            check=False,
        )
    assert result.returncode == 2 and "another run is writing" in result.stderr


def test_output_folder_ownership_in_the_library(tmp_path):
    with OutputGuard() as guard:  # an earlier run wrote a.jpg and b.jpg
        folder = guard.folder(tmp_path / "out", "output_dir")
        folder.begin(["a.jpg", "b.jpg"])
        for name in ("a.jpg", "b.jpg"):
            folder.write_bytes(name, b"ours")
    (tmp_path / "out" / "theirs.jpg").write_bytes(b"theirs")
    (tmp_path / "out" / ".b.jpg.k1ll3d_x.tmp").write_bytes(b"a killed run's temporary file of ours")
    (tmp_path / "out" / ".theirs.jpg.abcdefgh.tmp").write_bytes(b"looks like one, but not of a file we own")
    with OutputGuard() as guard:  # this run writes a.jpg only
        folder = guard.folder(tmp_path / "out", "output_dir")
        folder.write_bytes("a.jpg", b"ours again")
        assert folder.finish() == 1 and not (tmp_path / "out" / ".b.jpg.k1ll3d_x.tmp").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [MANIFEST, FOLDER_LOCK, "a.jpg", "theirs.jpg", ".theirs.jpg.abcdefgh.tmp"]
    )
    with pytest.raises(UserError, match="overlaps the input folder"):
        OutputGuard(inputs=[tmp_path / "data"]).folder(tmp_path / "data" / "out", "output_dir")


@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda tmp: tmp, "is a folder, not a config file"),
        (
            lambda tmp: _write(
                tmp / "laughs.yaml",
                "a: &a [x, x, x]\n"
                + "".join(
                    f"l{i}: &l{i} [*{'a' if i == 0 else f'l{i - 1}'}, *{'a' if i == 0 else f'l{i - 1}'}]\n"
                    for i in range(60)
                ),
            ),
            "YAML aliases",
        ),
    ],
)
def test_config_files_that_are_not_configs_give_one_line(tmp_path, make_config, message):
    result = run("explore_images.py", config=str(make_config(tmp_path)), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def _write(path, text):
    path.write_text(text)
    return path


def test_errors_never_echo_a_files_contents(faces, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:SECRET-HASH:19000:0:99999:7:::\nother line\n")
    result = run(
        "explore_images.py",
        f"dataset_dir={faces}",
        f"output_csv={tmp_path}/m3.csv",
        f"summary_csv={tmp_path}/s3.csv",
        "labels.source=csv",
        f"labels.csv_path={secret}",
        check=False,
    )
    assert result.returncode == 2 and "SECRET" not in result.stderr + result.stdout
    result = run(
        "process_images.py",
        f"input_csv={secret}",
        f"output_dir={tmp_path}/o",
        f"output_csv={tmp_path}/p.csv",
        check=False,
    )
    assert result.returncode == 2 and "SECRET" not in result.stderr + result.stdout


def test_negative_thresholds_and_impossible_detector_settings_are_config_errors(faces, tmp_path):
    common = [f"dataset_dir={faces}", f"output_csv={tmp_path}/m4.csv", f"summary_csv={tmp_path}/s4.csv"]
    result = run("explore_images.py", *common, "checks.blurry.below=-5", check=False)
    assert result.returncode == 2 and "checks.blurry.below: expected a value >= 0, got -5" in result.stderr
    result = run("explore_images.py", *common, "metrics.faces.min_score=1.5", check=False)
    assert result.returncode == 2 and "metrics.faces.min_score" in result.stderr and "Traceback" not in result.stderr
    result = run("explore_images.py", *common, "checks.no_face.metric=face_colour", check=False)
    assert result.returncode == 2 and "face_roll" in result.stderr  # the error lists the face columns a check can use


def test_a_full_disk_is_one_line_not_a_traceback(monkeypatch, capsys):
    import errno

    from utils import run_script

    def main(args):
        raise OSError(errno.ENOSPC, "No space left on device", "csv/image_metadata.csv")

    monkeypatch.setattr(sys, "argv", ["explore_images.py"])
    with pytest.raises(SystemExit) as stop:
        run_script(main, "test", "explore_images.yaml")
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: No space left on device: csv/image_metadata.csv; re-run the same command once fixed"
    )


def test_an_output_changed_since_a_killed_run_wrote_it_is_the_users_and_survives_the_resume(explored, tmp_path):
    """Ownership is by content: a file edited after agepipe wrote it is the user's (writes are atomic, so
    a crash never leaves a changed file of agepipe's behind)."""
    out = tmp_path / "killed"
    kill_processing_part_way(explored, out, lines=60)
    victim = sorted((out / "images").glob("*.jpg"))[0]
    edited = bytearray(victim.read_bytes())
    edited[len(edited) // 2] ^= 0xFF  # the same size, other content
    victim.write_bytes(bytes(edited))
    result = process(explored / "image_metadata.csv", out, "chunk_files=20", check=False)
    assert result.returncode != 0 and victim.name in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert victim.read_bytes() == edited


# --------------------------------------------------------------------------------------------------
# Second round (issue 21): silent wrong results, hangs and floods, tracebacks and leaks
# --------------------------------------------------------------------------------------------------
def test_a_jpeg_cut_short_with_an_end_marker_appended_is_unreadable(sample, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    source = sorted(sample.glob("*.chip.jpg"))[3].read_bytes()
    for fraction in (0.6, 0.8, 0.95):
        (data / f"{int(fraction * 100)}_0_0_cut.jpg").write_bytes(source[: int(len(source) * fraction)] + b"\xff\xd9")
    (data / "30_0_0_whole.jpg").write_bytes(source)
    run("explore_images.py", f"dataset_dir={data}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    rows = read_csv(tmp_path / "m.csv").set_index("file")
    cut = rows.drop(index="30_0_0_whole.jpg")
    assert (cut["status"] == "unreadable").all() and cut["reason"].str.contains("corrupt or truncated JPEG data").all()
    assert rows.loc["30_0_0_whole.jpg", "status"] != "unreadable"


def test_a_phone_photo_is_measured_the_way_it_is_shown(tmp_path):
    from PIL import Image

    from agepipe.data.image_files import read_image

    stored = np.zeros((60, 120, 3), np.uint8)
    stored[:, :30] = 255  # a white band on the left, as stored
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: the band is on top
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    bgr, info = read_image(str(tmp_path / "phone.jpg"), 10**8, 10**9)
    assert bgr.shape[:2] == (120, 60) and (info["width"], info["height"]) == (60, 120)
    assert bgr[:25].mean() > 240 and bgr[40:].mean() < 15


def test_a_damaged_descriptor_cache_is_described_again_never_trusted(sample, tmp_path):
    from agepipe.data.image_files import FileLimits
    from agepipe.faces.alignment import FaceSettings
    from agepipe.faces.describer import DescriptorSettings
    from agepipe.faces.descriptor_cache import describe_files
    from agepipe.faces.detector import DetectorSettings, FinderSettings
    from agepipe.running.parallel import Engine
    from agepipe.running.resume import Journal

    faces_found = FaceSettings(FinderSettings(DetectorSettings(0.7, 0.3, 0.15), 1, 0.5), 1.0, 0.2, 40, "square", 24)
    settings = DescriptorSettings(faces_found, 0.25, ("image", "mirror"), "every_view", True, 1e-6)
    faces = [str(p) for p in sorted(sample.glob("*.chip.jpg"))[:4]]
    cache = tmp_path / "cache.jsonl"
    clean = [
        image.first.vector
        for image in describe_files(faces, settings, cache, Engine(num_workers=1), FileLimits(10**8, 10**9))
    ]
    header = Journal.header(cache)
    keys = list(Journal(cache, header["fingerprint"]).keys())
    with open(cache, "a", encoding="utf-8") as f:
        for key, vector in zip(keys, ([[float("nan")] * 209] * 2, [[1e30] * 209] * 2, [[0.5] * 128] * 2)):
            f.write(json.dumps({"_key": key, "descriptor": vector, "face_problem": None}) + "\n")
    with open(cache, "ab") as f:
        f.write(b"\xff\xfe not UTF-8\n")
    again = [
        image.first.vector
        for image in describe_files(faces, settings, cache, Engine(num_workers=1), FileLimits(10**8, 10**9))
    ]
    for before, after in zip(clean, again):
        np.testing.assert_allclose(before, after, atol=1e-5)
    assert all(np.isfinite(vector).all() for vector in again)


def test_exploration_names_what_is_wrong_with_each_label(sample, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    faces = sorted(sample.glob("*.chip.jpg"))[:5]
    for face in faces:
        shutil.copy(face, data / face.name)
    ages = ["25.5", "1e23", "-3", "abc", "40"]
    (tmp_path / "labels.csv").write_text("file,age\n" + "".join(f"{f.name},{a}\n" for f, a in zip(faces, ages)))
    run(
        "explore_images.py",
        f"dataset_dir={data}",
        "labels.source=csv",
        f"labels.csv_path={tmp_path}/labels.csv",
        f"output_csv={tmp_path}/m.csv",
        f"summary_csv={tmp_path}/s.csv",
    )
    rows = read_csv(tmp_path / "m.csv").set_index("file")
    reasons = [rows.loc[f.name, "label_error"] for f in faces]
    assert reasons[:4] == [
        "age 25.5 is not a whole number of years",
        "age 1e+23 outside 0-120",
        "age -3 outside 0-120",
        "age in the labels CSV is not a number",
    ]
    assert rows.loc[faces[4].name, "age"] == 40 and pd.isna(reasons[4])


def test_deep_and_alias_bombed_configs_are_one_short_line_at_once(tmp_path):
    import time

    deep = tmp_path / "deep.yaml"
    deep.write_text("checks: " + "[" * 100_000 + "]" * 100_000 + "\n")
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(
        "a: &a [x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"l{i}: &l{i} [*{'a' if i == 0 else f'l{i - 1}'}, *{'a' if i == 0 else f'l{i - 1}'}]\n" for i in range(31)
        )
    )
    for config, words in ((deep, "nests deeper than"), (laughs, "aliases expand to more than")):
        start = time.perf_counter()
        result = run("explore_images.py", config=str(config), check=False)
        assert result.returncode == 2 and words in result.stderr and time.perf_counter() - start < 30
        assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 400
    result = run("explore_images.py", "checks.blurry.below=" + "x" * 5000, check=False)
    assert result.returncode == 2 and len(result.stderr) < 400 and "chars)" in result.stderr


def test_tampered_model_metadata_is_one_line(tmp_path):
    import zipfile

    good = {
        "age_group_edges": [0, 10, 20],
        "labels": ["0-9", "10-19", "20+"],
        "max_age": 100,
        "backbone": "cnn",
        "descriptor": None,
        "input_size": 32,
        "training_group_shares": [0.3, 0.3, 0.4],
        "config": {},
        "python": "3.11",
        "packages": {},
    }
    (tmp_path / "faces").mkdir()
    cv2.imwrite(str(tmp_path / "faces" / "30_0_0_face.jpg"), np.full((64, 64, 3), 128, np.uint8))
    cases = {
        "extra key": {**good, "surprise": 1},
        "string edges": {**good, "age_group_edges": ["0", "10", "20"]},
        "negative input size": {**good, "input_size": -32},
        "labels of other edges": {**good, "labels": ["a", "b", "c"]},
    }
    for name, metadata in cases.items():
        model = tmp_path / f"{name}.keras"
        with zipfile.ZipFile(model, "w") as archive:
            archive.writestr("agepipe.json", json.dumps(metadata))
        result = run(
            "predict_age.py",
            f"model_path={model}",
            f"inputs=[{tmp_path}/faces]",
            f"output_csv={tmp_path}/p.csv",
            check=False,
        )
        assert (
            result.returncode == 2 and "has damaged metadata" in result.stderr and "Traceback" not in result.stderr
        ), name


def test_a_file_is_never_quoted_in_its_reason(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "30_0_0_secret.jpg").write_bytes(b"P6 SECRETPASSWORD 12 12\n255\n" + bytes(10))
    (data / "31_0_0_secret.png").write_bytes(b"\x89PNG\r\n\x1a\nSECRETPASSWORD-IN-A-CHUNK" + bytes(40))
    run("explore_images.py", f"dataset_dir={data}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    text = (tmp_path / "m.csv").read_text()
    assert "SECRET" not in text and (read_csv(tmp_path / "m.csv")["status"] == "unreadable").all()


def test_an_image_that_takes_too_long_says_so(tmp_path):
    from agepipe.quality.image_metrics import METRICS, ReaderSettings, metric
    from agepipe.running.parallel import Engine

    @metric()
    def slow_in_tests(view):
        import time

        time.sleep(30)
        return 0.0

    try:
        image = tmp_path / "1_0_0_face.png"
        cv2.imwrite(str(image), np.full((50, 50, 3), 128, np.uint8))
        settings = ReaderSettings({"slow_in_tests": {}}, 10**8, 10**9, 20, 200)
        [(reason,)] = list(
            parallel_map(
                _measure_reason,
                [(str(image), settings)],
                Engine(num_workers=1, task_timeout=1),
                on_failure=lambda item, why: (why,),
            )
        )
        assert reason == "took longer than task_timeout_seconds (1 s)"
    finally:
        METRICS.pop("slow_in_tests")


def _measure_reason(state, item):
    from agepipe.quality.image_metrics import measure_file

    path, settings = item
    return (measure_file(path, settings)["error"],)
