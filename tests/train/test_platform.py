"""`layerfreeze.train.platform`: the opt-in CPU convolution path and host-memory retention."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_steps import _batch, _changed, _tiny

from layerfreeze import train
from layerfreeze.train import platform


def _ynn_convolutions(steps, state, batch):
    """How many XNNPACK (YNN) fusions of the compiled train step hold a convolution."""
    text = steps.train_step.lower(state, batch).compile().as_text()
    bodies = dict(re.findall(r"^%?([\w.-]+) .*?\{\n(.*?)\n\}", text, re.S | re.M))
    called = re.findall(r"calls=%?([\w.-]+).*__ynn_fusion", text)
    return sum("convolution(" in bodies.get(name, "") for name in called)


def test_compiler_options_send_convolutions_to_eigen_and_keep_frozen_exact():
    model = _tiny()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
    runs = {}
    assert platform.cpu_conv_options() == platform.CPU_EIGEN_CONV  # on CPU
    for name, options in (("default", None), ("eigen", platform.cpu_conv_options())):
        s = train.make_steps(
            model, optax.adam(1e-2), "stem,stage1", variables["params"], compiler_options=options
        )
        state = s.init_state(variables, jax.random.key(1))
        ynn_convs = _ynn_convolutions(s, state, _batch())
        before = jax.tree.map(np.array, state.as_dict())
        for i in range(2):
            state, metrics = s.train_step(state, _batch(seed=i))
        runs[name] = (ynn_convs, before, jax.tree.map(np.array, state.as_dict()), metrics)
        s.eval_step(state, _batch())  # compiles with the same options
    # XLA's default CPU compile puts convolutions in XNNPACK (YNN) fusions;
    # the opt-in leaves them as plain HLO convolutions (Eigen).
    assert runs["default"][0] > 0
    assert runs["eigen"][0] == 0
    _, before, after, metrics = runs["eigen"]
    for collection in ("params", "batch_stats"):
        for path, changed in _changed(before[collection], after[collection]).items():
            assert changed != (path.split("/")[0] in ("stem", "stage1")), path
    # Same computation up to the summation order of the convolutions.
    np.testing.assert_allclose(metrics["loss"], runs["default"][3]["loss"], rtol=1e-4)
    np.testing.assert_allclose(
        after["params"]["head"]["Dense_0"]["kernel"],
        runs["default"][2]["params"]["head"]["Dense_0"]["kernel"],
        rtol=1e-3,
        atol=1e-5,
    )


_HOST_MEMORY = textwrap.dedent(
    """
    import json, resource, sys, warnings
    from layerfreeze.train import platform
    applied = platform.retain_host_memory() if sys.argv[1] == "retain" else None
    import jax, jax.numpy as jnp
    # A 48 MiB output each call, freed when the next result replaces it.
    f = jax.jit(lambda x: x * 2.0)
    x = jnp.ones((3072, 4096), jnp.float32)
    calls = []
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x).block_until_ready()
        calls.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The heap settles after a few calls. The fewest faults of a call is the steady
    # state: on a loaded machine the kernel may page out idle heap between calls
    # (after a memory-heavy hour, 10 calls in a row here faulted before one did
    # not), while without retention every call maps its buffer afresh (>= 12k faults).
    faults = min(calls[2:])
    with warnings.catch_warnings(record=True) as late:
        warnings.simplefilter("always")
        again = platform.retain_host_memory()
    print(json.dumps({"applied": applied, "faults": faults, "again": again,
                      "warning": str(late[0].message) if late else ""}))
    """
)


def _default_emitters():
    flags = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(f for f in flags if not f.startswith("--xla_cpu_use_fusion_emitters"))


@pytest.mark.skipif(
    sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)
def test_retain_host_memory_stops_the_per_step_page_faults():
    def run(mode):
        proc = subprocess.run(
            [sys.executable, "-c", _HOST_MEMORY, mode],
            # XLA's default emitters, as users run: the suite's faster-compiling
            # elemental emitters (conftest) map a new output buffer every call.
            env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_default_emitters()),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    released, retained = run("release"), run("retain")
    # 48 MiB in 4 KiB pages is 12,288 faults a call when the buffer is unmapped each time.
    assert released["faults"] > 10_000
    assert retained["applied"] is True
    assert retained["faults"] < 0.25 * released["faults"]
    # Once JAX's backends run, it is too late: refused, with a warning that says when to call.
    assert retained["again"] is False and released["again"] is False
    assert "before the first JAX computation" in retained["warning"]


_COMPILATION_CACHE = textwrap.dedent(
    """
    import json, sys, warnings
    import jax, numpy as np
    from layerfreeze import _upstream
    from layerfreeze.train import platform
    before = _upstream.compilation_cache_dir_in_use()
    path = platform.enable_compilation_cache(sys.argv[1])
    f = lambda x: x * 3 + 1
    with platform.CompileCounter() as first:
        jax.jit(f)(np.arange(3.0))
    jax.clear_caches()  # as a new process would: only the persistent cache remains
    with platform.CompileCounter() as second:
        jax.jit(f)(np.arange(3.0))
    with warnings.catch_warnings(record=True) as late:
        warnings.simplefilter("always")
        other = platform.enable_compilation_cache(sys.argv[1] + "_other")
    print(json.dumps({
        "before": before, "path": str(path), "in_use": _upstream.compilation_cache_dir_in_use(),
        "first": [first.compiled, first.cache_hits], "second": [second.compiled, second.cache_hits],
        "other": str(other), "warning": str(late[0].message) if late else "",
    }))
    """
)


def test_compilation_cache_reads_back_what_was_compiled_and_keeps_its_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILATION_CACHE, str(tmp_path / "cache")],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is None
    assert out["path"] == out["in_use"] == str(tmp_path / "cache")
    assert out["first"] == [1, 0]  # compiled by XLA, and stored
    assert out["second"] == [0, 1]  # read back from the cache
    # JAX keeps the directory it opened: another one is refused, with a warning.
    assert out["other"] == out["path"] and "takes effect only in a new process" in out["warning"]
    assert not (tmp_path / "cache_other").exists()
