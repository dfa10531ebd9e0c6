"""Every example in the library modules' docstrings runs and shows what it claims."""
import doctest
import importlib

import pytest

LIBRARY = ["image_io", "image_reader", "image_processor", "face_analysis", "utils", "resampling"]


@pytest.mark.parametrize("name", LIBRARY)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
