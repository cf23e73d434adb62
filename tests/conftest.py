"""Shared test setup: the repository root importable (for `experiments`)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

# Compiling random initialisers with partitionable threefry takes ~3x longer on
# CPU; the tests only need some deterministic random numbers.
jax.config.update("jax_threefry_partitionable", False)
