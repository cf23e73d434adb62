r"""ULMFiT-style gradual unfreezing: head first, one more group each epoch, stem last.

Discriminative learning rates: each group below the head trains 2.6x slower
than the one above it. Parameters that were trainable keep their Adam moments
across phase changes; the train step compiles once per phase.

  python experiments/cifar.py --config=experiments/configs/cifar10_gradual.py \
      --config.init_from=runs/cifar100_source

Offline (synthetic data, runs through all six phases):

  python experiments/cifar.py --config=experiments/configs/cifar10_gradual.py \
      --config.dataset=synthetic

`metrics.jsonl` rows carry `phase` and `trainable_params`; the trainable count
grows at epochs 1, 2, 3, 4 and 5. Synthetic (16 steps an epoch): 5,130 ->
8,398,858 -> 10,498,570 -> 11,024,138 -> 11,172,106 -> 11,173,962 at steps 16,
32, 48, 64 and 80; six compilations; final test accuracy 1.0; 7.5 minutes on a
2-core CPU.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.schedule = "gradual"  # head, +stage4, +stage3, +stage2, +stage1, +stem
    config.lr_multipliers = "ulmfit:2.6"
    config.num_epochs = 7.0
    config.synthetic_train_size = 2048
    config.learning_rate = 1e-3
    config.eval_every = 10_000  # evaluate at the end only
    config.log_every = 8
    return config
