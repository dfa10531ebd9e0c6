"""The command line every script shares: --help lists every setting with its value and meaning, and its
examples are valid commands; a stage reads the settings the stage before it ran with."""

import shlex
import subprocess
import sys

import pytest

from conftest import PROJECT, read_csv, run

SCRIPTS = {
    "explore_images.py": "ExploreConfig",
    "process_images.py": "ProcessConfig",
    "visualize_image_information.py": "VisualizeConfig",
    "train_model.py": "TrainConfig",
    "predict_age.py": "PredictConfig",
    "make_sample_dataset.py": "SampleConfig",
    "run_notebook.py": "ResamplingConfig",
}
CONFIGS = {"run_notebook.py": "resampling.yaml"}  # the others read the YAML file named for them


def leaf_keys(model, prefix=""):
    from typing import get_args, get_origin

    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        sections = [
            a
            for a in (field.annotation, *get_args(field.annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if sections and get_origin(field.annotation) is not dict:
            keys += leaf_keys(sections[0], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


@pytest.mark.parametrize("script, model", SCRIPTS.items())
def test_help_lists_every_setting_with_its_meaning_and_valid_examples(script, model):
    from agepipe.config import data_stages, model_stages
    from agepipe.config.loading import load_config

    model = getattr(data_stages, model, None) or getattr(model_stages, model)

    result = subprocess.run([sys.executable, script, "--help"], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for key in leaf_keys(model):
        assert f"  {key} = " in text or f"  {key}: " in text, key
    assert "values are YAML" in text and "inputs=[photos,more/photos]" in text
    examples = [line.strip() for line in text.split("examples:")[1].splitlines() if line.strip()]
    assert examples
    for example in examples:
        words = shlex.split(example)
        assert words[:2] == ["python", script]
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        load_config(model, PROJECT / "configs" / CONFIGS.get(script, script.replace(".py", ".yaml")), overrides)


@pytest.mark.slow
def test_later_stages_use_the_thresholds_the_exploration_ran_with(sample, tmp_path):
    """Explore with a changed threshold, then process and visualize with no other flag: the same images
    are flagged in all three; a different value for it on their command line is one line naming both."""
    run(
        "explore_images.py",
        f"dataset_dir={sample}",
        f"output_csv={tmp_path}/m.csv",
        f"summary_csv={tmp_path}/s.csv",
        "checks.blurry.below=20",
    )
    explored = read_csv(tmp_path / "m.csv")
    blurry = set(explored.loc[explored["flag_blurry"], "file"])
    assert blurry and (explored.loc[explored["flag_blurry"], "blurriness"] < 20).all()
    run(
        "process_images.py", f"input_csv={tmp_path}/m.csv", f"output_dir={tmp_path}/out", f"output_csv={tmp_path}/p.csv"
    )
    processed = read_csv(tmp_path / "p.csv")
    assert set(processed.loc[processed["failed_checks_before"].fillna("").str.contains("blurry"), "file"]) == blurry
    kept = processed["status"].isin(["kept", "repaired"])
    assert (processed.loc[kept, "after_blurriness"] >= 20).all()  # judged by the exploration's 20, not the YAML's 8
    run(
        "visualize_image_information.py",
        f"exploration_csv={tmp_path}/m.csv",
        f"processed_csv={tmp_path}/p.csv",
        f"output_dir={tmp_path}/report",
    )
    assert f"blurry &lt; 20: {len(blurry)} images" in (tmp_path / "report" / "index.html").read_text()
    for script, place in (
        ("process_images.py", f"input_csv={tmp_path}/m.csv"),
        ("visualize_image_information.py", f"exploration_csv={tmp_path}/m.csv"),
    ):
        result = (
            run(
                script,
                place,
                f"output_dir={tmp_path}/other",
                f"output_csv={tmp_path}/other.csv",
                "checks.blurry.below=8",
                check=False,
            )
            if script == "process_images.py"
            else run(script, place, f"output_dir={tmp_path}/other", "checks.blurry.below=8", check=False)
        )
        assert (
            result.returncode == 2
            and "the exploration ran with 20" in result.stderr
            and "this command says 8" in result.stderr
        )
    same = run(
        "process_images.py",
        f"input_csv={tmp_path}/m.csv",
        f"output_dir={tmp_path}/out",
        f"output_csv={tmp_path}/p.csv",
        "checks.blurry.below=20",
    )
    assert same.returncode == 0


def test_every_script_works_from_any_folder(sample, tmp_path):
    command = [
        sys.executable,
        str(PROJECT / "explore_images.py"),
        "--set",
        f"dataset_dir={sample}",
        "--set",
        "output_csv=m.csv",
        "--set",
        "summary_csv=s.csv",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m.csv").is_file()  # a path typed on the command line is relative to the current folder
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT / "process_images.py"),
            "--set",
            "input_csv=m.csv",
            "--set",
            "output_dir=out",
            "--set",
            "output_csv=p.csv",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and (tmp_path / "p.csv").is_file(), result.stderr[-2000:]


@pytest.mark.slow
def test_your_own_folder_and_labels_csv_end_to_end_with_one_flag(sample, manifest, tmp_path):
    """Photos whose names carry no age, a labels CSV beside them, and --set workspace=DIR: every stage
    finds its inputs and writes its outputs in the workspace, nothing in the project."""
    import shutil

    photos = tmp_path / "my photos"
    photos.mkdir()
    chosen = manifest[(manifest["defect"] == "none") & manifest["age"].notna()].iloc[::5][:80]
    lines = ["file,age"]
    for index, row in enumerate(chosen.itertuples()):
        shutil.copy(sample / row.file, photos / f"IMG_{index:04d}.jpg")
        lines.append(f"IMG_{index:04d}.jpg,{int(row.age)}")
    (photos / "labels.csv").write_text("\n".join(lines) + "\n")
    git = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=PROJECT, capture_output=True, text=True
    ).stdout
    workspace = f"workspace={tmp_path}/run"
    run("explore_images.py", workspace, f"dataset_dir={photos}", f"labels.csv_path={photos}/labels.csv")
    run("process_images.py", workspace)
    run("check_labels.py", workspace, "folds=2", "training.epochs=2")
    run("visualize_image_information.py", workspace)
    run("train_model.py", workspace, f"input_csv={tmp_path}/run/csv/checked_metadata.csv", "training.epochs=3")
    result = run("predict_age.py", workspace)
    predictions = read_csv(tmp_path / "run" / "csv" / "predictions.csv")
    assert len(predictions) >= 5 and predictions["age"].notna().all() and "true ages known for" in result.stdout
    assert (tmp_path / "run" / "reports" / "quality" / "index.html").exists() and (
        tmp_path / "run" / "csv" / "checked_metadata.csv"
    ).exists()
    assert (
        subprocess.run(
            ["git", "status", "--porcelain", "--ignored"], cwd=PROJECT, capture_output=True, text=True
        ).stdout
        == git
    )


@pytest.mark.parametrize(
    "command",
    [
        ["process_images.py"],
        ["visualize_image_information.py"],
        ["check_labels.py"],
        ["train_model.py"],
        ["predict_age.py"],
        ["run_notebook.py", "resampling.ipynb"],
    ],
)
def test_a_workspace_that_does_not_exist_is_one_line_before_any_work_and_leaves_nothing(command, tmp_path):
    result = subprocess.run(
        [sys.executable, str(PROJECT / command[0]), *command[1:], "--set", f"workspace={tmp_path}/typo"],
        cwd=tmp_path,  # from another folder: the notebook is found in the project
        capture_output=True,
        text=True,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "does not exist: start it with" in lines[0], result.stderr
    assert not (tmp_path / "typo").exists()


def test_exploring_a_workspace_again_explores_the_dataset_it_explored(sample, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for face in sorted(sample.glob("*.chip.jpg"))[:5]:
        (photos / face.name).write_bytes(face.read_bytes())
    workspace = tmp_path / "ws"
    run("explore_images.py", f"workspace={workspace}", f"dataset_dir={photos}")
    first = read_csv(workspace / "csv" / "image_metadata.csv")
    again = run("explore_images.py", f"workspace={workspace}")  # no dataset_dir: the one explored before
    assert f"exploring {photos} again" in again.stderr
    assert read_csv(workspace / "csv" / "image_metadata.csv").equals(first) and len(first) == 5
    photos.rename(tmp_path / "moved")
    gone = run("explore_images.py", f"workspace={workspace}", check=False)
    assert gone.returncode == 2 and "no longer exists: name the dataset with --set dataset_dir" in gone.stderr
