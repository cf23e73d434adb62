"""Frozen-feature caching: the model's skip, the prefix rule, the cache, the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layerfreeze as lf
from layerfreeze import train
from layerfreeze.models import GROUPS, ResNet, resnet18
from layerfreeze.train import data, features

PREFIX_GROUPS = GROUPS[:-1]  # a ResNet can start after any group but the head


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _model(**kw):
    return resnet18(10, stem="cifar", width=4, **kw)


def _variables(model, size=16):
    return model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False)


def _images(n=6, size=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


# --------------------------------------------------------------------------- #
# Model: features + start_after == the whole model
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("group", PREFIX_GROUPS)
def test_cached_prefix_then_rest_equals_full_model(group):
    model = _model(head="mlp", head_dropout=0.3)
    variables = _variables(model)
    x = data.normalize(_images())
    prefix = GROUPS[: GROUPS.index(group) + 1]
    rngs = {"dropout": jax.random.key(3)}

    feats = model.apply(variables, x, upto=group, method=ResNet.features)
    with lf.frozen_batchnorm(variables["params"], ",".join(prefix)):
        cached, cached_updates = model.apply(
            variables,
            feats,
            train=True,
            start_after=group,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        full, full_updates = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs=rngs
        )
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
    # The skipped groups' statistics come back untouched, the rest updated alike.
    assert sorted(cached_updates["batch_stats"]) == sorted(full_updates["batch_stats"])
    for g in prefix:
        _assert_trees_equal(cached_updates["batch_stats"][g], variables["batch_stats"][g])
    for a, b in zip(jax.tree.leaves(cached_updates), jax.tree.leaves(full_updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pooled_stage4_features_feed_the_head():
    model = _model()
    variables = _variables(model)
    x = data.normalize(_images())
    pooled = model.apply(variables, x, upto="stage4", pool=True, method=ResNet.features)
    assert pooled.shape == (6, 32)
    with lf.frozen_batchnorm(variables["params"], "all"):
        logits = model.apply(variables, pooled, train=True, start_after="stage4")
        full = model.apply(variables, x, train=True)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-6)


def test_init_still_creates_every_group():
    model = _model()
    variables = _variables(model)
    assert sorted(variables["params"]) == sorted(GROUPS)
    assert sorted(variables["batch_stats"]) == sorted(GROUPS[:-1])
    logits = model.apply(variables, _images().astype(np.float32), upto="head", method="features")
    assert logits.shape == (6, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_after": "head"}, r"start_after must be one of \['stem', .*'stage4'\]"),
        ({"start_after": "stage9"}, r"start_after must be one of \['stem', 'stage1'"),
    ],
)
def test_start_after_rejects_bad_groups(kwargs, match):
    model = _model()
    variables = _variables(model)
    with pytest.raises(ValueError, match=match):
        model.apply(variables, jnp.zeros((1, 2, 2, 32)), train=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upto": "body"}, r"upto must be one of \['stem', .*'head'\]; got 'body'"),
        ({"upto": "stage2", "pool": True}, "pool=True is only valid with upto='stage4'"),
    ],
)
def test_features_rejects_bad_arguments(kwargs, match):
    model = _model()
    variables = _variables(model)
    with pytest.raises(ValueError, match=match):
        model.apply(variables, jnp.zeros((1, 16, 16, 3)), method=ResNet.features, **kwargs)


# --------------------------------------------------------------------------- #
# frozen_prefix
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("stem,stage1", "stage1"),
        ("stage1", None),
        ("all-but:head", "stage4"),
        ("stem,stage2", "stem"),
        ("all", "stage4"),
        ("none", None),
    ],
)
def test_frozen_prefix(spec, expected):
    params = _variables(_model())["params"]
    assert features.frozen_prefix(params, spec, PREFIX_GROUPS) == expected


def test_frozen_prefix_is_none_when_batchnorm_trains():
    params = _variables(_model())["params"]
    spec = lf.as_spec("all-but:head").replace(train_bn=True)
    assert features.frozen_prefix(params, spec, PREFIX_GROUPS) is None


def test_frozen_prefix_rejects_unknown_groups():
    params = _variables(_model())["params"]
    with pytest.raises(ValueError, match=r"groups \['body'\] are not top-level keys"):
        features.frozen_prefix(params, "stem", ["stem", "body"])


# --------------------------------------------------------------------------- #
# compute_features
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(("group", "pool"), [("stage2", False), ("stage4", True)])
def test_compute_features_matches_one_big_batch(group, pool):
    model = _model()
    variables = _variables(model)
    images = _images(n=7)
    got = features.compute_features(
        model,
        variables,
        images,
        upto=group,
        preprocess=data.normalize,
        batch_size=3,  # 7 = 3 + 3 + 1 padded
        pool=pool,
    )
    want = model.apply(variables, data.normalize(images), upto=group, pool=pool, method="features")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_compute_features_rejects_bad_batch_size():
    model = _model()
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        features.compute_features(
            model,
            _variables(model),
            _images(),
            upto="stem",
            preprocess=data.normalize,
            batch_size=0,
        )


# --------------------------------------------------------------------------- #
# FeatureCache
# --------------------------------------------------------------------------- #


_compute_features = features.compute_features  # not counted


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of `compute_features` that `FeatureCache` makes: `upto`, or
    `(upto, start_after)` for features grown from a shorter prefix's."""
    calls = []

    def counting(*args, **kwargs):
        start_after = kwargs.get("start_after")
        calls.append(kwargs["upto"] if start_after is None else (kwargs["upto"], start_after))
        return _compute_features(*args, **kwargs)

    monkeypatch.setattr(features, "compute_features", counting)
    return calls


