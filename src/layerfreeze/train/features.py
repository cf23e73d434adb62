"""Frozen-feature caching: run a frozen prefix of the network once per example.

When every group up to some group `g` is frozen and their BatchNorm runs on
running statistics, the output of `g` depends only on the input image. It can
be computed once for the whole training set (`compute_features`) and the rest
of the network trained on it (`ResNet.__call__(..., start_after=g)`,
`train.make_steps(..., start_after=g)`). Head-only training then costs a
forward pass over the data once, plus the head per step.

The cached features are fixed per example, so random augmentation of the
images cannot be applied to them: cache only runs without augmentation.
`FeatureCache` keeps a training set's features for a run whose frozen
prefix changes from phase to phase.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from layerfreeze.train import data
>>> from layerfreeze.models import GROUPS, resnet18
>>> model = resnet18(10, stem="cifar", width=4)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
>>> frozen_prefix(variables["params"], "all-but:head", GROUPS[:-1])
'stage4'
>>> images = np.zeros((5, 16, 16, 3), np.uint8)
>>> compute_features(model, variables, images, upto="stage4", pool=True,
...                  preprocess=data.normalize, batch_size=2).shape
(5, 32)
"""

import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from layerfreeze import _checks, _paths, _plan, _spec
from layerfreeze.train import _ahead

__all__ = ["FeatureCache", "compute_features", "frozen_prefix"]

_log = logging.getLogger(__name__)


def frozen_prefix(params: Any, spec: _spec.SpecLike, groups: Sequence[str]) -> str | None:
    """The last group of the longest frozen prefix of `groups` under `spec`.

    A group belongs to the prefix when every one of its parameters is frozen
    and its BatchNorm runs on running statistics (not so under
    `train_bn=True`), and so does every group before it. Features up to the
    returned group depend only on the input and can be cached.

    Args:
      params: the parameters (or their shapes); top-level keys are groups.
      spec: the freeze spec.
      groups: top-level groups in order from input to output. Leave out the
        groups after which a model cannot start: for a ResNet,
        `models.GROUPS[:-1]` (everything but the head).

    Returns:
      The group's name, or None if the first group is not frozen.

    Raises:
      ValueError: a name in `groups` is not a top-level key of `params`.

    >>> params = {"stem": {"w": 0}, "body": {"w": 0}, "head": {"w": 0}}
    >>> frozen_prefix(params, "stem,body", ["stem", "body"])
    'body'
    >>> frozen_prefix(params, "body", ["stem", "body"]) is None
    True
    """
    known = _paths.top_level_groups(_paths.leaf_paths(params))
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(
            f"groups {unknown} are not top-level keys of the params; those are {known}."
        )
    frozen = _plan.plan(params, spec).frozen_bn_groups
    last = None
    for group in groups:
        if group not in frozen:
            break
        last = group
    return last


