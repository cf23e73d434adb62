"""Sharding as data: meshes with named axes, and rules from parameter paths to shardings.

A model that does not fit replicated keeps its parameters, gradients and
optimizer state split over the devices. Which leaf splits how is data, as in
big_vision, t5x and kauldron: an ordered list of `(pattern, rule)` pairs,
each pattern a regex matched with `re.fullmatch` against a leaf's
`/`-joined path (`stem/Conv_0/kernel`), the first match deciding. A rule is
a `jax.sharding.PartitionSpec` over the mesh's axis names (`P()` replicates)
or a function `(shape, mesh) -> PartitionSpec`, such as `fsdp()`, which
splits each leaf above a size along its largest dimension that the axis
divides. Every leaf must be covered (end with `(".*", P())` to replicate
the rest), and a rule that no leaf reaches is an error, as in freeze specs.

* `make_mesh({"data": 2, "fsdp": 2})`: a mesh with named axes.
* `param_shardings(mesh, params, rules)`: a `NamedSharding` per parameter.
* `opt_state_shardings(tx, params, param_shardings)`: the shardings of the
  optimizer state, following the parameters'. Frozen leaves hold no state
  under `layerfreeze.freeze` (`optax.MaskedNode`), and their place stays
  empty; step counts and other state that is no parameter's are replicated.
* `shard_batch(mesh, batch)`: the batch split over the data axes, the axes
  named `data` or `fsdp` (`batch_axes=` chooses others; `make_steps` takes
  the same option). On several processes each passes its own part of the
  global batch.
* `place(tree, shardings)`: host values (the same on every process) copied
  into shardings, each process putting only its own devices' shards.

`train.make_steps(..., mesh=mesh, sharding_rules=rules)` builds steps whose
state lives in these shardings; a loop of one's own uses them with `jax.jit`:

>>> import jax, jax.numpy as jnp, optax, layerfreeze as lf
>>> from jax.sharding import PartitionSpec as P
>>> mesh = make_mesh({"data": 1, "fsdp": -1})  # -1: the rest of the devices
>>> params = {"stem": {"kernel": jnp.ones((8, 64))}, "head": {"kernel": jnp.ones((64, 4)),
...           "bias": jnp.zeros(4)}}
>>> rules = [(".*/bias", P()), (".*", fsdp(min_size=256))]
>>> shardings = param_shardings(mesh, params, rules)
>>> jax.tree.map(lambda s: s.spec, shardings)
{'head': {'bias': P(), 'kernel': P('fsdp',)}, 'stem': {'kernel': P(None, 'fsdp')}}
>>> tx = lf.freeze(optax.adam(1e-3), "stem")
>>> opt_shardings = opt_state_shardings(tx, params, shardings)
>>> params = jax.device_put(params, shardings)
>>> opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
>>> adam = opt_state.inner_states["trainable"].inner_state[0].inner_state[0]
>>> adam.mu["head"]["kernel"].sharding.spec, adam.mu["stem"]["kernel"]  # frozen: no state
(P('fsdp',), MaskedNode())
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from layerfreeze import _blocks, _checks, _nnx, _paths

__all__ = [
    "DATA_AXES",
    "Rule",
    "Rules",
    "batch_sharding",
    "check_rules",
    "fsdp",
    "make_mesh",
    "opt_state_shardings",
    "param_shardings",
    "place",
    "replicate",
    "shard_batch",
]

AnyMesh = Mesh | AbstractMesh
Rule = P | Callable[[tuple[int, ...], AnyMesh], P]
"""A `PartitionSpec`, or `(leaf shape, mesh) -> PartitionSpec`."""
Rules = Sequence[tuple[str, Rule]]
"""Ordered `(regex, rule)` pairs; the first whose regex fully matches a leaf's path applies."""

DATA_AXES: tuple[str, ...] = ("data", "fsdp")
"""The mesh axes that split the batch unless told otherwise (FSDP is data parallel too)."""


# Meshes ---------------------------------------------------------------------


def make_mesh(
    axes: Mapping[str, int] | Sequence[Any] | None = None, *, devices: Any = None
) -> Mesh:
    """A mesh over `devices` (default: all devices) with named axes.

    * `make_mesh()`: one axis `data` over every device (data parallel, the
      state replicated); `make_mesh(devices)` the same over those devices.
    * `make_mesh({"data": 2, "fsdp": 2})`: axes in the order given, their
      sizes multiplying to the number of devices; one size may be -1, the
      devices the others leave.

    On several hosts call `jax.distributed.initialize()` first; `jax.devices()`
    then lists every host's devices.

    Raises:
      ValueError: the sizes do not multiply to the number of devices, or a
        size is below 1 (other than one -1).
      TypeError: an axis name is no string or a size no integer.

    >>> dict(make_mesh({"data": -1, "model": 1}).shape)
    {'data': 1, 'model': 1}
    """
    if axes is not None and not isinstance(axes, Mapping):  # make_mesh(devices)
        if devices is not None:
            raise TypeError("make_mesh takes the devices once: make_mesh(devices) or devices=...")
        axes, devices = None, axes
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    if axes is None:
        return Mesh(devices, ("data",))
    names, shape = _mesh_shape(axes, devices.size)
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=list(devices))


