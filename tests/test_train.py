"""Training on the generated sample: it learns, it does not leak, it saves and reloads, it distributes."""
import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import read_csv, run

# Small and quick, still enough for the synthetic faces' age cues.
FAST = ["input.image_size=48", "model.filters=[16, 32, 64]", "input.batch_size=32", "training.epochs=40",
        "training.early_stopping_patience=40", "training.learning_rate=0.004", "training.warmup_epochs=1"]


def train(input_csv, out, *extra, check=True):
    return run("train_model.py", f"input_csv={input_csv}", f"output_dir={out}", *FAST, *extra, check=check)


@pytest.fixture(scope="module")
def trained(resampled, tmp_path_factory):
    folder, _, _ = resampled
    out = tmp_path_factory.mktemp("model")
    result = train(folder / "resampled.csv", out)
    return out, result


def test_training_beats_the_majority_baseline_clearly(trained):
    out, result = trained
    metrics = json.loads((out / "metrics.json").read_text())
    test, baseline = metrics["test"], metrics["majority_baseline"]
    print("\n" + result.stdout)
    assert test["accuracy"] >= baseline["accuracy"] + 0.2
    assert test["one_off_accuracy"] >= 0.8 and test["mae_years"] < baseline["mae_years"] - 5
    assert np.array(test["confusion_matrix"]).sum() == test["images"] == metrics["split_images"]["test"]
    for name in ("model.keras", "history.csv", "training_curves.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0


def test_no_source_image_in_two_splits_and_test_holds_originals_only(trained, resampled):
    out, _ = trained
    split = read_csv(out / "split.csv")
    per_source = split[split["split"] != "unused"].groupby("source")["split"].nunique()
    assert (per_source == 1).all()
    assert (split.loc[split["split"] == "test", "copy"] == 0).all()
    assert (split.loc[split["split"] == "unused", "copy"] > 0).all()
    folder, _, _ = resampled
    assert len(split) == len(read_csv(folder / "resampled.csv"))
    # every group is represented in every split
    groups = split.assign(group=(split["age"] // 10).clip(upper=7))
    assert (groups.groupby("split")["group"].nunique().loc[["train", "validation", "test"]] == 8).all()


def test_saved_model_reloads_with_its_groups_and_predicts_the_same(trained):
    import tensorflow as tf

    from age_model import decode_and_resize, load_with_metadata, predict_probabilities

    out, _ = trained
    model, metadata = load_with_metadata(out / "model.keras")
    assert metadata["labels"] == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"] and metadata["input_size"] == 48
    saved = read_csv(out / "test_predictions.csv")
    images = tf.data.Dataset.from_tensor_slices(saved["path"].to_numpy(str)).map(lambda p: tf.cast(decode_and_resize(p, 48), tf.float32)).batch(16)
    probabilities = predict_probabilities(model, images, flip=True)
    np.testing.assert_allclose(probabilities, saved[[f"p_{g}" for g in metadata["labels"]]].to_numpy(), atol=2e-4)


def test_predict_age_on_a_folder_with_a_broken_file(trained, sample, tmp_path):
    out, _ = trained
    folder = tmp_path / "faces"
    folder.mkdir()
    for face in sorted(sample.glob("*.chip.jpg"))[:20]:
        (folder / face.name).write_bytes(face.read_bytes())
    (folder / "33_0_0_broken.jpg").write_bytes(b"not a jpeg")
    result = run("predict_age.py", f"model_path={out}/model.keras", f"inputs=[{folder}]", f"output_csv={tmp_path}/p.csv")
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 21 and rows["error"].notna().sum() == 1
    ok = rows[rows["error"].isna()]
    probabilities = ok[[c for c in ok.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-3)
    assert ok["expected_age"].between(0, 100).all() and "names carry ages: on 20 images" in result.stdout


def test_mirrored_strategy_on_two_logical_cpus(resampled, tmp_path):
    folder, _, _ = resampled
    train(folder / "resampled.csv", tmp_path, "distribution.strategy=mirrored", "distribution.logical_cpus=2", "training.epochs=1")
    assert json.loads((tmp_path / "metrics.json").read_text())["replicas"] == 2


def test_multi_worker_strategy_runs_as_one_local_worker_without_tf_config(resampled, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    folder, _, _ = resampled
    train(folder / "resampled.csv", tmp_path, "distribution.strategy=multi_worker", "training.epochs=1")
    assert json.loads((tmp_path / "metrics.json").read_text())["replicas"] == 1


def test_a_keras_applications_backbone_trains_and_reloads_offline(resampled, tmp_path):
    from age_model import load_with_metadata

    folder, _, _ = resampled
    train(folder / "resampled.csv", tmp_path, "model.backbone=MobileNetV3Small", "model.weights=null", "training.epochs=1",
          "input.image_size=64")
    model, metadata = load_with_metadata(tmp_path / "model.keras")
    assert metadata["input_size"] == 64 and model.output_shape == (None, 8)


def test_a_group_without_images_is_reported_not_fatal(resampled, tmp_path):
    folder, _, _ = resampled
    result = train(folder / "resampled.csv", tmp_path, "age_groups.edges=[0, 10, 20, 30, 40, 50, 60, 70, 95]", "training.epochs=1")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["groups_without_test_images"] == ["95+"] and metrics["test"]["per_group_recall"]["95+"] is None
    assert "age group 95+ has no training images" in result.stderr


def test_bad_inputs_give_clear_messages(tmp_path, sample):
    (tmp_path / "bad.csv").write_text("name,years\na.jpg,3\n")
    (tmp_path / "30_0_0_face.jpg").write_bytes(next(sample.glob("*.chip.jpg")).read_bytes())
    result = train(tmp_path / "bad.csv", tmp_path, check=False)
    assert result.returncode == 2 and "lacks column 'file'" in result.stderr
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    result = run("predict_age.py", f"model_path={tmp_path}/other.keras", f"inputs=[{tmp_path}]", check=False)
    assert result.returncode == 2 and "was not saved by train_model.py" in result.stderr
    (tmp_path / "text.keras").write_text("hello")
    result = run("predict_age.py", f"model_path={tmp_path}/text.keras", f"inputs=[{tmp_path}]", check=False)
    assert result.returncode == 2 and "was not saved by train_model.py" in result.stderr


def test_split_is_stratified_and_seeded():
    from train_model import split_by_source

    frame = pd.DataFrame({"source": [f"s{i}" for i in range(100)] * 2, "copy": [0] * 100 + [1] * 100,
                          "group_index": [i % 4 for i in range(100)] * 2})
    first, second = split_by_source(frame, 0.2, 0.2, seed=3), split_by_source(frame, 0.2, 0.2, seed=3)
    assert first.equals(second) and not first.equals(split_by_source(frame, 0.2, 0.2, seed=4))
    originals = first[:100]
    assert (originals == "test").sum() == 20 and (originals == "validation").sum() == 20
    assert (first[100:][originals.to_numpy() == "test"] == "unused").all()
