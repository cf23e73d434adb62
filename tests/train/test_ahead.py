"""`train.Phases(..., compile_ahead=True)`: the phases to come compiled on a background thread.

A 3-layer MLP without a model (`make_steps(None, ..., loss_fn=...)`), so that
each program compiles in a fraction of a second. Compilations are counted
with `platform.CompileCounter` (JAX's monitoring events), never timed.
"""

import functools
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerfreeze as lf
from layerfreeze import train
from layerfreeze.train import _ahead, platform

GROUPS = ("stem", "body", "head")
PARAMS = {
    "stem": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)},
    "body": {"w": jnp.linspace(-0.5, 0.5, 16).reshape(4, 4)},
    "head": {"w": jnp.linspace(-1.0, 0.5, 8).reshape(4, 2)},
}
BATCH = {
    "x": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3),
    "y": np.linspace(0.0, 1.0, 8, dtype=np.float32).reshape(4, 2),
}
# Phase 0 trains the head, phase 1 (step 3) the body too, phase 2 (step 6) everything.
SCHEDULE = lf.schedules.gradual_unfreezing(GROUPS, every=3, unit="step")


def loss_fn(params, batch, rng):
    h = jnp.tanh(batch["x"] @ params["stem"]["w"])
    h = jnp.tanh(h @ params["body"]["w"])
    return jnp.mean((h @ params["head"]["w"] - batch["y"]) ** 2)


def _phases(schedule=SCHEDULE, loss_of=lambda phase: loss_fn, frozen_dtype=None, **kw):
    """`Phases` over the MLP; `loss_of(phase)` is the loss of a phase's steps."""

    def build(phase, previous):
        return train.make_steps(
            None,
            optax.adam(0.1),
            phase.spec,
            PARAMS,
            loss_fn=loss_of(phase),
            previous=previous,
            frozen_dtype=frozen_dtype,
        )

    return train.Phases(schedule, build, params=PARAMS, **kw)


def _run(phases, steps=9, policy=None, norms=None, params=PARAMS):
    """Trains `steps` steps; returns `(state, metrics of each step)` and `{change step:
    compile requests}`.

    Before each step the compiles queued ahead are waited for, so that the
    counter around the step sees only what the step itself compiles.
    """
    state = phases.init_state(params, jax.random.key(0))
    requests, history = {}, []
    for step in range(steps):
        phases.wait_ahead()
        with platform.CompileCounter() as counter:  # counts every thread: the worker is idle
            if policy is not None and policy.update(step):
                phases.extend(policy.schedule)  # a decision that is no guess compiles now
                phases.foresee(policy.candidate_schedule())
            steps_, state, change = phases.update(step, state)
            state, metrics = steps_.train_step(state, BATCH)
            jax.block_until_ready(metrics)
        history.append(metrics)
        if policy is not None:
            policy.observe({f"grad_norm/{g}": n for g, n in zip(GROUPS, norms[step], strict=True)})
            if policy.forecast_due():  # partway through an interval: guess from its norms
                phases.foresee(policy.candidate_schedule())
        if change is not None:
            requests[step] = counter.requests
    phases.close(wait=True)
    return (state, history), requests


@pytest.fixture(scope="module", params=[None, "bfloat16"], ids=["float32", "frozen-bfloat16"])
def both_runs(request):
    """The same 9 steps over two phase changes, compiled ahead and at each change.

    With `frozen_dtype`, each change also casts the params (the newly unfrozen
    group back up to float32): the state compiled ahead against is the cast one.
    """
    ahead = _run(_phases(compile_ahead=True, frozen_dtype=request.param))
    at_change = _run(_phases(frozen_dtype=request.param))
    return ahead, at_change


def test_a_program_compiled_ahead_steps_bitwise_like_one_compiled_at_the_change(both_runs):
    (ahead, _), (at_change, _) = both_runs  # each the final state and every step's metrics
    want, got = jax.tree.leaves(at_change), jax.tree.leaves(ahead)
    assert jax.tree.structure(ahead) == jax.tree.structure(at_change)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_foreseen_phase_change_compiles_nothing(both_runs):
    (_, ahead), (_, at_change) = both_runs
    assert ahead == {3: 0, 6: 0}
    assert all(n >= 1 for n in at_change.values()) and at_change.keys() == {3, 6}


