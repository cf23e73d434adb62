"""layerfreeze: layer freezing for transfer learning in JAX, Flax and Optax.

>>> import jax.numpy as jnp, optax, layerfreeze
>>> params = {"stem": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}
>>> tx = layerfreeze.freeze(optax.adamw(1e-3), "stem")
>>> layerfreeze.summary(params, "stem").trainable_params
2

Automatic freezing for speed: `AutoFreeze` and `freezeout` (module `auto`).
Beyond these names, import the submodules you need: `checkpoint` (resumable
Orbax checkpoints), `pretrained` (start from an earlier run's weights),
`metrics` (a resumable metrics log, its averaging window, a plot), `features`
(frozen-feature caching), `data`, `models`, `lr`, `schedules`, `phases` and
`train`, e.g. `from layerfreeze import metrics, pretrained`.
"""

from layerfreeze._batchnorm import batchnorm_modules, frozen_batchnorm
from layerfreeze._freeze import METHODS, freeze
from layerfreeze._grad import grad, value_and_grad
from layerfreeze._labels import (
    freeze_labels,
    frozen_bn_groups,
    frozen_mask,
    label_fn,
    trainable_since,
)
from layerfreeze._nnx import nnx_filter, nnx_train_mode
from layerfreeze._rows import scan_segments, stack_slice
from layerfreeze._spec import FROZEN, TRAINABLE, FreezeSpec, Rule, as_spec
from layerfreeze._summary import FreezeSummary, summary
from layerfreeze._transfer import transfer_opt_state
from layerfreeze.auto import AutoFreeze, freezeout
from layerfreeze.lr import (
    geometric_multipliers,
    layerwise_decay,
    scale_by_group,
    ulmfit_multipliers,
)
from layerfreeze.phases import PhaseChange, Phases, ResumeMismatchError
from layerfreeze.schedules import (
    FreezeSchedule,
    Phase,
    constant,
    explicit,
    fine_tune,
    freeze_to,
    gradual_unfreezing,
    parse_lr_multipliers,
    parse_schedule,
    unfreeze,
)

__all__ = [
    "FROZEN",
    "AutoFreeze",
    "METHODS",
    "TRAINABLE",
    "FreezeSchedule",
    "FreezeSpec",
    "FreezeSummary",
    "Phase",
    "PhaseChange",
    "Phases",
    "ResumeMismatchError",
    "Rule",
    "as_spec",
    "batchnorm_modules",
    "constant",
    "explicit",
    "freeze",
    "freeze_labels",
    "freezeout",
    "frozen_batchnorm",
    "frozen_bn_groups",
    "fine_tune",
    "freeze_to",
    "frozen_mask",
    "geometric_multipliers",
    "grad",
    "gradual_unfreezing",
    "label_fn",
    "layerwise_decay",
    "nnx_filter",
    "nnx_train_mode",
    "parse_lr_multipliers",
    "parse_schedule",
    "scale_by_group",
    "summary",
    "trainable_since",
    "transfer_opt_state",
    "ulmfit_multipliers",
    "unfreeze",
    "scan_segments",
    "stack_slice",
    "value_and_grad",
]

__version__ = "0.1.0"
