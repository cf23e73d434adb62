"""Unfreezing under `freeze(..., previous=...)`: newly trainable leaves start fresh."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import layerfreeze as lf
from layerfreeze import _paths

STEPS = 4  # per phase; a multiple of MultiSteps' k so phases start on a boundary

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=3, decay_steps=30)


def _shifted(schedule, shift):
    return schedule if shift == 0 else (lambda count: schedule(count + shift))


# Each maker takes the step at which the optimizer starts: a fresh reference
# optimizer for a leaf unfrozen at step N sees the schedule at the global step.
OPTIMIZERS = {
    "adam": lambda shift: optax.adam(0.1),
    "adamw": lambda shift: optax.adamw(0.1, weight_decay=0.1),
    "adamw-warmup-cosine": lambda shift: optax.adamw(_shifted(SCHEDULE, shift), weight_decay=0.1),
    "inject-hyperparams": lambda shift: optax.inject_hyperparams(optax.adam)(
        learning_rate=_shifted(SCHEDULE, shift)
    ),
    "lion": lambda shift: optax.lion(0.01, weight_decay=0.1),
    "lamb": lambda shift: optax.lamb(0.1),
    "multisteps": lambda shift: optax.MultiSteps(optax.adam(0.1), every_k_schedule=2),
}


def _params():
    keys = jax.random.split(jax.random.key(0), 5)
    return {
        "stem": {"w": jax.random.normal(keys[0], (3,))},
        "mid": {"w": jax.random.normal(keys[1], (2, 2))},
        "top": {"w": jax.random.normal(keys[2], (3,))},
        "head": {"w": jax.random.normal(keys[3], (3, 2)), "b": jax.random.normal(keys[4], (2,))},
    }


def _grads(step, params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), step), len(leaves))
    return treedef.unflatten(
        [3.0 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    )


def _run(optimizer, phases, *, method="zero", with_previous=True, steps=STEPS):
    """Trains through `phases` (specs), `steps` steps each, transferring state at changes.

    Returns a list of `(grads, params, updates)` per step, and the final state.
    """
    params, state, trace = _params(), None, []
    for i, spec in enumerate(phases):
        previous = phases[:i] if with_previous else ()
        tx = lf.freeze(optimizer, spec, method=method, previous=previous)
        fresh = tx.init(params)
        state = fresh if state is None else lf.transfer_opt_state(state, fresh)
        update = jax.jit(tx.update)
        for _ in range(steps):
            grads = _grads(len(trace), params)
            updates, state = update(grads, state, params)
            trace.append((grads, params, updates))
            params = optax.apply_updates(params, updates)
    return trace, state


def _reference(make, phases, trace, *, method="zero", steps=STEPS):
    """Per leaf, the updates of an optimizer of its own, started fresh when the leaf
    (last) became trainable; under `lr0`, started at step 0 and run throughout."""
    paths = _paths.leaf_paths(_params())
    since = [lf.trainable_since(_params(), spec, phases[:i]) for i, spec in enumerate(phases)]
    refs: dict[str, tuple[int, optax.GradientTransformation, object]] = {}
    expected = []
    for t, (grads, params, _) in enumerate(trace):
        phase = t // steps
        row = {}
        for path, g, p in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
            start = 0 if method == "lr0" else since[phase][path]
            if start is None:
                row[path] = np.zeros(np.shape(p), np.float32)
                continue
            if path not in refs or refs[path][0] != start * steps:
                ref = make(start * steps)
                refs[path] = (start * steps, ref, ref.init({"x": p}))
            begun, ref, state = refs[path]
            update, state = ref.update({"x": g}, state, {"x": p})
            refs[path] = (begun, ref, state)
            row[path] = update["x"] if since[phase][path] is not None else np.zeros_like(p)
        expected.append(row)
    return expected


def _assert_matches_reference(trace, expected, *, rtol=1e-5):
    paths = _paths.leaf_paths(_params())
    for t, ((_, _, updates), want) in enumerate(zip(trace, expected, strict=True)):
        for path, got in zip(paths, jax.tree.leaves(updates), strict=True):
            np.testing.assert_allclose(
                got, want[path], rtol=rtol, atol=1e-7, err_msg=f"step {t}, {path}"
            )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unfrozen_leaves_update_like_a_fresh_optimizer(name):
    phases = ["stem,mid", "none"]
    trace, _ = _run(OPTIMIZERS[name](0), phases)
    _assert_matches_reference(trace, _reference(OPTIMIZERS[name], phases, trace))


def test_without_previous_unfrozen_leaves_do_not_start_fresh():
    # The behaviour `previous` fixes: the shared step count spends Adam's bias
    # correction on moments that start at zero (after 20 frozen steps the first
    # update is about half a fresh one; after 1000, several times larger).
    phases = ["stem,mid", "none"]
    # transfer_opt_state says so, naming the leaves and the remedy.
    with pytest.warns(UserWarning, match=r"mu/mid/w, mu/stem/w.*step count of 20.*previous="):
        trace, _ = _run(optax.adam(0.1), phases, with_previous=False, steps=20)
    expected = _reference(OPTIMIZERS["adam"], phases, trace, steps=20)
    ratio = np.asarray(trace[20][2]["stem"]["w"]) / np.asarray(expected[20]["stem/w"])
    assert np.all((ratio < 0.6) | (ratio > 1.5)), ratio
    with pytest.raises(AssertionError):
        _assert_matches_reference(trace, expected)


def test_stem_fresh_after_1000_frozen_steps_with_constant_gradients():
    params = {"stem": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    tx = lf.freeze(optax.adam(0.1), "stem")
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(1000):
        state = update(grads, state, params)[1]
    tx = lf.freeze(optax.adam(0.1), "none", previous=["stem"])
    state, update = lf.transfer_opt_state(state, tx.init(params)), jax.jit(tx.update)
    fresh = optax.adam(0.1)
    fresh_state = fresh.init(params["stem"])
    for _ in range(10):
        updates, state = update(grads, state, params)
        want, fresh_state = fresh.update(grads["stem"], fresh_state, params["stem"])
        np.testing.assert_allclose(updates["stem"]["w"], want["w"], rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adamw", "adamw-warmup-cosine", "inject-hyperparams"])
def test_leaves_that_stay_trainable_continue_bitwise(name):
    optimizer = OPTIMIZERS[name](0)
    changed, _ = _run(optimizer, ["stem,mid", "stem"])
    unchanged, _ = _run(optimizer, ["stem,mid", "stem,mid"])
    for (_, _, a), (_, _, b) in zip(changed, unchanged, strict=True):
        for group in ("top", "head"):
            for x, y in zip(jax.tree.leaves(a[group]), jax.tree.leaves(b[group]), strict=True):
                np.testing.assert_array_equal(x, y)
    frozen = [u["stem"]["w"] for _, _, u in changed]
    assert all(np.array_equal(u, np.zeros(3)) for u in frozen)
    params_before, params_after = changed[0][1], changed[-1][1]
    np.testing.assert_array_equal(params_after["stem"]["w"], params_before["stem"]["w"])


def test_five_phases_with_two_new_cohorts_and_a_refrozen_leaf():
    phases = ["stem,mid,top", "stem,mid", "stem", "top", "none"]
    trace, state = _run(optax.adam(0.1), phases)
    _assert_matches_reference(trace, _reference(OPTIMIZERS["adam"], phases, trace))
    since = lf.trainable_since(_params(), phases[-1], phases[:-1])
    # top trained from phase 1, was frozen in phase 3 and starts over at 4.
    assert since == {"head/b": 0, "head/w": 0, "mid/w": 2, "stem/w": 3, "top/w": 4}
    counts = state.inner_states["trainable"].inner_state[0].counts
    assert {k: [int(c) for c in v] for k, v in counts.items()} == {
        "since_2": [3 * STEPS],
        "since_3": [2 * STEPS],
        "since_4": [STEPS],
    }


def test_a_cohort_that_continues_keeps_its_count():
    phases = ["stem,mid", "stem", "none"]
    _, state = _run(optax.adam(0.1), phases)
    cohorts = state.inner_states["trainable"].inner_state[0]
    assert int(cohorts.inner_state[0].count) == 3 * STEPS
    assert {k: int(v[0]) for k, v in cohorts.counts.items()} == {
        "since_1": 2 * STEPS,
        "since_2": STEPS,
    }


def test_global_norm_clip_spans_every_cohort():
    # Adam with a large eps is not scale invariant, so the clip factor shows.
    make = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1, eps=1.0))
    trace, _ = _run(make(), ["stem,mid", "none"])
    adam, per_cohort = optax.adam(0.1, eps=1.0), make()
    adam_state = adam.init(_params()["stem"])
    per_cohort_state = per_cohort.init(_params()["stem"])
    for grads, params, updates in trace[STEPS:]:
        norm = optax.tree.norm(grads)
        assert norm > 1.0  # clipping is active
        clipped = {"w": grads["stem"]["w"] / norm}
        want, adam_state = adam.update(clipped, adam_state, params["stem"])
        np.testing.assert_allclose(updates["stem"]["w"], want["w"], rtol=1e-5)
        # Clipping the stem's cohort on its own would give something else.
        wrong, per_cohort_state = per_cohort.update(grads["stem"], per_cohort_state, params["stem"])
        assert not np.allclose(updates["stem"]["w"], wrong["w"], rtol=1e-3)


def test_lr0_continues_warm_and_ignores_previous():
    phases = ["stem,mid", "none"]
    trace, state = _run(optax.adam(0.1), phases, method="lr0")
    expected = _reference(OPTIMIZERS["adam"], phases, trace, method="lr0")
    _assert_matches_reference(trace, expected)
    _, plain_state = _run(optax.adam(0.1), phases, method="lr0", with_previous=False)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert state.inner_states["trainable"].inner_state[0].counts == {}


def test_without_previous_the_state_has_no_cohort_counts():
    tx = lf.freeze(optax.adam(0.1), "stem")
    state = tx.init(_params())
    assert state.inner_states["trainable"].inner_state[0].counts == {}
    updates, _ = tx.update(_grads(0, _params()), state, _params())
    np.testing.assert_array_equal(updates["stem"]["w"], np.zeros(3))


def test_previous_as_label_trees():
    params = _params()
    mask = lf.frozen_mask(params, "stem,mid")
    by_labels = lf.freeze(optax.adam(0.1), labels=lf.frozen_mask(params, "none"), previous=[mask])
    by_specs = lf.freeze(optax.adam(0.1), "none", previous=["stem,mid"])
    grads = _grads(0, params)
    a = by_labels.update(grads, by_labels.init(params), params)
    b = by_specs.update(grads, by_specs.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_summary_attributes_cohort_state_to_groups():
    params = _params()
    tx = lf.freeze(optax.adam(0.1), "none", previous=["stem,mid"])
    state = tx.init(params)
    summary = lf.summary(params, "none", state).as_dict()
    for group, size in {"stem": 3, "mid": 4, "top": 3, "head": 8}.items():
        assert summary["groups"][group]["opt_state_bytes"] == 2 * 4 * size  # mu and nu
    assert summary["opt_state_bytes"] - 2 * 4 * 18 == 2 * 4  # base count and since_1 count


def test_extra_cohorts_add_no_compiled_work():
    keys = jax.random.split(jax.random.key(0), 3)
    params = {g: jax.random.normal(k, (64, 64)) for g, k in zip(("a", "b", "c"), keys, strict=True)}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    def flops(previous):
        tx = lf.freeze(optimizer, "none", previous=previous)
        compiled = jax.jit(tx.update).lower(params, tx.init(params), params).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    one, three = flops(()), flops(["a,b", "a"])
    assert one > 64 * 64 * 3 * 10
    assert three <= 1.01 * one


class _Net(nnx.Module):
    def __init__(self):
        self.stem = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))


CONTAINERS = {
    "FrozenDict": lambda: FrozenDict({"stem": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}),
    "OrderedDict": lambda: collections.OrderedDict(
        stem={"w": jnp.ones(3)}, head={"w": jnp.ones(2)}
    ),
    "nnx.State": lambda: nnx.state(_Net(), nnx.Param),
}


@pytest.mark.parametrize("container", CONTAINERS)
def test_cohorts_work_on_any_params_container(container):
    params = CONTAINERS[container]()
    tx = lf.freeze(optax.adam(0.1), "stem")
    state = tx.init(params)
    for _ in range(3):
        state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)[1]
    grads = jax.tree.map(lambda p: jnp.full_like(p, -0.5), params)
    tx = lf.freeze(optax.adam(0.1), "none", previous=["stem"])
    state = lf.transfer_opt_state(state, tx.init(params))
    updates, _ = jax.jit(tx.update)(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    fresh = optax.adam(0.1)
    want, _ = fresh.update(grads, fresh.init(params), params)
    for path, got, ref in zip(
        _paths.leaf_paths(params), jax.tree.leaves(updates), jax.tree.leaves(want), strict=True
    ):
        if path.startswith("stem"):
            np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=path)
        else:  # its moments remember three steps of the opposite sign
            assert not np.allclose(got, ref, rtol=0.1), path


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (optax.adam, "call it"),
        (0.1, "got float"),
        ("adam", "got str"),
    ],
)
def test_freeze_needs_an_optax_optimizer(optimizer, message):
    with pytest.raises(TypeError, match=message):
        lf.freeze(optimizer, "stem")


@pytest.mark.parametrize("previous", ["stem", None, {"stem": "frozen"}, 3])
def test_previous_must_be_a_sequence_of_specs(previous):
    with pytest.raises(TypeError, match="previous must be a sequence"):
        lf.freeze(optax.adam(0.1), "none", previous=previous)


def test_previous_specs_with_labels_are_refused():
    labels = lf.frozen_mask(_params(), "none")
    with pytest.raises(ValueError, match=r"not valid \(in previous\)"):
        lf.freeze(optax.adam(0.1), labels=labels, previous=["stem"])


def test_a_previous_rule_matching_nothing_fails_at_init():
    tx = lf.freeze(optax.adam(0.1), "none", previous=["stage9"])
    with pytest.raises(ValueError, match="stage9"):
        tx.init(_params())


def test_state_from_a_freeze_without_previous_is_refused():
    params = _params()
    old = lf.freeze(optax.adam(0.1), "none").init(params)  # no `since_1` counts
    tx = lf.freeze(optax.adam(0.1), "none", previous=["stem"])
    with pytest.raises(ValueError, match="since_1"):
        tx.update(_grads(0, params), old, params)
