"""Freezing some blocks of stacked (scanned) leaves: block selectors such as `enc[:2]`.

The scanned ViT is checked against the unrolled one with the same weights and the
same blocks frozen; a BERT-style encoder pytree (`encoder/layer_{i}`, and stacked
`encoder/layer`) against plain JAX.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerfreeze as lf
from layerfreeze import _paths, _transfer, train
from layerfreeze.models import ViT, stack_blocks, unstack_blocks, vit_groups
from layerfreeze.train import _ahead, checkpoint

DEPTH = 4
EMB = "embedding,pos_embedding,cls"
R = np.random.RandomState(0)
BATCH = {
    "image": R.randn(8, 8, 8, 3).astype(np.float32),
    "label": R.randint(0, 5, 8).astype(np.int32),
}


def _vit(scan, **kw):
    return ViT(
        num_classes=5, patch_size=4, width=16, depth=DEPTH, mlp_dim=32, num_heads=2,
        scan=scan, head_zeroinit=False, **kw,
    )  # fmt: skip


@functools.cache
def _unrolled_params():
    return _vit(False).init(jax.random.key(0), BATCH["image"][:1])["params"]


def _params(scan):
    params = _unrolled_params()
    return stack_blocks(params) if scan else params


def _unrolled_spec(frozen_blocks, extra=EMB):
    return ",".join([extra, *(f"Transformer/encoderblock_{i}" for i in frozen_blocks)])


def _optimizer():
    return optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2, weight_decay=0.1))


def _train(scan, spec, steps=4, optimizer=None, **kw):
    model = _vit(scan, **kw)
    params = _params(scan)
    made = train.make_steps(model, optimizer or _optimizer(), spec, params, grad_norm=True)
    state = made.init_state({"params": params}, jax.random.key(1))
    metrics = []
    for _ in range(steps):
        state, m = made.train_step(state, BATCH)
        metrics.append(jax.device_get(m))
    return state, metrics, made


def _flat(tree):
    return dict(zip(_paths.leaf_paths(tree), map(np.asarray, jax.tree.leaves(tree)), strict=True))


# The spec ----------------------------------------------------------------------------


STACK = {
    "emb": np.zeros(3),
    "enc": {"k": np.zeros((4, 3, 2)), "b": np.zeros((4, 2))},
    "head": np.zeros((3, 2)),
}


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("enc[:2]", (True, True, False, False)),
        ("enc[1:3]", (False, True, True, False)),
        ("enc[2]", (False, False, True, False)),
        ("enc[-1]", (False, False, False, True)),
        ("enc[-2:]", (False, False, True, True)),
        ("all-but:enc[-1],head", (True, True, True, False)),
        ("enc[ 1 : ]", (False, True, True, True)),
    ],
)
def test_block_selectors_resolve_block_by_block(text, rows):
    resolved = lf.FreezeSpec.parse(text).resolve_blocks(STACK)
    assert resolved["enc/k"] == resolved["enc/b"] == rows
    # A partly frozen leaf is trainable for per-leaf answers.
    assert lf.FreezeSpec.parse(text).resolve(STACK)["enc/k"] is False


def test_first_match_wins_per_block_and_whole_selections_are_one_bool():
    spec = lf.FreezeSpec((("enc[1]", "trainable"), "enc[:3]"))
    assert spec.resolve_blocks(STACK)["enc/k"] == (True, False, True, False)
    assert lf.FreezeSpec.parse("enc[:]").resolve_blocks(STACK)["enc/k"] is True
    # A deeper path after the selector picks those leaves only.
    assert lf.FreezeSpec.parse("enc[:2]/k").resolve_blocks(STACK)["enc/b"] is False
    # Globs with character classes are still globs.
    assert lf.FreezeSpec.parse("e[m]b").rules[0].kind == "glob"
    assert lf.FreezeSpec.parse("enc[:2],head").describe() == "enc[:2],head"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("enc[:5]", r"reaches outside the stack 'enc' of depth 4 \(blocks 0..3\).*\[i\]"),
        ("enc[4]", r"outside the stack 'enc' of depth 4"),
        ("enc[-5:]", r"outside the stack 'enc' of depth 4"),
        ("enc[2:2]", r"selects no block of the stack 'enc' of depth 4.*\[start:stop\]"),
        ("enc[3:1]", r"selects no block"),
        ("enc[]", r"empty or malformed block selector.*valid block selectors"),
        ("enc[1:2:3]", r"empty or malformed block selector"),
        ("head[:1]", r"'head' is a single leaf, not a stack"),
        ("emb[0]", r"'emb' is a single leaf, not a stack"),
        ("enc[:2]/x", r"matches no parameter"),
    ],
)
def test_bad_block_selectors_name_the_depth_and_the_valid_forms(text, message):
    with pytest.raises(ValueError, match=message):
        lf.FreezeSpec.parse(text).resolve_blocks(STACK)


def test_selector_on_a_tree_that_is_not_a_stack():
    with pytest.raises(ValueError, match=r"not a stack of blocks; the leading axes .* differ"):
        lf.FreezeSpec.parse("Transformer/encoderblock_0[:1]").resolve(_params(False))


def test_per_leaf_masks_refuse_partly_frozen_leaves():
    with pytest.raises(ValueError, match=r"some blocks of the stacked leaves.*layerfreeze.freeze"):
        lf.frozen_mask(STACK, "enc[:2]")
    with pytest.raises(ValueError, match="need the leaves' shapes"):
        lf.FreezeSpec.parse("enc[:2]").resolve_paths(["enc/k"])
    assert lf.frozen_mask(STACK, "enc[:]")["enc"]["k"] is True


# Scanned against unrolled --------------------------------------------------------------


def test_scanned_and_unrolled_train_alike_and_frozen_blocks_stay_bit_identical():
    scanned, m_scan, made = _train(True, EMB + ",Transformer/encoderblock[:2]")
    unrolled, m_unroll, _ = _train(False, _unrolled_spec([0, 1]))
    assert made.trainable_params == sum(
        x.size for p, x in _flat(_params(False)).items() if "encoderblock_2" in p
        or "encoderblock_3" in p or p.startswith(("head", "Transformer/encoder_norm"))
    )  # fmt: skip
    before = _flat(_params(True))
    after = _flat(scanned.params)
    for path, value in after.items():
        if path.startswith("Transformer/encoderblock/"):
            np.testing.assert_array_equal(value[:2], before[path][:2], err_msg=path)
            assert np.any(value[2:] != before[path][2:]), path
        elif path.split("/")[0] in EMB.split(","):
            np.testing.assert_array_equal(value, before[path], err_msg=path)
        else:
            assert np.any(value != before[path]), path
    want = _flat(stack_blocks(jax.device_get(unrolled.params)))
    for path, value in after.items():
        if path.endswith("key/bias"):
            # Softmax ignores a shift of every key: this gradient is rounding noise,
            # which Adam scales up to full steps. Only its frozen blocks can agree.
            np.testing.assert_array_equal(value[:2], want[path][:2])
            continue
        np.testing.assert_allclose(value, want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    for a, b in zip(m_scan, m_unroll, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    # The blocks the frozen run did not touch: no optimizer state at all.
    summary = lf.summary(scanned.params, made.spec, scanned.opt_state, groups=vit_groups(
        DEPTH, scan=True))  # fmt: skip
    rows = {g.name: g for g in summary.groups}
    assert rows["Transformer/encoderblock[0]"].opt_state_bytes == 0
    assert rows["Transformer/encoderblock[3]"].opt_state_bytes == 2 * rows[
        "Transformer/encoderblock[3]"].bytes  # fmt: skip
    assert rows["Transformer/encoderblock[1]"].status == "frozen"
    assert rows["Transformer/encoderblock[2]"].status == "trainable"


def test_gradients_and_clipping_norm_see_only_the_trainable_blocks():
    def loss(params, model):
        logits = model.apply({"params": params}, BATCH["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, BATCH["label"]).mean()

    spec = "Transformer/encoderblock[1:3]"
    scanned = jax.jit(lf.value_and_grad(functools.partial(loss, model=_vit(True)), spec))
    _, grads = scanned(_params(True))
    _, full = jax.jit(jax.value_and_grad(functools.partial(loss, model=_vit(False))))(
        _params(False)
    )
    for path, value in _flat(grads).items():
        if path.startswith("Transformer/encoderblock/"):
            assert not np.any(value[1:3]), path
            assert np.any(value[[0, 3]]), path
    trainable = {k: v for k, v in full.items() if k != "Transformer"}
    trainable["Transformer"] = {
        k: v
        for k, v in full["Transformer"].items()
        if k not in ("encoderblock_1", "encoderblock_2")
    }
    np.testing.assert_allclose(optax.tree.norm(grads), optax.tree.norm(trainable), rtol=1e-5)


def test_frozen_prefix_of_a_scan_costs_what_the_unrolled_one_costs():
    def flops(scan, spec, **kw):
        model = _vit(scan, scan_unroll=True)  # XLA counts a loop body once otherwise
        params = _params(scan)
        made = train.make_steps(model, _optimizer(), spec, params, grad_norm=True, **kw)
        state = made.init_state({"params": params}, jax.random.key(1))
        return made.train_step.lower(state, BATCH).compile().cost_analysis()["flops"]

    # The phase of an automatic policy (`lf.auto`) that froze the embeddings and blocks 0-2:
    # one block range, with per-block gradient norms as AutoFreeze reads them.
    groups = vit_groups(DEPTH, scan=True)
    (spec,) = [
        p.spec
        for p in lf.auto.freezeout(groups, 100, scaling="linear").phases
        if p.spec.describe() == EMB + ",Transformer/encoderblock[:3]"
    ]
    scanned = flops(True, spec, group_norms=groups)
    unrolled = flops(False, _unrolled_spec([0, 1, 2]))
    full = flops(True, "none")
    print(
        f"\nscanned frozen prefix {scanned:.4g}, unrolled {unrolled:.4g}, all trainable {full:.4g}"
    )
    assert scanned == pytest.approx(unrolled, rel=0.01)
    assert scanned < 0.75 * full
    assert lf.scan_segments("Transformer/encoderblock", DEPTH) == ((0, DEPTH),)


def test_layerwise_decay_per_block_along_the_stacked_axis():
    decay = 0.5
    outs = {}
    for scan in (False, True):
        groups = vit_groups(DEPTH, scan=scan)
        layers = [groups[:3], *groups[3 : 3 + DEPTH], groups[3 + DEPTH :]]
        tx = lf.freeze(
            optax.chain(optax.sgd(1.0), lf.lr.scale_by_group(lf.lr.layerwise_decay(layers, decay))),
            EMB,
        )
        params = _params(scan)
        ones = jax.tree.map(jnp.ones_like, params)
        updates, _ = tx.update(ones, tx.init(params), params)
        outs[scan] = updates
    kernel = outs[True]["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        kernel[:, 0, 0], [-(decay ** (DEPTH + 1 - i)) for i in range(1, DEPTH + 1)], rtol=1e-6
    )
    want = _flat(stack_blocks(outs[False]))
    for path, value in _flat(outs[True]).items():
        np.testing.assert_array_equal(value, want[path], err_msg=path)


# Unfreezing --------------------------------------------------------------------------


def test_unfrozen_block_starts_fresh_and_training_blocks_keep_their_moments():
    params = _params(True)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    first = "all-but:Transformer/encoderblock[3],head"
    second = "all-but:Transformer/encoderblock[2:],head"
    tx1 = lf.freeze(optax.adam(0.1), first)
    state = tx1.init(params)
    for _ in range(3):
        _, state = tx1.update(grads, state, params)
    tx2 = lf.freeze(optax.adam(0.1), second, previous=[first])
    state2 = lf.transfer_opt_state(state, tx2.init(params))
    updates, _ = tx2.update(grads, state2, params)
    fresh = optax.adam(0.1)
    fresh_update = fresh.update(grads, fresh.init(params), params)[0]
    kernel = ("Transformer", "encoderblock", "MlpBlock_3", "Dense_0", "kernel")

    def at(tree):
        return functools.reduce(lambda t, k: t[k], kernel, tree)

    np.testing.assert_array_equal(at(updates)[2], at(fresh_update)[2])  # new: fresh Adam
    continued = optax.adam(0.1)
    cstate = continued.init(params)
    for _ in range(3):
        _, cstate = continued.update(grads, cstate, params)
    np.testing.assert_array_equal(at(updates)[3], at(continued.update(grads, cstate)[0])[3])
    assert not np.any(at(updates)[:2])


@pytest.mark.parametrize("method", ["zero", "lr0"])
@pytest.mark.parametrize("direction", ["unfreeze", "refreeze"])
def test_block_ranges_carried_by_one_compiled_program_as_eagerly(method, direction):
    """`_transfer.compile_pieces`: the rows a change of block ranges carries over,
    sliced and joined by one program compiled for the abstract states, are
    bitwise what `transfer_opt_state` does eagerly."""
    params = _params(True)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    specs = [
        "all-but:Transformer/encoderblock[3],head",
        "all-but:Transformer/encoderblock[1:],head",
    ]
    if direction == "refreeze":
        specs.reverse()
    tx1 = lf.freeze(optax.adam(0.1), specs[0], method=method)
    old = tx1.init(params)
    for _ in range(2):
        _, old = tx1.update(grads, old, params)
    new = lf.freeze(optax.adam(0.1), specs[1], method=method, previous=specs[:1]).init(params)
    pieces = _transfer.compile_pieces(_ahead.abstract(old), _ahead.abstract(new))
    if (method, direction) == ("zero", "unfreeze"):
        # The newly unfrozen blocks are a cohort of their own (fresh), the others whole.
        assert pieces is None
    else:  # freezing more splits the trainable leaves; lr0 keeps state in both branches
        assert pieces is not None and pieces.which
    got, want = _transfer.carry(old, new, pieces), lf.transfer_opt_state(old, new)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Without a change of ranges there is nothing to compile.
    assert _transfer.compile_pieces(_ahead.abstract(old), _ahead.abstract(old)) is None


def test_gradual_unfreezing_over_scanned_blocks_resumes_bitwise(tmp_path):
    groups = vit_groups(DEPTH, scan=True)
    gradual = lf.schedules.gradual_unfreezing(groups, every=2, unit="step")
    assert gradual.phases[2].spec.describe() == (
        "all-but:head,Transformer/encoder_norm,Transformer/encoderblock[3]"
    )
    # Its third and fourth phases (blocks 3, then 2 and 3, train), three steps each:
    # one compile per phase, and a stack split differently in each.
    schedule = lf.schedules.explicit(
        {0: gradual.phases[2].spec, 3: gradual.phases[3].spec}, unit="step"
    )
    params = _params(True)
    model = _vit(True)

    def build(phase, previous):
        return train.make_steps(model, _optimizer(), phase.spec, params, previous=previous)

    def run(phases, state, start, stop):
        for step in range(start, stop):
            steps, state, _ = phases.update(step, state)
            state, _ = steps.train_step(state, BATCH)
        return state

    def fresh():
        return train.Phases(schedule, build, params=params)

    phases = fresh()
    straight = run(phases, phases.init_state({"params": params}, jax.random.key(1)), 0, 6)
    first = fresh()
    state = run(first, first.init_state({"params": params}, jax.random.key(1)), 0, 2)
    meta = first.metadata()
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state.as_dict(), metadata=meta)
        second = fresh()
        second.restore(ckpt.restore_metadata())
        template = second.steps().init_state({"params": params}, jax.random.key(1))
        restored, _ = ckpt.restore(jax.eval_shape(lambda: template.as_dict()))
    resumed = run(second, train.TrainState(**restored), 2, 6)
    want, got = _flat(straight.params), _flat(resumed.params)
    for path in want:
        np.testing.assert_array_equal(want[path], got[path], err_msg=path)
    want, got = _flat(straight.opt_state), _flat(resumed.opt_state)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(want[path], got[path], err_msg=path)
    # Blocks 0 and 1 were frozen throughout; block 2 trained from step 3.
    before = _flat(params)
    for path, value in _flat(resumed.params).items():
        if path.startswith("Transformer/encoderblock/"):
            np.testing.assert_array_equal(value[:2], before[path][:2], err_msg=path)


# A BERT-style encoder pytree ------------------------------------------------------------


def _bert(stacked, layers=4, width=8):
    keys = iter(jax.random.split(jax.random.key(3), 64))

    def layer():
        return {
            "attention": {"query": {"kernel": jax.random.normal(next(keys), (width, width))}},
            "output": {
                "dense": {"kernel": jax.random.normal(next(keys), (width, width))},
                "LayerNorm": {"scale": jnp.ones(width), "bias": jnp.zeros(width)},
            },
        }

    encoder = [layer() for _ in range(layers)]
    params = {
        "embeddings": {"word_embeddings": jax.random.normal(next(keys), (11, width))},
        "pooler": {"dense": {"kernel": jax.random.normal(next(keys), (width, 2))}},
    }
    if stacked:
        params["encoder"] = {"layer": jax.tree.map(lambda *x: jnp.stack(x), *encoder)}
    else:
        params["encoder"] = {f"layer_{i}": p for i, p in enumerate(encoder)}
    return params


def _bert_loss(params, tokens, labels):
    h = params["embeddings"]["word_embeddings"][tokens].mean(1)

    def block(h, p):
        h = jnp.tanh(h @ p["attention"]["query"]["kernel"]) + h
        h = h @ p["output"]["dense"]["kernel"]
        ln = p["output"]["LayerNorm"]
        return (h - h.mean(-1, keepdims=True)) * ln["scale"] + ln["bias"], None

    enc = params["encoder"]
    if "layer" in enc:
        h, _ = jax.lax.scan(block, h, enc["layer"])
    else:
        for i in range(len(enc)):
            h, _ = block(h, enc[f"layer_{i}"])
    logits = h @ params["pooler"]["dense"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_bert_style_pytree_unrolled_and_stacked():
    tokens = jnp.asarray(R.randint(0, 11, (6, 5)))
    labels = jnp.asarray(R.randint(0, 2, 6))
    specs = {
        False: "embeddings,encoder/layer_0,encoder/layer_1",
        True: "embeddings,encoder/layer[:2]",
    }
    groups = {
        False: ["embeddings", *(f"encoder/layer_{i}" for i in range(4)), "pooler"],
        True: ["embeddings", *(f"encoder/layer[{i}]" for i in range(4)), "pooler"],
    }
    final = {}
    for stacked in (False, True):
        params = _bert(stacked)
        tx = lf.freeze(_optimizer(), specs[stacked])
        state = tx.init(params)
        step = jax.jit(lf.value_and_grad(_bert_loss, specs[stacked]))
        p = params
        for _ in range(5):
            _, g = step(p, tokens, labels)
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        summary = lf.summary(p, specs[stacked], state, groups=groups[stacked])
        assert [g.status for g in summary.groups] == ["frozen"] * 3 + ["trainable"] * 3
        final[stacked] = p
    unrolled = final[False]["encoder"]
    restacked = jax.tree.map(lambda *x: jnp.stack(x), *(unrolled[f"layer_{i}"] for i in range(4)))
    start = _bert(True)["encoder"]["layer"]
    for path, value in _flat(final[True]["encoder"]["layer"]).items():
        np.testing.assert_array_equal(value[:2], _flat(start)[path][:2], err_msg=path)
        # Adam turns float rounding differences of the two layouts into ~1e-4.
        np.testing.assert_allclose(value, _flat(restacked)[path], rtol=1e-3, atol=1e-4)


def test_unstack_round_trip_keeps_a_stacked_spec_meaningful():
    # The same blocks named both ways resolve to the same frozen parameters.
    scanned = lf.summary(_params(True), EMB + ",Transformer/encoderblock[:2]")
    unrolled = lf.summary(unstack_blocks(_params(True)), _unrolled_spec([0, 1]))
    assert scanned.trainable_params == unrolled.trainable_params
    assert scanned.total_params == unrolled.total_params


def test_timm_rule_freezes_the_blocks_whose_decayed_rate_is_tiny():
    groups = vit_groups(DEPTH, scan=True)
    multipliers = lf.lr.layerwise_decay(
        [groups[:3], *groups[3 : 3 + DEPTH], groups[3 + DEPTH :]], 0.5
    )
    spec = lf.lr.freeze_below(multipliers, 0.1)  # 0.5**4 and 0.5**5: embeddings and block 0
    assert spec.describe() == EMB + ",Transformer/encoderblock[0]"
    resolved = spec.resolve_blocks(_params(True))
    assert resolved["Transformer/encoderblock/MlpBlock_3/Dense_0/kernel"] == (
        True,
        False,
        False,
        False,
    )
    with pytest.raises(ValueError, match=r"threshold must be > 0"):
        lf.lr.freeze_below(multipliers, 0)


def test_nnx_scanned_blocks_freeze_by_block():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 4, rngs=rngs)

    class Net(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            def body(x, block):
                return jnp.tanh(block.dense(x)), None

            x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))(x, self.blocks)
            return self.head(x)

    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    spec = "blocks[:2]"
    assert lf.FreezeSpec.parse(spec).resolve_blocks(params)["blocks/dense/kernel"] == (
        True,
        True,
        False,
    )
    with pytest.raises(ValueError, match="an nnx filter selects whole variables"):
        lf.nnx_filter(model, spec)
    x = jnp.ones((5, 4))

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    tx = lf.freeze(_optimizer(), spec)
    state = tx.init(params)
    p = params
    for _ in range(3):
        _, g = lf.value_and_grad(loss, spec)(p)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    before, after = _flat(params), _flat(p)
    kernel = next(k for k in before if k.startswith("blocks/dense/kernel"))
    np.testing.assert_array_equal(after[kernel][:2], before[kernel][:2])
    assert np.any(after[kernel][2] != before[kernel][2])
