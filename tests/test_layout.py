"""The layout draws the architecture: the scripts a user runs and the helpers the design names at the
root, reading top to bottom over a library below them that never imports them."""

import ast

import pytest

from conftest import PACKAGE, PROJECT, root_modules, scripts

MAX_ROOT_MODULES, MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_LINE_LENGTH = 16, 500, 60, 120  # pyproject.toml: ruff's too


def imported_names(path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def library_files():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PROJECT)))
def test_the_package_never_imports_the_root(path):
    assert not imported_names(path) & set(root_modules()), "the package imports a top-level module"


@pytest.mark.parametrize("script", scripts())
def test_scripts_never_import_each_other(script):
    assert not imported_names(root_modules()[script]) & (set(scripts()) - {script})


def test_the_root_holds_what_a_user_runs_and_what_the_design_names():
    assert len(root_modules()) <= MAX_ROOT_MODULES
    for design in (
        "utils",
        "image_reader",
        "image_processor",
        "image_visualizer",
        "explore_images",
        "process_images",
        "visualize_image_information",
        "train_model",
        "predict_age",
    ):
        assert design in root_modules()


@pytest.mark.parametrize(
    "path", [*root_modules().values(), *library_files()], ids=lambda p: str(p.relative_to(PROJECT))
)
def test_modules_and_functions_stay_small(path):
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= MAX_MODULE_LINES
    assert max(map(len, text.splitlines())) <= MAX_LINE_LENGTH
    long = [
        node.name
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