def test_a_warm_up_that_fails_is_only_logged(caplog):
    def loss(phase):
        def refuses_zeros(params, batch, rng):
            def check(y):
                if y == 0.0:
                    raise Boom("a batch of zeros")

            jax.debug.callback(check, batch["y"].sum())
            return loss_fn(params, batch, rng)

        return refuses_zeros

    with caplog.at_level("INFO", logger="layerfreeze.train.phases"):
        (state, metrics), requests = _run(_phases(loss_of=loss, compile_ahead=True))
    assert "Not warming up a program of" in caplog.text and "a batch of zeros" in caplog.text
    assert requests == {3: 0, 6: 0}  # the programs compiled ahead still ran at the changes
    (want, want_metrics), _ = _run(_phases(loss_of=loss, compile_ahead=True, warm_up=False))
    got, want = jax.tree.leaves((state, metrics)), jax.tree.leaves((want, want_metrics))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_guess_foreseen_right_before_a_change_compiles_after_its_first_step():
    """`foresee` after an `extend`ed decision: the phase about to begin compiles at
    once, the guess after it only once the change's first step has run (so that
    the worker does not trace beside that step)."""
    traced = []  # the start of each phase whose loss was traced (compiled)

    def loss(phase):
        def noted(params, batch, rng):
            traced.append(phase.start)
            return loss_fn(params, batch, rng)

        return noted

    def schedule(text):
        return lf.schedules.parse_schedule(text, GROUPS, unit="step")

    phases = _phases(schedule("explicit:0=none"), loss_of=loss, compile_ahead=True)
    state = phases.init_state(PARAMS, jax.random.key(0))
    for step in range(3):
        steps, state, _ = phases.update(step, state)
        state, _ = steps.train_step(state, BATCH)
    phases.extend(schedule("explicit:0=none;3=stem"))  # decided: the change at step 3
    phases.foresee(schedule("explicit:0=none;3=stem;6=stem,body"))  # the next guess
    assert phases.wait_ahead(timeout=60)
    assert 3 in traced and 6 not in traced
    steps, state, change = phases.update(3, state)
    state, _ = steps.train_step(state, BATCH)
    assert change is not None and phases.wait_ahead(timeout=60)
    assert 6 in traced
    phases.close()


def test_an_earlier_guess_compiled_is_kept_for_the_decision():
    """Guesses come back (on the scanned ViT a decision took the guess made two
    before it): a guess replaced after its compiles ended stays compiled, and a
    decision adopting it compiles nothing."""

    def schedule(text):
        return lf.schedules.parse_schedule(text, GROUPS, unit="step")

    phases = _phases(schedule("explicit:0=none"), compile_ahead=True)
    state = phases.init_state(PARAMS, jax.random.key(0))
    for step in range(3):
        steps, state, _ = phases.update(step, state)
        state, _ = steps.train_step(state, BATCH)
        if step == 0:
            phases.foresee(schedule("explicit:0=none;6=stem"))  # the first guess
            assert phases.wait_ahead(timeout=60)
    phases.foresee(schedule("explicit:0=none;6=stem,body"))  # replaced by a second
    assert phases.wait_ahead(timeout=60)
    phases.extend(schedule("explicit:0=none;3=stem"))  # the decision: the first guess
    with platform.CompileCounter() as counter:
        steps, state, change = phases.update(3, state)
        state, metrics = steps.train_step(state, BATCH)
        jax.block_until_ready(metrics)
    assert change is not None and counter.requests == 0
    phases.close()


STACKED = {
    "stem": PARAMS["stem"],
    "blocks": {  # 3 stacked blocks
        "dense": {"w": jnp.linspace(-0.5, 0.5, 48).reshape(3, 4, 4), "b": jnp.zeros((3, 4))}
    },
    "head": PARAMS["head"],
}


def stacked_loss(params, batch, rng):
    h = jnp.tanh(batch["x"] @ params["stem"]["w"])
    for i in range(3):
        dense = params["blocks"]["dense"]
        h = jnp.tanh(h @ dense["w"][i] + dense["b"][i])
    return jnp.mean((h @ params["head"]["w"] - batch["y"]) ** 2)


