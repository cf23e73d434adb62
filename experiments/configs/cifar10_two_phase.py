r"""fastai-style `fine_tune`: train the head with the body frozen, then unfreeze all.

Phase 0 (epoch 0): everything but the head frozen. Phase 1 (from epoch 1):
nothing frozen, discriminative rates geometric from base_lr/200 (stem) to
base_lr/2 (head), as fastai's `fine_tune` (`lr_mult=100`, rate halved). The
schedule fixes the run's length (1 + 3 epochs); `num_epochs` is not used.

  python experiments/cifar.py --config=experiments/configs/cifar10_two_phase.py \
      --config.init_from=runs/cifar100_source

Offline:

  python experiments/cifar.py --config=experiments/configs/cifar10_two_phase.py \
      --config.dataset=synthetic
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.schedule = "fine_tune:freeze_epochs=1,epochs=3,lr_mult=100"
    config.synthetic_train_size = 2048
    config.learning_rate = 2e-3
    config.log_every = 8
    return config
