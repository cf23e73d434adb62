r"""Transfer a ViT-Ti/4 to CIFAR-10: embeddings and blocks 0-5 frozen, layer-wise decay.

  python experiments/cifar.py --config=configs/vit_cifar10_finetune.py \
      --config.init_from=runs/vit_cifar100_source

The freeze spec is the embeddings and the first half of the blocks, `vit_groups(12)[:9]`:
`embedding,pos_embedding,cls,Transformer/encoderblock_0,...,Transformer/encoderblock_5`.
Blocks 6-11, the final norm and the head train with layer-wise learning-rate decay 0.75
(BEiT/MAE): the head at the base rate, block 11 at 0.75 of it, block 6 at 0.75**6.
The 100-class head of the source run is re-initialised for 10 classes.

Offline smoke run (synthetic data; the source run of configs/vit_cifar100_source.py):

  python experiments/cifar.py --config=configs/vit_cifar10_finetune.py \
      --config.dataset=synthetic --config.num_train_steps=40 \
      --config.init_from=/tmp/vit_source --workdir=/tmp/vit_finetune
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