def test_a_stacked_leafs_optimizer_state_is_carried_by_a_program_compiled_ahead():
    """Freezing a stacked leaf block by block (AutoFreeze over a scanned ViT) splits
    its state's block ranges: the rows carried over are sliced by one program
    compiled ahead, so the change compiles nothing and carries bitwise what eager
    slicing does."""
    schedule = lf.schedules.parse_schedule(
        "explicit:0=none;2=stem,blocks[0];4=stem,blocks[:2];6=stem,blocks[:3]",
        ("stem", "blocks[0]", "blocks[1]", "blocks[2]", "head"),
        unit="step",
    )  # fmt: skip

    def run(compile_ahead):
        def build(phase, previous):
            return train.make_steps(
                None, optax.adam(0.1), phase.spec, STACKED, loss_fn=stacked_loss,
                previous=previous,
            )  # fmt: skip

        phases = train.Phases(schedule, build, params=STACKED, compile_ahead=compile_ahead)
        return _run(phases, params=STACKED)

    ahead, requests = run(True)
    assert requests == {2: 0, 4: 0, 6: 0}
    at_change, _ = run(False)
    assert jax.tree.structure(ahead) == jax.tree.structure(at_change)
    for a, b in zip(jax.tree.leaves(ahead), jax.tree.leaves(at_change), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class Boom(Exception):
    pass


def _through_phase_0(phases):
    """Phase 0's three steps, then the compiles ahead waited for; the state at step 3."""
    state = phases.init_state(PARAMS, jax.random.key(0))
    for step in range(3):
        steps, state, _ = phases.update(step, state)
        state, _ = steps.train_step(state, BATCH)
    assert phases.wait_ahead(timeout=60)
    return state


@pytest.mark.parametrize("warm_up", [None, False], ids=["default", "off"])
def test_on_the_cpu_a_program_compiled_ahead_first_runs_on_zeros_before_its_phase(warm_up):
    """XLA's CPU runtime prepares an executable's kernels in its first run (2-5x a
    later run): by default on the CPU, `Phases` runs each train step compiled
    ahead once on zeros, so that its phase's first step is no first run."""
    seen = []  # (phase start, the batch's sum) of every run of a train step

    def loss(phase):
        def noted(params, batch, rng):
            jax.debug.callback(lambda y: seen.append((phase.start, float(y))), batch["y"].sum())
            return loss_fn(params, batch, rng)

        return noted

    phases = _phases(loss_of=loss, compile_ahead=True, warm_up=warm_up)
    _through_phase_0(phases)
    zeros = sorted(start for start, y in seen if y == 0.0)
    assert zeros == ([3, 6] if warm_up is None else [])
    assert sorted(start for start, y in seen if y != 0.0) == [0, 0, 0]  # BATCH's steps


def test_a_background_compile_failure_is_raised_at_the_change_with_its_error():
    def loss(phase):
        if phase.start != 3:
            return loss_fn

        def broken(params, batch, rng):
            raise Boom("the loss of phase 1 cannot be traced")

        return broken

    phases = _phases(loss_of=loss, compile_ahead=True)
    state = _through_phase_0(phases)  # phase 1 failed on the worker, and did not hang
    steps, state, change = phases.update(3, state)
    assert change is not None
    with pytest.raises(Boom, match="cannot be traced") as info:
        steps.train_step(state, BATCH)  # where compiling at the change raises it
    assert any("compiling phase 1 ahead" in note for note in info.value.__notes__)
    # The traceback is the background thread's: it reaches the loss that raised.
    assert any(entry.name == "broken" for entry in info.traceback)
    assert int(state.step) == 3  # the state was not donated to any program
    phases.close()


def test_a_compile_that_failed_for_other_arguments_is_not_raised():
    # Compiled ahead for the batch of phase 0, phase 1 takes another (say,
    # cached features): the failure was the guess's, and the step compiles.
    def loss(phase):
        if phase.start != 3:
            return loss_fn

        def needs_a_wider_batch(params, batch, rng):
            if batch["x"].shape[0] != 8:
                raise Boom("only batches of 8")
            return loss_fn(params, batch, rng)

        return needs_a_wider_batch

    phases = _phases(loss_of=loss, compile_ahead=True)
    state = _through_phase_0(phases)
    steps, state, _ = phases.update(3, state)
    wide = jax.tree.map(lambda x: np.concatenate([x, x]), BATCH)
    state, metrics = steps.train_step(state, wide)
    assert np.isfinite(float(metrics["loss"]))
    phases.close()


def test_a_change_does_not_wait_for_a_compile_still_queued():
    release = threading.Event()
    blocker = _ahead.submit((-1, 0), lambda: release.wait(60))  # the worker is busy
    try:
        phases = _phases(compile_ahead=True)
        state = phases.init_state(PARAMS, jax.random.key(0))
        for step in range(4):  # the change at 3 finds phase 1's compile still queued
            steps, state, change = phases.update(step, state)
            state, metrics = steps.train_step(state, BATCH)
        assert change is not None and np.isfinite(float(metrics["loss"]))
        phases.close()
    finally:
        release.set()
    assert _ahead.wait(blocker, timeout=60)


@pytest.mark.parametrize(
    ("percentile", "frozen_at_4", "guess_taken"),
    [(50, "stem", True), (70, "stem,body", False)],
    ids=["guess-taken", "guess-discarded"],
)
def test_autofreeze_next_candidate_is_compiled_ahead_and_used_only_if_chosen(
    percentile, frozen_at_4, guess_taken
):
    # Norms per step (stem, body, head). The guess after step 2 forecasts from
    # step 2's norms (rates 0, 0.25 or 0.5, 0.33): the stem alone. Step 3's make
    # the decision at step 4: the stem alone (50th percentile: the guess) or,
    # the body's rate falling to 0, the stem and the body (70th: not the guess).
    body = {50: (3.0, 3.0), 70: (2.0, 6.0)}[percentile]
    norms = [(1.0, 4.0, 9.0)] * 2 + [(1.0, b, 6.0) for b in body] + [(0.5, 3.0, 4.0)] * 2
    policy = lf.auto.AutoFreeze(GROUPS, interval=2, percentile=percentile)
    phases = train.Phases(
        policy.schedule,
        lambda phase, previous: train.make_steps(
            None, optax.adam(0.1), phase.spec, PARAMS, loss_fn=loss_fn, previous=previous
        ),
        params=PARAMS,
        compile_ahead=True,
    )
    phases.foresee(policy.candidate_schedule())
    _, requests = _run(phases, steps=5, policy=policy, norms=norms)
    assert phases.schedule.phases[-1].spec.describe() == frozen_at_4
    assert requests.keys() == {4}
    # The guess's program runs only for the phase it was compiled for.
    assert (requests[4] == 0) == guess_taken


def test_foresee_takes_only_a_schedule_that_keeps_the_current_phases():
    phases = _phases()
    other = lf.schedules.gradual_unfreezing(GROUPS, every=4, unit="step")
    with pytest.raises(ValueError, match="keeps every phase of the current one"):
        phases.foresee(other)
    with pytest.raises(TypeError, match="compile_ahead must be"):
        _phases(compile_ahead="yes")


def test_exit_during_a_background_compile_neither_hangs_nor_aborts(tmp_path):
    # XLA aborts the process if the interpreter exits under a compile on a daemon
    # thread; the worker's exit hook waits for the compile in flight instead.
    script = textwrap.dedent(
        """
        import threading
        import jax, jax.numpy as jnp, numpy as np, optax
        import layerfreeze as lf
        from layerfreeze import train

        compiling = threading.Event()  # set when the worker compiles a train step
        compile, count = jax.stages.Lowered.compile, []

        def signalled(self, *args, **kwargs):
            if threading.current_thread().name == "layerfreeze-compile-ahead":
                count.append(1)
                if len(count) == 2:  # the optimizer's init first, then the train step
                    compiling.set()
            return compile(self, *args, **kwargs)

        jax.stages.Lowered.compile = signalled

        params = {f"l{i}": {"w": jnp.eye(8)} for i in range(4)}

        def loss_fn(p, batch, rng):
            h = batch["x"]
            for _ in range(40):  # a program that takes a while to compile
                for name in sorted(p):
                    h = jnp.tanh(h @ p[name]["w"])
            return jnp.mean(h**2)

        schedule = lf.schedules.gradual_unfreezing(sorted(params), every=1, unit="step")
        phases = train.Phases(schedule, lambda phase, previous: train.make_steps(
            None, optax.sgd(0.1), phase.spec, params, loss_fn=loss_fn, previous=previous),
            params=params, compile_ahead=True)
        state = phases.init_state(params, jax.random.key(0))
        steps, state, _ = phases.update(0, state)
        state, _ = steps.train_step(state, {"x": np.ones((2, 8), np.float32)})
        assert compiling.wait(60)
        print("exiting while compiling, with compiles queued", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exiting while compiling" in done.stdout


def test_without_the_feature_cache_a_train_step_of_another_frozen_prefix_compiles_at_the_change():
    # Its batches would be the cached features after another prefix: shapes not seen yet.
    phases = _phases(compile_ahead=True, prefix_groups=GROUPS[:-1])
    _, requests = _run(phases, steps=4)
    assert requests.keys() == {3} and requests[3] >= 1


def _cached_run(compile_ahead):
    """A ResNet's 4 steps with cached features: on images, then (step 2) on the features
    after stage1; `{change step: compile requests}` and the final state."""
    from layerfreeze.models import GROUPS as RESNET_GROUPS
    from layerfreeze.models import resnet18
    from layerfreeze.train import data, features

    model = resnet18(10, stem="cifar", width=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    images = np.random.RandomState(0).randint(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    labels = np.arange(12, dtype=np.int32) % 10
    prefix_groups = RESNET_GROUPS[:-1]
    cache = features.FeatureCache(model, images, preprocess=data.normalize, batch_size=8)
    schedule = lf.schedules.explicit({0: "none", 2: "stem,stage1"}, unit="step")

    def build(phase, previous):
        prefix = features.frozen_prefix(variables["params"], phase.spec, prefix_groups)
        return train.make_steps(
            model, optax.adam(1e-2), phase.spec, variables["params"], previous=previous,
            start_after=prefix, preprocess=None if prefix else lambda rng, x: data.normalize(x),
        )  # fmt: skip

    phases = train.Phases(
        schedule, build, params=variables["params"], prefix_groups=prefix_groups,
        feature_cache=cache, compile_ahead=compile_ahead,
    )  # fmt: skip
    state = phases.init_state(variables, jax.random.key(0))
    requests = {}
    for step in range(4):
        phases.wait_ahead()
        with platform.CompileCounter() as counter:
            steps, state, change = phases.update(step, state)
            cache.update(
                phases.frozen_prefix(), {"params": state.params, "batch_stats": state.batch_stats}
            )
            idx = np.arange(4) + 4 * (step % 3)
            inputs = images[idx] if cache.features is None else cache.features[idx]
            state, _ = steps.train_step(state, {"image": inputs, "label": labels[idx]})
            jax.block_until_ready(state)
        if change is not None:
            requests[step] = counter.requests
    phases.close(wait=True)
    return requests, cache, state


def test_with_the_feature_cache_a_change_of_frozen_prefix_compiles_nothing():
    # At the change first: the features' program is kept per (model, prefix, ...).
    at_change, _, want = _cached_run(compile_ahead=False)
    ahead, cache, got = _cached_run(compile_ahead=True)
    # Compiled ahead: the features after stage1 and the train step on them.
    assert cache.prefix == "stage1" and cache.features.shape == (12, 16, 16, 4)
    assert ahead == {2: 0} and at_change[2] >= 2
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_compile_queued_by_a_first_step_starts_once_that_step_has_run():
    # A step of about a second, dispatched asynchronously: the job queued with its
    # outputs finds all of them computed (it waited on the smallest, the loss),
    # where a job queued at once would find the step still running.
    @jax.jit
    def step(x):
        y = jax.lax.fori_loop(0, 600, lambda i, y: jnp.tanh(y @ y), x)
        return {"state": y, "loss": jnp.sum(y)}

    x = jnp.full((256, 256), 0.01, jnp.float32)
    jax.block_until_ready(step(x))  # compiled
    out = step(x)
    seen = []
    future = _ahead.submit((0,), _ahead.after(out, lambda: seen.append(out["state"].is_ready())))
    assert _ahead.wait(future, timeout=60.0) and seen == [True]


@pytest.mark.parametrize("compile_ahead", [False, True])
def test_phases_evaluate_with_one_eval_step_compiled_once(compile_ahead):
    phases = _phases(compile_ahead=compile_ahead)
    state = phases.init_state(PARAMS, jax.random.key(0))
    requests = {}
    for step in range(9):
        steps, state, change = phases.update(step, state)
        state, _ = steps.train_step(state, BATCH)
        phases.wait_ahead()  # the counter sees the evaluation alone
        with platform.CompileCounter() as counter:
            jax.block_until_ready(steps.eval_step(state, BATCH))
        if change is not None:
            requests[step] = counter.requests
    assert requests == {3: 0, 6: 0}
    assert phases.steps(1).eval_step is phases.steps(2).eval_step
    phases.close(wait=True)


def test_a_change_leaves_its_eval_step_compiling_in_the_background():
    # A loss of its own per phase: each phase has an eval step of its own to compile.
    phases = _phases(compile_ahead=True, loss_of=lambda phase: functools.partial(loss_fn))
    state = phases.init_state(PARAMS, jax.random.key(0))
    steps, state, _ = phases.update(0, state)
    release = threading.Event()
    blocker = _ahead.submit((-1,), lambda: release.wait(60.0))  # the worker held
    try:
        state, _ = steps.train_step(state, BATCH)  # queues the later phases' compiles
        steps.eval_step(state, BATCH)
        for step in (1, 2):
            steps, state, _ = phases.update(step, state)
            state, _ = steps.train_step(state, BATCH)
        # Phase 1 begins with its compiles still queued: the train step's is dropped
        # (it compiles at its first call), the eval step's is kept.
        steps, state, change = phases.update(3, state)
        assert change.index == 1
    finally:
        release.set()
    assert _ahead.wait(blocker, timeout=60.0) and phases.wait_ahead(timeout=60.0)
    with platform.CompileCounter() as counter:
        jax.block_until_ready(steps.eval_step(state, BATCH))
    assert counter.requests == 0
    phases.close(wait=True)
