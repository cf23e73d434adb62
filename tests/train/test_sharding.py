"""Sharding rules, meshes with named axes, and sharded steps (`layerfreeze.train.sharding`).

The rules and their errors are checked in process on one device (an
`AbstractMesh` stands for larger meshes). Everything that needs several
devices runs in one subprocess on four CPU devices (`data`=2 x `fsdp`=2).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from devices import run_on_cpu_devices
from flax import nnx
from flax.training import train_state
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from stacked_net import Net

import layerfreeze as lf
from layerfreeze import train
from layerfreeze.train import sharding

# The model of the multi-device script too (which imports it the same way).
MODEL = "from stacked_net import Net\n"

RULES = [("head/kernel", P("fsdp")), (".*/bias", P()), (".*", sharding.fsdp(min_size=256))]
EXPECTED = {
    "bn/bias": P(),
    "bn/scale": P(),
    "head/bias": P(),
    "head/kernel": P("fsdp"),
    "stack/bias": P(),
    "stack/kernel": P(None, None, "fsdp"),
    "stem/bias": P(),
    "stem/kernel": P(None, "fsdp"),
}
MESH_2X2 = AbstractMesh((2, 2), ("data", "fsdp"))


@pytest.fixture(scope="module")
def params():
    return jax.eval_shape(
        lambda: Net().init(jax.random.key(0), jnp.zeros((2, 16)), train=False)["params"]
    )


def _name(key):
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(_name, p)): v for p, v in flat}


def test_rules_apply_in_order_first_full_match_wins(params):
    shardings = sharding.param_shardings(MESH_2X2, params, RULES)
    assert {k: s.spec for k, s in _by_path(shardings).items()} == EXPECTED
    # `kernel` alone matches no full path; `.*kernel` does.
    rules = [("kernel", P("fsdp")), (".*", P())]
    with pytest.raises(ValueError, match=r"rule\(s\) 'kernel' match no parameter"):
        sharding.param_shardings(MESH_2X2, params, rules)


def test_fsdp_splits_the_largest_divisible_dimension_above_min_size():
    mesh = AbstractMesh((4,), ("fsdp",))
    rule = sharding.fsdp(min_size=100)
    assert rule((12, 64, 64), mesh) == P(None, None, "fsdp")  # of equal dimensions, the last
    assert rule((64, 12), mesh) == P("fsdp")
    assert rule((30, 12), mesh) == P(None, "fsdp")  # 30 does not divide by 4
    assert rule((30, 10), mesh) == P()  # nothing divides: replicated
    assert rule((8, 8), mesh) == P()  # below min_size
    assert sharding.fsdp("model", min_size=1)((8,), AbstractMesh((2,), ("model",))) == P("model")


def test_without_strict_an_uncovered_leaf_is_replicated(params):
    shardings = sharding.param_shardings(MESH_2X2, params, [(".*kernel", P())], strict=False)
    assert all(s.spec == P() for s in jax.tree.leaves(shardings))


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        (
            [(".*", P("model"))],
            r"rule \('\.\*', P\('model',\)\) names mesh axis 'model', which the mesh lacks; "
            r"its axes: data=2, fsdp=2",
        ),
        (
            [(".*", sharding.fsdp("model"))],
            r"fsdp\(axis='model'\) names a mesh axis the mesh lacks; its axes: data=2, fsdp=2",
        ),
        (
            [("head/kernel", P(None, ("data", "fsdp"))), (".*", P())],
            r"rule 'head/kernel' gives leaf 'head/kernel' of shape \(64, 10\) "
            r"P\(None, \('data', 'fsdp'\)\): dimension 1 of size 10 does not divide over "
            r"data=2 x fsdp=2 \(4 shards\); valid: ",
        ),
        (
            [("stem/kernel", P(None, ("data", "fsdp"))), ("head/kernel", P()), (".*", P())],
            None,  # 64 divides over data x fsdp = 4: no error
        ),
        (
            [("stem/bias", P("fsdp", None)), (".*", P())],
            r"leaf 'stem/bias' of shape \(64,\) P\('fsdp', None\): 2 entries for 1 dimensions",
        ),
        (
            [(".*kernel", P("fsdp"))],
            r"No sharding rule covers bn/bias, bn/scale, head/bias, stack/bias, stem/bias; "
            r"rules: '\.\*kernel'. .*\('\.\*', P\(\)\) last",
        ),
        (
            [(".*", P()), ("head/.*", P())],
            r"rule\(s\) 'head/\.\*' match no parameter not taken by an earlier rule",
        ),
        ([(".*", P("data", "data"))], r"uses mesh axis 'data' more than once"),
        ([("(", P())], r"Sharding rule '\(' is no valid regex"),
        ({".*": P()}, r"a list of \(regex, rule\) pairs.*got dict"),
        ([(".*", "fsdp")], r"the rule for '\.\*' is str 'fsdp'"),
        ([(".*", lambda shape, mesh: "fsdp")], r"gives leaf .* str 'fsdp'; a rule function"),
    ],
)
def test_bad_rules_fail_naming_what_was_given_and_what_is_valid(params, rules, match):
    if match is None:
        sharding.param_shardings(MESH_2X2, params, rules)
        return
    error = TypeError if "pairs" in match or "str 'fsdp'" in match else ValueError
    with pytest.raises(error, match=match):
        sharding.param_shardings(MESH_2X2, params, rules)


@pytest.mark.parametrize(
    ("axes", "error", "match"),
    [
        ({"data": 2}, ValueError, r"sizes multiply to 2, but there are 1 devices; valid: "),
        ({"data": 2, "fsdp": -1}, ValueError, r"the other axes take 2 devices, which do not"),
        ({"data": -1, "fsdp": -1}, ValueError, r"only one axis may have size -1"),
        ({"data": 0}, ValueError, r"axis 'data' has size 0; sizes are >= 1, or -1"),
        ({"data": 1.0}, TypeError, r"axis 'data' has size float 1.0; sizes are integers"),
        ({1: 1}, TypeError, r"non-empty string names"),
    ],
)
def test_a_mesh_whose_size_does_not_match_the_devices_fails(axes, error, match):
    with pytest.raises(error, match=match):
        train.make_mesh(axes)


def test_make_mesh_keeps_its_one_axis_forms():
    for mesh in (
        train.make_mesh(),
        train.make_mesh(jax.devices()),
        train.make_mesh(devices=jax.devices()),
    ):
        assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    mesh = train.make_mesh({"data": 1, "fsdp": -1, "model": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "model": 1}
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.batch_sharding(train.make_mesh()).spec == P("data")
    with pytest.raises(ValueError, match=r"none of which splits the batch by default"):
        sharding.batch_sharding(train.make_mesh({"model": -1}))
    with pytest.raises(ValueError, match=r"names 'expert', which the mesh lacks; its axes: data"):
        train.shard_batch(mesh, {"x": np.zeros(4)}, batch_axes=("data", "expert"))


def test_opt_state_follows_the_params_and_frozen_leaves_hold_none(params):
    shardings = sharding.param_shardings(MESH_2X2, params, RULES)
    for method in ("zero", "lr0"):
        tx = lf.freeze(
            optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
            "stem,stack[:1]",
            method=method,
        )
        opt = _by_path(sharding.opt_state_shardings(tx, params, shardings))
        mu = {k.split("/mu/", 1)[1]: s.spec for k, s in opt.items() if "/mu/" in k}
        if method == "zero":  # the frozen stem and block 0 hold no state
            assert not any(k.startswith("stem/") or "blocks[0:1]" in k for k in mu), mu
        assert mu["head/kernel"] == P("fsdp")
        assert mu["stack/kernel/blocks[1:2]"] == P(None, None, "fsdp")
        assert mu["stem/bias" if method == "lr0" else "bn/scale"] == P()
        counts = [s.spec for k, s in opt.items() if k.endswith("count")]
        assert counts and all(spec == P() for spec in counts)


def test_a_block_range_that_cannot_split_like_its_stack_moves_the_split():
    params = {"enc": {"w": jnp.zeros((8, 4, 6)), "b": jnp.zeros((8, 4))}}
    mesh = AbstractMesh((4,), ("fsdp",))
    shardings = sharding.param_shardings(mesh, params, [(".*", sharding.fsdp(min_size=1))])
    assert shardings["enc"]["w"].spec == P("fsdp")  # 8 blocks split over 4
    tx = lf.freeze(optax.adam(1e-3), "enc[:3]")
    opt = _by_path(sharding.opt_state_shardings(tx, params, shardings))
    # Blocks 3-8 (5 of them) do not divide over 4: the split moves to dimension 1.
    (spec,) = [s.spec for k, s in opt.items() if k.endswith("/mu/enc/w/blocks[3:8]")]
    assert spec == P(None, "fsdp")


def test_make_steps_with_rules_on_an_nnx_model():
    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(16, 64, rngs=rngs)
            self.bn = nnx.BatchNorm(64, rngs=rngs)
            self.head = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.bn(self.stem(x))))

    model = Mlp(nnx.Rngs(0))
    mesh = train.make_mesh({"data": 1, "fsdp": -1})
    rules = [(".*/bias", P()), (".*", sharding.fsdp(min_size=256))]
    steps = train.make_steps(
        model, optax.adam(1e-2), "stem", inputs="x", mesh=mesh, sharding_rules=rules
    )
    state = steps.init_state(model, jax.random.key(0))
    r = np.random.RandomState(0)
    batch = train.shard_batch(
        mesh, {"x": r.randn(4, 16).astype(np.float32), "label": np.arange(4, dtype=np.int32)}
    )
    before = np.asarray(state.params["stem"]["kernel"][...])
    state, metrics = steps.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    specs = {k: v.sharding.spec for k, v in _by_path(state.params).items()}
    assert specs["stem/kernel/value"] == P(None, "fsdp") and specs["head/kernel/value"] == P("fsdp")
    np.testing.assert_array_equal(state.params["stem"]["kernel"][...], before)
    assert float(steps.eval_step(state, batch)["count"]) == 4


def test_phases_with_a_bare_optimizer_place_its_state_by_the_rules(params):
    mesh = train.make_mesh({"data": 1, "fsdp": -1})
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    schedule = lf.schedules.explicit({0: "stem,stack[:1]", 1: "stem"}, unit="step")
    phases = train.Phases(
        schedule,
        lambda phase, previous: lf.freeze(optax.adam(1e-3), phase.spec, previous=previous),
        params=params,
        mesh=mesh,
        sharding_rules=RULES,
    )
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=phases.tx())
    _, state, change = phases.update(1, state)
    assert change is not None
    mu = {
        k.split("/mu/", 1)[1]: v.sharding.spec
        for k, v in _by_path(state.opt_state).items()
        if "/mu/" in k
    }
    assert mu["stack/kernel/blocks[0:1]"] == P(None, None, "fsdp")
    assert mu["head/kernel"] == P("fsdp")
    with pytest.raises(ValueError, match=r"sharding_rules need the mesh they shard over"):
        train.Phases(schedule, lambda phase, previous: None, params=params, sharding_rules=RULES)


def test_make_steps_refuses_rules_without_a_mesh_or_with_unknown_axes():
    params = {"w": jnp.ones((4, 4))}
    loss = lambda p, b, rng: jnp.sum(p["w"])
    with pytest.raises(ValueError, match=r"sharding_rules needs a mesh to shard over"):
        train.make_steps(
            None, optax.sgd(0.1), "none", params, loss_fn=loss, sharding_rules=[(".*", P())]
        )
    with pytest.raises(
        ValueError, match=r"names mesh axis 'fsdp', which the mesh lacks; its axes: data=1"
    ):
        train.make_steps(
            None,
            optax.sgd(0.1),
            "none",
            params,
            loss_fn=loss,
            mesh=train.make_mesh(),
            sharding_rules=[(".*", P("fsdp"))],
        )
    with pytest.raises(TypeError, match=r"option mesh must be a jax.sharding.Mesh"):
        train.make_steps(None, optax.sgd(0.1), "none", params, loss_fn=loss, mesh="data")


_SHARDED = MODEL + textwrap.dedent(
    """
    import functools, json, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    import layerfreeze as lf
    from layerfreeze import schedules, train
    from layerfreeze.train import platform, sharding

    SPEC = "stem,stack[:1]"
    RULES = [("head/kernel", P("fsdp")), (".*/bias", P()), (".*", sharding.fsdp(min_size=256))]
    model = Net()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16)), train=False)
    params = variables["params"]
    r = np.random.RandomState(0)
    batches = [{"x": r.randn(8, 16).astype(np.float32),
                "label": r.randint(0, 10, 8).astype(np.int32)} for _ in range(4)]
    mesh = train.make_mesh({"data": 2, "fsdp": 2})
    out = {"devices": jax.device_count(), "seconds": {}}
    runs = {}  # (check, "one" | "sharded") -> (losses, final params)
    clock = [time.perf_counter()]

    def lap(what):
        clock.append(time.perf_counter())
        out["seconds"][what] = round(clock[-1] - clock[-2], 2)

    def key_name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    def specs(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(map(key_name, p)): str(x.sharding.spec) for p, x in flat}

    def place(b, m):
        return b if m is None else train.shard_batch(m, b)

    def shards(spec):  # how many pieces a spec cuts a leaf into on the mesh
        axes = [a for e in spec for a in ((e,) if isinstance(e, str) else e or ())]
        return int(np.prod([mesh.shape[a] for a in axes]))

    def same(sharding, x):
        return sharding.is_equivalent_to(x.sharding, x.ndim)

    # (a-d, f) make_steps through Phases: one device against data=2 x fsdp=2 with the
    # rules. Block 0 of the stack unfreezes at step 2 (a new cohort of optimizer state).
    schedule = schedules.explicit({0: SPEC, 2: "stem"}, unit="step")
    for name, m, rules in [("one", None, None), ("sharded", mesh, RULES)]:
        phases = train.Phases(schedule, lambda phase, previous: train.make_steps(
            model, optax.adam(1e-2), phase.spec, params, inputs="x", previous=previous,
            mesh=m, sharding_rules=rules), params=params)
        state = phases.init_state(variables, jax.random.key(1))
        losses = []
        for i, b in enumerate(batches):
            b = place(b, m)
            if i == 0:
                steps = phases.steps()
                compiled = steps.train_step.lower(state, b).compile()
                memory = compiled.memory_analysis()
                out[name + "_argument_bytes"] = memory.argument_size_in_bytes
                out[name + "_alias_bytes"] = memory.alias_size_in_bytes
                out[name + "_state_bytes"] = sum(
                    x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
                if m is not None:
                    out["expected_state_bytes"] = sum(
                        x.nbytes // shards(x.sharding.spec) for x in jax.tree.leaves(state))
            if i == 0 and m is not None:
                out["init_opt_specs"] = specs(state.opt_state)
                (state_in, batch_in), _ = compiled.input_shardings
                state_out, _ = compiled.output_shardings
                out["compiled_matches"] = [
                    same(a, x) and same(b, x)
                    for a, b, x in zip(jax.tree.leaves(state_in), jax.tree.leaves(state_out),
                                       jax.tree.leaves(state), strict=True)
                ]
                out["batch_specs"] = [str(s.spec) for s in jax.tree.leaves(batch_in)]
            if i == 2:  # the end of phase 0
                out[name + "_frozen_equal"] = bool(
                    np.array_equal(state.params["stem"]["kernel"], params["stem"]["kernel"])
                    and np.array_equal(state.params["stack"]["kernel"][:1],
                                       params["stack"]["kernel"][:1]))
                if m is not None:
                    out["param_specs"] = specs(state.params)
                    out["opt_specs"] = specs(state.opt_state)
                    out["stem_shard_shape"] = list(
                        state.params["stem"]["kernel"].addressable_shards[0].data.shape)
            steps, state, change = phases.update(i, state)
            if change and m is not None:
                out["phase_opt_specs"] = specs(state.opt_state)
                want = jax.tree.leaves(steps.shardings.opt_state)
                out["phase_opt_matches"] = [x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                                            zip(jax.tree.leaves(state.opt_state), want)]
            state, metrics = steps.train_step(state, b)
            losses.append(float(metrics["loss"]))
        runs["steps", name] = losses, state.params
        out[name + "_stem_equal"] = bool(
            np.array_equal(state.params["stem"]["kernel"], params["stem"]["kernel"]))
        lap("make_steps and Phases " + name)

    # (e) a loop of one's own: lf.freeze + lf.value_and_grad under jax.jit.
    tx = lf.freeze(optax.adam(1e-2), SPEC)
    p_sh = sharding.param_shardings(mesh, params, RULES)
    o_sh = sharding.opt_state_shardings(tx, params, p_sh)

    def loss_fn(p, batch):
        logits = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                             batch["x"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def step(p, o, batch, grad_shardings=None):
        loss, grads = lf.value_and_grad(loss_fn, SPEC)(p, batch)
        if grad_shardings is not None:  # as the params: reduce-scattered, never whole
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss, grads

    for name, m in [("one", None), ("sharded", mesh)]:
        p = jax.tree.map(jnp.copy, params)  # the sharded step donates it
        if m is None:
            jitted, o = jax.jit(step), tx.init(p)
        else:
            jitted = jax.jit(functools.partial(step, grad_shardings=p_sh),
                             in_shardings=(p_sh, o_sh, sharding.batch_sharding(mesh)),
                             out_shardings=(p_sh, o_sh, None, None), donate_argnums=(0, 1))
            p = jax.device_put(p, p_sh)
            o = jax.jit(tx.init, out_shardings=o_sh)(p)
        losses = []
        for b in batches[:2]:
            p, o, loss, grads = jitted(p, o, place(b, m))
            losses.append(float(loss))
        runs["own", name] = losses, p
        if m is not None:
            out["own_grad_specs"] = specs(grads)
            out["own_opt_specs"] = specs(o)
    lap("own step")

    for check in ("steps", "own"):
        (one_losses, one), (losses, sharded) = runs[check, "one"], runs[check, "sharded"]
        out[check + "_losses"] = [one_losses, losses]
        # The largest parameter difference in units of rtol=1e-5, atol=1e-6 (<= 1: close).
        out[check + "_param_error"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1e-6 + 1e-5 * np.abs(b))))
            for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one), strict=True))

    # (g) frozen_dtype with the rules: each cast leaf keeps its sharding, at init and
    # at a phase change (stem unfrozen, head frozen); the summary counts each device's
    # shards. Then the same compiled ahead: the casts, the fresh optimizer state and
    # the step, for the state in the shardings update places it in.
    schedule = schedules.explicit({0: SPEC, 1: "stack[:1],head"}, unit="step")
    dtypes = lambda tree: {k: str(x.dtype) for k, x in
                           zip(specs(tree), jax.tree.leaves(tree), strict=True)}
    bits = lambda tree: [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]
    first, second = place(batches[1], mesh), place(batches[0], mesh)
    built = {}  # phase 0's steps, shared: compiled once for both runs

    def build(phase, previous):
        steps = built.get(phase.start) or train.make_steps(
            model, optax.adam(1e-2), phase.spec, params, inputs="x", previous=previous,
            mesh=mesh, sharding_rules=RULES, frozen_dtype="bfloat16")
        if phase.start == 0:
            built[0] = steps
        return steps

    for ahead in (False, True):
        phases = train.Phases(schedule, build, params=params, compile_ahead=ahead)
        state = phases.init_state(variables, jax.random.key(1))
        init = specs(state.params), dtypes(state.params)
        steps, state, _ = phases.update(0, state)
        state, _ = steps.train_step(state, first)
        phases.wait_ahead()
        with platform.CompileCounter() as counter:
            steps, state, change = phases.update(1, state)
            phase = specs(state.params), dtypes(state.params), specs(state.opt_state)
            head = np.array(state.params["head"]["kernel"])
            state, metrics = steps.train_step(state, second)
            jax.block_until_ready(metrics)
        phases.close()
        if ahead:
            out["bf16_ahead_requests"] = counter.requests
            out["bf16_ahead_same"] = (phase, bits(state)) == plain
            continue
        plain = phase, bits(state)
        out["bf16_init_specs"], out["bf16_init_dtypes"] = init
        out["bf16_phase_specs"], out["bf16_phase_dtypes"], _ = phase
        out["bf16_head_equal"] = bool(np.array_equal(
            np.asarray(state.params["head"]["kernel"]).view(np.uint16), head.view(np.uint16)))
        out["bf16_loss"] = float(metrics["loss"])
    summary = lf.summary(state.params, steps.plan, state.opt_state)
    out["per_device"] = summary.as_dict()["bytes_per_device"]
    held = {}
    for name in ("params", "opt_state"):
        for x in jax.tree.leaves(getattr(state, name)):
            for shard in x.addressable_shards:
                key = f"cpu:{shard.device.id}"
                held.setdefault(key, {"params": 0, "opt_state": 0})
                held[key][name] += shard.data.nbytes
    out["per_device_shards"] = held
    out["summary_lines"] = str(summary).splitlines()[-2:]
    lap("frozen_dtype")
    print(json.dumps(out))
    """
)


def test_sharded_state_on_four_cpu_devices():
    """One subprocess (data=2 x fsdp=2) checks everything that needs several devices."""
    out = run_on_cpu_devices(_SHARDED)

    # Parameters and optimizer state follow the rules, as init_state made them.
    assert out["param_specs"] == {k: str(v) for k, v in EXPECTED.items()}
    assert out["stem_shard_shape"] == [16, 32]
    opt = out["opt_specs"]
    assert opt == out["init_opt_specs"]
    mu = {k.split("/mu/", 1)[1]: v for k, v in opt.items() if "/mu/" in k}
    assert mu["head/kernel"] == "P('fsdp',)"
    assert mu["stack/kernel/blocks[1:2]"] == "P(None, None, 'fsdp')"
    # Frozen leaves (the stem, block 0 of the stack) hold no optimizer state.
    assert not any(k.startswith("stem/") or "blocks[0:1]" in k for k in mu), sorted(mu)
    assert all(v == "P()" for k, v in opt.items() if k.endswith("count"))

    # Four steps over two phases give one device's losses and parameters; frozen
    # leaves stay bit-identical.
    np.testing.assert_allclose(*reversed(out["steps_losses"]), rtol=1e-5)
    assert out["steps_param_error"] <= 1
    assert out["one_frozen_equal"] and out["sharded_frozen_equal"]
    assert out["one_stem_equal"] and out["sharded_stem_equal"]

    # The compiled program takes and gives every state leaf in its sharding, so each
    # device's arguments are its shards (plus a quarter of the batch), and the
    # donated state is reused in place: no replicated copy of a sharded leaf.
    assert out["compiled_matches"] and all(out["compiled_matches"])
    assert out["batch_specs"] == ["P(('data', 'fsdp'),)"] * 2
    batch_bytes = 8 * 16 * 4 + 8 * 4
    assert out["sharded_state_bytes"] == out["expected_state_bytes"]  # bytes / shards, per leaf
    assert out["sharded_argument_bytes"] == out["sharded_state_bytes"] + batch_bytes // 4
    assert out["one_argument_bytes"] == out["one_state_bytes"] + batch_bytes
    assert out["sharded_argument_bytes"] < 0.6 * out["one_argument_bytes"]  # fsdp=2
    assert out["sharded_alias_bytes"] == out["sharded_state_bytes"]

    # A phase change: newly unfrozen block 0 of the stack gets state (and its own
    # step count) in its sharding; the whole state is in the new phase's shardings.
    phase = {k.split("/mu/", 1)[1]: v for k, v in out["phase_opt_specs"].items() if "/mu/" in k}
    assert phase["stack/kernel/blocks[0:1]"] == "P(None, None, 'fsdp')"
    assert phase["stack/kernel/blocks[1:2]"] == "P(None, None, 'fsdp')"
    assert any("counts/since_1" in k for k in out["phase_opt_specs"])
    assert out["phase_opt_matches"] and all(out["phase_opt_matches"])

    # A loop of one's own with lf.freeze and lf.value_and_grad under jax.jit.
    np.testing.assert_allclose(*reversed(out["own_losses"]), rtol=1e-5)
    assert out["own_param_error"] <= 1
    assert out["own_grad_specs"] == {k: str(v) for k, v in EXPECTED.items()}
    assert out["own_opt_specs"] == out["opt_specs"]

    # frozen_dtype: the frozen stem in bfloat16 (the stack, frozen in part, stays
    # float32), each leaf in its rules' sharding; at the phase change the stem comes
    # back up and the head goes down, both keeping their shardings.
    expected = {k: str(v) for k, v in EXPECTED.items()}
    assert out["bf16_init_specs"] == expected and out["bf16_phase_specs"] == expected
    bf16 = {k for k, v in out["bf16_init_dtypes"].items() if v == "bfloat16"}
    assert bf16 == {"stem/kernel", "stem/bias"}, out["bf16_init_dtypes"]
    bf16 = {k for k, v in out["bf16_phase_dtypes"].items() if v == "bfloat16"}
    assert bf16 == {"head/kernel", "head/bias"}, out["bf16_phase_dtypes"]
    assert out["bf16_head_equal"] and np.isfinite(out["bf16_loss"])
    # Compiled ahead, the change compiles nothing and trains the same bits.
    assert out["bf16_ahead_requests"] == 0 and out["bf16_ahead_same"]
    # The summary's bytes per device are each device's shards.
    assert out["per_device"] == out["per_device_shards"]
    assert out["summary_lines"][0].startswith("bytes by dtype: float32 ")
    assert out["summary_lines"][1].startswith("bytes per device (4 devices")
