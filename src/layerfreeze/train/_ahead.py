"""Compiling programs ahead of their use: one background worker, abstract signatures.

`train.Phases(..., compile_ahead=True)` lowers and compiles the steps of the
phases it can foresee (`jax.jit(f).lower(abstract args).compile()`) while the
current phase trains. This module holds the pieces that know nothing of phases:

* `abstract` and `signature`: what a jitted function is compiled for (shapes,
  dtypes, weak types, shardings, tree structure), from arrays or from
  `jax.ShapeDtypeStruct`s;
* `AheadFn`: a jitted function that runs a program compiled ahead when it is
  called with the signature the program was compiled for, and `jax.jit`'s own
  path otherwise;
* `submit`: the process's single compile worker, a daemon thread.

One worker for the whole process bounds the concurrency: XLA's CPU compiler
runs on the thread that asks for it, so the worker takes at most about one
core, and on a 2-core CPU one compile beside the train step made the step
1.7-2.2x slower (`benchmarks/RESULTS.md`, "Compiling phases ahead"). Its jobs
run in priority order (the next phase first). The worker keeps the process's
priority: at nice 19 the step slowed less (1.1-1.9x) but the compile took
1.4-1.5x longer, and a change that must wait for it would wait behind every
other process of a shared machine, with no way back (an unprivileged process
cannot raise a thread's priority again).

An interpreter that exits while XLA compiles on a daemon thread aborts (the
thread unwinds through XLA's C++ frames when it finds the interpreter gone),
so at exit the queued jobs are cancelled and the one in flight is waited
for; a compile cannot be interrupted, and it ends.
"""

import atexit
import concurrent.futures
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = [
    "AheadFn",
    "abstract",
    "after",
    "log_skip",
    "on_cpu",
    "run_once",
    "signature",
    "submit",
    "wait",
    "zeros",
]

_log = logging.getLogger(__name__)

Signature = tuple[Any, tuple[tuple[Any, ...], ...]]


def abstract(tree: Any) -> Any:
    """`tree` with each array replaced by its `jax.ShapeDtypeStruct` (sharding included).

    Arrays that are no `jax.Array` (NumPy arrays, Python scalars) get no
    sharding and the dtype `jax.jit` gives them (float64 becomes float32
    unless x64 is on), as a call would.
    """

    def one(x: Any) -> jax.ShapeDtypeStruct:
        shape, dtype, weak_type, sharding = _leaf(x)
        return jax.ShapeDtypeStruct(shape, dtype, weak_type=weak_type, sharding=sharding)

    return jax.tree.map(one, tree)


def signature(tree: Any) -> Signature | None:
    """What a program compiled for `tree` requires of its arguments.

    None under a trace, or for leaves that are no arrays (a call with them
    goes to `jax.jit`, which says what is wrong).
    """
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            return None
        try:
            out.append(_leaf(x))
        except TypeError:
            return None
    return treedef, tuple(out)


def zeros(tree: Any) -> Any:
    """Arrays of zeros with the shapes, dtypes and shardings of abstract `tree`.

    A leaf without a sharding (a NumPy argument) becomes a NumPy array; a typed
    PRNG key leaf becomes keys of zero bits. The zeros are placed shard by
    shard (`jax.make_array_from_callback`): nothing is compiled, and each
    process makes only its own shards.
    """

    def one(x: jax.ShapeDtypeStruct) -> Any:
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        data = jax.eval_shape(jax.random.key_data, x) if key else x
        host = np.zeros(data.shape, data.dtype)
        if x.sharding is None:
            out = host
        else:
            out = jax.make_array_from_callback(data.shape, x.sharding, lambda i: host[i])
        return jax.random.wrap_key_data(out, impl=x.dtype._impl) if key else out

    return jax.tree.map(one, tree)


def run_once(compiled: Any) -> bool:
    """Runs `compiled` (a `jax.stages.Compiled`) once on zeros, to its end.

    XLA's CPU runtime prepares an executable's library kernels (YNNPACK
    pipelines, JIT-generated code) in its first run, which took 2-5x a later
    run (`benchmarks/first_run.py`); after this, the program's first real run
    is an ordinary one. The zeros take the shapes, dtypes and shardings that
    the program was compiled for.

    Returns:
      False, running nothing, when the program spans devices of other
      processes: its collectives would meet their steps.
    """
    (args, kwargs), (shardings, kwarg_shardings) = compiled.args_info, compiled.input_shardings
    flat = jax.tree.leaves(shardings) + jax.tree.leaves(kwarg_shardings)
    if not all(s.is_fully_addressable for s in flat):
        return False

    def zero(info: Any, sharding: Any) -> Any:
        return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)

    args = zeros(jax.tree.map(zero, args, shardings))
    kwargs = zeros(jax.tree.map(zero, kwargs, kwarg_shardings))
    jax.block_until_ready(compiled(*args, **kwargs))
    return True


def on_cpu(compiled: Any) -> bool:
    """Whether `compiled` (a `jax.stages.Compiled`) takes its arguments on CPU devices."""
    return all(
        d.platform == "cpu" for s in jax.tree.leaves(compiled.input_shardings) for d in s.device_set
    )


def _leaf(x: Any) -> tuple[Any, ...]:
    if isinstance(x, jax.ShapeDtypeStruct | jax.Array):  # a typed key array has no weak_type
        return x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding
    aval = jax.typeof(x)
    return aval.shape, aval.dtype, aval.weak_type, None


