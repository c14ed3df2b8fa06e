"""The benchmark scripts under test, loaded from benchmarks/ (not a package) once per module."""
import importlib.util
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ql():
    return _load("quality_levers")


@pytest.fixture(scope="module")
def ug():
    return _load("unit_generalization")
