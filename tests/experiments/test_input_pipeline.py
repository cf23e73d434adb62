"""`experiments/input_pipeline.py`: CIFAR through TFDS (mocked and a real prepared copy).

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

import io

import input_pipeline
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image


@pytest.fixture
def small_read_chunks(monkeypatch):
    """Reads in chunks of 32 so that a small split spans several chunks."""
    monkeypatch.setattr(input_pipeline, "_READ_CHUNK", 32)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.usefixtures("fixed_mock_getitems", "small_read_chunks")
def test_load_dataset_through_tfds_mock_data(name, tmp_path):
    with tfds.testing.mock_data(num_examples=100, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = input_pipeline.load_dataset(name, data_dir=str(tmp_path))
        expected = tfds.data_source(name, split="train", download=False)
        expected_images = np.stack([expected[i]["image"] for i in range(100)])
        expected_labels = np.array([expected[i]["label"] for i in range(100)])

    assert ds.name == name
    assert ds.num_classes == input_pipeline.NUM_CLASSES[name]
    for images, labels in [(ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)]:
        assert images.shape == (100, 32, 32, 3)
        assert images.dtype == np.uint8
        assert labels.shape == (100,)
        assert labels.dtype == np.int32
        assert labels.min() >= 0
        assert labels.max() < input_pipeline.NUM_CLASSES[name]
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
        ds = input_pipeline.load_dataset("cifar10", data_dir=str(tmp_path))
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

    ds = input_pipeline.load_dataset("cifar10", data_dir=str(tmp_path))

    np.testing.assert_array_equal(ds.train_images, splits["train"][0])
    np.testing.assert_array_equal(ds.train_labels, splits["train"][1])
    np.testing.assert_array_equal(ds.test_images, splits["test"][0])
    np.testing.assert_array_equal(ds.test_labels, splits["test"][1])
    assert ds.train_labels.dtype == np.int32
    assert (ds.num_train, ds.num_test, ds.num_classes) == (70, 30, 10)


@pytest.mark.parametrize("tensorflow", [False, True])
def test_missing_data_raises_actionable_error(tmp_path, monkeypatch, tensorflow):
    monkeypatch.setattr(input_pipeline, "_tensorflow_installed", lambda: tensorflow)
    with pytest.raises(input_pipeline.DatasetUnavailableError) as info:
        input_pipeline.load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"data_dir={str(tmp_path)!r}" in message
    assert "download=False" in message
    # The extra is advised only where what it brings is missing.
    assert ('pip install "layerfreeze[cifar]"' in message) is not tensorflow
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message
    assert f"{tmp_path}/cifar10/3.0.2/" in message
    assert "--config.dataset=synthetic" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_download_raises_actionable_error(tmp_path, monkeypatch):
    # Stands in for preparing without TensorFlow or network, and never downloads.
    def no_tensorflow(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_tensorflow)
    monkeypatch.setattr(input_pipeline, "_reachable", lambda host: True)
    with pytest.raises(input_pipeline.DatasetUnavailableError, match="could not download") as info:
        input_pipeline.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert "No module named 'tensorflow'" in str(info.value)
    assert "tfds build cifar100" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_offline_download_fails_at_once_naming_the_offline_command(tmp_path, monkeypatch):
    def never(self, *args, **kwargs):
        raise AssertionError("no download may be attempted without the network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", never)
    hosts = []
    monkeypatch.setattr(input_pipeline, "_reachable", lambda host: hosts.append(host) or False)
    with pytest.raises(input_pipeline.DatasetUnavailableError) as info:
        input_pipeline.load_dataset("cifar10", data_dir=str(tmp_path), download=True)
    assert hosts == ["www.cs.toronto.edu"]
    message = str(info.value)
    assert "cannot be reached (no network?)" in message
    assert "python experiments/cifar.py --config.dataset=synthetic" in message
    assert "\n" not in message and "pip install" not in message


def test_default_data_dir_is_named_in_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(
        input_pipeline.DatasetUnavailableError, match=r"TFDS default data_dir"
    ) as info:
        input_pipeline.load_dataset("cifar10")
    assert "tfds build cifar10 --data_dir=DIR --file_format=array_record" in str(info.value)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'") as info:
        input_pipeline.load_dataset("mnist")
    assert not isinstance(info.value, input_pipeline.DatasetUnavailableError)
    for name in input_pipeline.DATASETS:
        assert repr(name) in str(info.value)
