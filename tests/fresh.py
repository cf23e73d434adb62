"""Python run as in a fresh interpreter, without importing JAX every time.

A fork server (`multiprocessing`'s "forkserver") imports JAX, Flax, Optax,
layerfreeze and the experiment's modules once per test process, and nothing
else: no backend, no compiled program, no thread but NumPy's BLAS pool. Each
run is a process forked from it that executes the code in a new `__main__`
namespace, with its own working directory, command line and output files.
The code sees no variable, import or JAX state of another run or of the test,
and what it uses it must import itself, as in a fresh interpreter; it starts
in about 0.05 s instead of the 3-5 s of CPU that importing JAX and the
experiment takes (about 40 s over the README blocks and command lines).
The server's environment is the test process's when it starts (conftest's
`XLA_FLAGS` included).
"""

import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile

# Imported once by the server. Nothing here may start a JAX backend or threads.
PRELOAD = (
    "numpy",
    "jax",
    "jax.numpy",
    "flax.linen",
    "flax.nnx",
    "optax",
    "layerfreeze",
    "layerfreeze.train",
    "absl.app",
    "ml_collections.config_flags",
    "cifar_train",  # the experiment (on sys.path through pytest's `pythonpath`)
)

_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(list(PRELOAD))
    return _context


def _child(code, filename, argv, cwd, stdout, stderr, env, jax_config):
    # In the forked process. An exception ends it with its traceback on stderr
    # and exit code 1 (multiprocessing's bootstrap), `sys.exit(n)` with n.
    os.environ.update(env)  # before XLA reads its flags: at the first backend use
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
    os.chdir(cwd)
    sys.argv = list(argv)
    if filename != "-c":  # as `python script.py`: its folder first on sys.path
        sys.path.insert(0, str(pathlib.Path(filename).parent))
    import jax

    for name, value in jax_config.items():
        jax.config.update(name, value)
    namespace = {"__name__": "__main__", "__file__": filename, "__builtins__": __builtins__}
    exec(compile(code, filename, "exec"), namespace)


def start_script(script, *args, cwd, output, env=None, jax_config=None):
    """Starts `python script *args` in `cwd`; returns its `multiprocessing.Process`.

    Its stdout and stderr go to the file `output`. `env` and `jax_config` as in
    `run_code`. The caller joins the process (or kills it) and reads its
    `exitcode`.
    """
    script = pathlib.Path(script)
    argv = [str(script), *map(str, args)]
    process = _server().Process(
        target=_child,
        args=(
            script.read_text(),
            str(script),
            argv,
            str(cwd),
            str(output),
            str(output),
            dict(env or {}),
            dict(jax_config or {}),
        ),
    )
    process.start()
    return process


def _run(code, filename, argv, cwd, timeout, env, jax_config):
    with tempfile.TemporaryDirectory() as tmp:
        out, err = pathlib.Path(tmp, "stdout"), pathlib.Path(tmp, "stderr")
        process = _server().Process(
            target=_child,
            args=(code, filename, argv, str(cwd), str(out), str(err), env, jax_config),
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        return subprocess.CompletedProcess(argv, process.exitcode, out.read_text(), err.read_text())


def run_code(code, *args, cwd, timeout=600, env=None, jax_config=None):
    """`python -c code *args` in `cwd`, as `subprocess.run(..., capture_output=True, text=True)`.

    `env`: environment variables set before the code runs; those that XLA reads
    when its backend starts (`XLA_FLAGS`) take effect, those that JAX reads when
    it is imported do not: give those as `jax_config`, `jax.config` settings.
    """
    argv = ["-c", *map(str, args)]
    return _run(code, "-c", argv, cwd, timeout, dict(env or {}), dict(jax_config or {}))


def run_script(script, *args, cwd, timeout=600):
    """`python script *args` in `cwd`, as `subprocess.run(..., capture_output=True, text=True)`."""
    script = pathlib.Path(script)
    argv = [str(script), *map(str, args)]
    return _run(script.read_text(), str(script), argv, cwd, timeout, {}, {})
