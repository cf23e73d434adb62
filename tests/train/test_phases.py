"""`layerfreeze.train.Phases`: a schedule run step by step in a user's loop, on small models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from zoo import FlaxExampleResNet, NNXNet

import layerfreeze as lf
from layerfreeze import _paths, train

R = np.random.RandomState(0)
IMAGES = R.randn(8, 8, 8, 3).astype(np.float32)
LABELS = R.randint(0, 5, 8).astype(np.int32)
BATCH = {"image": IMAGES, "label": LABELS}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="stem")(x))
        x = nn.relu(nn.Dense(16, name="body")(x))
        return nn.Dense(5, name="head")(x)


def _linen(model, schedule, method="zero", **kw):
    variables = model.init(jax.random.key(0), IMAGES[:2], train=False)

    def build(phase, previous):
        return train.make_steps(
            model, optax.adam(1e-2), phase.spec, variables["params"], method=method,
            previous=previous,
        )  # fmt: skip

    phases = train.Phases(schedule, build, params=variables["params"], method=method, **kw)
    return phases, variables


def _run(phases, state, start, stop, log=None):
    for step in range(start, stop):
        steps, state, change = phases.update(step, state)
        if change is not None and log is not None:
            log.append(change)
        state, _ = steps.train_step(state, BATCH)
    return state


def _leaves(tree):
    def host(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return dict(zip(_paths.leaf_paths(tree), map(host, jax.tree.leaves(tree)), strict=True))


SCHEDULE = lf.schedules.parse_schedule(
    "unfreeze:0=head,3=body,6=stem", ["stem", "body", "head"], unit="step"
)


@pytest.mark.parametrize("method", lf.METHODS)
def test_phase_changes_carry_state_and_compile_once_per_phase(method):
    phases, variables = _linen(MLP(), SCHEDULE, method=method)
    state = phases.init_state(variables, jax.random.key(1))
    log = []
    state = _run(phases, state, 0, 9, log)
    assert [(c.step, c.index) for c in log] == [(3, 1), (6, 2)]
    assert phases.compilations == 3 and phases.current == 2
    assert [c.trainable_after for c in log] == [16 * 16 + 16 + 16 * 5 + 5, 3 * 64 * 16 + 16 + 357]
    # Revisiting the steps of a phase builds nothing new.
    phases.steps(0)
    assert phases.compilations == 3


def test_state_carried_equals_transfer_by_hand():
    phases, variables = _linen(MLP(), SCHEDULE)
    state = _run(phases, phases.init_state(variables, jax.random.key(1)), 0, 3)
    by_hand = lf.transfer_opt_state(state.opt_state, phases.tx(1).init(state.params))
    _, moved, change = phases.update(3, state)
    assert change is not None
    for a, b in zip(jax.tree.leaves(moved.opt_state), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_array_equal(a, b)
    # The head kept its Adam moments across the change.
    head_mu = [v for p, v in _leaves(moved.opt_state).items() if "mu" in p and "head/kernel" in p]
    assert head_mu and np.any(head_mu[0] != 0)


def test_resume_in_the_middle_is_bitwise_exact():
    phases, variables = _linen(MLP(), SCHEDULE)
    straight = _run(phases, phases.init_state(variables, jax.random.key(1)), 0, 9)

    first, _ = _linen(MLP(), SCHEDULE)
    state = _run(first, first.init_state(variables, jax.random.key(1)), 0, 5)
    saved, meta = jax.device_get(state.as_dict()), first.metadata()

    second, _ = _linen(MLP(), SCHEDULE)  # a new process: nothing cached
    assert second.restore(meta) == 1
    template = second.steps().init_state(variables, jax.random.key(1))
    restored = train.TrainState(**jax.tree.map(jnp.asarray, saved))
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(template.opt_state)
    resumed = _run(second, restored, 5, 9)
    want, got = _leaves(straight.as_dict()), _leaves(resumed.as_dict())
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(want[path], got[path], err_msg=path)


def test_restore_refuses_other_settings():
    phases, _ = _linen(MLP(), SCHEDULE)
    meta = phases.metadata()
    other = lf.schedules.parse_schedule(
        "unfreeze:0=head,4=body,stem", ["stem", "body", "head"], unit="step"
    )
    with pytest.raises(lf.schedules.ResumeMismatchError, match=r"schedule: checkpoint .* this run"):
        _linen(MLP(), other)[0].restore(meta)
    with pytest.raises(
        lf.schedules.ResumeMismatchError, match=r"method: checkpoint 'zero', this run 'lr0'"
    ):
        _linen(MLP(), SCHEDULE, method="lr0")[0].restore(meta)
    with pytest.raises(lf.schedules.ResumeMismatchError, match=r"phase 7.*phases 0\.\.2"):
        phases.restore({**meta, "phase": 7})


def test_epochs_and_total():
    schedule = lf.schedules.fine_tune(1, 2, ["stem", "body", "head"])
    with pytest.raises(ValueError, match=r"counts epochs: pass steps_per_epoch"):
        _linen(MLP(), schedule)
    phases, _ = _linen(MLP(), schedule, steps_per_epoch=4)
    assert phases.total_steps == 12
    assert [phases.index_at(s) for s in (0, 3, 4, 11)] == [0, 0, 1, 1]


def test_spec_that_does_not_fit_fails_before_any_work():
    schedule = lf.schedules.explicit({0: "stage9", 2: "none"}, unit="step")
    with pytest.raises(ValueError, match=r"'stage9' matches no parameter"):
        _linen(MLP(), schedule)


def test_linen_cnn_batchnorm_follows_the_phase():
    model = FlaxExampleResNet()
    schedule = lf.schedules.explicit({0: "conv_init,bn_init,block0", 2: "none"}, unit="step")
    phases, variables = _linen(model, schedule)
    state = phases.init_state(variables, jax.random.key(1))
    before = _leaves(state.batch_stats)
    state = _run(phases, state, 0, 2)
    mid = _leaves(state.batch_stats)
    assert np.array_equal(before["bn_init/mean"], mid["bn_init/mean"])
    state = _run(phases, state, 2, 3)
    assert not np.array_equal(mid["bn_init/mean"], _leaves(state.batch_stats)["bn_init/mean"])


def test_nnx_model_through_make_steps():
    model = NNXNet(nnx.Rngs(0))
    schedule = lf.schedules.explicit({0: "stem,stem_bn", 2: "none"}, unit="step")
    phases = train.Phases(
        schedule,
        lambda phase, previous: train.make_steps(
            model, optax.adam(1e-2), phase.spec, previous=previous
        ),
        params=model,
    )
    state = phases.init_state(model, jax.random.key(1))
    before = _leaves(state.params)
    state = _run(phases, state, 0, 2)
    mid = _leaves(state.params)
    assert np.array_equal(before["stem/kernel"], mid["stem/kernel"])
    assert not np.array_equal(before["head/kernel"], mid["head/kernel"])
    state = _run(phases, state, 2, 4)
    assert not np.array_equal(mid["stem/kernel"], _leaves(state.params)["stem/kernel"])
    assert phases.compilations == 2


def test_flax_train_state_and_a_step_of_your_own():
    model = MLP()
    variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
    params = variables["params"]
    phases = train.Phases(
        SCHEDULE,
        lambda phase, previous: lf.freeze(optax.adam(1e-2), phase.spec, previous=previous),
        params=params,
    )
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=phases.tx())

    @jax.jit
    def step(state, batch):
        grads = jax.grad(
            lambda p: train.classification_loss(state.apply_fn({"params": p}, batch["image"]),
                                                batch)[0]
        )(state.params)  # fmt: skip
        return state.apply_gradients(grads=grads)

    txs = set()
    for t in range(9):
        _, state, _ = phases.update(t, state)
        txs.add(id(state.tx))
        state = step(state, BATCH)
    assert len(txs) == 3
    assert not np.array_equal(state.params["stem"]["kernel"], params["stem"]["kernel"])


def test_bad_input():
    with pytest.raises(TypeError, match=r"takes a layerfreeze.schedules.FreezeSchedule, got str"):
        train.Phases("gradual", lambda p, q: None, params={"w": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"Unknown freeze method 'half'"):
        _linen(MLP(), SCHEDULE, method="half")
    with pytest.raises(ValueError, match=r"steps_per_epoch must be >= 1"):
        _linen(MLP(), lf.schedules.gradual_unfreezing(["stem", "body", "head"]), steps_per_epoch=0)


SMALL = {g: {"w": jnp.ones(2)} for g in ("stem", "body", "head")}


def _build_tx(phase, previous):
    return lf.freeze(optax.adam(1e-2), phase.spec, previous=previous)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"build": optax.adam(1e-2)}, TypeError, r"build must be a function .*got an optax opt"),
        ({"build": "make_steps"}, TypeError, r"build must be a function .*got str 'make_steps'"),
        ({"params": "params"}, TypeError, r"params must be the parameter pytree .*got str"),
        ({"params": None}, TypeError, r"params must be the parameter pytree .*got NoneType"),
        ({"steps_per_epoch": 2.5}, TypeError, r"steps_per_epoch must be an integer, got float"),
        ({"steps_per_epoch": "10"}, TypeError, r"steps_per_epoch must be an integer, got str"),
        ({"prefix_groups": "stem"}, TypeError, r"prefix_groups must be a sequence .*got str"),
    ],
    ids=["optimizer", "string", "params-string", "params-none", "float", "string-count", "prefix"],
)
def test_construction_names_the_wrong_argument(kwargs, error, match):
    schedule = lf.schedules.gradual_unfreezing(["stem", "body", "head"])  # counts epochs
    args = {"build": _build_tx, "params": SMALL, "steps_per_epoch": 4, **kwargs}
    with pytest.raises(error, match=match):
        train.Phases(schedule, args.pop("build"), **args)


@pytest.mark.parametrize(
    ("step", "state", "error", "match"),
    [
        (2.5, "ok", TypeError, r"step must be an integer, got float 2.5"),
        ("3", "ok", TypeError, r"step must be an integer, got str '3'"),
        (3, None, TypeError, r"takes the train state.*got NoneType None, which has no params"),
        (3, {"params": SMALL}, TypeError, r"got dict .*which has no params, opt_state, replace"),
    ],
)
def test_update_names_a_wrong_step_or_state(step, state, error, match):
    phases = train.Phases(SCHEDULE, _build_tx, params=SMALL)
    if state == "ok":
        state = train_state.TrainState.create(apply_fn=None, params=SMALL, tx=phases.tx())
    with pytest.raises(error, match=match):
        phases.update(step, state)


def test_frozen_prefix_changes_are_reported_for_a_feature_cache():
    phases, variables = _linen(MLP(), SCHEDULE, prefix_groups=("stem", "body"))
    state = phases.init_state(variables, jax.random.key(1))
    assert phases.frozen_prefix() == "body"
    log = []
    _run(phases, state, 0, 7, log)
    assert [(c.prefix_before, c.prefix_after, c.prefix_changed) for c in log] == [
        ("body", "stem", True),
        ("stem", None, True),
    ]
    unprefixed, _ = _linen(MLP(), SCHEDULE)
    assert unprefixed.frozen_prefix() is None
