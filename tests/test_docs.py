"""Every example in the library modules' docstrings runs and shows what it claims."""

import doctest
import importlib
import importlib.util

import pytest

from conftest import library_modules

# the library modules whose docstrings hold examples (a module without any is not listed: its test could never fail)
EXAMPLES = [name for name in library_modules() if ">>> " in importlib.util.find_spec(name).loader.get_source(name)]


@pytest.mark.parametrize("name", EXAMPLES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