def _cache(model, images, **kw):
    return features.FeatureCache(
        model, images, preprocess=data.normalize, batch_size=4, pool=("stage4",), **kw
    )


def test_feature_cache_computes_once_per_prefix(counted, caplog):
    model = _model()
    variables = _variables(model)
    images = _images(n=6)
    cache = _cache(model, images)
    assert (cache.prefix, cache.features, cache.nbytes, cache.seconds) == (None, None, 0, 0.0)

    with caplog.at_level("INFO", logger="layerfreeze.train.features"):
        assert cache.update("stage2", variables) is True
    first = cache.features
    want = _compute_features(
        model, variables, images, upto="stage2", preprocess=data.normalize, batch_size=4
    )
    assert first.shape == (6, 8, 8, 8) and first.dtype == np.float32
    assert first.tobytes() == want.tobytes()
    assert (cache.prefix, cache.nbytes) == ("stage2", first.nbytes)
    assert isinstance(cache.seconds, float) and cache.seconds >= 0
    assert any(
        "Cached the features after stage2: shape (6, 8, 8, 8) float32" in r.getMessage()
        for r in caplog.records
    )

    assert cache.update("stage2", variables) is False
    assert cache.features is first
    assert counted == ["stage2"]


def test_feature_cache_recomputes_when_the_prefix_changes(counted):
    model = _model()
    variables = _variables(model)
    cache = _cache(model, _images(n=6))
    assert cache.update("stage2", variables) is True
    assert cache.update("stage4", variables) is True
    assert (cache.prefix, cache.features.shape) == ("stage4", (6, 32))  # pooled
    # Back to stage2, whose groups a phase in between may have trained.
    trained = jax.tree.map(lambda x: x * 1.5, variables)
    assert cache.update("stage2", trained) is True
    want = _compute_features(
        model, trained, _images(n=6), upto="stage2", preprocess=data.normalize, batch_size=4
    )
    assert cache.features.tobytes() == want.tobytes()
    assert counted == ["stage2", "stage4", "stage2"]


