"""The facts `layerfreeze._upstream` relies on in jax and optax still hold.

Each failure here names an upstream change that layerfreeze must follow.
"""

import importlib
import subprocess
import sys

import jax
import optax
import pytest

from layerfreeze import _upstream

# Where optax defines each state whose `count` is a schedule position.
_GLOBAL_COUNT_HOMES = {
    "AddNoiseState": "optax.transforms._adding",
    "ApplyEvery": "optax._src.transform",
    "InjectHyperparamsState": "optax.schedules._inject",
    "InjectStatefulHyperparamsState": "optax.schedules._inject",
    "ReduceLROnPlateauState": "optax.contrib._reduce_on_plateau",
    "ScaleByScheduleState": "optax._src.transform",
    "WeightDecaySchedule": "optax.transforms._adding",
    "WrappedScheduleState": "optax.schedules._inject",
}


@pytest.mark.parametrize("name", sorted(_upstream.GLOBAL_COUNT_STATES))
def test_global_count_states_exist_with_a_count(name):
    cls = getattr(importlib.import_module(_GLOBAL_COUNT_HOMES[name]), name)
    assert "count" in cls._fields, f"optax's {name} has no `count` field any more"


def test_partition_state_keeps_branch_states_in_inner_states():
    state = optax.partition({"a": optax.sgd(1.0)}, {"w": "a"}).init({"w": 1.0})
    assert type(state).__name__ == "PartitionState"
    assert state._fields == (_upstream.PARTITION_STATES,)
    leaves = jax.tree_util.tree_flatten_with_path(
        optax.partition({"a": optax.adam(1.0)}, {"w": "a"}).init({"w": 1.0})
    )[0]
    assert all(_upstream.is_partition_states_key(keypath[0]) for keypath, _ in leaves)


def test_jax_reports_whether_backends_started():
    code = (
        "from layerfreeze import _upstream; a = _upstream.jax_backends_started(); "
        "import jax.numpy as jnp; jnp.zeros(1).block_until_ready(); "
        "print(a, _upstream.jax_backends_started())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
