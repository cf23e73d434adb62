r"""Linear probe: everything but the head frozen, on a pretrained source model.

  python experiments/cifar.py --config=experiments/configs/cifar10_linear_probe.py \
      --config.init_from=runs/cifar100_source

With all stages frozen their BatchNorm runs on running statistics, so the
frozen backbone is a fixed feature extractor; set
`--config.cache_frozen_features=True --config.augment=False` to compute its
features once.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.freeze = "all-but:head"
    config.learning_rate = 1e-2
    config.weight_decay = 0.0
    return config