def test_feature_cache_with_groups_grows_a_prefix_from_the_features_it_holds(counted):
    model = _model()
    variables = _variables(model)
    images = _images(n=6)
    grown = _cache(model, images, groups=PREFIX_GROUPS)
    fresh = _cache(model, images)
    for prefix in ("stem", "stage2", "stage4", "stage1"):
        assert grown.update(prefix, variables) and fresh.update(prefix, variables)
        # Within float rounding of the features computed from the images.
        np.testing.assert_allclose(grown.features, fresh.features, rtol=1e-5, atol=1e-6)
    # stage1 after the pooled stage4 comes from the images again, as does every prefix
    # of the cache without groups.
    assert counted == [
        "stem", "stem", ("stage2", "stem"), "stage2", ("stage4", "stage2"), "stage4",
        "stage1", "stage1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"start_after must be one of \['stem'\]; got 'stage2'"):
        model.apply(variables, grown.features, upto="stage1", start_after="stage2",
                    method="features")  # fmt: skip


def test_feature_cache_none_empties_it(counted):
    model = _model()
    variables = _variables(model)
    cache = _cache(model, _images(n=6))
    assert cache.update(None, variables) is False
    assert cache.update("stem", variables) is True
    assert cache.update(None, variables) is False
    assert (cache.prefix, cache.features, cache.nbytes, cache.seconds) == (None, None, 0, 0.0)
    assert cache.update(None, variables) is False
    assert cache.update("stem", variables) is True
    assert counted == ["stem", "stem"]


def test_feature_cache_is_empty_after_a_failed_computation(counted):
    model = _model()
    variables = _variables(model)
    cache = _cache(model, _images(n=6))
    cache.update("stem", variables)
    with pytest.raises(ValueError, match="upto must be one of"):
        cache.update("body", variables)
    assert (cache.prefix, cache.features) == (None, None)
    assert cache.update("stem", variables) is True


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "match"),
    [
        (_images(n=2), {"batch_size": 0}, ValueError, "batch_size must be an integer >= 1; got 0"),
        (_images(n=0), {"batch_size": 2}, ValueError, "No images to cache"),
        (
            _images(n=2),
            {"batch_size": 2, "pool": "stage4"},
            TypeError,
            r"pool must be a collection of group names such as \('stage4',\)",
        ),
    ],
)
def test_feature_cache_rejects_bad_arguments(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        features.FeatureCache(_model(), images, preprocess=data.normalize, **kwargs)


# --------------------------------------------------------------------------- #
# make_steps(start_after=...)
# --------------------------------------------------------------------------- #


def test_train_step_on_cached_features_matches_train_step_on_images():
    model = _model()
    variables = _variables(model)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    spec = "stem,stage1,stage2"
    plain = train.make_steps(model, optimizer, spec, variables["params"])
    cached = train.make_steps(
        model,
        optimizer,
        spec,
        variables["params"],
        start_after="stage2",
        preprocess=lambda rng, x: x,
    )
    images = _images(n=12)
    labels = np.arange(12, dtype=np.int32) % 10
    feats = features.compute_features(
        model,
        variables,
        images,
        upto="stage2",
        preprocess=lambda x: x.astype(jnp.float32),
        batch_size=5,
    )
    a = plain.init_state(variables, jax.random.key(1))
    b = cached.init_state(variables, jax.random.key(1))
    for i in range(3):
        idx = np.arange(4) + 4 * i
        a, ma = plain.train_step(a, {"image": images[idx], "label": labels[idx]})
        b, mb = cached.train_step(b, {"image": feats[idx], "label": labels[idx]})
        for k in ("loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, err_msg=k)
    for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # The eval step still reads images through the whole model.
    batch = {"image": images[:4], "label": labels[:4]}
    np.testing.assert_allclose(
        cached.eval_step(b, batch)["loss"], plain.eval_step(a, batch)["loss"], rtol=1e-4
    )


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("stem", {"start_after": "stage1"}, "group is not entirely frozen"),
        ("stem,stage1", {"start_after": "stage1", "method": "lr0"}, "needs method 'zero'"),
    ],
)
def test_make_steps_refuses_an_unfrozen_start(spec, kwargs, match):
    model = _model()
    params = _variables(model)["params"]
    with pytest.raises(ValueError, match=match):
        train.make_steps(model, optax.sgd(0.1), spec, params, **kwargs)
