"""One process of a small sharded training run, for `test_multiprocess.py`.

    python multiprocess_driver.py OUT --mesh=data=2,fsdp=2 --processes=2 --process_id=0 \\
        --port=PORT [--die_after=K] [--restore_from=DIR --restore_mesh=fsdp=4]

A linen model with BatchNorm and a stack of two blocks (a leaf stacked along
its leading axis, as `nn.scan` lays it out) trains for `--steps` steps with
`train.make_steps` under `train.Phases`: the stem and block 0 of the stack are
frozen until step 3, when block 0 unfreezes. Parameters and optimizer state
are split by FSDP rules over the mesh; each process feeds its part of the
global batch. A checkpoint is saved after step 2 and at the end (`OUT/ckpt`);
a run that finds one resumes from it; the losses so far ride in its metadata. The last
checkpoint is the run's result. `--die_after=K`: the last process exits at once
after step K, as if killed. `--restore_from` (one process): after training,
restore that directory's latest step onto `--restore_mesh`, compare it with
this run's final state and write `OUT/restored.json`. `--compile_ahead`: the
phase to come is compiled ahead (`Phases(compile_ahead=True)`, waited for
before each step), and `OUT/ahead_{process}.json` says whether each program
compiled ahead would run on zeros (`warm_up`, which refuses a program
spanning several processes).

Processes meet through `jax.distributed.initialize` on localhost (a single
process too, so that it reduces with the same CPU collectives, gloo, as
several); the caller sets `XLA_FLAGS` to give each process its CPU devices.
"""

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from stacked_net import Net  # this folder is on sys.path when the file runs as a script

from layerfreeze import schedules, train
from layerfreeze.train import _ahead, checkpoint, sharding
from layerfreeze.train.workdir import WorkdirLock

SCHEDULE = {0: "stem,stack[:1]", 3: "stem"}  # block 0 of the stack unfreezes at step 3
RULES = [(".*/bias", P()), (".*", sharding.fsdp(min_size=256))]
BATCH = 8


def _axes(text):
    return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}


def _batch(step):
    r = np.random.RandomState(step)
    return {
        "x": r.randn(BATCH, 16).astype(np.float32),
        "label": r.randint(0, 10, BATCH).astype(np.int32),
    }


def _local(batch):
    """This process's contiguous part of the global batch."""
    n, i = jax.process_count(), jax.process_index()
    return {k: np.array_split(v, n)[i] for k, v in batch.items()}


def _phases(model, params, mesh, compile_ahead=False):
    def build(phase, previous):
        return train.make_steps(
            model,
            optax.adam(1e-2),
            phase.spec,
            params,
            inputs="x",
            previous=previous,
            mesh=mesh,
            sharding_rules=RULES,
        )

    return train.Phases(
        schedules.explicit(SCHEDULE, unit="step"), build, params=params, compile_ahead=compile_ahead
    )


def _restore(ckpt, phases, variables):
    def target(meta):
        phases.restore(meta)
        return phases.steps().init_state(variables, jax.random.key(1)).as_dict()

    step, restored, meta, _ = ckpt.restore_latest_intact(target)
    return step, train.TrainState(**restored), meta


def _specs(tree):
    return {
        jax.tree_util.keystr(path): str(leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--die_after", type=int, default=0)
    parser.add_argument("--restore_from", type=pathlib.Path)
    parser.add_argument("--restore_mesh")
    parser.add_argument("--compile_ahead", action="store_true")
    args = parser.parse_args()
    if args.port:  # also for one process: the same collectives (gloo) as for several
        jax.distributed.initialize(
            f"localhost:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=60,
            heartbeat_timeout_seconds=10,
            shutdown_timeout_seconds=10,
        )

    # One run: process 0 holds the workdir for all (a killed run leaves no lock).
    lock = WorkdirLock(args.out)
    lock.acquire()
    model = Net()
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), jnp.zeros((2, 16)), train=False
    )
    params = variables["params"]
    mesh = train.make_mesh(_axes(args.mesh))
    phases = _phases(model, params, mesh, compile_ahead=args.compile_ahead)
    ckpt = checkpoint.Checkpointer(args.out / "ckpt", max_to_keep=2)
    if ckpt.latest_step() is None:
        start, state, losses = 0, phases.init_state(variables, jax.random.key(1)), []
    else:
        start, state, meta = _restore(ckpt, phases, variables)
        losses = meta["losses"]
    ran_once = []
    for step in range(start, args.steps):
        if args.compile_ahead:
            phases.wait_ahead()
        steps, state, change = phases.update(step, state)
        if change is not None and args.compile_ahead:  # the programs compiled for it
            ran_once += [_ahead.run_once(p) for p in steps.train_step.programs.values()]
        state, metrics = steps.train_step(state, train.shard_batch(mesh, _local(_batch(step))))
        losses.append(float(metrics["loss"]))
        done = step + 1
        if done in (2, args.steps):
            ckpt.save(done, state.as_dict(), metadata={**phases.metadata(), "losses": losses})
        if done == args.die_after and jax.process_index() == jax.process_count() - 1:
            os._exit(3)  # as if killed: no cleanup, no goodbye to the other processes
    ckpt.close()
    if args.compile_ahead:
        phases.close(wait=True)
        (args.out / f"ahead_{jax.process_index()}.json").write_text(json.dumps(ran_once))
    if args.restore_from is None:
        return
    # What another run saved, onto this process's mesh of another shape: the same
    # values as this run's final state, in the shardings of the new mesh.
    other = train.make_mesh(_axes(args.restore_mesh))
    with checkpoint.Checkpointer(args.restore_from) as source:
        _, restored, _ = _restore(source, _phases(model, params, other), variables)
    pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    record = {
        "equal": all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in pairs),
        "specs": _specs(restored.params),
        "shard": list(restored.params["stack"]["kernel"].addressable_shards[0].data.shape),
    }
    (args.out / "restored.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
