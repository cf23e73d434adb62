"""The training stack: jitted steps, phases, checkpoints, metrics, feature caching.

Install it with `pip install "layerfreeze[train]"` (it adds Orbax for
checkpoints). The core (`import layerfreeze`) never imports it.

This package gives the train and eval steps and the phase runner; the rest are
submodules, imported by name:

* `sharding`: meshes with named axes, rules from parameter paths to
  shardings (FSDP, model parallel), the batch split over the data axes;
* `checkpoint`: resumable Orbax checkpoints that refuse damaged steps, written
  by every process of a run and restored onto any mesh;
* `pretrained`: start from an earlier run's weights;
* `metrics`: a resumable metrics log and its averaging window;
* `features`: cache the output of a frozen prefix and train on it;
* `data`: in-memory image datasets, a synthetic one, resumable batching;
* `platform`: opt-in tuning for the machine (CPU convolutions, host memory);
* `workdir`: one run per workdir (`WorkdirLock`).

>>> import jax.numpy as jnp, optax
>>> from layerfreeze import train
>>> params = {"w": jnp.ones(3)}
>>> steps = train.make_steps(None, optax.sgd(0.1), "none", params,
...     loss_fn=lambda p, batch, rng: jnp.sum(p["w"] * batch["x"]))
>>> state = steps.init_state(params, jnp.zeros(2, jnp.uint32))
>>> state, metrics = steps.train_step(state, {"x": jnp.ones(3)})
>>> state.params["w"]
Array([0.9, 0.9, 0.9], dtype=float32)
"""

from layerfreeze.train._steps import (
    EvalStep,
    LossFn,
    StepOptions,
    TrainState,
    TrainSteps,
    classification_loss,
    make_steps,
)
from layerfreeze.train.phases import PhaseChange, Phases
from layerfreeze.train.sharding import make_mesh, replicate, shard_batch

__all__ = [
    "EvalStep",
    "LossFn",
    "PhaseChange",
    "Phases",
    "StepOptions",
    "TrainState",
    "TrainSteps",
    "classification_loss",
    "make_mesh",
    "make_steps",
    "replicate",
    "shard_batch",
]
