"""Benchmarks are code too: each runs in its tiny mode (a few dozen generated faces, small counts, no peer
install), so that one that breaks fails the tests instead of rotting until someone needs its figures."""

import subprocess
import sys

import pytest

from conftest import PROJECT

BENCHMARKS = sorted(path.name for path in (PROJECT / "benchmarks").glob("bench_*.py"))
# The longest even when tiny (they train models and run whole stages: half a minute to two minutes each) run
# with the slow tests, which CI runs too: none rots, and `make test` stays under fifteen minutes.
LONGEST = {
    "bench_datasets.py",
    "bench_labels.py",
    "bench_model.py",
    "bench_photos.py",
    "bench_predict.py",
    "bench_scale.py",
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LONGEST else n for n in BENCHMARKS])
def test_each_benchmark_runs_in_its_tiny_mode(name):
    result = subprocess.run(
        [sys.executable, f"benchmarks/{name}", "--tiny"], cwd=PROJECT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert any(character.isdigit() for character in result.stdout), "it printed no figure"
