"""Every example in the library modules' docstrings runs and shows what it claims."""
import doctest
import importlib

import pytest

from conftest import PROJECT

SCRIPTS = {"explore_images", "process_images", "visualize_image_information", "check_labels", "train_model", "predict_age",
           "make_sample_dataset", "run_notebook"}
# the library modules whose docstrings hold examples (a module without any is not listed: its test could never fail)
LIBRARY = sorted(p.stem for p in PROJECT.glob("*.py") if p.stem not in SCRIPTS and ">>> " in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", LIBRARY)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
