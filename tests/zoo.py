"""Small models the library has never seen, written the way their authors' guides write them."""

import functools

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class FlaxExampleBlock(nn.Module):
    """A residual block as in Flax's `examples/imagenet/models.py`."""

    filters: int
    conv: nn.Module
    norm: nn.Module
    act: callable = nn.relu

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class FlaxExampleResNet(nn.Module):
    """Shaped like Flax's ImageNet ResNet: BatchNorm's mode fixed at construction from `train`."""

    num_classes: int = 5
    widths: tuple[int, ...] = (8, 16)

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=jnp.float32)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = conv(self.widths[0], (3, 3), name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        for i, width in enumerate(self.widths):
            x = FlaxExampleBlock(width, conv=conv, norm=norm, name=f"block{i}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class MyBatchNorm(nn.BatchNorm):
    """A user's BatchNorm subclass."""


class ConvNormAct(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Conv(self.features, (3, 3), name="conv")(x)
        # use_running_average passed positionally at call time.
        x = MyBatchNorm(momentum=0.8, name="norm1")(x, not train)
        return nn.gelu(x)


class Stage(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = ConvNormAct(self.features, name="unit_a")(x, train=train)
        x = ConvNormAct(self.features, name="unit_b")(x, train=train)
        return x


class DeepNormNet(nn.Module):
    """BatchNorm three modules deep, named `norm1`, a subclass, mode passed at call time."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = Stage(8, name="encoder")(x, train=train)
        x = Stage(8, name="middle")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(16, name="neck")(x)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(1, name="regressor")(x)


class NNXNet(nnx.Module):
    """An NNX CNN with BatchNorm, as NNX's guides write one."""

    def __init__(self, rngs: nnx.Rngs, num_classes: int = 5):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
        self.body = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.body_bn = nnx.BatchNorm(16, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.relu(self.body_bn(self.body(x)))
        x = self.dropout(jnp.mean(x, axis=(1, 2)))
        return self.head(x)
