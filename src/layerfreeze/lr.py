"""Discriminative learning rates: one learning-rate multiplier per top-level group.

Earlier groups of a pretrained network hold more general features and take
smaller steps (ULMFiT; fastai's `slice(lo, hi)`). Multipliers are plain
`{group: float}` dicts; `scale_by_group` applies them after any optax
optimizer, learning-rate schedules included.
"""

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from layerfreeze import _blocks, _checks, _paths, _spec

__all__ = [
    "MultipliersLike",
    "freeze_below",
    "geometric_multipliers",
    "layerwise_decay",
    "scale_by_group",
    "ulmfit_multipliers",
]

MultipliersLike = _checks.Multipliers


def geometric_multipliers(groups: Sequence[str], lo: float, hi: float) -> dict[str, float]:
    """Multipliers spaced geometrically, as fastai's `slice(lo, hi)`.

    With a base learning rate of `hi`, the first group trains at `lo` and the
    last at `hi`; the multipliers are relative to `hi`: `lo / hi` for the first
    group, exactly 1.0 for the last, a constant ratio between neighbours.

    Args:
      groups: the top-level groups, input to output (`"stem"` first, `"head"`
        last).
      lo: the learning rate of the first group, > 0.
      hi: the learning rate of the last group, >= `lo`.

    Returns:
      `{group: multiplier}` in the order of `groups`. One group gets 1.0.

    >>> geometric_multipliers(["stem", "body", "head"], 1e-4, 1e-2)
    {'stem': 0.01, 'body': 0.1, 'head': 1.0}
    """
    groups = _checks.groups(groups)
    lo, hi = _checks.positive("lo", lo), _checks.positive("hi", hi)
    if lo > hi:
        raise ValueError(
            f"geometric_multipliers needs lo <= hi (the first group trains slowest), got "
            f"lo={lo!r} > hi={hi!r}. Did you swap them?"
        )
    n = len(groups)
    if n == 1:
        return {groups[0]: 1.0}
    ratio = lo / hi
    # ratio ** 1 is exactly lo / hi and ratio ** 0 exactly 1.0 at the ends.
    return {g: ratio ** ((n - 1 - i) / (n - 1)) for i, g in enumerate(groups)}


def ulmfit_multipliers(groups: Sequence[str], factor: float = 2.6) -> dict[str, float]:
    """ULMFiT's discriminative rates: each group `factor` times slower than the next.

    Args:
      groups: the top-level groups, input to output.
      factor: the ratio between neighbouring groups, > 0 (ULMFiT uses 2.6).

    Returns:
      `{group: multiplier}` in the order of `groups`; the last group gets 1.0.

    >>> ulmfit_multipliers(["stem", "body", "head"], factor=2.0)
    {'stem': 0.25, 'body': 0.5, 'head': 1.0}
    """
    groups = _checks.groups(groups)
    factor = _checks.positive("factor", factor)
    n = len(groups)
    return {g: 1.0 / factor ** (n - 1 - i) for i, g in enumerate(groups)}


