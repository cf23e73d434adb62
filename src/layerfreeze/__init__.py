"""layerfreeze: layer freezing for transfer learning in JAX, Flax and Optax.

>>> import jax.numpy as jnp, optax, layerfreeze
>>> params = {"stem": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}
>>> tx = layerfreeze.freeze(optax.adamw(1e-3), "stem")
>>> layerfreeze.summary(params, "stem").trainable_params
2
"""

from layerfreeze._freeze import METHODS, freeze
from layerfreeze._labels import freeze_labels, frozen_bn_groups, frozen_mask, label_fn
from layerfreeze._spec import FROZEN, TRAINABLE, FreezeSpec, Rule, as_spec
from layerfreeze._summary import FreezeSummary, summary

__all__ = [
    "FROZEN",
    "METHODS",
    "TRAINABLE",
    "FreezeSpec",
    "FreezeSummary",
    "Rule",
    "as_spec",
    "freeze",
    "freeze_labels",
    "frozen_bn_groups",
    "frozen_mask",
    "label_fn",
    "summary",
]

__version__ = "0.1.0"
