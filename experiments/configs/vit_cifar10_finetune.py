r"""Transfer a ViT-Ti/4 to CIFAR-10: embeddings and blocks 0-5 frozen, layer-wise decay.

  python experiments/cifar.py --config=experiments/configs/vit_cifar10_finetune.py \
      --config.init_from=runs/vit_cifar100_source

The freeze spec is the embeddings and the first half of the blocks, `vit_groups(12)[:9]`:
`embedding,pos_embedding,cls,Transformer/encoderblock_0,...,Transformer/encoderblock_5`.
Blocks 6-11, the final norm and the head train with layer-wise learning-rate decay 0.75
(BEiT/MAE): the head at the base rate, block 11 at 0.75 of it, block 6 at 0.75**6.
The 100-class head of the source run is re-initialised for 10 classes.

Offline smoke run (synthetic data, from the smoke run of experiments/configs/vit_cifar100_source.py;
both have 10 classes, so the head is kept):

  python experiments/cifar.py --config=experiments/configs/vit_cifar10_finetune.py \
      --config.dataset=synthetic --config.num_train_steps=40 --config.batch_size=32 \
      --config.init_from=/tmp/vit_source --workdir=/tmp/vit_finetune

Result (2 shared CPU cores, 1.5 minutes): 2,671,498 of 5,362,570 parameters train; the
training loss goes from 1.00 (steps 1-10) to 0.87 (steps 31-40); test accuracy 0.654
(0.548 at the source run's end).
"""

import ml_collections

from configs import cifar10
from layerfreeze import models

DEPTH = 12  # ViT-Ti's


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.model = "vit_ti4"
    config.pool = "tok"
    # Three embedding groups with pool="tok" (embedding, pos_embedding, cls), then blocks.
    config.freeze = ",".join(models.vit_groups(DEPTH, pool="tok")[: 3 + DEPTH // 2])
    config.layer_decay = 0.75
    config.learning_rate = 5e-4
    config.weight_decay = 0.05
    config.num_epochs = 10.0
    return config
