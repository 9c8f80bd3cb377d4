"""Stopping a child process together with everything it started.

The CLI's ``pipeline`` (dvc and the stage it runs), the Prefect flow's ``dvc exp run`` and the
benchmarks' servers all start a child in a session of its own (``start_new_session=True``), so
that its process group holds its whole tree. A stage can outlive its parent while it ends its
MLflow run, so the wait is for the whole group, not only the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress

#: How long a child's group may take to exit after the signal before it is SIGKILLed, seconds.
STOP_GRACE_S = 30.0
#: How long to wait for the child's exit status once its group was SIGKILLed, seconds.
REAP_TIMEOUT_S = 10.0


def group_exists(pgid: int) -> bool:
    """Whether any process (a zombie included) is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_process_group(process: subprocess.Popen, signum: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> int | None:
    """Send ``signum`` to the group that ``process`` leads and wait until every member has exited;
    SIGKILL what is left after ``grace_s`` seconds. Returns ``process``'s exit status, or None
    when it could not be reaped.

    ``process`` must have been started with ``start_new_session=True`` (its pid is its group's id).
    """
    pgid = process.pid
    with suppress(ProcessLookupError):
        os.killpg(pgid, signum)
    deadline = time.monotonic() + grace_s
    while group_exists(pgid):
        process.poll()  # reap the leader itself: its zombie would keep the group alive
        if time.monotonic() >= deadline:
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            break
        time.sleep(0.05)
    try:
        return process.wait(timeout=REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
