"""Image datasets in memory: a synthetic CIFAR stand-in, resumable batching, augmentation.

A `Dataset` holds whole splits as uint8 numpy arrays (CIFAR-10 train is 150
MiB), because transfer-learning runs are short and revisit every example many
times; batching is then plain numpy indexing, and augmentation runs on the
accelerator inside the jitted train step. Reading CIFAR itself (TFDS) is the
experiment's input pipeline, `experiments/input_pipeline.py`.

Batch order is a pure function of `(seed, step)`: a run resumed from a checkpoint
at step `k` sees exactly the batches an uninterrupted run sees from step `k`.

>>> ds = make_synthetic(num_train=100, num_test=20)
>>> ds.train_images.shape, ds.train_images.dtype, ds.num_classes
((100, 32, 32, 3), dtype('uint8'), 10)
>>> batch = next(train_batches(ds, batch_size=32, seed=0))
>>> batch.step, batch.images.shape, batch.labels.shape
(0, (32, 32, 32, 3), (32,))
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_SHAPE",
    "PADDING_MODES",
    "Dataset",
    "EvalBatch",
    "TrainBatch",
    "augment",
    "batch_indices",
    "epoch_permutation",
    "eval_batches",
    "make_synthetic",
    "normalize",
    "steps_per_epoch",
    "train_batches",
]

IMAGE_SHAPE = (32, 32, 3)
PADDING_MODES = ("zero", "reflect")

# Per-channel statistics of the CIFAR-10 training set, pixels scaled to [0, 1].
# Used for CIFAR-100 too, so a network pretrained on one sees inputs on the same
# scale when fine-tuned on the other (the two sets differ by about 0.02).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory: uint8 images `[N, 32, 32, 3]` and int32 labels `[N]`.

    Attributes:
        train_images: uint8 array `[num_train, 32, 32, 3]`.
        train_labels: int32 array `[num_train]`, values in `[0, num_classes)`.
        test_images: uint8 array `[num_test, 32, 32, 3]`.
        test_labels: int32 array `[num_test]`.
        num_classes: number of classes.
        name: the dataset's name (`"synthetic"`, `"cifar10"`, or a name of your own).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
                raise ValueError(
                    f"{split}_images must be uint8 [N, 32, 32, 3]; got {images.dtype} "
                    f"{images.shape}."
                )
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels must be int32 [{images.shape[0]}] to match "
                    f"{split}_images; got {labels.dtype} {labels.shape}."
                )

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.test_labels.shape[0])


def make_synthetic(
    *, num_train: int = 5000, num_test: int = 1000, num_classes: int = 10, seed: int = 0
) -> Dataset:
    """Builds a learnable dataset with CIFAR's shapes, deterministic in `seed`.

    Each class has a fixed random low-frequency colour template (a 6x6 grid of
    random colours, bilinearly upsampled to 40x40). An example is a random 32x32
    window of its class's template (shifts of up to 8 pixels), with a random
    brightness offset and uniform pixel noise. Measured: a 3-layer CNN (Adam,
    lr 1e-3, batch 64, with `augment`) takes the loss from 2.6 to 0.08 in 100
    steps, while a linear probe on mean colour reaches 48% test accuracy.

    Templates, train and test examples come from independent streams of `seed`:
    changing `num_test` leaves the training set unchanged. Labels are balanced
    (class counts differ by at most one).

    Args:
        num_train: number of training examples.
        num_test: number of test examples.
        num_classes: number of classes.
        seed: non-negative seed; the same seed gives bit-identical arrays.

    Returns:
        A `Dataset` named `"synthetic"`.

    >>> a = make_synthetic(num_train=20, num_test=10, seed=3)
    >>> b = make_synthetic(num_train=20, num_test=10, seed=3)
    >>> bool((a.train_images == b.train_images).all()), sorted(set(a.test_labels.tolist()))
    (True, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    num_train = _check_int("num_train", num_train, 1)
    num_test = _check_int("num_test", num_test, 1)
    num_classes = _check_int("num_classes", num_classes, 2)
    seed = _check_int("seed", seed, 0)
    templates = _class_templates(np.random.default_rng((seed, 0)), num_classes)
    train_images, train_labels = _synthetic_split(
        np.random.default_rng((seed, 1)), templates, num_train
    )
    test_images, test_labels = _synthetic_split(
        np.random.default_rng((seed, 2)), templates, num_test
    )
    return Dataset(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        name="synthetic",
    )


_TEMPLATE_SIZE = 40  # 32 + the largest shift, so windows never wrap around.
_TEMPLATE_GRID = 6


def _class_templates(rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """int16 `[num_classes, 40, 40, 3]` smooth colour fields with values in [38, 217]."""
    grid = rng.uniform(0.15, 0.85, (num_classes, _TEMPLATE_GRID, _TEMPLATE_GRID, 3))
    # Bilinear interpolation as a matrix: up[i, j] is the weight of grid row j in row i.
    pos = np.linspace(0, _TEMPLATE_GRID - 1, _TEMPLATE_SIZE)
    up = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(_TEMPLATE_GRID)[None, :]))
    fields = np.einsum("yi,nijc,xj->nyxc", up, grid, up)
    return np.round(fields * 255.0).astype(np.int16)