def layerwise_decay(layers: Sequence[str | Sequence[str]], decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay (BEiT, MAE, timm's `param_groups_layer_decay`).

    Layer `i` of `n` (input to output) trains at `decay ** (n - 1 - i)` times
    the base rate: the last layer at the base rate, each layer below it
    `decay` times slower. A layer is a group (a path prefix such as
    `Transformer/encoderblock_3`) or a tuple of groups that share a rate, e.g.
    a ViT's embeddings `("embedding", "pos_embedding", "cls")` as BEiT's layer
    0, and `("Transformer/encoder_norm", "head")` as its last.

    Args:
      layers: the layers, input to output.
      decay: in (0, 1]; 0.65-0.75 is usual for fine-tuning a ViT.

    Returns:
      `{group: multiplier}` for `scale_by_group`, in the order of `layers`.

    Raises:
      TypeError: `decay` is no number, `layers` no sequence, or a layer
        neither a group name nor a sequence of them.
      ValueError: `decay` outside (0, 1], an empty layer, or a group named
        twice.

    >>> layerwise_decay([("embedding", "cls"), "block_0", "block_1", "head"], 0.5)
    {'embedding': 0.125, 'cls': 0.125, 'block_0': 0.25, 'block_1': 0.5, 'head': 1.0}
    """
    value = _checks.number("decay", decay)  # numpy and JAX scalars too
    if not 0 < value <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}; 0.65-0.75 is usual.")
    if isinstance(layers, str | Mapping) or not isinstance(layers, Iterable):
        raise TypeError(
            "layers must be a sequence of groups (or tuples of groups), input to output, "
            f"e.g. [('embedding', 'cls'), 'block_0', 'head']; got {_checks.given(layers)}."
        )
    layers = [_layer(i, layer) for i, layer in enumerate(layers)]
    _checks.groups([g for layer in layers for g in layer], "layers")  # unique, non-empty
    n = len(layers)
    decay = value
    return {g: decay ** (n - 1 - i) for i, layer in enumerate(layers) for g in layer}


def _layer(i: int, layer: Any) -> tuple[str, ...]:
    """Layer `i` of `layerwise_decay` as a tuple of groups."""
    if isinstance(layer, str):
        return (layer,)
    if isinstance(layer, Mapping) or not isinstance(layer, Iterable):
        raise TypeError(
            f"layers[{i}] must be a group name or a tuple of group names, got "
            f"{_checks.given(layer)}."
        )
    layer = tuple(layer)
    if not layer:
        raise ValueError(
            f"layers[{i}] is empty: each layer names at least one group (an empty one would "
            "shift every layer below it by a factor of decay)."
        )
    return layer


def freeze_below(multipliers: MultipliersLike, threshold: float) -> "_spec.FreezeSpec":
    """timm's rule: freeze the groups whose multiplier is below `threshold`.

    With layer-wise decay the lowest layers train at tiny rates; freezing them
    instead gives the same updates to within that rate and skips their
    gradients and optimizer state.

    Args:
      multipliers: `{group: multiplier}`, e.g. from `layerwise_decay`.
      threshold: a multiplier > 0; groups strictly below it are frozen.

    Returns:
      A `FreezeSpec` freezing those groups (`none` when there are none);
      combine it with `scale_by_group(multipliers)` for the rest.

    >>> m = layerwise_decay([("embedding", "cls"), "blocks[0]", "blocks[1]", "head"], 0.5)
    >>> freeze_below(m, 0.2).describe()
    'embedding,cls'
    """
    table = _checks.multipliers(multipliers)
    threshold = _checks.positive("threshold", threshold)
    return _spec.FreezeSpec(tuple(_spec.Rule(g) for g, m in table.items() if m < threshold))


def scale_by_group(
    multipliers: MultipliersLike,
    *,
    default: float = 1.0,
) -> optax.GradientTransformation:
    """Multiplies each update by the multiplier of its group.

    A group is a top-level name (`stage1` for `stage1/Block_0/Conv_0/kernel`),
    any path prefix (`Transformer/encoderblock_3`), or a block selector over
    stacked blocks (`Transformer/encoderblock[3]`: block 3 of a scanned
    encoder, whose leaves then get one multiplier per block along their
    leading axis). A leaf takes the multiplier of the longest group that is
    its path or a prefix of it (a block selector before the plain prefix of
    its stack).
    Chain it after an optimizer to give each group its own learning rate; the
    optimizer's own schedule keeps running, scaled per group. A multiplier of
    exactly 1.0 leaves updates bit-identical, 0.0 gives exact zeros (but
    prefer freezing: a zero multiplier still pays for the gradient and the
    optimizer state).

    Stateless. Multipliers are Python floats baked into a jitted step, so a
    new set of multipliers (a new schedule phase) compiles a new step.

    Args:
      multipliers: `{group: multiplier}` or `(group, multiplier)` pairs (e.g.
        a `Phase`'s `lr_multipliers`); every multiplier a finite number >= 0.
      default: the multiplier of groups not listed.

    Returns:
      An `optax.GradientTransformation`. Its `init` raises a ValueError if a
      listed group is not a top-level group of the params.

    Works on dicts, `FrozenDict` and `nnx.State`, and inside
    `layerfreeze.freeze` (groups whose leaves are all frozen still count as
    existing).

    >>> import jax.numpy as jnp, optax
    >>> params = {"stem": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> tx = optax.chain(optax.sgd(1.0), scale_by_group({"stem": 0.1}))
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> updates["stem"]["w"], updates["head"]["w"]
    (Array([-0.1, -0.1], dtype=float32), Array([-1., -1.], dtype=float32))
    """
    table = _checks.multipliers(multipliers)
    default = _checks.non_negative("default", default)
    rules = _group_rules(table)
    ranked = _by_precedence(table, rules)
    scale = functools.partial(_scale_leaf, ranked=ranked, default=default)

    def init_fn(params: Any) -> optax.EmptyState:
        _check_groups_exist(rules, params)
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


# (rule, multiplier) pairs, the rule that takes precedence first.
_Ranked = Sequence[tuple[_spec.Rule, float]]


def _group_rules(table: dict[str, float]) -> dict[str, _spec.Rule]:
    rules = {g: _spec.Rule(g) for g in table}
    for group, rule in rules.items():
        if rule.kind not in ("group", "block"):
            raise ValueError(
                f"scale_by_group: {group!r} is not a group: use a path prefix such as "
                "'stage1' or 'Transformer/encoderblock_3', or a block selector such as "
                "'Transformer/encoderblock[3]' (one block of a stacked encoder)."
            )
    return rules


def _by_precedence(table: dict[str, float], rules: dict[str, _spec.Rule]) -> _Ranked:
    # Longest prefix first (`Transformer/encoderblock_1` before `Transformer`),
    # and a block selector before the plain prefix of the same stack.
    ordered = sorted(table, key=lambda g: (-len(_bare(rules[g])), rules[g].kind != "block"))
    return [(rules[g], table[g]) for g in ordered]


def _check_groups_exist(rules: dict[str, _spec.Rule], params: Any) -> None:
    paths = _leaf_paths_with_masked(params)
    unknown = [g for g, rule in rules.items() if not any(rule.matches(p) for p in paths)]
    if unknown:
        existing = _paths.top_level_groups(paths)
        raise ValueError(
            f"scale_by_group: learning-rate multiplier(s) for unknown group(s) "
            f"{', '.join(repr(g) for g in unknown)} (no parameter path is or starts with "
            f"them). Groups that exist: {', '.join(existing) or '(none: empty params)'}."
        )


def _scale_leaf(keypath: Any, leaf: Any, *, ranked: _Ranked, default: float) -> Any:
    keypath, key = _blocks.block_key_of(keypath)
    path = _paths.path_str(_paths.keypath_names(keypath))
    rows, depth = None, None
    if key is not None:
        rows, depth = range(key.start, key.stop), key.depth
    elif any(rule.kind == "block" and rule.matches(path) for rule, _ in ranked):
        depth = jnp.shape(leaf)[0]
        rows = range(depth)
    return _scaled(leaf, _multipliers_of(path, rows, depth, ranked, default))


def _multipliers_of(
    path: str, rows: range | None, depth: int | None, ranked: _Ranked, default: float
) -> list[float]:
    """The multiplier of each row in `rows` of the leaf at `path` ([one] if None)."""
    out = []
    for row in rows if rows is not None else [None]:
        value = default
        for rule, multiplier in ranked:
            if not rule.matches(path):
                continue
            if rule.kind == "block":
                if row is None or depth is None or row not in rule.blocks(depth):
                    continue
            value = multiplier
            break
        out.append(value)
    return out


def _scaled(leaf: Any, m: list[float]) -> Any:
    """`leaf` times `m` (one multiplier, or one per row), with exact zeros and exact copies."""
    if len(set(m)) > 1:
        column = jnp.asarray(m, leaf.dtype).reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1))
        return jnp.where(column == 0, jnp.zeros_like(leaf), leaf * column)
    if m[0] == 1.0:
        return leaf
    if m[0] == 0.0:
        return jnp.zeros_like(leaf)
    return leaf * m[0]


def _bare(rule: _spec.Rule) -> str:
    """A group's path without its block selector."""
    return rule.stack + rule.selector[2] if rule.kind == "block" else rule.pattern


def _leaf_paths_with_masked(params: Any) -> list[str]:
    # Inside `optax.partition` the params of other branches are `MaskedNode`s,
    # which have no leaves; count them so their groups still exist.
    flat, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode)
    )
    return [_paths.path_str(_paths.keypath_names(p)) for p, _ in flat]
