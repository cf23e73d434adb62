"""ResNets with named parameter groups, a ViT, and importers for torchvision and big_vision weights.

Example:
    >>> from layerfreeze.models import GROUPS, create_model
    >>> model = create_model("resnet18", num_classes=10, stem="cifar", width=8)
    >>> GROUPS
    ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
"""

from layerfreeze.models.big_vision import load_big_vision_npz
from layerfreeze.models.resnet import (
    BLOCKS,
    GROUPS,
    HEADS,
    MODEL_NAMES,
    STEMS,
    ResNet,
    create_model,
    resnet10,
    resnet18,
    resnet34,
    resnet50,
)
from layerfreeze.models.torchvision import load_torchvision_resnet
from layerfreeze.models.vit import (
    POOLS,
    VIT_NAMES,
    VIT_SIZES,
    ViT,
    create_vit,
    stack_blocks,
    unstack_blocks,
    vit,
    vit_groups,
)

__all__ = [
    "BLOCKS",
    "GROUPS",
    "HEADS",
    "MODEL_NAMES",
    "POOLS",
    "STEMS",
    "VIT_NAMES",
    "VIT_SIZES",
    "ResNet",
    "ViT",
    "create_model",
    "create_vit",
    "load_big_vision_npz",
    "load_torchvision_resnet",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "stack_blocks",
    "unstack_blocks",
    "vit",
    "vit_groups",
]
