"""Opt-in tuning for the machine a run is on: CPU convolutions, host memory, compilation.

None is on by default: the first two were chosen by measurement on one 2-core
CPU (`benchmarks/RESULTS.md`), and a library default must not depend on one
machine; the persistent compilation cache writes to disk. `experiments/cifar.py`
and the benchmarks switch them on where they helped (`--host_memory=retain`;
convolutions through Eigen; `config.compilation_cache`). `CompileCounter`
counts what a block of code compiled and what it read from the cache.
"""

import ctypes
import functools
import os
import pathlib
import platform
import threading
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import jax
import jax.numpy as jnp

from layerfreeze import _upstream

__all__ = [
    "CPU_EIGEN_CONV",
    "CompileCounter",
    "cpu_conv_options",
    "default_compilation_cache_dir",
    "enable_compilation_cache",
    "retain_host_memory",
]

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


def default_compilation_cache_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/layerfreeze/jax`, by default `~/.cache/layerfreeze/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "layerfreeze" / "jax"


def enable_compilation_cache(
    directory: str | os.PathLike[str] | None = None, *, min_compile_time_secs: float = 0.0
) -> pathlib.Path:
    """Turns on JAX's persistent compilation cache: a program compiled once is read back.

    A resumed run, or a second run of the same configuration, then compiles
    nothing it compiled before: each program is looked up by a hash of its HLO,
    compile options, devices and jax/jaxlib versions, so a changed program is
    compiled afresh, never confused with another. Process-wide, for every
    library in the process. As JAX warns, the cache is trusted: keep it in a
    directory only you can write.

    JAX opens the cache at the first compilation and keeps that directory for
    the life of the process: call this first. Called later with another
    directory, it warns and leaves the open one in use.

    Args:
      directory: where compiled programs go; default
        `default_compilation_cache_dir()`. Created if missing; `~` expands.
      min_compile_time_secs: programs that compile faster are not stored
        (JAX's own default is 1 s; 0 stores every program).

    Returns:
      The directory in use.

    >>> import tempfile
    >>> cache = enable_compilation_cache(tempfile.mkdtemp())  # doctest: +SKIP
    """
    path = pathlib.Path(directory or default_compilation_cache_dir()).expanduser().absolute()
    in_use = _upstream.compilation_cache_dir_in_use()
    if in_use is not None and pathlib.Path(in_use).absolute() != path:
        warnings.warn(
            f"enable_compilation_cache: JAX already uses the cache in {in_use} for this "
            f"process; {path} takes effect only in a new process (call this before the "
            "first compilation).",
            stacklevel=2,
        )
        return pathlib.Path(in_use)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileCounter:
    """Counts the XLA programs a block of code compiles, and those read from the cache.

    A context manager that listens to `jax.monitoring` while it is open. Every
    request JAX makes for an executable counts once in `requests` (tracing
    cache hits make none); `cache_hits` of them were read from the persistent
    compilation cache (`enable_compilation_cache`), and `compiled` were built by
    XLA. `seconds` is the wall time of all requests. Counts the whole process,
    every thread included.

    >>> import jax, numpy as np
    >>> with CompileCounter() as counter:
    ...     _ = jax.jit(lambda x: x * 3 + 1)(np.arange(3.0))
    >>> counter.requests, counter.compiled + counter.cache_hits == counter.requests
    (1, True)
    """

    def __init__(self):
        self.requests = 0
        self.cache_hits = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    @property
    def compiled(self) -> int:
        """Programs XLA compiled: requests not read from the persistent cache."""
        return self.requests - self.cache_hits

    def __enter__(self) -> Self:
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        jax.monitoring.unregister_event_listener(self._event)
        jax.monitoring.unregister_event_duration_listener(self._duration)

    def _event(self, event: str, **kwargs: object) -> None:
        if event == _upstream.CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def _duration(self, event: str, duration_secs: float, **kwargs: object) -> None:
        if event == _upstream.BACKEND_COMPILE_EVENT:
            with self._lock:
                self.requests += 1
                self.seconds += duration_secs

    def __repr__(self) -> str:
        return (
            f"CompileCounter(requests={self.requests}, compiled={self.compiled}, "
            f"cache_hits={self.cache_hits}, seconds={self.seconds:.2f})"
        )
