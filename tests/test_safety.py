"""Data safety and hostile input: a run never touches what it did not write, never hangs, and gives every
file a row. Each test plants the danger (a user's files, a tampered CSV, a FIFO...) and checks the oracle."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import PROJECT, kill_part_way, process, read_csv, run
from errors import UserError
from outputs import MANIFEST, OutputFolder, run_lock
from parallel import parallel_map


def snapshot(folder):
    """Every file below folder with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


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
    result = run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={mine}", f"output_csv={tmp_path}/p.csv", check=False)
    assert result.returncode == 2 and "holds files agepipe did not write" in result.stderr and snapshot(mine) == before
    # with the user's explicit word the stage writes there, and still deletes nothing of theirs
    run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={mine}", f"output_csv={tmp_path}/p.csv", "overwrite_output=true")
    after = snapshot(mine)
    assert all(after[name] == digest for name, digest in before.items()) and len(after) > len(before)
    # a second run with other settings deletes its own earlier outputs only
    run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={mine}", f"output_csv={tmp_path}/p.csv", "resize=64")
    assert all(snapshot(mine)[name] == digest for name, digest in before.items())


@pytest.mark.parametrize("output_dir, message", [(".", "overlaps the project's .git"), (".git/x", "overlaps the project's .git"),
                                                 ("..", "overlaps the project's .git")])
def test_the_project_and_its_git_are_never_an_output_folder(faces, tmp_path, output_dir, message):
    git = snapshot(PROJECT / ".git" / "refs")
    result = run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={output_dir}", f"output_csv={tmp_path}/p.csv", check=False)
    assert result.returncode == 2 and message in result.stderr and snapshot(PROJECT / ".git" / "refs") == git


def test_output_csvs_that_would_destroy_an_input_are_refused(faces, tmp_path):
    image = next(faces.iterdir())
    before = image.read_bytes()
    result = run("explore_images.py", f"dataset_dir={faces}", f"output_csv={image}", f"summary_csv={tmp_path}/s.csv", check=False)
    assert result.returncode == 2 and "image file's name" in result.stderr and image.read_bytes() == before
    result = run("explore_images.py", f"dataset_dir={faces}", f"output_csv={faces}/m.csv", f"summary_csv={tmp_path}/s.csv", check=False)
    assert result.returncode == 2 and "sit inside the input" in result.stderr
    result = run("explore_images.py", f"dataset_dir={faces}", f"output_csv={tmp_path}", f"summary_csv={tmp_path}/s.csv", check=False)
    assert result.returncode == 2 and "is a folder" in result.stderr
    original = (tmp_path / "m.csv").read_bytes()
    result = run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={tmp_path}/out", f"output_csv={tmp_path}/m.csv", check=False)
    assert result.returncode == 2 and "would overwrite" in result.stderr and (tmp_path / "m.csv").read_bytes() == original
    result = run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={tmp_path}/out", f"output_csv={tmp_path}/out/p.csv", check=False)
    assert result.returncode == 2 and "inside the image folder" in result.stderr


@pytest.mark.parametrize("tampered", ["../escaped.jpg", "/tmp/agepipe-escaped.jpg", "sub/../../escaped.jpg"])
def test_a_tampered_csv_cannot_make_a_stage_write_outside_its_folder(faces, tmp_path, tampered):
    frame = read_csv(tmp_path / "m.csv")
    frame.loc[0, "file"] = tampered
    frame.to_csv(tmp_path / "tampered.csv", index=False)
    result = run("process_images.py", f"input_csv={tmp_path}/tampered.csv", f"output_dir={tmp_path}/out", f"output_csv={tmp_path}/p.csv", check=False)
    assert result.returncode == 2 and "leads outside" in result.stderr
    assert not (tmp_path / "escaped.jpg").exists() and not os.path.exists("/tmp/agepipe-escaped.jpg")


def test_resume_redoes_outputs_deleted_since_the_journal_recorded_them(explored, tmp_path):
    out = tmp_path / "killed"
    kill_part_way("process_images.py", [f"input_csv={explored / 'image_metadata.csv'}", f"output_dir={out}/images",
                                         f"output_csv={out}/processed.csv", "num_workers=1"], out / "processed.journal.jsonl", lines=100)
    shutil.rmtree(out / "images")
    process(explored / "image_metadata.csv", out)
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
    command = [sys.executable, "explore_images.py", "--set", f"dataset_dir={tmp_path}/data", "--set", f"output_csv={tmp_path}/m.csv",
               "--set", f"summary_csv={tmp_path}/s.csv", "--set", "checks={}", "--set", "duplicates.enabled=false"]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    rows = read_csv(tmp_path / "m.csv").set_index("file")
    assert sorted(rows.index) == sorted(expected) and len((tmp_path / "m.csv").read_text().splitlines()) == len(expected) + 1
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


