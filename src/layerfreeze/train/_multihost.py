"""What the training stack needs from a run of several processes: barriers and small gathers.

JAX runs one controller per host (`jax.distributed.initialize`); each calls
the same functions in the same order. Whatever touches shared files (moving
a damaged checkpoint aside, removing unfinished steps, taking a workdir's
lock) is done by process 0 between barriers, and whatever one process finds
out (a step it cannot read, the shards it checksums) is gathered, so that
every process takes the same branch. On one process every function here is
a no-op that compiles nothing.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["barrier", "gather_ints", "gather_text", "is_primary", "several"]

# The longest text `gather_text` carries (bytes of UTF-8); longer text is cut.
_TEXT_BYTES = 1024


def several() -> bool:
    """Whether this run has more than one process."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this is process 0, which writes what is written once."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (the same name on all)."""
    if several():
        multihost_utils.sync_global_devices(name)


def gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every process's `values` (integers in [0, 2**64)), indexed by process.

    All processes pass the same number of values. On one process: `[values]`.
    """
    values = [int(v) for v in values]
    if not several():
        return [values]
    words = np.array([[v >> 32, v & 0xFFFFFFFF] for v in values], np.uint32).reshape(-1, 2)
    gathered = multihost_utils.process_allgather(words)  # [processes, n, 2]
    return [[(int(hi) << 32) | int(lo) for hi, lo in rows] for rows in gathered]


def gather_text(text: str) -> list[str]:
    """Every process's `text` (cut to 1 KiB of UTF-8), indexed by process."""
    if not several():
        return [text]
    data = text.encode()[:_TEXT_BYTES]
    buffer = np.zeros(_TEXT_BYTES + 4, np.uint8)
    buffer[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
    buffer[4 : 4 + len(data)] = np.frombuffer(data, np.uint8)
    gathered = multihost_utils.process_allgather(buffer)
    out = []
    for row in gathered:
        size = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
        out.append(row[4 : 4 + size].tobytes().decode(errors="replace"))
    return out
