"""`layerfreeze.train.data`: the synthetic dataset, resumable batching, augmentation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfreeze.train import data


def _arrays(ds):
    return [ds.train_images, ds.train_labels, ds.test_images, ds.test_labels]


def test_synthetic_is_deterministic_per_seed():
    a = data.make_synthetic(num_train=500, num_test=100, seed=1)
    b = data.make_synthetic(num_train=500, num_test=100, seed=1)
    c = data.make_synthetic(num_train=500, num_test=100, seed=2)
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.train_images, c.train_images)
    assert not np.array_equal(a.train_labels, c.train_labels)


def test_synthetic_train_set_does_not_depend_on_test_size():
    a = data.make_synthetic(num_train=200, num_test=10, seed=0)
    b = data.make_synthetic(num_train=200, num_test=50, seed=0)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)


def test_synthetic_shapes_and_balanced_labels():
    ds = data.make_synthetic(num_train=503, num_test=101)
    assert (ds.name, ds.num_classes) == ("synthetic", 10)  # make_synthetic's default
    assert ds.train_images.shape == (503, 32, 32, 3)
    assert ds.test_images.shape == (101, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32
    for labels in (ds.train_labels, ds.test_labels):
        counts = np.bincount(labels, minlength=ds.num_classes)
        assert counts.max() - counts.min() <= 1
    # Images use the pixel range and differ between examples.
    assert ds.train_images.std() > 20
    assert len(np.unique(ds.train_images.reshape(503, -1), axis=0)) == 503


def test_synthetic_classes_differ_more_than_examples_within_a_class():
    ds = data.make_synthetic(num_train=1000, num_test=10, seed=0)
    means = np.stack([ds.train_images[ds.train_labels == k].mean(0) for k in range(ds.num_classes)])
    within = np.mean([ds.train_images[ds.train_labels == k].std(0).mean() for k in range(10)])
    between = means.std(0).mean()
    assert between > within / 2


def test_dataset_rejects_wrong_dtypes():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="train_labels must be int32"):
        data.Dataset(images, np.zeros(2, np.int64), images, np.zeros(2, np.int32), 10, "x")
    with pytest.raises(ValueError, match="test_images must be uint8"):
        data.Dataset(images, np.zeros(2, np.int32), images / 1.0, np.zeros(2, np.int32), 10, "x")


@settings(max_examples=40, deadline=None)
@given(
    num_examples=st.integers(1, 60),
    batch_size=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 5),
)
def test_each_epoch_sees_every_example_at_most_once(num_examples, batch_size, seed, epoch):
    batch_size = min(batch_size, num_examples)
    spe = data.steps_per_epoch(num_examples, batch_size)
    steps = range(epoch * spe, (epoch + 1) * spe)
    seen = np.concatenate([data.batch_indices(seed, s, num_examples, batch_size) for s in steps])
    assert len(seen) == spe * batch_size
    assert len(set(seen.tolist())) == len(seen)
    np.testing.assert_array_equal(
        seen, data.epoch_permutation(seed, epoch, num_examples)[: len(seen)]
    )
    if num_examples % batch_size == 0:
        np.testing.assert_array_equal(np.sort(seen), np.arange(num_examples))


def test_epochs_have_different_orders():
    orders = [data.epoch_permutation(0, epoch, 100).tolist() for epoch in range(5)]
    assert len({tuple(o) for o in orders}) == 5
    assert data.epoch_permutation(0, 0, 100).tolist() != data.epoch_permutation(1, 0, 100).tolist()


@pytest.mark.parametrize("start_step", [0, 1, 7, 8, 13])
def test_resumed_train_batches_match_an_uninterrupted_run(start_step):
    ds = data.make_synthetic(num_train=35, num_test=5)
    stop = 20  # 4 steps per epoch: crosses several epoch boundaries.
    full = list(data.train_batches(ds, batch_size=8, seed=3, stop_step=stop))
    resumed = data.train_batches(ds, batch_size=8, seed=3, start_step=start_step, stop_step=stop)
    resumed = list(resumed)
    assert [b.step for b in full] == list(range(stop))
    assert [b.step for b in resumed] == list(range(start_step, stop))
    for a, b in zip(full[start_step:], resumed, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    for batch in full:
        idx = data.batch_indices(3, batch.step, 35, 8)
        np.testing.assert_array_equal(batch.images, ds.train_images[idx])
        np.testing.assert_array_equal(batch.labels, ds.train_labels[idx])


def test_batching_arguments_are_checked_eagerly():
    ds = data.make_synthetic(num_train=10, num_test=2)
    with pytest.raises(ValueError, match="batch_size=11 is larger than the dataset"):
        data.train_batches(ds, batch_size=11, seed=0)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        data.train_batches(ds, batch_size=2, seed=0, start_step=-1)
    with pytest.raises(ValueError, match="images and labels differ"):
        data.eval_batches(ds.test_images, ds.train_labels, 4)


@pytest.mark.parametrize(("num", "batch_size"), [(10, 4), (12, 4), (3, 8), (8, 8), (1, 1)])
def test_eval_batches_cover_every_example_exactly_once(num, batch_size):
    images = np.arange(num * 32 * 32 * 3, dtype=np.int64).reshape(num, 32, 32, 3)
    images = (images % 251).astype(np.uint8)
    labels = np.arange(num, dtype=np.int32)
    batches = list(data.eval_batches(images, labels, batch_size))
    assert len(batches) == -(-num // batch_size)
    for batch in batches:
        assert batch.images.shape == (batch_size, 32, 32, 3)
        assert batch.labels.shape == batch.mask.shape == (batch_size,)
        assert batch.mask.dtype == bool
        assert not batch.images[~batch.mask].any()
    np.testing.assert_array_equal(np.concatenate([b.labels[b.mask] for b in batches]), labels)
    np.testing.assert_array_equal(np.concatenate([b.images[b.mask] for b in batches]), images)
    assert sum(int(b.mask.sum()) for b in batches) == num


# Eager `augment` dispatches every op of the vmapped body separately (seconds per
# call); the tests run it compiled, and `test_augment_runs_under_jit` checks that
# eager and compiled results agree.
_augment = jax.jit(data.augment, static_argnames=("pad", "flip", "padding"))


def _random_images(dtype, num=16, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (num, 32, 32, 3)).astype(dtype)
    return jnp.asarray(images)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_keeps_shape_and_dtype_and_is_deterministic(dtype):
    images = _random_images(dtype)
    out = _augment(jax.random.key(0), images)
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    np.testing.assert_array_equal(out, _augment(jax.random.key(0), images))
    assert not np.array_equal(out, _augment(jax.random.key(1), images))


def test_augment_flip_gives_the_image_or_its_mirror():
    images = np.asarray(_random_images(np.uint8, num=32))
    out = np.asarray(_augment(jax.random.key(0), images, pad=0, flip=True))
    flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images, strict=True)]
    kept = [np.array_equal(o, x) for o, x in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < len(images)


def test_augment_without_flip_or_pad_is_identity():
    images = _random_images(np.float32)
    out = _augment(jax.random.key(0), images, pad=0, flip=False)
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize(("padding", "np_mode"), [("zero", "constant"), ("reflect", "reflect")])
def test_augment_crop_is_a_window_of_the_padded_image(padding, np_mode):
    pad = 4
    images = np.asarray(_random_images(np.uint8))
    out = np.asarray(_augment(jax.random.key(2), images, pad=pad, flip=False, padding=padding))
    offsets = []
    for image, crop in zip(images, out, strict=True):
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(padded[dy : dy + 32, dx : dx + 32], crop)
        ]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1


def test_augment_runs_under_jit():
    images = _random_images(np.uint8, num=4)
    jitted = jax.jit(functools.partial(data.augment, pad=2, padding="reflect"))
    np.testing.assert_array_equal(
        jitted(jax.random.key(5), images),
        data.augment(jax.random.key(5), images, pad=2, padding="reflect"),
    )


def test_augment_rejects_unknown_padding():
    with pytest.raises(ValueError, match=r"Unknown padding 'wrap'; expected one of \('zero', "):
        data.augment(jax.random.key(0), _random_images(np.uint8), padding="wrap")


def test_normalize_standardises_per_channel():
    mean_pixel = np.asarray(data.CIFAR10_MEAN, np.float32) * 255.0
    images = np.broadcast_to(mean_pixel, (2, 32, 32, 3))
    out = data.normalize(images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 0.0, atol=1e-6)
    zeros = data.normalize(np.zeros((1, 1, 1, 3), np.uint8))
    np.testing.assert_allclose(
        zeros[0, 0, 0], -np.asarray(data.CIFAR10_MEAN) / np.asarray(data.CIFAR10_STD), rtol=1e-6
    )
