"""What layerfreeze relies on in jax and optax beyond their documented API.

Kept in one place so that an upstream release that changes any of it breaks
one module, and `tests/test_upstream.py` says which fact no longer holds.
"""

from typing import Any

import jax

__all__ = [
    "BACKEND_COMPILE_EVENT",
    "CACHE_HIT_EVENT",
    "GLOBAL_COUNT_STATES",
    "PARTITION_STATES",
    "compilation_cache_dir_in_use",
    "is_partition_states_key",
    "jax_backends_started",
]

# NamedTuples of optax whose `count` is a position in time (a schedule's step,
# an accumulation phase) rather than a bias correction: every cohort of
# `layerfreeze.freeze` shares it. Recognised by class name: several are not
# exported by optax (`optax._src.transform.ScaleByScheduleState`, ...).
GLOBAL_COUNT_STATES = frozenset(
    {
        "AddNoiseState",
        "ApplyEvery",
        "InjectHyperparamsState",
        "InjectStatefulHyperparamsState",
        "ReduceLROnPlateauState",
        "ScaleByScheduleState",
        "WeightDecaySchedule",
        "WrappedScheduleState",
    }
)

# The field of `optax.transforms.PartitionState` that holds each branch's state,
# keyed by label: state paths read `inner_states/<label>/...`.
PARTITION_STATES = "inner_states"


def is_partition_states_key(key: Any) -> bool:
    """Whether a key-path entry is the `inner_states` attribute of an optax `PartitionState`."""
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == PARTITION_STATES


def jax_backends_started() -> bool:
    """Whether JAX has initialised its backends (no public API asks this)."""
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


# jax.monitoring events (jax 0.10): the duration of every request for an XLA
# executable (compiled, or read from the persistent compilation cache), and a
# read from that cache.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def compilation_cache_dir_in_use() -> str | None:
    """The persistent compilation cache's directory once JAX has opened it, else None.

    JAX opens the cache at the first compilation and keeps that directory for
    the life of the process, whatever `jax_compilation_cache_dir` says later.
    """
    from jax._src import compilation_cache

    cache = compilation_cache._cache
    if not compilation_cache._cache_initialized or cache is None:
        return None
    return str(getattr(cache, "_path", ""))