def _synthetic_split(
    rng: np.random.Generator, templates: np.ndarray, num: int
) -> tuple[np.ndarray, np.ndarray]:
    num_classes = templates.shape[0]
    height, width, _ = IMAGE_SHAPE
    labels = rng.permutation(np.arange(num) % num_classes).astype(np.int32)
    dy, dx = rng.integers(0, _TEMPLATE_SIZE - height + 1, (2, num))
    images = np.empty((num, *IMAGE_SHAPE), np.int16)
    # A plain loop of slices copies 20x faster than one fancy-indexing gather.
    for i in range(num):
        images[i] = templates[labels[i], dy[i] : dy[i] + height, dx[i] : dx[i] + width]
    images += rng.integers(-25, 26, (num, 1, 1, 1), dtype=np.int16)  # brightness
    # Uniform pixel noise in [-32, 31] (std 18.5) from raw bytes: 10x cheaper than
    # drawing Gaussians, and the class signal does not care about the noise's shape.
    noise = np.frombuffer(rng.bytes(images.size), np.uint8).reshape(images.shape)
    images += (noise >> 2).astype(np.int16) - 32
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _check_int(name: str, value: int, low: int) -> int:
    value = operator.index(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}.")
    return value


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch; the last partial batch is dropped.

    >>> steps_per_epoch(50_000, 128)
    390
    """
    num_examples = _check_int("num_examples", num_examples, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({num_examples} examples); "
            "no full batch fits."
        )
    return num_examples // batch_size


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of `epoch`: a permutation seeded from `(seed, epoch)` only.

    It depends on no earlier epoch, so any epoch can be recomputed on resume.

    >>> epoch_permutation(0, 3, 5).tolist() == epoch_permutation(0, 3, 5).tolist()
    True
    >>> sorted(epoch_permutation(0, 3, 5).tolist())
    [0, 1, 2, 3, 4]
    """
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    num_examples = _check_int("num_examples", num_examples, 1)
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Example indices of global train step `step` (epoch = step // steps_per_epoch).

    >>> spe = steps_per_epoch(10, 4)  # 2 full batches, 2 examples dropped per epoch
    >>> batch_indices(0, spe + 1, 10, 4).tolist() == epoch_permutation(0, 1, 10)[4:8].tolist()
    True
    """
    step = _check_int("step", step, 0)
    epoch, index = divmod(step, steps_per_epoch(num_examples, batch_size))
    order = epoch_permutation(seed, epoch, num_examples)
    return order[index * batch_size : (index + 1) * batch_size]


class TrainBatch(NamedTuple):
    """One training batch: the global `step`, uint8 `images` `[B, 32, 32, 3]`, int32 `labels`."""

    step: int
    images: np.ndarray
    labels: np.ndarray


class EvalBatch(NamedTuple):
    """One evaluation batch, padded to the batch size.

    `mask[i]` is True when row `i` is a real example and False for padding, so
    `sum(correct * mask)` counts every example exactly once.
    """

    images: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def train_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    stop_step: int | None = None,
) -> Iterator[TrainBatch]:
    """Yields the training batches of steps `start_step, start_step + 1, ...`.

    Batch `step` holds `batch_indices(seed, step, ...)`, so resuming at `k` gives
    the same batches as an uninterrupted run from step `k` on. Endless unless
    `stop_step` (exclusive) is given.

    >>> ds = make_synthetic(num_train=10, num_test=2)
    >>> [b.step for b in train_batches(ds, batch_size=4, seed=0, start_step=3, stop_step=6)]
    [3, 4, 5]
    """
    # Arguments are checked here, not at the first `next()`.
    start_step = _check_int("start_step", start_step, 0)
    seed = _check_int("seed", seed, 0)
    spe = steps_per_epoch(dataset.num_train, batch_size)
    if stop_step is not None:
        stop_step = _check_int("stop_step", stop_step, start_step)
    return _train_batches(dataset, batch_size, seed, start_step, stop_step, spe)


def _train_batches(
    dataset: Dataset, batch_size: int, seed: int, step: int, stop_step: int | None, spe: int
) -> Iterator[TrainBatch]:
    epoch, order = -1, np.empty((0,), np.int64)
    while stop_step is None or step < stop_step:
        if step // spe != epoch:
            epoch = step // spe
            order = epoch_permutation(seed, epoch, dataset.num_train)
        start = (step % spe) * batch_size
        idx = order[start : start + batch_size]
        yield TrainBatch(step, dataset.train_images[idx], dataset.train_labels[idx])
        step += 1


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[EvalBatch]:
    """Yields every example once, in order, in batches of exactly `batch_size`.

    The last batch is padded with zeros (one compiled eval step serves all
    batches); its `mask` marks the real rows.

    >>> images, labels = np.zeros((5, 32, 32, 3), np.uint8), np.arange(5, dtype=np.int32)
    >>> [b.mask.tolist() for b in eval_batches(images, labels, 3)]
    [[True, True, True], [True, True, False]]
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}.")
    # Arguments are checked above, not at the first `next()`.
    return _eval_batches(images, labels, batch_size)


