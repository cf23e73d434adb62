"""Runs a test's script on several CPU devices: JAX takes the device count at start."""

import json
import os

import fresh


def run_on_cpu_devices(script: str, devices: int = 4, *, timeout: float = 300) -> dict:
    """Runs `script` in a fresh interpreter with `devices` CPU devices; its last line, as JSON.

    The script prints one JSON object last; a failure shows the end of its stderr.
    """
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    proc = fresh.run_code(script, cwd=os.getcwd(), timeout=timeout, env={"XLA_FLAGS": flags})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == devices, out
    return out
