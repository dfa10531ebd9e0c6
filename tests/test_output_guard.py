"""The one output guard, case by case (issue 21, "data loss"): each test plants a file of the user's, or
points an output at an input, and checks that the run refuses in one line and that every byte is
still there."""

import hashlib
import shutil
import subprocess
import sys

import pytest

from conftest import PROJECT, read_csv, run


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(result, *words):
    """The run stopped before writing anything, with one line naming the problem."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and all(word in lines[-1] for word in words), lines[-1:]


@pytest.fixture
def faces(sample, tmp_path):
    """A folder of 30 sample faces (some flagged, some duplicates) and its exploration CSV."""
    data = tmp_path / "data"
    data.mkdir()
    chosen = (
        sorted(sample.glob("*.chip.jpg"))[:28]
        + [sample / name for name in sorted(p.name for p in sample.iterdir()) if name.endswith(".jpg.chip.jpg")][-2:]
    )
    for face in chosen:
        shutil.copy(face, data / face.name)
    run("explore_images.py", f"dataset_dir={data}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    return data


def test_a_file_of_the_users_named_like_a_planned_output_is_never_replaced_or_deleted(faces, tmp_path):
    out = tmp_path / "out"
    run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={out}", f"output_csv={tmp_path}/p.csv")
    rows = read_csv(tmp_path / "p.csv")
    planned = rows[rows["status"].isin(["kept", "repaired", "rejected"])]
    rejected = planned.loc[planned["path"].isna(), "file"].tolist()
    victims = (
        rejected[:1] + planned.loc[planned["path"].notna(), "file"].tolist()[:1]
    )  # planned but rejected; kept, then replaced by the user
    for name in victims + ["notes.txt"]:
        (out / name).write_bytes(b"the user's own file")
    for overwrite in ("false", "true"):
        result = run(
            "process_images.py",
            f"input_csv={tmp_path}/m.csv",
            f"output_dir={out}",
            f"output_csv={tmp_path}/p.csv",
            f"overwrite_output={overwrite}",
            check=False,
        )
        refused(result, "holds a file of yours named like an output")
        assert all((out / name).read_bytes() == b"the user's own file" for name in victims + ["notes.txt"])


def test_a_cache_that_is_not_a_cache_is_refused_not_replaced(faces, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    before = digest(tmp_path / "m.csv")
    for cache in (notes, tmp_path / "m.csv"):
        result = run(
            "train_model.py",
            f"input_csv={tmp_path}/m.csv",
            f"output_dir={tmp_path}/model",
            f"descriptor_cache={cache}",
            check=False,
        )
        refused(result, "descriptor_cache")
    assert notes.read_text() == "my notes\n" and digest(tmp_path / "m.csv") == before
    result = run(
        "predict_age.py",
        f"model_path={tmp_path}/none.keras",
        f"inputs=[{faces}]",
        f"output_csv={tmp_path}/p.csv",
        f"descriptor_cache={notes}",
        check=False,
    )
    refused(result, "descriptor_cache", "not one of agepipe's journals")


def test_predictions_never_replace_an_input_image_or_the_model(faces, tmp_path):
    image = sorted(faces.iterdir())[0]
    model = tmp_path / "model.keras"
    model.write_bytes(b"a model file")
    before = {p: digest(p) for p in (image, model)}
    for target, words in (
        (image, ("overlaps the input folder",)),
        (model, ("would overwrite the input",)),
        (faces / "p.csv", ("overlaps the input folder",)),
        (tmp_path, ("is a folder",)),
    ):
        result = run("predict_age.py", f"model_path={model}", f"inputs=[{faces}]", f"output_csv={target}", check=False)
        refused(result, *words)
    assert all(digest(p) == d for p, d in before.items())


def test_explore_never_writes_over_its_labels_csv_nor_into_git(faces, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,age\n" + "".join(f"{p.name},30\n" for p in faces.iterdir()))
    before = digest(labels)
    result = run(
        "explore_images.py",
        f"dataset_dir={faces}",
        "labels.source=csv",
        f"labels.csv_path={labels}",
        f"output_csv={labels}",
        f"summary_csv={tmp_path}/s2.csv",
        check=False,
    )
    refused(result, "would overwrite the input")
    assert digest(labels) == before
    git_config = PROJECT / ".git" / "config"
    before = digest(git_config)
    result = run(
        "explore_images.py",
        f"dataset_dir={faces}",
        f"output_csv={git_config}",
        f"summary_csv={tmp_path}/s2.csv",
        check=False,
    )
    refused(result, ".git")
    assert digest(git_config) == before


def notebook(name, tmp_path, *overrides):
    command = [sys.executable, "run_notebook.py", name, "--output-dir", str(tmp_path / "notebooks")]
    return subprocess.run(
        command + [a for o in overrides for a in ("--set", o)], cwd=PROJECT, capture_output=True, text=True
    )


def test_notebook_outputs_never_replace_their_inputs(processed, tmp_path):
    population = PROJECT / "data" / "abs_erp_australia_by_age.csv"
    before = digest(population), digest(processed / "processed.csv")
    result = notebook("australian_population.ipynb", tmp_path, f"target_csv={population}")
    assert result.returncode != 0 and "target_csv" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert notebook("australian_population.ipynb", tmp_path, f"target_csv={tmp_path}/t.csv").returncode == 0
    result = notebook(
        "resampling.ipynb",
        tmp_path,
        f"processed_csv={processed}/processed.csv",
        f"output_csv={processed}/processed.csv",
        f"output_dir={tmp_path}/images",
        f"target_csv={tmp_path}/t.csv",
    )
    assert (
        result.returncode != 0
        and "would overwrite the input" in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )
    assert (digest(population), digest(processed / "processed.csv")) == before


def test_model_and_report_folders_go_through_the_guard(faces, tmp_path):
    for output_dir, words in (
        (PROJECT / ".git" / "agepipe-model", (".git",)),
        (faces, ("would overwrite the input",)),
        (faces / "model", ("overlaps the input folder",)),
        (PROJECT / "configs", ("project's configs",)),
    ):
        refused(
            run(
                "train_model.py",
                f"input_csv={tmp_path}/m.csv",
                f"output_dir={output_dir}",
                f"descriptor_cache={tmp_path}/d.jsonl",
                check=False,
            ),
            *words,
        )
    before = sorted(p.name for p in faces.iterdir())
    refused(
        run(
            "visualize_image_information.py",
            f"exploration_csv={tmp_path}/m.csv",
            "processed_csv=null",
            f"output_dir={faces}",
            check=False,
        ),
        "would overwrite the input",
    )
    assert sorted(p.name for p in faces.iterdir()) == before
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").write_text("<p>my own page</p>")
    refused(
        run(
            "visualize_image_information.py",
            f"exploration_csv={tmp_path}/m.csv",
            "processed_csv=null",
            f"output_dir={report}",
            check=False,
        ),
        "holds files agepipe did not write",
    )
    result = run(
        "visualize_image_information.py",
        f"exploration_csv={tmp_path}/m.csv",
        "processed_csv=null",
        f"output_dir={report}",
        "overwrite_output=true",
        check=False,
    )
    refused(result, "index.html")
    assert (report / "index.html").read_text() == "<p>my own page</p>"


def test_one_run_at_a_time_per_output_folder(faces, tmp_path):
    from agepipe.running.output_guard import OutputGuard

    with OutputGuard() as guard:
        guard.folder(tmp_path / "out", "output_dir")
        refused(
            run(
                "process_images.py",
                f"input_csv={tmp_path}/m.csv",
                f"output_dir={tmp_path}/out",
                f"output_csv={tmp_path}/other.csv",
                check=False,
            ),
            "another run is writing into",
        )
        guard.folder(tmp_path / "model", "output_dir")
        refused(
            run(
                "train_model.py",
                f"input_csv={tmp_path}/m.csv",
                f"output_dir={tmp_path}/model",
                f"descriptor_cache={tmp_path}/d.jsonl",
                check=False,
            ),
            "another run is writing into",
        )


@pytest.mark.parametrize(
    "name, words",
    [
        ("", "names no file"),
        (".", "names no file"),
        ("a\x00b.jpg", "names no file"),
        (".agepipe-outputs.sqlite", "agepipe's own bookkeeping"),
        (".agepipe.lock", "agepipe's own bookkeeping"),
        ("sub/.agepipe-outputs.json", "agepipe's own bookkeeping"),
    ],
)
def test_names_from_a_csv_that_name_no_file_of_their_own_are_refused(faces, tmp_path, name, words):
    out = tmp_path / "out"
    run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={out}", f"output_csv={tmp_path}/p.csv")
    manifest = digest(out / ".agepipe-outputs.sqlite")
    frame = read_csv(tmp_path / "m.csv")
    frame.loc[frame.index[0], ["file", "status"]] = [name, "ok"]
    frame.to_csv(tmp_path / "tampered.csv", index=False)
    result = run(
        "process_images.py",
        f"input_csv={tmp_path}/tampered.csv",
        f"output_dir={out}",
        f"output_csv={tmp_path}/p2.csv",
        check=False,
    )
    refused(result, words)
    assert digest(out / ".agepipe-outputs.sqlite") == manifest


def test_two_explorations_beside_each_other_keep_their_own_measurements(faces, tmp_path):
    for suffix in ("csv", "CSV"):  # the same stem
        run(
            "explore_images.py",
            f"dataset_dir={faces}",
            f"output_csv={tmp_path}/two.{suffix}",
            f"summary_csv={tmp_path}/two-{suffix}-s.csv",
        )
    assert (tmp_path / "two.csv.parts").is_dir() and (tmp_path / "two.CSV.parts").is_dir()
    assert read_csv(tmp_path / "two.csv").equals(read_csv(tmp_path / "two.CSV"))


def test_what_a_killed_run_leaves_is_cleared_by_the_next(faces, tmp_path):
    leftovers = [tmp_path / ".m.csv.k1ll3d_1.tmp", tmp_path / ".s.csv.abcdefgh.tmp"]
    for path in leftovers:
        path.write_text("half a CSV")
    stranger = tmp_path / ".notes.txt.abcdefgh.tmp"  # looks like one, but of no file this run writes
    stranger.write_text("not ours")
    run("explore_images.py", f"dataset_dir={faces}", f"output_csv={tmp_path}/m.csv", f"summary_csv={tmp_path}/s.csv")
    assert not any(p.exists() for p in leftovers) and stranger.exists()
    model = tmp_path / "model"
    model.mkdir()
    run(
        "process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={model}", f"output_csv={tmp_path}/p.csv"
    )  # makes it agepipe's
    scratch = model / ".scratch.ab12cd34.tmp"
    scratch.mkdir()
    (scratch / "train.data").write_bytes(b"a killed training's cache")
    run("process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={model}", f"output_csv={tmp_path}/p.csv")
    assert not scratch.exists()


def test_an_edited_output_csv_is_the_users_and_is_kept(faces, tmp_path):
    summary = tmp_path / "s.csv"
    summary.write_text(summary.read_text() + "my own note\n")
    before = digest(summary)
    refused(
        run(
            "explore_images.py",
            f"dataset_dir={faces}",
            f"output_csv={tmp_path}/m.csv",
            f"summary_csv={summary}",
            check=False,
        ),
        "cannot prove it wrote it",
    )
    assert digest(summary) == before
