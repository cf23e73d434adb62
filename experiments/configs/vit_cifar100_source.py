r"""Pretrain a ViT-Ti/4 (4x4 patches: 64 tokens of 32x32 images) on CIFAR-100, nothing frozen.

  python experiments/cifar.py --config=experiments/configs/vit_cifar100_source.py \
      --workdir=runs/vit_cifar100_source

Then transfer to CIFAR-10 with `experiments/configs/vit_cifar10_finetune.py`. `--config.scan=True`
stacks the blocks (`Transformer/encoderblock`); a run of either layout initialises
the other. A big_vision/AugReg `.npz` checkpoint starts a run too
(`--config.init_from=<file.npz>`, with the checkpoint's `vit_*` sizes and `pool`).

Offline smoke run (synthetic data, CIFAR shapes, 10 classes):

  python experiments/cifar.py --config=experiments/configs/vit_cifar100_source.py \
      --config.dataset=synthetic --config.num_train_steps=60 --config.batch_size=32 \
      --workdir=/tmp/vit_source

Result (2 shared CPU cores, about 3.5 minutes): the training loss falls from 2.16 (mean
of steps 1-10) to 1.09 (steps 51-60); test accuracy 0.548.
"""

import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.dataset = "cifar100"
    config.model = "vit_ti4"
    config.pool = "tok"
    config.freeze = "none"
    # ViTs trained from scratch on small images want AdamW with strong weight decay
    # and a warmup (DeiT, big_vision's cifar configs).
    config.learning_rate = 1e-3
    config.weight_decay = 0.05
    config.warmup_steps = 500
    config.num_epochs = 100.0
    return config
