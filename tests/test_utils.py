"""Config validation, age groups, atomic writes, the resume journal, part files and the streaming pool map."""

import json
from typing import Literal

import pytest
from pydantic import Field

from agepipe.config.loading import apply_override, validate_section
from agepipe.config.schema import AgeRange, Bounded, Section
from agepipe.data.age_groups import AgeGroups
from agepipe.errors import ConfigError, UserError
from agepipe.running.parallel import Engine, parallel_map
from agepipe.running.resume import Journal, PartStore, json_table
from agepipe.running.writes import atomic_write


class Rule(Section):
    below: Bounded(float) | None


class Example(Section):
    threshold: Bounded(float, 0, 10)
    workers: Bounded(int, 0)
    mode: Literal["a", "b"]
    path: str | None
    edges: list[Bounded(int, 0)] = Field(min_length=2)
    checks: dict[str, Rule]


GOOD = {"threshold": 2.5, "workers": 2, "mode": "a", "path": None, "edges": [0, 10], "checks": {"x": {"below": 1}}}


def test_valid_config_passes_through():
    assert validate_section(Example, GOOD).model_dump() == {**GOOD, "checks": {"x": {"below": 1.0}}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"threshold": "high"}, "threshold: expected a number, got 'high'"),
        ({"threshold": 11}, "threshold: expected a value <= 10, got 11"),
        ({"workers": 1.5}, "workers: expected an integer, got 1.5"),
        ({"workers": True}, "workers: expected an integer, got True"),
        ({"mode": "c"}, "mode: expected one of 'a' or 'b', got 'c'"),
        ({"edges": [10]}, "edges: expected at least 2 items, got [10]"),
        ({"edges": [0, -1]}, "edges[1]: expected a value >= 0, got -1"),
        ({"checks": {"x": {"below": "low"}}}, "checks.x.below: expected a number, got 'low'"),
        ({"checks": {"x": {"belw": 1}}}, "checks.x.belw: unknown key (did you mean below?)"),
        ({"treshold": 1}, "treshold: unknown key (did you mean threshold?)"),
        ({"zzz": 1}, "zzz: unknown key"),
        ({"threshold": float("nan")}, "threshold: expected a finite number, got nan"),
    ],
)
def test_config_errors_name_the_key_and_what_was_expected(change, message):
    with pytest.raises(ConfigError) as error:
        validate_section(Example, {**GOOD, **change})
    assert str(error.value) == message


def test_missing_key_is_named_and_rules_joining_fields_are_checked():
    config = dict(GOOD)
    del config["mode"]
    with pytest.raises(ConfigError, match="^mode: missing key$"):
        validate_section(Example, config)
    with pytest.raises(ConfigError, match="^age_range: expected min < max, got min 50 and max 20$"):
        validate_section(AgeRange, {"min": 50, "max": 20}, "age_range")


