"""Shared test setup: fast XLA compilation and a persistent compilation cache."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The suite is dominated by compiling hundreds of tiny programs, and the tests
# check exactness and compiled costs (HLO-level), not the speed of the generated
# code: LLVM's -O0 compiles them about 10% faster, and XLA:CPU's elemental
# emitters instead of its MLIR fusion emitters about 3x faster (a ResNet-10
# train step: 3.0 s -> 0.8 s of CPU; the suite: about 20% less CPU).
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *_FAST_COMPILE]))

import jax  # noqa: E402

# Compiling random initialisers with partitionable threefry takes ~3x longer on
# CPU; the tests only need some deterministic random numbers.
jax.config.update("jax_threefry_partitionable", False)

# Many tests compile the same tiny train steps; XLA's persistent cache lets
# the second compilation of a program (in any xdist worker) be a file read.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("LAYERFREEZE_TEST_JAX_CACHE", str(ROOT / ".pytest_cache" / "jax")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def fixed_mock_getitems(monkeypatch):
    """Makes `mock_data`'s data sources answer `__getitems__` (TFDS 4.9.10 bug).

    `mock_data` sets `__getitems__ = functools.partial(_getitems, generator=...)`
    on a MagicMock instance. MagicMock binds `__getitem__` (a magic method it knows)
    but not `__getitems__`, so the keys land in `_getitems`'s `self` parameter and
    every bulk read fails with "missing 1 required positional argument:
    'record_keys'". The replacement takes the keys as its last positional argument,
    so it also works once TFDS binds it.
    """

    def getitems(*args, generator, serialized=False):
        assert not serialized, "the loader reads decoded examples"
        return [generator[key] for key in args[-1]]

    from tensorflow_datasets.testing import mocking

    monkeypatch.setattr(mocking, "_getitems", getitems)
