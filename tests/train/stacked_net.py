"""The small model of the sharding and several-process tests.

Dense, BatchNorm, a stack of 2 blocks (a subtree of stacked leaves, as
`nn.scan` lays them out) and a head. Imported by `test_sharding.py`, its
four-device script, and `multiprocess_driver.py` (this folder is on their
`sys.path`).
"""

import flax.linen as nn


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.1), (2, 64, 64))
        bias = self.param("bias", nn.initializers.zeros, (2, 64))
        for i in range(2):
            x = x + nn.tanh(x @ kernel[i] + bias[i])
        return x


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(64, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        return nn.Dense(10, name="head")(Stack(name="stack")(x))
