"""Several processes for real: `jax.distributed.initialize` on one machine, CPU devices.

`multiprocess_driver.py` trains a small model with `train.make_steps` under
`train.Phases` (part of a stacked leaf frozen, then unfrozen at step 3) with
FSDP rules, and checkpoints with `checkpoint.Checkpointer`. Run as 2
processes x 2 CPU devices (JAX's CPU collectives, gloo) it gives bitwise the
parameters, optimizer state and losses of 1 process x 4 devices, also when
one process is killed mid-run and both are started again, and when they compile
the phase to come ahead; and what the 2 processes saved restores onto a mesh of
another shape in 1 process. The
single process runs under `jax.distributed.initialize` too, so that both
reduce with gloo: XLA's in-process collectives sum in another order (float
rounding apart, not bitwise).
"""

import json
import os
import pathlib
import socket
import time

import fresh
import jax
import numpy as np

from layerfreeze.train import checkpoint

DRIVER = pathlib.Path(__file__).with_name("multiprocess_driver.py")
# Wall-clock limit of one launch (all of its processes), seconds.
TIMEOUT = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out, *args, processes=1, devices=4):
    """Runs the driver as `processes` processes; returns their exit codes and output.

    When one process fails, the others (waiting on it in a collective) are
    killed; so is every process at the time limit. Nothing is left running.
    """
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    launch = len(list(out.glob("launch_*_0.txt")))
    flags = os.environ.get("XLA_FLAGS", "")
    # As conftest: faster to compile; and the test session's compilation cache,
    # so that a resumed run reads back what the killed one compiled.
    jax_config = {
        "jax_platforms": "cpu",
        "jax_threefry_partitionable": False,
        "jax_compilation_cache_dir": str(jax.config.jax_compilation_cache_dir or ""),
        "jax_persistent_cache_min_compile_time_secs": 0,
    }
    procs, logs = [], []
    for i in range(processes):
        log = out / f"launch_{launch}_{i}.txt"
        procs.append(
            fresh.start_script(
                DRIVER,
                out,
                *args,
                f"--processes={processes}",
                f"--process_id={i}",
                f"--port={port}",
                cwd=out,
                output=log,
                env={"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}"},
                jax_config=jax_config,
            )
        )
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.exitcode is None for p in procs):
            if time.monotonic() > deadline or any(p.exitcode for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
    return [p.exitcode for p in procs], [log.read_text() for log in logs]


def _ok(codes, output):
    assert codes == [0] * len(codes), "\n".join(o[-3000:] for o in output)


def _final(directory):
    """The last checkpoint's state (gathered, NumPy) and the losses recorded with it."""
    with checkpoint.Checkpointer(directory) as ckpt:
        state = ckpt.restore_arrays(("step", "params", "batch_stats", "opt_state", "rng"))
        return state, ckpt.restore_metadata()["losses"]


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_two_processes_match_one_resume_after_a_kill_and_restore_onto_another_mesh(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    # 2 processes x 2 devices; the second process dies after step 3, its partner
    # then waits in a collective and is stopped.
    codes, output = _launch(multi, "--mesh=data=2,fsdp=2", "--die_after=3", processes=2, devices=2)
    assert codes[1] == 3, output[1][-3000:]
    with checkpoint.Checkpointer(multi / "ckpt") as ckpt:
        assert ckpt.latest_step() == 2  # step 3 and the phase change there were lost
    # Both started again: they resume from step 2 and cross the phase change.
    _ok(*_launch(multi, "--mesh=data=2,fsdp=2", processes=2, devices=2))

    # 1 process x 4 devices, the same mesh, uninterrupted; then the 2 processes'
    # last checkpoint restored onto a mesh of another shape, fsdp=4.
    args = [f"--restore_from={multi / 'ckpt'}", "--restore_mesh=fsdp=4"]
    _ok(*_launch(single, "--mesh=data=2,fsdp=2", *args))
    (multi_state, multi_losses), (state, losses) = _final(multi / "ckpt"), _final(single / "ckpt")
    assert int(state["step"]) == 6 and len(losses) == 6
    assert multi_losses == losses  # floats compared exactly
    _assert_bitwise(multi_state, state)

    # The same 2 processes compiling the phase to come ahead: the same bits. Neither
    # runs the program compiled ahead on zeros: its collectives would meet no partner.
    ahead = tmp_path / "ahead"
    _ok(*_launch(ahead, "--mesh=data=2,fsdp=2", "--compile_ahead", processes=2, devices=2))
    ahead_state, ahead_losses = _final(ahead / "ckpt")
    assert ahead_losses == losses
    _assert_bitwise(ahead_state, state)
    for i in range(2):
        assert json.loads((ahead / f"ahead_{i}.json").read_text()) == [False]

    restored = json.loads((single / "restored.json").read_text())
    assert restored["equal"]
    assert restored["specs"]["['stack']['kernel']"] == "P(None, None, 'fsdp')"
    assert restored["shard"] == [2, 64, 16]  # split 4 ways along its last axis
