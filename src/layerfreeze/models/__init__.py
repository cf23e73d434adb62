"""ResNets with named parameter groups, and an importer for torchvision weights.

Example:
    >>> from layerfreeze.models import GROUPS, create_model
    >>> model = create_model("resnet18", num_classes=10, stem="cifar", width=8)
    >>> GROUPS
    ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
"""

from layerfreeze.models.resnet import (
    BLOCKS,
    GROUPS,
    HEADS,
    MODEL_NAMES,
    STEMS,
    ResNet,
    create_model,
    resnet18,
    resnet34,
    resnet50,
)
from layerfreeze.models.torchvision import load_torchvision_resnet

__all__ = [
    "BLOCKS",
    "GROUPS",
    "HEADS",
    "MODEL_NAMES",
    "STEMS",
    "ResNet",
    "create_model",
    "load_torchvision_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
]
