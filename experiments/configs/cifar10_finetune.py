r"""Full fine-tuning: nothing frozen (the baseline freezing is measured against).

  python experiments/cifar.py --config=experiments/configs/cifar10_finetune.py \
      --config.init_from=runs/cifar100_source
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.freeze = "none"
    config.learning_rate = 5e-4
    return config
