r"""Pretrain a source model on CIFAR-100, nothing frozen, for later transfer.

  python experiments/cifar.py --config=experiments/configs/cifar100_source.py \
      --workdir=runs/cifar100_source

Then transfer to CIFAR-10 (the 100-class head is re-initialised for 10):

  python experiments/cifar.py --config.init_from=runs/cifar100_source

Offline: add `--config.dataset=synthetic` to both (the synthetic set has 10
classes, so the head is kept).
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.dataset = "cifar100"
    config.freeze = "none"
    config.num_epochs = 30.0
    config.learning_rate = 2e-3
    return config
