"""Imports a script of `benchmarks/` the way it runs: its folder on `sys.path`, so the
scripts that import a sibling (`from freeze_cost import ...`) find it, and each script
loaded once per process."""

import importlib
import pathlib
import sys
from types import ModuleType

DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    if str(DIR) not in sys.path:
        sys.path.insert(0, str(DIR))
    return importlib.import_module(name)