def test_override_parses_yaml_values_and_rejects_non_sections():
    config = {"checks": {"blurry": {"below": 8}}, "n": 1}
    apply_override(config, "checks.blurry.below=12.5")
    apply_override(config, "n=[1, 2]")
    assert config == {"checks": {"blurry": {"below": 12.5}}, "n": [1, 2]}
    with pytest.raises(ConfigError, match="'n' is not a config section"):
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
    assert len(resumed.done) == 2 and "a" in resumed.done and "b" in resumed.done
    with resumed:
        resumed.record("c", {"x": 3.0, "y": "t"})
    rows = Journal(path, "fp1").rows(["c", "a", "b"])
    assert rows["x"].tolist()[:2] == [3.0, 1.5] and rows["x"].isna().tolist() == [False, False, True]
    assert rows["y"].tolist()[::2] == ["t", "s"] and rows["y"].isna().tolist() == [False, True, False]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_damaged_journal_line_is_done_again_and_a_stranger_is_never_a_journal(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path, "fp1") as journal:
        journal.record("a", {"x": 1})
    with open(path, "ab") as f:
        f.write(b"\xff\xfe not JSON, not UTF-8\n")
    with Journal(path, "fp1") as journal:
        journal.record("b", {"x": 2})
    resumed = Journal(path, "fp1")
    assert (
        len(resumed.done) == 2
        and "a" in resumed.done
        and "b" in resumed.done
        and resumed.records(["a", "b"]) == {"a": {"x": 1}, "b": {"x": 2}}
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert not Journal.is_journal(notes) and not Journal.is_journal(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="not one of agepipe's journals"):
        Journal(notes, "fp1")
    assert notes.read_text() == "my notes\n"


def test_journal_refuses_rows_its_rule_rejects_and_reads_each_key_by_one_seek(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path, "fp1") as journal:
        journal.record("a", {"x": 1})
        journal.record("b", {"x": -1})  # what a damaged cache row looks like to the rule below
        journal.record("a", {"x": 3})  # the last row of a key wins
        journal.record("c", {"x": 5})
        journal.record("c", {"x": -5})  # a refused row undoes the key's earlier ones
    checked = Journal(path, "fp1", accept=lambda key, row: row["x"] > 0)
    assert len(checked.done) == 1 and "a" in checked.done and checked.records(["a", "b"]) == {"a": {"x": 3}}
    with checked:
        checked.record("b", {"x": 2})
        assert checked.records(["b"]) == {"b": {"x": 2}}  # readable while the journal is open
    checked.compact(checked.records(["a", "b"]))
    assert checked.records(["b", "a"]) == {"a": {"x": 3}, "b": {"x": 2}} and len(path.read_text().splitlines()) == 3


def test_journal_with_other_fingerprint_is_discarded(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path, "old-settings") as journal:
        journal.record("a", {"x": 1})
    assert not Journal(path, "new-settings").done
    assert not path.exists()


def test_parts_keep_their_column_types_and_only_their_own_files_are_ever_deleted(tmp_path):
    store = PartStore(tmp_path / "parts", "settings-1")
    first, second = store.part_name(["a|1|5", "b|2|6"]), store.part_name(["c|3|7"])
    assert first != second and first != PartStore(tmp_path / "parts", "settings-2").part_name(["a|1|5", "b|2|6"])
    store.write(
        first, [{"width": 200, "score": 1.5, "hash": "ab"}, {"width": None, "score": float("nan"), "hash": None}]
    )
    store.write(
        second, [{"width": None, "score": 2.0, "hash": None}]
    )  # a chunk where a whole-number column is all empty
    table = json_table(list(store.rows(first)))
    assert (
        str(table["width"].dtype) == "Int64"
        and table["width"].tolist()[0] == 200
        and table["width"].isna().tolist() == [False, True]
    )
    assert (
        table["score"].tolist()[0] == 1.5
        and table["hash"].tolist()[0] == "ab"
        and table["hash"].isna().tolist() == [False, True]
    )
    looks_like_a_part = tmp_path / "parts" / ("0" * 32 + ".jsonl")
    looks_like_a_part.write_text('{"not": "a part"}\n')  # a part's name, but not its header
    killed_write = tmp_path / "parts" / f".{second[:32]}.k9x_2abc.tmp"
    killed_write.write_text("half a part")
    assert store.keep_only({first}) == 2
    assert store.has(first) and not store.has(second) and looks_like_a_part.exists() and not killed_write.exists()


def _pulled(state, item):
    return item


def test_parallel_map_takes_items_as_it_needs_them():
    """The items are a generator: by the first result only the first chunks have been taken from it,
    so a million files never sit in memory as a list."""
    taken = []

    def items():
        for i in range(20_000):
            taken.append(i)
            yield i

    results = parallel_map(_pulled, items(), Engine(num_workers=2, chunk_files=100))
    first = next(results)
    assert len(taken) <= 300, len(taken)
    assert sorted([first, *results]) == list(range(20_000)) and len(taken) == 20_000


def test_importing_the_library_modules_changes_no_global_state():
    import subprocess
    import sys

    from conftest import PROJECT, library_modules

    # third-party imports first: what they do at import (OpenCV sets LD_LIBRARY_PATH, scipy adds a
    # warnings filter) is theirs; the probe watches what agepipe's own modules add. The one module that
    # loads TensorFlow (after the worker pools fork) is left out: quieting TensorFlow's start-up log
    # before it loads is its purpose, and TensorFlow sets variables of its own.
    probe = """
import os, warnings, matplotlib, matplotlib.pyplot, PIL.Image, cv2, numpy, pandas, scipy.sparse.csgraph, yaml, tqdm
state = lambda: (dict(matplotlib.rcParams), matplotlib.get_backend(), PIL.Image.MAX_IMAGE_PIXELS, dict(os.environ),
                 list(warnings.filters))
before = state()
import importlib, pathlib
for module in MODULES:
    importlib.import_module(module)
print(before == state())
""".replace("MODULES", repr([m for m in library_modules() if m != "agepipe.model.keras_networks"]))
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr
