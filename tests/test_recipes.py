"""The README's recipes: multi-task learning on a frozen trunk, distillation from a frozen teacher.

Each recipe's train step (`lf.value_and_grad` + `lf.freeze`, reporting the
gradient norm) is checked against a hand-written ideal that differentiates
only the trainable subtree and runs the optimizer on it alone: the same
compiled FLOPs, frozen leaves bit-identical, and no optimizer state for them.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerfreeze as lf


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe's params, spec and loss, and its frozen/trainable split written out by hand."""

    params: Any
    spec: str
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]
    batch: Any
    split: Callable[[Any], tuple[Any, Any]]  # params -> (trainable, frozen)
    merge: Callable[[Any, Any], Any]  # (trainable, frozen) -> params
    groups: tuple[str, ...]  # rows of `lf.summary`
    frozen_groups: tuple[str, ...]  # the rows the spec freezes entirely


def _inputs(batch_size, features):
    return np.random.RandomState(0).randn(batch_size, features).astype(np.float32)


def _random_params(init, x):
    """Params of `init`'s shapes drawn with NumPy: no initialiser to compile."""
    rng = np.random.RandomState(1)
    shapes = jax.eval_shape(init, jax.random.key(0), x[:1])["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.randn(*s.shape), s.dtype), shapes)


# Multi-task: one trunk, a classification head and a regression head.


class _Trunk(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (128, 128):
            x = nn.relu(nn.Dense(width)(x))
        return x


class _MultiTask(nn.Module):
    @nn.compact
    def __call__(self, x):
        features = _Trunk(name="trunk")(x)
        return {
            "a": nn.Dense(4, name="head_a")(features),
            "b": nn.Dense(1, name="head_b")(features)[:, 0],
        }


def _multitask() -> Recipe:
    model = _MultiTask()
    x = _inputs(64, 32)
    params = _random_params(model.init, x)
    batch = {"x": x, "label": np.argmax(x[:, :4], -1), "target": np.sin(x[:, 0])}

    def loss_fn(params, batch):
        out = model.apply({"params": params}, batch["x"])
        losses = {
            "loss_a": optax.softmax_cross_entropy_with_integer_labels(
                out["a"], batch["label"]
            ).mean(),
            "loss_b": jnp.mean((out["b"] - batch["target"]) ** 2),
        }
        return losses["loss_a"] + 0.5 * losses["loss_b"], losses

    return Recipe(
        params=params,
        spec="trunk",
        loss_fn=loss_fn,
        batch=batch,
        split=lambda p: ({k: v for k, v in p.items() if k != "trunk"}, p["trunk"]),
        merge=lambda trainable, frozen: {**trainable, "trunk": frozen},
        groups=("trunk", "head_a", "head_b"),
        frozen_groups=("trunk",),
    )


# Distillation: a frozen teacher, a student whose first layer is frozen.


class _MLP(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, name=f"layer{i}")(x))
        return nn.Dense(10, name="head")(x)


def _distillation() -> Recipe:
    teacher, student = _MLP((128, 128)), _MLP((32, 32))
    x = _inputs(64, 32)
    params = {
        "teacher": _random_params(teacher.init, x),
        "student": _random_params(student.init, x),
    }
    batch = {"x": x, "label": np.argmax(x[:, :10], -1)}
    temperature = 2.0

    def loss_fn(params, batch):
        teacher_logits = teacher.apply({"params": params["teacher"]}, batch["x"])
        student_logits = student.apply({"params": params["student"]}, batch["x"])
        soft = (
            temperature**2
            * optax.kl_divergence(
                jax.nn.log_softmax(student_logits / temperature),
                jax.nn.softmax(teacher_logits / temperature),
            ).mean()
        )
        hard = optax.softmax_cross_entropy_with_integer_labels(
            student_logits, batch["label"]
        ).mean()
        return 0.9 * soft + 0.1 * hard, {"soft": soft, "hard": hard}

    def split(p):
        student = dict(p["student"])
        frozen = {"teacher": p["teacher"], "layer0": student.pop("layer0")}
        return student, frozen

    def merge(trainable, frozen):
        return {"teacher": frozen["teacher"], "student": {**trainable, "layer0": frozen["layer0"]}}

    return Recipe(
        params=params,
        spec="teacher,student/layer0",
        loss_fn=loss_fn,
        batch=batch,
        split=split,
        merge=merge,
        groups=("teacher", "student/layer0", "student"),
        frozen_groups=("teacher", "student/layer0"),
    )


RECIPES = {"multitask": _multitask, "distillation": _distillation}


def _optimizer():
    # Weight decay would move a frozen leaf that the optimizer saw; the clip
    # would see frozen gradients.
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def _step(recipe, differentiate):
    """The README's step: `differentiate(loss_fn)` over all params, `lf.freeze`d optimizer."""
    tx = lf.freeze(_optimizer(), recipe.spec)

    def step(params, opt_state, batch):
        (loss, metrics), grads = differentiate(recipe.loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return tx, step


def _ideal_step(recipe):
    """`jax.value_and_grad` of the trainable subtree only; optax over it alone."""
    tx = _optimizer()

    def step(trainable, frozen, opt_state, batch):
        def loss_fn(trainable):
            return recipe.loss_fn(recipe.merge(trainable, frozen), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return tx, step


@functools.cache
def _ours(name):
    """The recipe, its optimizer and initial state, and its step compiled (once per process)."""
    recipe = RECIPES[name]()
    tx, step = _step(recipe, lambda f: lf.value_and_grad(f, recipe.spec, has_aux=True))
    opt_state = tx.init(recipe.params)
    compiled = jax.jit(step).lower(recipe.params, opt_state, recipe.batch).compile()
    return recipe, opt_state, compiled


def _flops(compiled):
    return compiled.cost_analysis()["flops"]


@pytest.mark.parametrize("name", RECIPES)
def test_frozen_leaves_stay_bit_identical_and_trainable_ones_learn(name):
    recipe, opt_state, step = _ours(name)
    params = recipe.params
    for _ in range(3):
        params, opt_state, metrics = step(params, opt_state, recipe.batch)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    trainable_before, frozen_before = recipe.split(recipe.params)
    trainable_after, frozen_after = recipe.split(params)
    for before, after in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after), strict=True
    ):
        np.testing.assert_array_equal(after, before)
    for before, after in zip(
        jax.tree.leaves(trainable_before), jax.tree.leaves(trainable_after), strict=True
    ):
        assert not np.array_equal(after, before)


@pytest.mark.parametrize("name", RECIPES)
def test_optimizer_holds_state_for_trainable_leaves_only(name):
    recipe, opt_state, _ = _ours(name)
    rows = lf.summary(recipe.params, recipe.spec, opt_state, groups=recipe.groups).as_dict()
    for group in recipe.frozen_groups:
        assert rows["groups"][group]["status"] == "frozen"
        assert rows["groups"][group]["opt_state_bytes"] == 0, rows
    # Exactly the state of the optimizer over the trainable subtree alone.
    ideal_state = _optimizer().init(recipe.split(recipe.params)[0])
    assert rows["opt_state_bytes"] == sum(x.nbytes for x in jax.tree.leaves(ideal_state))
    assert len(jax.tree.leaves(opt_state)) == len(jax.tree.leaves(ideal_state))


@pytest.mark.parametrize("name", RECIPES)
def test_step_compiles_to_the_ideal_flops_even_reporting_the_grad_norm(name):
    recipe, opt_state, ours = _ours(name)
    ours_flops = _flops(ours)

    _, naive = _step(recipe, lambda f: jax.value_and_grad(f, has_aux=True))
    naive_flops = _flops(jax.jit(naive).lower(recipe.params, opt_state, recipe.batch).compile())

    ideal_tx, ideal = _ideal_step(recipe)
    trainable, frozen = recipe.split(recipe.params)
    ideal_state = jax.eval_shape(ideal_tx.init, trainable)
    lowered = jax.jit(ideal).lower(trainable, frozen, ideal_state, recipe.batch)
    ideal_flops = _flops(lowered.compile())

    print(f"{name}: ours {ours_flops:.0f}, ideal {ideal_flops:.0f}, naive {naive_flops:.0f}")
    assert abs(ours_flops / ideal_flops - 1) <= 0.01, (ours_flops, ideal_flops)
    # The same step with jax.value_and_grad differentiates the frozen part too.
    assert naive_flops > 1.5 * ideal_flops, (naive_flops, ideal_flops)
