"""Config validation, age groups, atomic writes and the resume journal."""
import json

import pytest

from utils import AgeGroups, ConfigError, Int, Journal, ListOf, MapOf, Number, Optional, Str, apply_override, atomic_write, validate

SCHEMA = {
    "threshold": Number(0, 10),
    "workers": Int(0),
    "mode": Str(["a", "b"]),
    "path": Optional(Str()),
    "edges": ListOf(Int(0), min_length=2, increasing=True),
    "checks": MapOf({"below": Optional(Number())}),
}
GOOD = {"threshold": 2.5, "workers": 2, "mode": "a", "path": None, "edges": [0, 10], "checks": {"x": {"below": 1}}}


def test_valid_config_passes_through():
    assert validate(GOOD, SCHEMA) == GOOD


@pytest.mark.parametrize(
    "change, message",
    [
        ({"threshold": "high"}, "threshold: expected a number >= 0 and <= 10, got 'high'"),
        ({"threshold": 11}, "threshold: expected a number >= 0 and <= 10, got 11"),
        ({"workers": 1.5}, "workers: expected an integer >= 0, got 1.5"),
        ({"workers": True}, "workers: expected an integer >= 0, got True"),
        ({"mode": "c"}, "mode: expected one of 'a', 'b', got 'c'"),
        ({"edges": [10, 0]}, "edges: expected a list of at least 2 of an integer >= 0 in increasing order"),
        ({"checks": {"x": {"below": "low"}}}, "checks.x.below: expected null or a number, got 'low'"),
        ({"checks": {"x": {"belw": 1}}}, "checks.x.belw: unknown key (allowed here: below)"),
        ({"treshold": 1}, "treshold: unknown key"),
    ],
)
def test_config_errors_name_the_key_and_what_was_expected(change, message):
    with pytest.raises(ConfigError) as error:
        validate({**GOOD, **change}, SCHEMA)
    assert message in str(error.value)


def test_missing_key_is_named():
    config = dict(GOOD)
    del config["mode"]
    with pytest.raises(ConfigError, match="^mode: missing key$"):
        validate(config, SCHEMA)


def test_override_parses_yaml_values_and_rejects_non_sections():
    config = {"checks": {"blurry": {"below": 8}}, "n": 1}
    apply_override(config, "checks.blurry.below=12.5")
    apply_override(config, "n=[1, 2]")
    assert config == {"checks": {"blurry": {"below": 12.5}}, "n": [1, 2]}
    with pytest.raises(ConfigError, match="n is not a config section"):
        apply_override(config, "n.x=1")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_override(config, "no-equals-sign")


def test_age_groups_bin_ages_at_their_edges():
    groups = AgeGroups((0, 10, 20, 30, 40, 50, 60, 70))
    assert groups.labels == ["0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
    assert [groups.label_of(a) for a in (0, 9, 10, 69, 70, 101)] == ["0-9", "0-9", "10-19", "60-69", "70+", "70+"]
    assert groups.index_of(float("nan")) == -1
    assert AgeGroups((5, 18)).label_of(3) is None
    assert groups.bounds(100)[-1] == (70, 100)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half of the new cont")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_journal_resumes_and_ignores_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path, "fp1") as journal:
        journal.record("a", {"x": 1.5, "y": None})
        journal.record("b", {"x": float("nan"), "y": "s"})
    with open(path, "a") as f:
        f.write('{"_key": "c", "x": 3')  # a write cut off by a crash
    resumed = Journal(path, "fp1")
    assert resumed.done == {"a", "b"}
    with resumed:
        resumed.record("c", {"x": 3.0, "y": "t"})
    rows = Journal(path, "fp1").rows(["c", "a", "b"])
    assert rows["x"].tolist()[:2] == [3.0, 1.5] and rows["x"].isna().tolist() == [False, False, True]
    assert rows["y"].tolist()[::2] == ["t", "s"] and rows["y"].isna().tolist() == [False, True, False]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_journal_with_other_fingerprint_is_discarded(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path, "old-settings") as journal:
        journal.record("a", {"x": 1})
    assert Journal(path, "new-settings").done == set()
    assert not path.exists()


def test_importing_the_library_modules_changes_no_global_state():
    import subprocess
    import sys

    from conftest import PROJECT

    # third-party imports first: what they do at import (OpenCV sets LD_LIBRARY_PATH, scipy adds a
    # warnings filter) is theirs; the probe watches what agepipe's own modules add
    probe = """
import os, warnings, matplotlib, matplotlib.pyplot, PIL.Image, cv2, numpy, pandas, scipy.sparse.csgraph, yaml, tqdm
state = lambda: (dict(matplotlib.rcParams), matplotlib.get_backend(), PIL.Image.MAX_IMAGE_PIXELS, dict(os.environ), list(warnings.filters))
before = state()
import utils, image_io, image_reader, image_processor, image_visualizer, face_analysis, resampling
print(before == state())
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr
