"""`layerfreeze.train.workdir`: one run per workdir; a killed run leaves no stale lock."""

import os
import signal
import subprocess
import sys

import pytest

from layerfreeze.train.workdir import WorkdirBusyError, WorkdirLock

pytestmark = pytest.mark.skipif(os.name != "posix", reason="advisory locks are POSIX")

_HOLD = """
import sys, time
from layerfreeze.train.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirBusyError, match=rf"pid {proc.pid} on .*, since \d{{4}}-") as e:
            WorkdirLock(tmp_path).acquire()
        assert "another --workdir" in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # kill -9 left the lock file behind, but not the lock.
    assert (tmp_path / ".lock").exists()
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirBusyError, match=rf"pid {os.getpid()} "):
            WorkdirLock(tmp_path).acquire()
    # Released: free for the next run.
    with WorkdirLock(tmp_path):
        pass


def test_lock_is_reentrant_for_its_holder_and_creates_the_workdir(tmp_path):
    workdir = tmp_path / "new" / "run"
    lock = WorkdirLock(workdir)
    lock.acquire()
    lock.acquire()  # already held: nothing to do
    assert workdir.is_dir()
    lock.release()
    lock.release()
    assert (workdir / ".lock").read_text() == ""  # released: no holder recorded
