import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

import layerfreeze as lf
from layerfreeze import _labels, _paths

NAMES = st.sampled_from(["a", "b", "stem", "stage1", "head", "Conv_0", "kernel", "bias"])


def _trees(max_leaves=12):
    leaf = st.integers(1, 3).map(lambda n: np.zeros((n,), np.float32))
    return st.recursive(
        leaf,
        lambda children: st.dictionaries(NAMES, children, min_size=1, max_size=3),
        max_leaves=max_leaves,
    ).filter(lambda t: isinstance(t, dict))


@settings(max_examples=60, deadline=None)
@given(tree=_trees(), data=st.data())
def test_labels_follow_rules_on_random_trees(tree, data):
    paths = _paths.leaf_paths(tree)
    group = data.draw(st.sampled_from(_paths.top_level_groups(paths)))
    labels = lf.freeze_labels(tree, group)
    mask = lf.frozen_mask(tree, group)
    assert jax.tree.structure(labels) == jax.tree.structure(tree)
    for path, label, is_frozen in zip(
        paths, jax.tree.leaves(labels), jax.tree.leaves(mask), strict=True
    ):
        expected = path.split("/")[0] == group
        assert is_frozen == expected
        assert label == (lf.FROZEN if expected else lf.TRAINABLE)
    # all-but is the complement.
    inverse = lf.frozen_mask(tree, f"all-but:{group}")
    assert jax.tree.leaves(inverse) == [not m for m in jax.tree.leaves(mask)]


def _dict_params():
    return {
        "stem": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)},
        "stage1": {"kernel": jnp.ones((3, 3))},
        "head": {"kernel": jnp.ones((3, 2))},
    }


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


@pytest.mark.parametrize(
    "make",
    [
        _dict_params,
        lambda: FrozenDict(_dict_params()),
        lambda: nnx.state(_Net(nnx.Rngs(0)), nnx.Param),
    ],
    ids=["dict", "FrozenDict", "nnx.State"],
)
def test_container_type_is_kept_and_partition_accepts_it(make):
    params = make()
    labels = lf.freeze_labels(params, "stem")
    assert type(labels) is type(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    tx = optax.partition(
        {"frozen": optax.set_to_zero(), "trainable": optax.sgd(0.5)}, lf.label_fn("stem")
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert type(new) is type(params)
    for path, before, after in zip(
        _paths.leaf_paths(params), jax.tree.leaves(params), jax.tree.leaves(new), strict=True
    ):
        if path.startswith("stem/"):
            np.testing.assert_array_equal(after, before)
        else:
            assert not np.array_equal(after, before)


def test_nnx_paths_drop_value():
    params = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    assert _paths.leaf_paths(params) == [
        "bn/bias",
        "bn/scale",
        "head/bias",
        "head/kernel",
        "stem/bias",
        "stem/kernel",
    ]


def test_structure_mismatch_is_explained():
    params = _dict_params()
    labels = lf.freeze_labels(params, "stem")
    del labels["head"]
    with pytest.raises(ValueError, match=r"missing from labels: \['head/kernel'\]"):
        _labels.check_same_structure(labels, params)
    with pytest.raises(ValueError, match="different containers"):
        _labels.check_same_structure(FrozenDict(lf.freeze_labels(params, "stem")), params)