def _mesh_shape(axes: Mapping[str, int], n: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names = tuple(axes)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad or not names:
        raise TypeError(
            f"make_mesh takes {{axis name: size}} with non-empty string names, e.g. "
            f"{{'data': 2, 'fsdp': 2}}; got {dict(axes)!r}."
        )
    sizes = []
    for name in names:
        size = axes[name]
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise TypeError(
                f"make_mesh: axis {name!r} has size {_checks.given(size)}; sizes are integers."
            )
        if size < 1 and size != -1:
            raise ValueError(
                f"make_mesh: axis {name!r} has size {size}; sizes are >= 1, or -1 for the rest."
            )
        sizes.append(int(size))
    given = dict(axes)
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh({given!r}): only one axis may have size -1 (the rest).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"make_mesh({given!r}): the other axes take {known} devices, which do not "
                f"divide the {n} devices; valid: sizes whose product divides {n}."
            )
        sizes[sizes.index(-1)] = n // known
    elif known != n:
        raise ValueError(
            f"make_mesh({given!r}): the sizes multiply to {known}, but there are {n} devices; "
            f"valid: sizes whose product is {n} (or -1 for one axis: the rest)."
        )
    return names, tuple(sizes)


def _batch_axes(mesh: AnyMesh, axes: Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes that split the batch: `axes`, or the mesh's axes named in `DATA_AXES`."""
    names = tuple(mesh.axis_names)
    if axes is None:
        found = tuple(a for a in names if a in DATA_AXES)
        if not found:
            raise ValueError(
                f"The mesh has axes {', '.join(names)}, none of which splits the batch by "
                f"default ({', '.join(DATA_AXES)}); pass batch_axes=(...) naming the data "
                "parallel ones."
            )
        return found
    if isinstance(axes, str) or not isinstance(axes, Sequence):
        raise TypeError(
            f"batch_axes must be a sequence of mesh axis names, got {_checks.given(axes)}."
        )
    missing = [a for a in axes if a not in names]
    if missing:
        raise ValueError(
            f"batch_axes {tuple(axes)!r} names {', '.join(map(repr, missing))}, which the mesh "
            f"lacks; its axes: {_describe_mesh(mesh)}."
        )
    return tuple(axes)


def batch_sharding(mesh: AnyMesh, batch_axes: Sequence[str] | None = None) -> NamedSharding:
    """The sharding of a batch: its leading dimension split over the batch axes.

    Args:
      mesh: the mesh.
      batch_axes: the mesh axes that split the batch; default: the mesh's
        axes named in `DATA_AXES` (`data`, `fsdp`), in the mesh's order.

    Raises:
      ValueError: `batch_axes` names an axis the mesh lacks, or (by default)
        the mesh has no `data` or `fsdp` axis.

    >>> batch_sharding(make_mesh({"data": 1, "fsdp": 1, "model": -1})).spec
    P(('data', 'fsdp'),)
    """
    found = _batch_axes(mesh, batch_axes)
    return NamedSharding(mesh, P(found[0] if len(found) == 1 else found))


def shard_batch(
    mesh: Mesh, batch: Mapping[str, np.ndarray], *, batch_axes: Sequence[str] | None = None
) -> dict[str, jax.Array]:
    """Places this host's part of a batch on the mesh, split over the batch axes.

    Args:
      mesh: the mesh.
      batch: arrays whose leading dimension is the batch.
      batch_axes: the axes that split it (default: the mesh's `data` and
        `fsdp` axes, see `batch_sharding`); `make_steps` must be given the same.

    The leading dimension of each array must divide by the number of batch
    shards on this host; on one host the batch is the global batch.
    """
    sharding = batch_sharding(mesh, batch_axes)
    shards = math.prod(mesh.shape[a] for a in _batch_axes(mesh, batch_axes))
    n = max(1, shards * len(mesh.local_devices) // mesh.size)
    out = {}
    for key, value in batch.items():
        if value.shape[0] % n:
            raise ValueError(
                f"Batch array {key!r} has leading size {value.shape[0]}, which does not "
                f"divide over {n} batch shards on this host; use a batch size that is a "
                f"multiple of {n}."
            )
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def replicate(mesh: Mesh, tree: Any) -> Any:
    """A copy of `tree` on every device of `mesh` (see `place`)."""
    return place(tree, NamedSharding(mesh, P()))


def place(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` in `shardings`: one sharding for every leaf, or a pytree like `tree`.

    Each device receives its shards only, copied from the host. On several
    processes every process passes the same values (from the same seed, say)
    and puts the shards of its own devices: nothing crosses processes and
    nothing is compared, where `jax.device_put` would check each leaf across
    processes. An array already split over processes is moved by XLA. The
    copy shares no buffer with `tree`, which a donating train step would
    otherwise delete, and compiles nothing.

    >>> mesh = make_mesh()
    >>> placed = place({"w": np.ones((2, 3))}, NamedSharding(mesh, P()))
    >>> placed["w"].sharding.spec, placed["w"].shape
    (P(), (2, 3))
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _place(x, shardings), tree)
    return jax.tree.map(_place, tree, shardings)


def _place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_place(jax.random.key_data(x), sharding), impl=impl)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(jnp.copy(x), sharding)
    # From the host, shard by shard: nothing compiles (a jnp.copy would, per shape),
    # and each device gets a fresh array, which it may adopt and later donate.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: np.array(host[i]))


# Rules ----------------------------------------------------------------------


def fsdp(axis: str = "fsdp", *, min_size: int = 2**20) -> Callable[[tuple[int, ...], AnyMesh], P]:
    """A rule that splits a leaf along its largest dimension that `axis` divides.

    Leaves with fewer than `min_size` elements, and those no dimension of
    which the axis divides, are replicated. Of equal dimensions the last is
    taken (a stacked leaf's leading axis is its depth). The default,
    2**20 elements, is big_vision's 4 MiB for float32.

    >>> from jax.sharding import AbstractMesh
    >>> rule = fsdp(min_size=100)
    >>> mesh = AbstractMesh((4,), ("fsdp",))
    >>> rule((12, 64, 64), mesh), rule((6, 10), mesh), rule((10, 30), mesh)
    (P(None, None, 'fsdp'), P(), P())
    """
    if not isinstance(axis, str):
        raise TypeError(f"fsdp: axis must be a mesh axis name, got {_checks.given(axis)}.")
    min_size = _checks.count("fsdp: min_size", min_size)

    def rule(shape: tuple[int, ...], mesh: AnyMesh) -> P:
        sizes = _axis_sizes(mesh)
        if axis not in sizes:
            raise ValueError(
                f"fsdp(axis={axis!r}) names a mesh axis the mesh lacks; its axes: "
                f"{_describe_mesh(mesh)}."
            )
        if math.prod(shape) < min_size:
            return P()
        order = sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True)
        for dim in order:
            if shape[dim] % sizes[axis] == 0:
                return P(*(None,) * dim, axis)
        return P()

    rule.__qualname__ = rule.__name__ = f"fsdp({axis!r}, min_size={min_size})"
    return rule


def param_shardings(mesh: AnyMesh, params: Any, rules: Rules, *, strict: bool = True) -> Any:
    """The `NamedSharding` of each parameter, by the first rule whose regex matches its path.

    Args:
      mesh: a `jax.sharding.Mesh` (or an `AbstractMesh`, to check rules
        without the devices).
      params: the parameters, their shapes (`jax.eval_shape`), or an NNX model
        (its `nnx.Param`s).
      rules: ordered `(regex, rule)` pairs, matched with `re.fullmatch`
        against each leaf's `/`-joined path; a rule is a `PartitionSpec` or
        a function `(shape, mesh) -> PartitionSpec` (`fsdp()`).
      strict: a leaf no rule covers is an error (default); False replicates it.

    Returns:
      A pytree like `params` (same containers) of `NamedSharding`s.

    Raises:
      ValueError: a rule names an axis the mesh lacks, splits a dimension
        the axes do not divide, has more entries than its leaf dimensions, or
        reaches no leaf; a leaf no rule covers (when `strict`); a bad regex.
      TypeError: `rules` is no sequence of `(regex, rule)` pairs.
    """
    params = _checks.params(_nnx.as_params(params))
    compiled = check_rules(rules, mesh)
    flat, treedef = jax.tree.flatten(params)
    paths = _paths.leaf_paths(params)
    specs, used, uncovered = [], set(), []
    for path, leaf in zip(paths, flat, strict=True):
        index = next((i for i, (regex, _, _) in enumerate(compiled) if regex.fullmatch(path)), None)
        if index is None:
            uncovered.append(path)
            specs.append(P())
            continue
        used.add(index)
        specs.append(_leaf_spec(compiled[index], path, _shape(leaf), mesh))
    if uncovered and strict:
        raise ValueError(
            f"No sharding rule covers {_checks.listing(uncovered, 5)}; rules: "
            f"{_describe_rules(compiled)}. Add a rule for them, e.g. ('.*', P()) last to "
            "replicate the rest."
        )
    unused = [pattern for i, (_, pattern, _) in enumerate(compiled) if i not in used]
    if unused:
        raise ValueError(
            f"Sharding rule(s) {', '.join(map(repr, unused))} match no parameter not taken by "
            f"an earlier rule; parameters: {_checks.listing(paths, 8)}."
        )
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def check_rules(rules: Rules, mesh: AnyMesh | None = None) -> list[tuple[re.Pattern, str, Rule]]:
    """`[(compiled regex, pattern, rule)]` after checking `rules`' form (and axes, given a mesh).

    Raises:
      TypeError: `rules` is no sequence of `(regex, PartitionSpec or function)` pairs.
      ValueError: a regex does not compile, or a `PartitionSpec` names an axis
        `mesh` lacks.
    """
    usage = (
        "sharding rules are a list of (regex, rule) pairs, a rule a PartitionSpec or a "
        "function (shape, mesh) -> PartitionSpec, e.g. [('.*/bias', P()), ('.*', fsdp())]"
    )
    if isinstance(rules, str | bytes | Mapping) or not isinstance(rules, Sequence):
        raise TypeError(f"{usage}; got {_checks.given(rules)}.")
    out = []
    for entry in rules:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise TypeError(f"{usage}; got the entry {_checks.given(entry)}.")
        pattern, rule = entry
        if not (isinstance(rule, P) or callable(rule)):
            raise TypeError(f"{usage}; the rule for {pattern!r} is {_checks.given(rule)}.")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"Sharding rule {pattern!r} is no valid regex: {e}.") from e
        if mesh is not None and isinstance(rule, P):
            _check_axes(rule, mesh, f"Sharding rule ({pattern!r}, {rule})")
        out.append((regex, pattern, rule))
    return out


def _leaf_spec(
    compiled: tuple[re.Pattern, str, Rule], path: str, shape: tuple[int, ...], mesh: AnyMesh
) -> P:
    _, pattern, rule = compiled
    spec = rule if isinstance(rule, P) else rule(tuple(shape), mesh)
    where = f"Sharding rule {pattern!r} gives leaf {path!r} of shape {tuple(shape)}"
    if not isinstance(spec, P):
        raise TypeError(f"{where} {_checks.given(spec)}; a rule function returns a PartitionSpec.")
    _check_spec(spec, shape, mesh, where)
    return spec


def _check_spec(spec: P, shape: Sequence[int], mesh: AnyMesh, where: str) -> None:
    """Raises a ValueError naming the problem unless `spec` can split an array of `shape`."""
    _check_axes(spec, mesh, f"{where} {spec}, which")
    if len(spec) > len(shape):
        raise ValueError(
            f"{where} {spec}: {len(spec)} entries for {len(shape)} dimensions; a spec has "
            "at most one entry per dimension."
        )
    sizes = _axis_sizes(mesh)
    for dim, entry in enumerate(spec):
        axes = _entry_axes(entry)
        split = math.prod(sizes[a] for a in axes)
        if shape[dim] % split:
            raise ValueError(
                f"{where} {spec}: dimension {dim} of size {shape[dim]} does not divide over "
                f"{' x '.join(f'{a}={sizes[a]}' for a in axes)} ({split} shards); valid: "
                "split dimensions whose size the axes divide, or replicate the leaf (P())."
            )


def _check_axes(spec: P, mesh: AnyMesh, what: str) -> None:
    sizes = _axis_sizes(mesh)
    named = [a for entry in spec for a in _entry_axes(entry)]
    missing = [a for a in named if a not in sizes]
    if missing:
        raise ValueError(
            f"{what} names mesh axis {', '.join(map(repr, missing))}, which the mesh lacks; "
            f"its axes: {_describe_mesh(mesh)}."
        )
    twice = sorted({a for a in named if named.count(a) > 1})
    if twice:
        raise ValueError(f"{what} uses mesh axis {', '.join(map(repr, twice))} more than once.")


def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is P.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


# Optimizer state -------------------------------------------------------------


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any) -> Any:
    """The shardings of `tx.init(params)`, following the parameters' shardings.

    A state leaf that belongs to a parameter (its path ends with the
    parameter's path and it has the parameter's shape: Adam's moments, an
    accumulator) takes that parameter's sharding. Under `layerfreeze.freeze`
    a stacked leaf frozen in some blocks has one state leaf per block range;
    each takes the parameter's sharding, and where the range's leading size
    does not divide over the axes that split it, those axes split the
    range's largest other dimension they divide instead. Frozen leaves hold
    no state (`optax.MaskedNode`): their places stay empty. Everything else
    (step counts, schedules' state, factored statistics) is replicated.

    `optax.tree_map_params` does this for optimizers whose `init` maps over
    the params tree as it is; `layerfreeze.freeze` reads paths and shapes to
    build its partition, so here the state is matched by path and shape.

    Args:
      tx: the optimizer (e.g. `layerfreeze.freeze(optax.adam(1e-3), spec)`).
      params: the parameters or their shapes.
      param_shardings: `param_shardings(mesh, params, rules)`, or any pytree
        like `params` of `NamedSharding`s over one mesh.

    Returns:
      A pytree like the optimizer state of `NamedSharding`s, for
      `jax.jit(tx.init, out_shardings=...)` and the train step.
    """
    params = _checks.params(_nnx.as_params(params))
    shapes = jax.eval_shape(tx.init, params)
    shardings = _flat_shardings(params, param_shardings)
    mesh = next(iter(shardings.values()))[1].mesh if shardings else None
    if mesh is None:
        raise ValueError("opt_state_shardings: the params have no leaves to take a mesh from.")
    replicated = NamedSharding(mesh, P())

    def one(keypath: Any, leaf: Any) -> NamedSharding:
        keypath, block = _blocks.block_key_of(keypath)
        names = _paths.keypath_names(keypath)
        shape = tuple(leaf.shape)
        for start in range(len(names)):
            found = shardings.get(_paths.path_str(names[start:]))
            if found is None:
                continue
            param_shape, sharding = found
            if block is None and shape == param_shape:
                return sharding
            if block is not None and param_shape[:1] == (block.depth,):
                if shape == (block.stop - block.start, *param_shape[1:]):
                    return NamedSharding(mesh, _fit(sharding.spec, shape, mesh))
            return replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, shapes)


def _flat_shardings(
    params: Any, param_shardings: Any
) -> dict[str, tuple[tuple[int, ...], NamedSharding]]:
    """`{path: (shape, sharding)}` of each parameter."""
    paths = _paths.leaf_paths(params)
    leaves = jax.tree.leaves(params)
    try:
        given = jax.tree.structure(params).flatten_up_to(param_shardings)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "param_shardings must be a pytree like params of NamedShardings (e.g. "
            f"param_shardings(mesh, params, rules)); {e}"
        ) from e
    bad = [p for p, s in zip(paths, given, strict=True) if not isinstance(s, NamedSharding)]
    if bad:
        raise TypeError(
            f"param_shardings holds no NamedSharding for {_checks.listing(bad, 5)}; build it "
            "with param_shardings(mesh, params, rules)."
        )
    meshes = {s.mesh for s in given}
    if len(meshes) > 1:
        raise ValueError(f"param_shardings spans {len(meshes)} meshes; use one mesh.")
    return {p: (_shape(leaf), s) for p, leaf, s in zip(paths, leaves, given, strict=True)}


def _fit(spec: P, shape: tuple[int, ...], mesh: AnyMesh) -> P:
    """`spec` for a block range of `shape`; a split it cannot take moves to another dimension."""
    sizes = _axis_sizes(mesh)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for dim, entry in enumerate(entries):
        axes = _entry_axes(entry)
        split = math.prod(sizes[a] for a in axes)
        if not axes or shape[dim] % split == 0:
            continue
        entries[dim] = None
        free = [d for d in range(len(shape)) if entries[d] is None and d != dim]
        for other in sorted(free, key=lambda d: (shape[d], d), reverse=True):
            if shape[other] % split == 0:
                entries[other] = entry
                break
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


# Helpers -------------------------------------------------------------------


def _axis_sizes(mesh: AnyMesh) -> dict[str, int]:
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise TypeError(f"Expected a jax.sharding.Mesh (see make_mesh), got {_checks.given(mesh)}.")
    return dict(mesh.shape)


def _describe_mesh(mesh: AnyMesh) -> str:
    return ", ".join(f"{name}={size}" for name, size in _axis_sizes(mesh).items())


def _describe_rules(compiled: Sequence[tuple[re.Pattern, str, Rule]]) -> str:
    if not compiled:
        return "none"
    return ", ".join(repr(pattern) for _, pattern, _ in compiled)


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(np.shape(leaf) if shape is None else shape)
