r"""Automatic freezing for speed (AutoFreeze): front groups freeze as their gradients settle.

Every `auto.interval` steps each trainable group's gradient norm, summed over
the interval, is compared with the interval before; the front-most groups
whose change rate is below the `auto.percentile` of all trainable groups'
rates freeze for good (the head never does). Each decision is a new phase:
one compile, the optimizer state of what still trains carried over. Without
augmentation the frozen prefix's outputs are cached, so a frozen prefix costs
nothing after one forward pass over the training set.

  python experiments/cifar.py --config=experiments/configs/cifar10_auto.py \
      --config.init_from=runs/cifar100_source

Offline:

  python experiments/cifar.py --config=experiments/configs/cifar10_auto.py \
      --config.dataset=synthetic

`metrics.jsonl` has a `phase` row at each decision with the groups `frozen`
and the `rates` it was made from; train rows carry `frozen`; `curves.png`
marks each decision with the groups that froze. FreezeOut's fixed schedule
instead: `--config.schedule=freezeout --config.freezeout.t0=0.5`.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.freeze = "none"  # every group but the head is left to the policy
    config.schedule = "auto"
    config.auto.interval = 20
    config.auto.percentile = 50.0
    config.augment = False  # cached features need fixed inputs
    config.cache_frozen_features = True
    config.num_epochs = 6.0
    config.synthetic_train_size = 2048
    config.eval_every = 10_000  # evaluate at the end only
    config.log_every = 8
    return config