def compute_features(
    model: flax.linen.Module,
    variables: Mapping[str, Any],
    images_uint8: np.ndarray,
    *,
    upto: str,
    preprocess: Callable[[jax.Array], jax.Array],
    batch_size: int,
    pool: bool = False,
    start_after: str | None = None,
) -> np.ndarray:
    """Eval-mode features of `images_uint8` up to group `upto`, as float32 numpy.

    Runs `model.features(preprocess(images), upto=upto, pool=pool)` (see
    `layerfreeze.models.ResNet.features`) in jitted batches of `batch_size`;
    the last batch is padded, so one compilation serves all of them. The
    compiled function is cached per `(model, upto, pool, preprocess,
    start_after)`: pass a module-level function such as `data.normalize`,
    not a fresh lambda.

    Args:
      model: a module with a `features(x, *, upto, pool)` method (and
        `start_after`, to use that argument).
      variables: `{"params": ..., "batch_stats": ...}`.
      images_uint8: `[N, H, W, C]` images, as stored by `layerfreeze.train.data`;
        with `start_after`, the float32 features after that group instead
        (as this function returns them).
      upto: the last group to run.
      preprocess: `images -> float images`, e.g. `data.normalize`; not
        applied to features (`start_after`).
      batch_size: examples per compiled call.
      pool: return the spatial mean of `stage4` (what the head reads).
      start_after: the inputs are this group's features: only the groups
        after it run (`model.features(x, upto=..., start_after=...)`).

    Returns:
      float32 `[N, ...]` features, on the host.

    Raises:
      ValueError: `batch_size` < 1 or no images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    num = len(images_uint8)
    if num == 0:
        raise ValueError("No images to compute features of.")
    # On the device once, not once per batch (host arrays would be copied every call).
    variables = _on_device(variables)
    out: np.ndarray | None = None
    pending: tuple[int, int, jax.Array] | None = None

    def store(start: int, real: int, result: jax.Array) -> np.ndarray:
        host = np.asarray(result, np.float32)
        target = out if out is not None else np.empty((num, *host.shape[1:]), np.float32)
        target[start : start + real] = host[:real]
        return target

    for start in range(0, num, batch_size):
        chunk = np.asarray(images_uint8[start : start + batch_size])
        real = len(chunk)
        if real < batch_size:
            pad = np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        # Dispatched asynchronously: the previous batch is copied to the host
        # while this one computes.
        result = _features_fn(model, upto, pool, preprocess, start_after)(variables, chunk)
        if pending is not None:
            out = store(*pending)
        pending = (start, real, result)
    assert pending is not None
    return store(*pending)


class FeatureCache:
    """A training set's features up to the current frozen prefix, kept on the host.

    Call `update(prefix, variables)` at each step (or phase change) with the
    prefix of the phase in force (`frozen_prefix`): the features are
    recomputed from `variables` only when the prefix changes. The groups of a
    prefix stay bit-identical while it lasts, but a phase in between may have
    trained them, so a prefix seen before is computed again. Given the model's
    `groups`, a longer prefix is computed from the features of the shorter one
    held (unless those are pooled): only the newly frozen groups run, as the
    groups held stayed frozen since their features were computed (a prefix
    only grows while it stays frozen). The features are derived data: never
    checkpoint them; a resumed run recomputes them.

    Args:
      model: a module with a `features(x, *, upto, pool)` method (the
        bundled ResNets), as for `compute_features`.
      images: `[N, H, W, C]` training images, indexed as the batches are.
      preprocess: `images -> float images`, e.g. `data.normalize`; a
        module-level function, so that each prefix compiles once.
      batch_size: examples per compiled call, >= 1.
      pool: the prefixes whose features are cached pooled (the spatial mean):
        `("stage4",)` for the bundled ResNets, whose head reads only the mean.
      groups: the groups in order from the input (`models.GROUPS[:-1]` for
        the bundled ResNets), to compute a longer prefix's features from the
        shorter prefix's (the model's `features` takes `start_after`). None:
        every prefix from the images.

    Raises:
      ValueError: `batch_size` < 1 or no images.
      TypeError: `pool` is a string rather than a collection of names, or
        `groups` no sequence of names.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from layerfreeze.train import data
    >>> from layerfreeze.models import resnet18
    >>> model = resnet18(10, stem="cifar", width=4)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    >>> cache = FeatureCache(model, np.zeros((5, 16, 16, 3), np.uint8),
    ...                      preprocess=data.normalize, batch_size=2, pool=("stage4",))
    >>> cache.update("stage4", variables), cache.update("stage4", variables)
    (True, False)
    >>> cache.prefix, cache.features.shape, cache.nbytes
    ('stage4', (5, 32), 640)
    >>> cache.update(None, variables), cache.features is None
    (False, True)
    """

    def __init__(
        self,
        model: flax.linen.Module,
        images: np.ndarray,
        *,
        preprocess: Callable[[jax.Array], jax.Array],
        batch_size: int,
        pool: Collection[str] = (),
        groups: Sequence[str] | None = None,
    ):
        if groups is not None:
            groups = _checks.groups(groups, "FeatureCache: groups", empty=True)
        if isinstance(pool, str):
            raise TypeError(
                f"pool must be a collection of group names such as ({pool!r},), got the "
                f"string {pool!r}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
        if len(images) == 0:
            raise ValueError("No images to cache the features of.")
        self._model, self._images = model, images
        self._preprocess, self._batch_size = preprocess, batch_size
        self._pool = frozenset(pool)
        self._groups = None if groups is None else tuple(groups)
        self._prefix: str | None = None
        self._features: np.ndarray | None = None
        self._seconds = 0.0
        self._variables: Any = None  # their shapes, as the last `update` placed them
        self._shapes: dict[str, tuple[int, ...]] = {}  # per prefix: one example's features

    @property
    def prefix(self) -> str | None:
        """The group the cached features end with; None when nothing is cached."""
        return self._prefix

    @property
    def features(self) -> np.ndarray | None:
        """float32 `[N, ...]` features of every image, or None (train on the images)."""
        return self._features

    @property
    def nbytes(self) -> int:
        """Host memory the features take, in bytes (0 when none)."""
        return 0 if self._features is None else self._features.nbytes

    @property
    def seconds(self) -> float:
        """How long computing the current features took (0.0 when none)."""
        return self._seconds

    def update(self, prefix: str | None, variables: Mapping[str, Any]) -> bool:
        """Makes the cache hold the features up to `prefix`.

        Args:
          prefix: the last group of the phase's frozen prefix, or None when the
            phase leaves none (then the cache is emptied: train on images).
          variables: `{"params": ..., "batch_stats": ...}` as they are now
            (e.g. the train state's); read when recomputing, and their shapes
            on the first call (for `compile_job`).

        Returns:
          Whether the features were computed (False: the prefix is unchanged,
          or None).

        Raises:
          ValueError: the model cannot stop at `prefix`; the cache is then empty.
        """
        if self._variables is None:
            self._variables = _abstract_variables(variables)
        if prefix == self._prefix:
            return False
        start_after, inputs = self._source(prefix)
        # Emptied first: a failed computation must not leave stale features behind.
        self._prefix, self._features, self._seconds = None, None, 0.0
        if prefix is None:
            _log.info("Feature cache emptied: this phase leaves no frozen prefix to cache.")
            return False
        start = time.perf_counter()
        features = compute_features(
            self._model,
            variables,
            inputs,
            upto=prefix,
            preprocess=self._preprocess,
            batch_size=self._batch_size,
            pool=prefix in self._pool,
            start_after=start_after,
        )
        self._prefix, self._features = prefix, features
        self._variables = _abstract_variables(variables)
        self._seconds = time.perf_counter() - start
        _log.info(
            "Cached the features after %s%s: shape %s float32 (%.1f MiB) in %.2fs.",
            prefix,
            "" if start_after is None else f" (from those after {start_after})",
            features.shape,
            features.nbytes / 2**20,
            self._seconds,
        )
        return True

    def _source(self, prefix: str | None) -> tuple[str | None, np.ndarray]:
        """`(start_after, inputs)` the features after `prefix` are computed from: the
        features held when they are of a shorter prefix (and `groups` orders them),
        else the images."""
        held, order = self._prefix, self._groups
        if (
            order is not None
            and held is not None
            and held not in self._pool
            and held in order
            and prefix in order
            and order.index(held) < order.index(prefix)
        ):
            return held, self._features
        return None, self._images

    # Compiling ahead (`train.Phases(..., feature_cache=cache)`) -------------------

    def batch_like(self, prefix: str | None, batch: Mapping[str, Any], key: str = "image") -> Any:
        """`batch` as a phase with frozen prefix `prefix` gets it, abstract.

        `batch[key]` (images, or another prefix's features: its leading
        dimension is the batch size) becomes a `jax.ShapeDtypeStruct` of the
        features after `prefix` (float32), or of the images when `prefix` is
        None, split over the devices as `batch[key]` is; the other entries
        stay as they are. `train.Phases` compiles the train step of a phase
        to come against it.

        Raises:
          ValueError: `update` has not been called yet (the variables' shapes
            are unknown), or the model cannot stop at `prefix`.
        """
        size = np.shape(batch[key])[0]
        if prefix is None:
            shape, dtype = self._images.shape[1:], self._images.dtype
        else:
            if prefix not in self._shapes:
                one = jax.ShapeDtypeStruct((1, *self._images.shape[1:]), self._images.dtype)
                fn = self._features_fn(prefix).jitted
                self._shapes[prefix] = jax.eval_shape(fn, self._variables_shape(), one).shape[1:]
            shape, dtype = self._shapes[prefix], np.float32  # stored as float32 on the host
        # Split over the devices as the entry it replaces (its leading dimension).
        sharding = getattr(batch[key], "sharding", None)
        return {
            **batch,
            key: jax.ShapeDtypeStruct((size, *shape), np.dtype(dtype), sharding=sharding),
        }

    def compile_job(self, prefix: str | None) -> Callable[[], Any] | None:
        """A job compiling the program `update(prefix, ...)` will run, for a background thread.

        The job returns the program (a `jax.stages.Compiled`).

        For `train.Phases(..., feature_cache=cache, compile_ahead=True)`,
        which queues it for a phase to come whose frozen prefix is `prefix`:
        at the change the features are then computed by that program, with
        nothing to trace or compile. None when there is nothing to compile:
        `prefix` is None, `update` has not been called yet, or the program is
        there already. The variables are expected in the shapes, dtypes and
        placement `update` saw last, and the features to be computed from
        what the cache holds now (the features of a shorter prefix, given
        `groups`, or the images).
        """
        if prefix is None or self._variables is None:
            return None
        start_after, inputs = self._source(prefix)  # as `update` would compute it now
        fn = self._features_fn(prefix, start_after)
        shape = (self._batch_size, *inputs.shape[1:])
        args = (self._variables, jax.ShapeDtypeStruct(shape, inputs.dtype))
        if _ahead.signature(args) in fn.programs:
            return None

        def job() -> Any:
            program = fn.jitted.lower(*args).compile()
            fn.add(args, program)
            return program

        return job

    def _features_fn(self, prefix: str, start_after: str | None = None) -> _ahead.AheadFn:
        pool = prefix in self._pool
        return _features_fn(self._model, prefix, pool, self._preprocess, start_after)

    def _variables_shape(self) -> Any:
        if self._variables is None:
            raise ValueError(
                "FeatureCache: the variables' shapes are known from the first update(prefix, "
                "variables) on; call it first."
            )
        return self._variables

    def __repr__(self) -> str:
        shape = None if self._features is None else self._features.shape
        return f"FeatureCache(prefix={self._prefix!r}, shape={shape})"


def _read(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables `features` reads."""
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def _on_device(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables `features` reads, on the device."""
    return jax.device_put(_read(variables))


def _abstract_variables(variables: Mapping[str, Any]) -> Any:
    """Their shapes, dtypes and shardings, as `compute_features` gets them: device
    arrays (a train state's) stay where they are, so nothing is copied to find out."""
    return _ahead.abstract(_read(variables))


@functools.cache
def _features_fn(
    model: flax.linen.Module,
    upto: str,
    pool: bool,
    preprocess: Callable[[jax.Array], jax.Array],
    start_after: str | None = None,
) -> _ahead.AheadFn:
    """`(variables, inputs) -> features` jitted, once per its arguments; it runs a
    program compiled ahead (`FeatureCache.compile_job`) for arguments that fit."""
    kwargs = {"upto": upto, "pool": pool, "method": "features"}
    if start_after is not None:  # the inputs are features: no preprocessing
        kwargs["start_after"], preprocess = start_after, _identity

    def features(variables: Mapping[str, Any], inputs: jax.Array) -> jax.Array:
        return model.apply(variables, preprocess(inputs), **kwargs)

    return _ahead.AheadFn(jax.jit(features), on_first_call=lambda args, out: None)


def _identity(x: Any) -> Any:
    return x
