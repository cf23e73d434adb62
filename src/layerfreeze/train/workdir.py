"""One run per workdir: a lock that a killed run does not leave behind.

Two runs writing one workdir interleave their metrics and race for its
checkpoints. `WorkdirLock` takes an exclusive `flock` on `<workdir>/.lock`
for as long as the run lives. The operating system releases it when the
process ends, however it ends (`kill -9` included), so a crashed run never
blocks the next one; a second run meanwhile is refused with the holder's pid,
host and start time, which the lock file records.

A run of several processes (`jax.distributed.initialize`) is one run: every
process calls `acquire`, process 0 alone takes the lock, and when it is
refused every process raises the same `WorkdirBusyError`. The lock asks JAX
how many processes there are, so take it after `jax.distributed.initialize`;
a program that has not imported JAX is one process.

>>> import tempfile
>>> workdir = tempfile.mkdtemp()
>>> with WorkdirLock(workdir):
...     try:
...         WorkdirLock(workdir).acquire()
...     except WorkdirBusyError as e:
...         print(str(e).split("(")[1].split(",")[0])
pid ...
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks to take
    fcntl = None

__all__ = ["WorkdirBusyError", "WorkdirLock"]

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive, process-lifetime lock on a workdir.

    Args:
      workdir: the run's directory; created if missing.

    Use it as a context manager, or call `acquire` and `release`. On a
    system without `fcntl` (Windows) it locks nothing.
    """

    def __init__(self, workdir: str | os.PathLike[str]):
        self.path = Path(workdir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises `WorkdirBusyError` naming the holder.

        On several processes every one calls it; process 0 takes the lock and
        tells the others whether it got it.

        Raises:
          WorkdirBusyError: another live process holds it.
        """
        if "jax" not in sys.modules:  # not a JAX program: one process (and no JAX to import)
            self._acquire_here()
            return
        from layerfreeze.train import _multihost

        if not _multihost.several():
            self._acquire_here()
            return
        refused = ""
        if _multihost.is_primary():
            try:
                self._acquire_here()
            except WorkdirBusyError as e:
                refused = str(e)
        refused = _multihost.gather_text(refused)[0]
        if refused:
            raise WorkdirBusyError(refused)

    def _acquire_here(self) -> None:
        if self._file is not None or fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncation: the holder's record must survive a refused open.
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            raise WorkdirBusyError(
                f"Another run is using the workdir {str(self.path.parent)!r} ({holder}). "
                "Wait for it to end, stop it, or give this run another --workdir."
            ) from None
        file.seek(0)
        file.truncate()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        file.write(json.dumps(record))
        file.flush()
        self._file = file

    def release(self) -> None:
        """Lets the lock go (also done by the operating system when the process ends)."""
        if self._file is None:
            return
        file, self._file = self._file, None
        file.truncate(0)
        fcntl.flock(file, fcntl.LOCK_UN)
        file.close()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _describe(text: str) -> str:
    try:
        record: Any = json.loads(text)
        return f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown: it has not written its record yet"
