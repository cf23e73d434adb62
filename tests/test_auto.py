"""`layerfreeze.auto`: AutoFreeze decisions and FreezeOut schedules on small controlled models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerfreeze as lf
from layerfreeze import auto, train

GROUPS = ("stem", "body", "head")
PARAMS = {g: {"w": jnp.full((4,), 2.0)} for g in GROUPS}
BATCH = {"x": np.ones((2, 4), np.float32)}
SGD = optax.sgd(0.1)


def _loss(constant):
    """Groups in `constant` get a fixed gradient (norm never changes); the others a moving one."""

    def loss_fn(params, batch, rng):
        del rng
        total = 0.0
        for g in GROUPS:
            w = params[g]["w"]
            total += jnp.sum(w) if g in constant else jnp.sum(w**2 * batch["x"][0])
        return total

    return loss_fn


def _phases(policy, loss_fn):
    def build(phase, previous):
        return train.make_steps(
            None, optax.sgd(0.05), phase.spec, PARAMS, loss_fn=loss_fn,
            group_norms=GROUPS, previous=previous,
        )  # fmt: skip

    return train.Phases(policy.schedule, build, params=PARAMS)


def _run(policy, phases, state, start, stop, log=None):
    for step in range(start, stop):
        if policy.update(step):
            phases.extend(policy.schedule)
        steps, state, change = phases.update(step, state)
        if change is not None and log is not None:
            log.append(change)
        state, metrics = steps.train_step(state, BATCH)
        policy.observe(metrics)
    return state


def test_group_whose_gradients_stop_changing_freezes_and_leaves_the_backward_pass():
    policy = lf.auto.AutoFreeze(GROUPS, interval=2, percentile=50)
    phases = _phases(policy, _loss(constant={"stem"}))
    state = phases.init_state(PARAMS, jax.random.key(0))
    log = []
    state = _run(policy, phases, state, 0, 8, log)
    # Rates exist from the second interval on: decided at step 4.
    assert policy.decisions[0] == (4, ("stem",))
    assert policy.last_rates["body"] > 0 and "stem" not in policy.last_rates
    assert (log[0].step, log[0].phase.spec.describe()) == (4, "stem")
    assert phases.compilations == len(policy.schedule.phases)
    # Frozen from step 4 on: the stem did its last update at step 3.
    np.testing.assert_allclose(state.params["stem"]["w"], np.full(4, 2.0 - 4 * 0.05), rtol=1e-6)
    assert "head" not in policy.frozen


def test_a_group_behind_a_trainable_one_never_freezes_first():
    policy = lf.auto.AutoFreeze(GROUPS, interval=2, percentile=50)
    phases = _phases(policy, _loss(constant={"body"}))
    state = phases.init_state(PARAMS, jax.random.key(0))
    _run(policy, phases, state, 0, 12)
    assert policy.last_rates["body"] == 0.0 < policy.last_rates["stem"]
    assert policy.frozen == () and policy.decisions == ()


def test_controlled_norms_decide_front_to_back_and_never_the_head():
    policy = lf.auto.AutoFreeze(["a", "b", "c", "head"], interval=1, percentile=40, frozen=["a"])
    sequence = [
        {"b": 1.0, "c": 1.0, "head": 1.0},
        {"b": 1.0, "c": 2.0, "head": 3.0},  # rates b 0, c 1, head 2: threshold 0.8
        {"c": 2.0, "head": 2.0},  # c 0, head 1/3: threshold 0.13
        {"head": 2.0},
        {"head": 2.0},
    ]
    decided = []
    for step, norms in enumerate(sequence):
        decided.append(policy.update(step))
        policy.observe({auto.norm_metric(g): v for g, v in norms.items()})
    assert decided == [(), (), ("b",), ("c",), ()]
    assert policy.frozen == ("a", "b", "c") and policy.trainable == ("head",)
    assert policy.update(5) == ()  # one rate left: nothing to compare with
    assert policy.update(5) == ()  # asking twice decides nothing twice
    assert [p.spec.describe() for p in policy.schedule.phases] == ["a", "a,b", "a,b,c"]


def test_a_group_outside_the_candidates_stays_trainable_and_so_do_the_ones_after_it():
    policy = lf.auto.AutoFreeze(
        ["a", "b", "c", "head"], interval=1, percentile=90, candidates=["a"]
    )
    for step, scale in enumerate([1.0, 1.0, 1.0, 1.0]):
        policy.update(step)
        norms = {"a": scale, "b": scale, "c": scale * (step + 1), "head": 4.0 * (step + 1)}
        policy.observe({auto.norm_metric(g): v for g, v in norms.items() if g in policy.trainable})
    assert policy.frozen == ("a",)  # b's rate is 0 too, but b is not a candidate


def test_equal_rates_freeze_nothing():
    policy = lf.auto.AutoFreeze(GROUPS, interval=1, percentile=99)
    for step in range(5):
        assert policy.update(step) == ()
        policy.observe({auto.norm_metric(g): float(step + 1) for g in GROUPS})


def _json(metadata):
    return json.loads(json.dumps(metadata))


def test_resume_across_a_decision_is_bitwise_exact():
    loss_fn = _loss(constant={"stem"})
    straight = lf.auto.AutoFreeze(GROUPS, interval=2, percentile=50)
    phases = _phases(straight, loss_fn)
    want = _run(straight, phases, phases.init_state(PARAMS, jax.random.key(0)), 0, 9)

    first = lf.auto.AutoFreeze(GROUPS, interval=2, percentile=50)
    phases = _phases(first, loss_fn)
    state = _run(first, phases, phases.init_state(PARAMS, jax.random.key(0)), 0, 3)
    saved = _json({"auto": first.metadata(), **phases.metadata()})  # mid-interval
    arrays = jax.device_get(state.as_dict())

    resumed = lf.auto.AutoFreeze(GROUPS, interval=2, percentile=50)
    resumed.restore(saved["auto"])
    phases = _phases(resumed, loss_fn)
    phases.restore(saved)
    state = train.TrainState(**arrays)
    got = _run(resumed, phases, state, 3, 9)

    assert resumed.decisions == straight.decisions and straight.decisions
    assert resumed.metadata() == straight.metadata()
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def test_forecast_names_the_decision_to_come_and_changes_none():
    # Norms (stem, body, head) per step, interval 4: the second interval's first
    # half says the stem and the body settle; its second half moves the body.
    norms = [(1.0, 4.0, 9.0)] * 4 + [(1.0, 4.0, 5.0)] * 2 + [(1.0, 9.0, 5.0)] * 2
    asked, quiet = (lf.auto.AutoFreeze(GROUPS, interval=4, percentile=70) for _ in range(2))
    guesses, due = [], []
    for step, values in enumerate(norms):
        for policy in (asked, quiet):
            policy.update(step)
            policy.observe({f"grad_norm/{g}": v for g, v in zip(GROUPS, values, strict=True)})
        due.append(asked.forecast_due())
        candidate = asked.candidate_schedule()
        guesses.append(None if candidate is None else candidate.phases[-1].spec.describe())
        if step == 5:
            assert asked.forecast() == ("stem", "body")
    # A quarter and half of the way through each interval that ends in a decision.
    assert [s for s, d in enumerate(due) if d] == [4, 5]
    # No guess before the first decision, which has no rates to compare; then the
    # forecast, which follows the norms: at step 7 the whole interval is seen, and it
    # is the decision.
    assert guesses[:4] == [None] * 4
    assert guesses[4:] == ["stem,body"] * 3 + ["stem"]
    assert asked.update(8) == quiet.update(8) == ("stem",)
    # Forecasting fetched the norms early but left every sum and decision as it was.
    assert asked.metadata() == quiet.metadata()


def test_restore_under_other_settings_names_both():
    saved = _json(lf.auto.AutoFreeze(GROUPS, interval=2).metadata())
    with pytest.raises(
        lf.schedules.ResumeMismatchError, match=r"interval: checkpoint 2, this run 3"
    ):
        lf.auto.AutoFreeze(GROUPS, interval=3).restore(saved)
    with pytest.raises(
        lf.schedules.ResumeMismatchError, match=r"policy: checkpoint None, this run 'auto'"
    ):
        lf.auto.AutoFreeze(GROUPS, interval=2).restore({})


def test_observe_names_the_missing_metric_and_update_counts_steps():
    policy = lf.auto.AutoFreeze(GROUPS, interval=2)
    with pytest.raises(KeyError, match=r"no grad_norm/stem .*group_norms="):
        policy.observe({"loss": 1.0, "grad_norm/body": 1.0, "grad_norm/head": 1.0})
    policy.observe({auto.norm_metric(g): 1.0 for g in GROUPS})
    with pytest.raises(ValueError, match=r"got 1 observe\(\) calls, expected 2"):
        policy.update(2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"interval": 0}, ValueError, r"interval must be >= 1"),
        ({"interval": 1.5}, TypeError, r"interval must be an integer"),
        ({"interval": 2, "percentile": 0}, ValueError, r"percentile must be in \(0, 100\)"),
        ({"interval": 2, "percentile": 100}, ValueError, r"percentile must be in \(0, 100\)"),
        ({"interval": 2, "frozen": ["head"]}, ValueError, r"'head' \(the head\) cannot be frozen"),
        ({"interval": 2, "frozen": ["neck"]}, ValueError, r"valid: stem, body, head"),
        ({"interval": 2, "frozen": ["stem", "body"]}, ValueError, r"nothing left to freeze"),
        (
            {"interval": 2, "frozen": ["stem"], "candidates": ["stem", "body"]},
            ValueError,
            r"\['stem'\] are both frozen for the whole run and left to the policy",
        ),
        ({"interval": 2, "candidates": ["head"]}, ValueError, r"valid: stem, body \(every group"),
    ],
)
def test_autofreeze_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        lf.auto.AutoFreeze(GROUPS, **kwargs)


@pytest.mark.parametrize(
    ("groups", "kwargs", "error", "message"),
    [
        (None, {}, TypeError, r"AutoFreeze: groups must be a sequence .*got NoneType None"),
        ([1, 2], {}, TypeError, r"non-empty strings, got \[1, 2\] in AutoFreeze: groups"),
        (["stem", ""], {}, TypeError, r"non-empty strings, got \[''\]"),
        (GROUPS, {"frozen": None}, TypeError, r"AutoFreeze: frozen must be a sequence .*NoneType"),
        (GROUPS, {"candidates": [0]}, TypeError, r"non-empty strings, got \[0\] in AutoFreeze: c"),
        (GROUPS, {"train_bn": "no"}, TypeError, r"train_bn must be True or False, got str 'no'"),
    ],
    ids=["none", "ints", "empty-name", "frozen-none", "candidates-int", "train_bn-string"],
)
def test_autofreeze_names_wrong_types(groups, kwargs, error, message):
    with pytest.raises(error, match=message):
        lf.auto.AutoFreeze(groups, interval=2, **kwargs)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ([1.0, 2.0, 3.0], r"observe takes the train step's metrics, a mapping .*got list"),
        ({auto.norm_metric(g): "1.0" for g in GROUPS}, r"grad_norm/stem must be a number .*str"),
        ({auto.norm_metric(g): None for g in GROUPS}, r"grad_norm/stem must be a number .*None"),
    ],
    ids=["list", "string-value", "none-value"],
)
def test_observe_names_wrong_metrics(metrics, message):
    with pytest.raises(TypeError, match=message):
        lf.auto.AutoFreeze(GROUPS, interval=2).observe(metrics)


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        ("4", TypeError, r"update: step must be an integer, got str '4'"),
        (4.0, TypeError, r"update: step must be an integer, got float 4.0"),
        (-2, ValueError, r"update: step must be >= 0, got -2"),
    ],
)
def test_update_names_a_wrong_step(step, error, message):
    with pytest.raises(error, match=message):
        lf.auto.AutoFreeze(GROUPS, interval=2).update(step)


@pytest.mark.parametrize(
    ("scaling", "want"),
    [
        # t_i = 0.5 + 0.5 * (i / 4) ** p, i = 0..3; the head trains to the end.
        ("linear", {0: "none", 50: "a", 62: "a,b", 75: "a,b,c", 88: "a,b,c,d"}),
        ("cubic", {0: "none", 50: "a", 51: "a,b", 56: "a,b,c", 71: "a,b,c,d"}),
    ],
)
def test_freezeout_stop_times(scaling, want):
    schedule = lf.auto.freezeout(["a", "b", "c", "d", "head"], 100, t0=0.5, scaling=scaling)
    assert {p.start: p.spec.describe() for p in schedule.phases} == want
    assert schedule.unit == "step" and schedule.total == 100


def test_freezeout_keeps_a_fixed_freeze_and_merges_equal_stops():
    schedule = lf.auto.freezeout(["a", "b", "c", "head"], 4, t0=0.9, scaling="linear", frozen=["a"])
    # b stops at round(0.9 * 4) = 4 = the end: it never freezes.
    assert [(p.start, p.spec.describe()) for p in schedule.phases] == [(0, "a")]
    assert lf.auto.freezeout(["a", "head"], 10, t0=1.0).phases[0].spec.describe() == "none"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t0": 0.0}, r"t0 must be a number in \(0, 1\]"),
        ({"t0": 1.5}, r"t0 must be a number in \(0, 1\]"),
        ({"scaling": "cosine"}, r"unknown scaling 'cosine'; valid: linear, squared, cubic"),
    ],
)
def test_freezeout_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lf.auto.freezeout(GROUPS, 10, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scaling": ["cubic"]}, r"scaling must be one of the strings linear, .*got list"),
        ({"train_bn": "yes"}, r"freezeout: train_bn must be True or False, got str 'yes'"),
        ({"frozen": None}, r"freezeout: frozen must be a sequence .*NoneType"),
    ],
)
def test_freezeout_names_wrong_types(kwargs, message):
    with pytest.raises(TypeError, match=message):
        lf.auto.freezeout(GROUPS, 10, **kwargs)


def test_group_norms_are_the_norms_of_each_groups_trainable_gradients():
    loss_fn = _loss(constant=set())
    steps = train.make_steps(
        None, optax.sgd(0.1), "stem", PARAMS, loss_fn=loss_fn, group_norms=("body", "stem")
    )
    state = steps.init_state(PARAMS, jax.random.key(0))
    _, metrics = steps.train_step(state, BATCH)
    grads = jax.grad(loss_fn)(PARAMS, BATCH, None)
    assert float(metrics["grad_norm/body"]) == pytest.approx(
        float(jnp.linalg.norm(grads["body"]["w"])), rel=1e-6
    )
    assert float(metrics["grad_norm/stem"]) == 0.0  # frozen: no gradient taken
    assert "grad_norm/head" not in metrics


def test_group_norms_bad_groups():
    with pytest.raises(ValueError, match=r"'neck' is no parameter's path prefix; .* body, head"):
        train.make_steps(
            None, optax.sgd(0.1), "none", PARAMS, loss_fn=_loss(()), group_norms=["neck"]
        )
    with pytest.raises(TypeError, match=r"sequence of groups such as \('stem',\)"):
        train.make_steps(
            None, optax.sgd(0.1), "none", PARAMS, loss_fn=_loss(()), group_norms="stem"
        )


def test_extend_refuses_a_schedule_that_rewrites_the_past():
    policy = lf.auto.AutoFreeze(GROUPS, interval=2)
    phases = _phases(policy, _loss(()))
    with pytest.raises(ValueError, match=r"keeps every phase of the current one"):
        phases.extend(lf.schedules.explicit({0: "stem"}, unit="step"))


# Stacked (scanned) blocks: one group per block, `blocks[i]` ----------------------------

STACKED = {
    "stem": {"w": jnp.full((4,), 2.0)},
    "blocks": {"w": jnp.full((4, 3), 2.0), "b": jnp.full((4, 2), 2.0)},
    "head": {"w": jnp.full((4,), 2.0)},
}
BLOCK_GROUPS = ("stem", *(f"blocks[{i}]" for i in range(4)), "head")


def _stacked_loss(params, batch, rng):
    """Stem and blocks 0-1: fixed gradients; blocks 2-3 change fastest, then the head."""
    del batch, rng
    settled = jnp.sum(params["stem"]["w"])
    moving = jnp.sum(params["head"]["w"] ** 2)
    for leaf in params["blocks"].values():
        settled += jnp.sum(leaf[:2])
        moving += 3 * jnp.sum(leaf[2:] ** 2)
    return settled + moving


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ("blocks[4]", r"group_norms: Block selector 'blocks\[4\]' reaches outside .* depth 4"),
        ("stack[0]", r"'stack\[0\]' selects blocks of 'stack', which is no parameter's path"),
        ("blocks/*", r"'blocks/\*' is a glob; a group is a path prefix .* or a block selector"),
    ],
)
def test_group_norms_bad_block_groups(group, message):
    with pytest.raises(ValueError, match=message):
        train.make_steps(
            None, SGD, "none", STACKED, loss_fn=_stacked_loss, group_norms=["stem", group]
        )


def test_autofreeze_over_stacked_blocks_freezes_a_prefix_range_bit_identically():
    policy = lf.auto.AutoFreeze(BLOCK_GROUPS, interval=2, percentile=50)

    def build(phase, previous):
        return train.make_steps(
            None, optax.sgd(0.05), phase.spec, STACKED, loss_fn=_stacked_loss,
            group_norms=BLOCK_GROUPS, previous=previous,
        )  # fmt: skip

    phases = train.Phases(policy.schedule, build, params=STACKED)
    state = phases.init_state(STACKED, jax.random.key(0))
    _, first = phases.steps().train_step(phases.init_state(STACKED, jax.random.key(0)), BATCH)
    grads = jax.grad(_stacked_loss)(STACKED, None, None)["blocks"]
    for i in range(4):  # each block's norm: its slice of the stacked gradient
        want = jnp.sqrt(sum(jnp.sum(g[i] ** 2) for g in grads.values()))
        assert float(first[f"grad_norm/blocks[{i}]"]) == pytest.approx(float(want), rel=1e-6)

    state = _run(policy, phases, state, 0, 4)
    before = jax.device_get(state.params)
    state = _run(policy, phases, state, 4, 10)
    # The stem and blocks 0-1 froze at step 4, as one phase: a block range from the input.
    assert policy.decisions == ((4, ("stem", "blocks[0]", "blocks[1]")),)
    assert [p.spec.describe() for p in policy.schedule.phases] == ["none", "stem,blocks[:2]"]
    assert phases.compilations == 2
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(after["stem"]["w"], before["stem"]["w"])
    for name, leaf in after["blocks"].items():
        np.testing.assert_array_equal(leaf[:2], before["blocks"][name][:2])
        assert not np.any(leaf[2:] == before["blocks"][name][2:])
