"""Opt-in tuning for the machine a run is on: CPU convolutions and host memory.

Neither is on by default: both were chosen by measurement on one 2-core CPU
(`benchmarks/RESULTS.md`), and a library default must not depend on one
machine. `experiments/cifar.py` and the benchmarks switch them on where they
helped (`--host_memory=retain`; convolutions through Eigen by default there).
"""

import ctypes
import functools
import platform
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from layerfreeze import _upstream

__all__ = ["CPU_EIGEN_CONV", "cpu_conv_options", "retain_host_memory"]

CPU_EIGEN_CONV: Mapping[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    ),
}
"""XLA CPU options (`make_steps(..., compiler_options=...)`): convolutions through Eigen.

jaxlib 0.10.2 runs CPU convolutions, dots and reductions through XNNPACK's YNN
kernels. This keeps dots and reductions there and sends convolutions back to
Eigen. Measured on a 2-core CPU (`benchmarks/vs_pytorch.py --parts`): the
YNN forward convolution of a CIFAR ResNet's first stage (32x32x64, batch 32)
takes as long in wall time as its CPU time, i.e. it runs on one core, while
Eigen's uses both; see `benchmarks/RESULTS.md` for what it gives per step.
Only the summation order of convolutions changes: frozen parameters and
BatchNorm statistics stay bit-identical, other values agree to float
rounding. It names an experimental XLA CPU setting of this jaxlib; use it
through `cpu_conv_options()`, which checks that the installed jaxlib accepts it.
"""


@functools.cache
def cpu_conv_options() -> Mapping[str, str]:
    """`CPU_EIGEN_CONV` where it applies, for `make_steps(..., compiler_options=...)`.

    Opt-in: `make_steps` compiles with XLA's own defaults unless given options.
    On the CPU backend this is `CPU_EIGEN_CONV` if this jaxlib accepts it
    (checked once, by compiling a one-element function with it): in a quiet
    `benchmarks/vs_pytorch.py` run on a 2-core CPU it took the CIFAR
    ResNet-18 frozen step from 1.30x to 1.10x PyTorch's and the full step from
    1.50x to 1.22x; `experiments/cifar.py` and the benchmarks turn it on. It
    was chosen on one machine: measure before relying on it elsewhere.
    Elsewhere (GPU, TPU), or where this jaxlib rejects it: `{}`.

    >>> options = cpu_conv_options()
    >>> options in ({}, CPU_EIGEN_CONV)
    True
    """
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(1)).compile(compiler_options=CPU_EIGEN_CONV)
    except Exception:  # an unknown option on another jaxlib: keep XLA's defaults
        return {}
    return dict(CPU_EIGEN_CONV)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_host_memory() -> bool:
    """Keeps the host memory a step frees for the next step (glibc, i.e. Linux).

    XLA's CPU client allocates each execution's temporary buffer, and Eigen its
    matrix-packing buffers, from worker threads. glibc serves requests above
    32 MiB with a fresh `mmap` (above 64 MiB a worker thread's arena has no
    other way) and unmaps it when it is freed, so every step faults its memory
    in again: 68k minor page faults and about 0.15 s of system time per CIFAR
    ResNet-18 train step at batch 32 on a 2-core CPU. This sets glibc to one
    arena (`M_ARENA_MAX=1`), no `mmap` (`M_MMAP_MAX=0`) and no trimming
    (`M_TRIM_THRESHOLD`), so freed memory is reused: no faults after the first
    steps. Whether that is faster depends on the process, as the single arena
    serialises allocation between threads. On that CPU a ViT-Ti/4 frozen step
    went from 1.06-1.15x to 0.88-0.97x PyTorch's (both given the setting), and
    a ResNet-18 step alone in one process from 503 to 444 ms, while
    `experiments/cifar.py`'s ResNet-18 steps got 5% slower (431 -> 454 ms) and
    its compilation slower too (`benchmarks/RESULTS.md`). Measure before
    keeping it. It changes where memory comes from, not what is computed; the
    process keeps its peak host memory until it exits.

    Call it before the first JAX computation: a thread that has allocated
    keeps its arena. It is process-wide and affects every library in the process.

    Returns:
      True if applied. False, with a warning, where the C library is not glibc
      or JAX's backends have started already.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        warnings.warn("retain_host_memory: not glibc; host memory left as it is.", stacklevel=2)
        return False
    if _upstream.jax_backends_started():
        warnings.warn(
            "retain_host_memory: JAX's backends have started, and their threads keep "
            "their allocator arenas; call it before the first JAX computation.",
            stacklevel=2,
        )
        return False
    libc = ctypes.CDLL("libc.so.6")
    limits = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(option, value) == 1 for option, value in limits)
