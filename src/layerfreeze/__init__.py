"""layerfreeze: layer freezing for transfer learning in JAX, Flax and Optax.

>>> import jax.numpy as jnp, optax, layerfreeze
>>> params = {"stem": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}
>>> tx = layerfreeze.freeze(optax.adamw(1e-3), "stem")
>>> layerfreeze.summary(params, "stem").trainable_params
2

The core needs jax, flax, optax and numpy. Beyond these names it has three
submodules: `schedules` (freeze schedules: gradual unfreezing, `fine_tune`),
`lr` (per-group learning rates, layer-wise decay) and `auto` (automatic
freezing, `AutoFreeze` and `freezeout`); `models` holds the bundled ResNets
and ViT. The training stack, `layerfreeze.train` (steps, phases,
checkpoints, metrics), is a package of its own with its own extra:
`pip install "layerfreeze[train]"`.
"""

from layerfreeze import auto, lr, schedules
from layerfreeze._batchnorm import batchnorm_modules, frozen_batchnorm
from layerfreeze._blocks import scan_segments, stack_slice
from layerfreeze._freeze import METHODS, freeze
from layerfreeze._grad import grad, value_and_grad
from layerfreeze._labels import (
    freeze_labels,
    frozen_mask,
    label_fn,
    trainable_since,
)
from layerfreeze._nnx import nnx_filter, nnx_train_mode
from layerfreeze._plan import Plan, plan
from layerfreeze._spec import FROZEN, TRAINABLE, FreezeSpec, Rule, as_spec
from layerfreeze._summary import FreezeSummary, summary
from layerfreeze._transfer import transfer_opt_state

__all__ = [
    "FROZEN",
    "METHODS",
    "TRAINABLE",
    "FreezeSpec",
    "FreezeSummary",
    "Plan",
    "Rule",
    "as_spec",
    "auto",
    "batchnorm_modules",
    "freeze",
    "freeze_labels",
    "frozen_batchnorm",
    "frozen_mask",
    "grad",
    "label_fn",
    "lr",
    "nnx_filter",
    "nnx_train_mode",
    "plan",
    "scan_segments",
    "schedules",
    "stack_slice",
    "summary",
    "trainable_since",
    "transfer_opt_state",
    "value_and_grad",
]

__version__ = "0.1.0"
