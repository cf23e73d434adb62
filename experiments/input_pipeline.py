"""The experiment's input pipeline: CIFAR-10/100 from TFDS, or the synthetic stand-in.

CIFAR is read with `tfds.data_source` from a prepared ArrayRecord copy into
memory (`layerfreeze.train.data.Dataset`); batching, augmentation and the
synthetic dataset are the library's (`layerfreeze.train.data`).

>>> ds = load_dataset("synthetic", synthetic_size=(100, 20))
>>> ds.train_images.shape, ds.train_images.dtype, ds.num_classes
((100, 32, 32, 3), dtype('uint8'), 10)
"""

import importlib.util
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np

from layerfreeze.train import data

__all__ = ["DATASETS", "NUM_CLASSES", "DatasetUnavailableError", "load_dataset"]

DATASETS = ("cifar10", "cifar100", "synthetic")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}

# Examples read per `__getitems__` call: large enough that ArrayRecord reads in
# bulk (2.5x faster than one record at a time), small enough to bound memory.
_READ_CHUNK = 4096


class DatasetUnavailableError(ValueError):
    """The requested TFDS dataset is not prepared on disk and could not be prepared."""


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (5000, 1000),
) -> data.Dataset:
    """Loads a dataset of `DATASETS` into memory.

    CIFAR is read with `tfds.data_source` from a prepared ArrayRecord copy (no
    TensorFlow needed; pillow decodes the PNGs). Preparing it (`download=True`)
    needs TensorFlow (`pip install "layerfreeze[cifar]"`) and network access.

    Args:
        name: one of `DATASETS`.
        data_dir: TFDS data directory; `None` means TFDS's default
            (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`).
        download: whether TFDS may download and prepare a missing dataset.
        seed: seed of the synthetic dataset; ignored for CIFAR.
        synthetic_size: `(num_train, num_test)` of the synthetic dataset.

    Returns:
        The dataset, both splits materialised as numpy arrays.

    Raises:
        ValueError: `name` is not one of `DATASETS`.
        DatasetUnavailableError: CIFAR is not prepared under `data_dir` and could
            not be prepared; the message says how to prepare it.

    >>> load_dataset("synthetic", synthetic_size=(50, 10)).test_images.shape
    (10, 32, 32, 3)
    >>> load_dataset("mnist")
    Traceback (most recent call last):
    ...
    ValueError: Unknown dataset 'mnist'; expected one of ('cifar10', 'cifar100', 'synthetic').
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")
    if name == "synthetic":
        num_train, num_test = synthetic_size
        return data.make_synthetic(
            num_train=num_train,
            num_test=num_test,
            num_classes=NUM_CLASSES["synthetic"],
            seed=seed,
        )
    return _load_tfds(name, data_dir=data_dir, download=download)


def _load_tfds(name: str, *, data_dir: str | None, download: bool) -> data.Dataset:
    # Imported here: TFDS takes half a second to import and synthetic runs never need it.
    try:
        train, test = _data_source(name, data_dir, download=False)
    # TFDS reports "not prepared" and "cannot prepare" through unrelated types
    # (KeyError for empty splits, NotImplementedError for a TFRecord copy,
    # ImportError without TensorFlow, OSError without network); to the user they
    # all mean the same, and the original error stays chained and quoted.
    except Exception as err:
        if not download:
            raise DatasetUnavailableError(_unavailable_message(name, data_dir, False, err)) from err
        # TFDS retries a failed download for minutes: without the network, say so now.
        if not _reachable(_DOWNLOAD_HOSTS[name]):
            raise DatasetUnavailableError(_offline_message(name, data_dir)) from err
        try:
            train, test = _data_source(name, data_dir, download=True)
        except Exception as err:
            raise DatasetUnavailableError(_unavailable_message(name, data_dir, True, err)) from err
    train_images, train_labels = _materialise(train, name=name, split="train")
    test_images, test_labels = _materialise(test, name=name, split="test")
    return data.Dataset(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES[name],
        name=name,
    )


# Where TFDS downloads each dataset from (its `download_and_prepare` URLs).
_DOWNLOAD_HOSTS = {"cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}


def _data_source(name: str, data_dir: str | None, *, download: bool) -> tuple[Any, Any]:
    import tensorflow_datasets as tfds  # half a second to import; synthetic runs skip it

    return tfds.data_source(
        name,
        split=["train", "test"],
        data_dir=data_dir,
        download=download,
        # `tfds.data_source` picks ArrayRecord only when no data_dir is given;
        # a data_dir would otherwise be prepared as TFRecord, which it cannot read.
        builder_kwargs={"file_format": "array_record"},
    )


def _tensorflow_installed() -> bool:
    """Whether TensorFlow, which preparing CIFAR needs, is importable here."""
    return importlib.util.find_spec("tensorflow") is not None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether an HTTPS connection to `host` opens within `timeout` seconds."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _offline_message(name: str, data_dir: str | None) -> str:
    where = f"data_dir={data_dir!r}" if data_dir else "the TFDS default data_dir"
    return (
        f"{name} is not prepared in {where}, and its download host "
        f"{_DOWNLOAD_HOSTS[name]} cannot be reached (no network?). Offline, train on the "
        "synthetic dataset: python experiments/cifar.py --config.dataset=synthetic; or "
        "point --config.data_dir at a prepared copy (with --config.download=False)."
    )


def _unavailable_message(name: str, data_dir: str | None, download: bool, err: Exception) -> str:
    import tensorflow_datasets as tfds

    where = (
        f"data_dir={data_dir!r}"
        if data_dir
        else "the TFDS default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)"
    )
    target = data_dir or "DIR"
    version = tfds.builder_cls(name).VERSION
    cause = (str(err).strip().splitlines() or [""])[0][:200]
    tried = "could not download and prepare it" if download else "download=False"
    return (
        f"{name} is not prepared (as ArrayRecord) in {where}; {tried}.\n"
        f"TFDS said: {type(err).__name__}: {cause}\n"
        "To fix, do one of:\n"
        + (
            ""
            if _tensorflow_installed()
            else '  - pip install "layerfreeze[cifar]" (brings tensorflow-cpu), then load once '
            "with download=True (needs network);\n"
        )
        + f"  - tfds build {name} --data_dir={target} --file_format=array_record;\n"
        f"  - put a prepared ArrayRecord copy under {target}/{name}/{version}/;\n"
        "  - or use the synthetic dataset, layerfreeze.train.data.make_synthetic "
        "(in experiments/cifar.py: --config.dataset=synthetic)."
    )


def _materialise(source: Sequence[Any], *, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads every example of a TFDS data source into uint8 images and int32 labels."""
    num = len(source)
    images = np.empty((num, *data.IMAGE_SHAPE), np.uint8)
    labels = np.empty((num,), np.int32)
    # Real data sources read in bulk through `__getitems__`; a plain sequence
    # (a hand-made source, a mock) may only have `__getitem__`.
    get_many = getattr(source, "__getitems__", None)
    for start in range(0, num, _READ_CHUNK):
        keys = list(range(start, min(num, start + _READ_CHUNK)))
        examples = get_many(keys) if get_many is not None else [source[k] for k in keys]
        chunk = np.stack([np.asarray(ex["image"]) for ex in examples])
        if chunk.shape[1:] != data.IMAGE_SHAPE:
            raise ValueError(
                f"{name}/{split} images have shape {chunk.shape[1:]}; expected {data.IMAGE_SHAPE}."
            )
        images[start : start + len(keys)] = chunk
        labels[start : start + len(keys)] = [ex["label"] for ex in examples]
    return images, labels