class AheadFn:
    """A jitted function that prefers the programs compiled for it ahead.

    Called with arguments whose `signature` is one a program was compiled
    for (`add`), it runs that program (a `jax.stages.Compiled`: same HLO,
    options and donation as the jitted function, so the same executable);
    otherwise it calls the jitted function, which compiles as usual, and logs
    once that the program compiled ahead did not fit. Everything else
    (`lower`, `trace`, ...) is the jitted function's.

    Args:
      jitted: the `jax.jit`-wrapped function.
      on_first_call: called with the abstract arguments of the first call
        (what a phase's first step looks like, for compiling the next phases)
        and its outputs (still being computed: dispatch is asynchronous).
    """

    def __init__(self, jitted: Any, on_first_call: Callable[[tuple[Any, ...], Any], None]):
        self.jitted = jitted
        self.programs: dict[Signature, Any] = {}
        self.failures: dict[Signature, BaseException] = {}
        self.called = False  # once called, `jitted` has compiled for its first arguments
        self._on_first_call = on_first_call
        self._noted = False

    def add(self, args: tuple[Any, ...], compiled: Any) -> None:
        """Registers `compiled`, the program of `jitted` lowered for abstract `args`."""
        self.programs[signature(args)] = compiled

    def fail(self, args: tuple[Any, ...], error: BaseException) -> None:
        """Registers the error that lowering or compiling for abstract `args` raised.

        A call with those arguments raises it (the error compiling there would
        raise); a call with others compiles as usual, as the guess was wrong.
        """
        self.failures[signature(args)] = error

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.called or kwargs:
            return self._call(args, kwargs)
        seen = signature(args)
        if seen is None:  # traced by an outer transformation
            return self.jitted(*args, **kwargs)
        self.called = True
        first = abstract(args)  # before the call: it may donate the arrays
        out = self._call(args, kwargs)
        self._on_first_call(first, out)
        return out

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not (self.programs or self.failures) or kwargs:
            return self.jitted(*args, **kwargs)
        seen = signature(args)
        program = self.programs.get(seen)
        if program is not None:
            return program(*args)
        error = self.failures.pop(seen, None)
        if error is not None:
            raise error
        if not self._noted:
            self._noted = True
            _log.info(
                "%s was compiled ahead for other argument shapes, dtypes or shardings; "
                "compiling it for these now.",
                getattr(self.jitted, "__name__", "a step"),
            )
        return self.jitted(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.jitted, name)


def after(outputs: Any, job: Callable[[], Any]) -> Callable[[], Any]:
    """`job`, run once the arrays in `outputs` are computed (or deleted: donated).

    A compile queued by a phase's first step starts when that step has run,
    so that the change's step has the CPU (and Python) to itself. One
    execution's outputs become ready together: only the smallest is kept (not
    the state, which would stay alive until the job runs).
    """
    arrays = [x for x in jax.tree.leaves(outputs) if isinstance(x, jax.Array)]
    smallest = min(arrays, key=lambda x: x.nbytes, default=None)

    def waited() -> Any:
        if smallest is not None:
            try:
                smallest.block_until_ready()
            except Exception:  # donated to the next step meanwhile: this one has run
                pass
        return job()

    return waited


def log_skip(what: str, error: BaseException) -> None:
    """Notes that `what` is not compiled ahead (it compiles when first used)."""
    _log.info("Not compiling %s ahead (it compiles when first used): %r", what, error)


# The worker ------------------------------------------------------------------


class _Worker:
    """A daemon thread running submitted jobs one at a time, lowest priority first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: list[tuple[Any, int, concurrent.futures.Future, Callable[[], Any]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._running: concurrent.futures.Future | None = None
        self._exit_hooked = False

    def submit(self, priority: Any, job: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._ensure_thread()
            heapq.heappush(self._queue, (priority, next(self._order), future, job))
            self._cond.notify()
        return future

    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._pid == os.getpid()

    def _ensure_thread(self) -> None:
        if self.alive():
            return
        if self._pid != os.getpid():  # a forked child: the parent's jobs are not ours
            for _, _, future, _ in self._queue:
                future.cancel()
            self._queue.clear()
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._loop, name="layerfreeze-compile-ahead", daemon=True
        )
        self._thread.start()
        if not self._exit_hooked:
            # Registered after jax's own exit hooks, so it runs before them.
            atexit.register(self.shutdown)
            self._exit_hooked = True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                _, _, future, job = heapq.heappop(self._queue)
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                self._running = future
            try:
                result = job()
            except BaseException as e:  # handed to whoever waits for it
                future.set_exception(e)
            else:
                future.set_result(result)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def shutdown(self) -> None:
        """Cancels the queued jobs and waits for the one in flight (it cannot be stopped)."""
        with self._cond:
            for _, _, future, _ in self._queue:
                future.cancel()
            self._queue.clear()
            running = self._running
        if running is not None and self.alive():
            _log.info("Waiting for a program being compiled ahead to finish before exit.")
            concurrent.futures.wait([running])


_WORKER = _Worker()


def submit(priority: Any, job: Callable[[], Any]) -> concurrent.futures.Future:
    """Queues `job` for the process's compile worker; lower `priority` runs first."""
    return _WORKER.submit(priority, job)


def wait(future: concurrent.futures.Future, timeout: float | None = None) -> bool:
    """Waits for `future` (at most `timeout` seconds); False if it did not finish.

    A job whose worker is gone (a forked child, an interpreter shutting down)
    is given up instead of waited for, so no caller waits forever.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not future.done():
        if not _WORKER.alive():
            future.cancel()
            break
        left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if left <= 0:
            break
        concurrent.futures.wait([future], timeout=left)
    return future.done() and not future.cancelled()