def _eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[EvalBatch]:
    for start in range(0, len(images), batch_size):
        batch_images = images[start : start + batch_size]
        batch_labels = labels[start : start + batch_size]
        real = len(batch_images)
        mask = np.zeros((batch_size,), bool)
        mask[:real] = True
        if real < batch_size:
            pad = batch_size - real
            batch_images = np.concatenate(
                [batch_images, np.zeros((pad, *batch_images.shape[1:]), batch_images.dtype)]
            )
            batch_labels = np.concatenate([batch_labels, np.zeros((pad,), batch_labels.dtype)])
        yield EvalBatch(batch_images, batch_labels, mask)


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    pad: int = 4,
    flip: bool = True,
    padding: str = "zero",
) -> jax.Array:
    """Random crop after padding by `pad` pixels, and random horizontal flip.

    Each example draws its own shift in `[-pad, pad]` per axis and its own flip,
    from `rng` only. Pure jax (use it inside `jit`); shape and dtype (uint8 or
    float) are preserved.

    Args:
        rng: a PRNG key.
        images: `[N, H, W, C]` batch.
        pad: pixels of padding on each side before the crop; 0 disables cropping.
        flip: whether to flip each image left-right with probability 1/2.
        padding: one of `PADDING_MODES`: `"zero"` or `"reflect"`.

    Returns:
        The augmented batch, same shape and dtype as `images`.

    >>> images = jnp.zeros((8, 32, 32, 3), jnp.uint8)
    >>> out = jax.jit(augment)(jax.random.key(0), images)
    >>> out.shape, out.dtype
    ((8, 32, 32, 3), dtype('uint8'))
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be a batch [N, H, W, C]; got shape {images.shape}.")
    pad = _check_int("pad", pad, 0)
    if padding not in PADDING_MODES:
        raise ValueError(f"Unknown padding {padding!r}; expected one of {PADDING_MODES}.")
    num, height, width, channels = images.shape
    if padding == "reflect" and pad >= min(height, width):
        raise ValueError(
            f"reflect padding needs pad < image size; got pad={pad} for {height}x{width}."
        )
    mode = "constant" if padding == "zero" else "reflect"
    # Draw all random numbers for the batch at once: per-example keys inside the
    # vmap compile 3x slower. Separate keys keep the crops the same with flip off.
    crop_key, flip_key = jax.random.split(rng)
    offsets = jax.random.randint(crop_key, (num, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, shape=(num,))

    def one(image: jax.Array, offset: jax.Array, flipped: jax.Array) -> jax.Array:
        if pad:
            padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
            image = jax.lax.dynamic_slice(
                padded, (offset[0], offset[1], 0), (height, width, channels)
            )
        if flip:
            image = jnp.where(flipped, image[:, ::-1, :], image)
        return image

    return jax.vmap(one)(images, offsets, flips)


def normalize(
    images: jax.Array,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> jax.Array:
    """Scales pixels in [0, 255] to [0, 1], then standardises per channel: float32.

    >>> x = normalize(jnp.full((1, 2, 2, 3), 255, jnp.uint8))
    >>> x.dtype, [round(float(v), 2) for v in x[0, 0, 0]]
    (dtype('float32'), [2.06, 2.13, 2.12])
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