def _die_on_thirteen(item):
    x, fifo = item
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    if x == 7:
        open(fifo).read()  # blocks forever without the time limit
    return x * 2


def test_a_killed_worker_or_a_hang_costs_one_item_not_the_run(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    items = [(x, str(tmp_path / "fifo")) for x in range(30)]
    results = list(parallel_map(_die_on_thirteen, items, 2, chunksize=4, timeout=2, on_failure=lambda item, why: (item[0], why)))
    failures = dict(r for r in results if isinstance(r, tuple))
    assert sorted(r for r in results if not isinstance(r, tuple)) == [x * 2 for x in range(30) if x not in (7, 13)]
    assert "worker process died" in failures[13] and "timed out" in failures[7]


def test_a_second_run_on_the_same_output_stops_with_one_line(faces, tmp_path):
    with run_lock(tmp_path / "m2.csv"):
        result = run("explore_images.py", f"dataset_dir={faces}", f"output_csv={tmp_path}/m2.csv", f"summary_csv={tmp_path}/s2.csv", check=False)
    assert result.returncode == 2 and "another run is writing" in result.stderr


def test_output_folder_ownership_in_the_library(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    folder.begin(["a.jpg", "b.jpg"])
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "out" / name).write_bytes(b"ours")
    (tmp_path / "out" / "theirs.jpg").write_bytes(b"theirs")
    (tmp_path / "out" / ".b.jpg.k1ll3d_x.tmp").write_bytes(b"a killed run's temporary file of ours")
    (tmp_path / "out" / ".theirs.jpg.abcdefgh.tmp").write_bytes(b"looks like one, but not of a file we own")
    assert folder.finish(["a.jpg"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([MANIFEST, "a.jpg", "theirs.jpg", ".theirs.jpg.abcdefgh.tmp"])
    with pytest.raises(UserError, match="overlaps the input dataset"):
        OutputFolder(tmp_path / "data" / "out", inputs=[tmp_path / "data"])


@pytest.mark.parametrize("make_config, message", [
    (lambda tmp: tmp, "is a folder, not a config file"),
    (lambda tmp: _write(tmp / "laughs.yaml", "a: &a [x, x, x]\n" + "".join(f"l{i}: &l{i} [*{'a' if i == 0 else f'l{i - 1}'}, "
                                                                    f"*{'a' if i == 0 else f'l{i - 1}'}]\n" for i in range(60))),
     "YAML aliases"),
])
def test_config_files_that_are_not_configs_give_one_line(tmp_path, make_config, message):
    result = run("explore_images.py", config=str(make_config(tmp_path)), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def _write(path, text):
    path.write_text(text)
    return path


def test_errors_never_echo_a_files_contents(faces, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:SECRET-HASH:19000:0:99999:7:::\nother line\n")
    result = run("explore_images.py", f"dataset_dir={faces}", f"output_csv={tmp_path}/m3.csv", f"summary_csv={tmp_path}/s3.csv",
                 "labels.source=csv", f"labels.csv_path={secret}", check=False)
    assert result.returncode == 2 and "SECRET" not in result.stderr + result.stdout
    result = run("process_images.py", f"input_csv={secret}", f"output_dir={tmp_path}/o", f"output_csv={tmp_path}/p.csv", check=False)
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

    from cli import run_script

    def main(args):
        raise OSError(errno.ENOSPC, "No space left on device", "csv/image_metadata.csv")

    monkeypatch.setattr(sys, "argv", ["explore_images.py"])
    with pytest.raises(SystemExit) as stop:
        run_script(main, "test", "explore_images.yaml")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: No space left on device: csv/image_metadata.csv; re-run the same command once fixed"


def test_resume_redoes_an_output_changed_since_the_journal_recorded_it(explored, tmp_path):
    out = tmp_path / "killed"
    kill_part_way("process_images.py", [f"input_csv={explored / 'image_metadata.csv'}", f"output_dir={out}/images",
                                         f"output_csv={out}/processed.csv", "num_workers=1"], out / "processed.journal.jsonl", lines=60)
    victim = sorted((out / "images").glob("*.jpg"))[0]
    original_size = victim.stat().st_size
    victim.write_bytes(b"truncated by a crash")
    process(explored / "image_metadata.csv", out)
    assert victim.stat().st_size == original_size and cv2.imread(str(victim)) is not None
