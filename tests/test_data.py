"""Tests for `layerfreeze.data`: loading (mocked and real TFDS), batching, augmentation.

No test downloads anything. CIFAR is read two ways, neither needing TensorFlow:

* `tfds.testing.mock_data(policy=MockPolicy.USE_CODE)`. `AUTO` would fall back to
  `USE_CODE` anyway, because the pip wheel of TFDS ships no `testing/metadata`
  files; `USE_FILES` needs those metadata files and fails without them. Decoded
  examples are generated in numpy, so no TensorFlow is needed as long as no
  `decoders` are passed (encoding them would need `tf`).
* A prepared ArrayRecord copy written by `_write_prepared_cifar10`, the same
  files `tfds build cifar10 --file_format=array_record` leaves, so the real read
  path (`ArrayRecordDataSource.__getitems__`, PNG decoding by pillow) is covered.
"""

import doctest
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from layerfreeze import data


@pytest.fixture
def small_read_chunks(monkeypatch):
    """Reads in chunks of 32 so that a small split spans several chunks."""
    monkeypatch.setattr(data, "_READ_CHUNK", 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.usefixtures("fixed_mock_getitems", "small_read_chunks")
def test_load_dataset_through_tfds_mock_data(name, tmp_path):
    with tfds.testing.mock_data(num_examples=100, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(name, data_dir=str(tmp_path))
        expected = tfds.data_source(name, split="train", download=False)
        expected_images = np.stack([expected[i]["image"] for i in range(100)])
        expected_labels = np.array([expected[i]["label"] for i in range(100)])

    assert ds.name == name
    assert ds.num_classes == data.NUM_CLASSES[name]
    for images, labels in [(ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)]:
        assert images.shape == (100, 32, 32, 3)
        assert images.dtype == np.uint8
        assert labels.shape == (100,)
        assert labels.dtype == np.int32
        assert labels.min() >= 0
        assert labels.max() < data.NUM_CLASSES[name]
    # Chunked bulk reads keep the order of the examples.
    np.testing.assert_array_equal(ds.train_images, expected_images)
    np.testing.assert_array_equal(ds.train_labels, expected_labels)


@pytest.mark.usefixtures("small_read_chunks")
def test_load_dataset_reads_sources_without_bulk_access(tmp_path):
    # `as_data_source_fn` replaces the data sources with plain lists, which have
    # `__getitem__` but no `__getitems__`.
    rng = np.random.default_rng(0)
    examples = {
        split: [
            {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": np.int64(i % 10)}
            for i in range(n)
        ]
        for split, n in [("train", 40), ("test", 33)]
    }

    def as_data_source(self, split, **kwargs):
        return [examples[s] for s in split]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        ds = data.load_dataset("cifar10", data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds.test_images, [ex["image"] for ex in examples["test"]])
    np.testing.assert_array_equal(ds.train_labels, np.arange(40) % 10)


def _write_prepared_cifar10(data_dir, splits):
    """Writes a prepared ArrayRecord copy of cifar10, without TensorFlow.

    Args:
        data_dir: TFDS data directory.
        splits: `{split: (uint8 images [N, 32, 32, 3], int labels [N])}`.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

    def feature(*, bytes_value=None, int_value=None):
        if bytes_value is not None:
            return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[bytes_value]))
        return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[int_value]))

    builder = tfds.builder("cifar10", data_dir=str(data_dir), file_format="array_record")
    out = builder.data_path
    out.mkdir(parents=True)
    split_infos = []
    for split, (images, labels) in splits.items():
        path = out / f"cifar10-{split}.array_record-00000-of-00001"
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            example = tf_example_pb2.Example(
                features=tf_feature_pb2.Features(
                    feature={
                        "id": feature(bytes_value=f"{split}_{i}".encode()),
                        "image": feature(bytes_value=png.getvalue()),
                        "label": feature(int_value=int(label)),
                    }
                )
            )
            writer.write(example.SerializeToString())
        writer.close()
        template = tfds.core.naming.ShardedFileTemplate(
            data_dir=out, dataset_name="cifar10", split=split, filetype_suffix="array_record"
        )
        split_infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[len(labels)],
                num_bytes=len(path.read_bytes()),
                filename_template=template,
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)
    builder.info.write_to_directory(out)


@pytest.mark.usefixtures("small_read_chunks")
def test_load_dataset_reads_prepared_array_record_copy(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (70, 32, 32, 3), np.uint8), rng.integers(0, 10, 70)),
        "test": (rng.integers(0, 256, (30, 32, 32, 3), np.uint8), rng.integers(0, 10, 30)),
    }
    _write_prepared_cifar10(tmp_path, splits)

    ds = data.load_dataset("cifar10", data_dir=str(tmp_path))

    np.testing.assert_array_equal(ds.train_images, splits["train"][0])
    np.testing.assert_array_equal(ds.train_labels, splits["train"][1])
    np.testing.assert_array_equal(ds.test_images, splits["test"][0])
    np.testing.assert_array_equal(ds.test_labels, splits["test"][1])
    assert ds.train_labels.dtype == np.int32
    assert (ds.num_train, ds.num_test, ds.num_classes) == (70, 30, 10)


def test_missing_data_raises_actionable_error(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"data_dir={str(tmp_path)!r}" in message
    assert "download=False" in message
    assert 'pip install "layerfreeze[cifar]"' in message
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message
    assert f"{tmp_path}/cifar10/3.0.2/" in message
    assert "--config.dataset=synthetic" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_download_raises_actionable_error(tmp_path, monkeypatch):
    # Stands in for preparing without TensorFlow or network, and never downloads.
    def no_tensorflow(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_tensorflow)
    with pytest.raises(data.DatasetUnavailableError, match="could not download") as info:
        data.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert "No module named 'tensorflow'" in str(info.value)
    assert "tfds build cifar100" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_default_data_dir_is_named_in_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DatasetUnavailableError, match=r"TFDS default data_dir") as info:
        data.load_dataset("cifar10")
    assert "tfds build cifar10 --data_dir=DIR --file_format=array_record" in str(info.value)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'") as info:
        data.load_dataset("mnist")
    assert not isinstance(info.value, data.DatasetUnavailableError)
    for name in data.DATASETS:
        assert repr(name) in str(info.value)


def _arrays(ds):
    return [ds.train_images, ds.train_labels, ds.test_images, ds.test_labels]


def test_synthetic_is_deterministic_per_seed():
    a = data.load_dataset("synthetic", seed=1, synthetic_size=(500, 100))
    b = data.load_dataset("synthetic", seed=1, synthetic_size=(500, 100))
    c = data.load_dataset("synthetic", seed=2, synthetic_size=(500, 100))
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
    ds = data.load_dataset("synthetic", synthetic_size=(503, 101))
    assert (ds.name, ds.num_classes) == ("synthetic", data.NUM_CLASSES["synthetic"])
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


def test_docstring_examples():
    result = doctest.testmod(data, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
