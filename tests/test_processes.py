"""Stopping a child with its whole process group: the wait covers a member that outlives the
child, a member that ignores the signal is SIGKILLed after the grace period, and an exited
child is only reaped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from lightclip.processes import group_exists, stop_process_group

# A parent that starts a child in its group and exits on SIGTERM at once; the child takes
# ``linger`` seconds to end (an MLflow run being closed) and then writes its mark.
PARENT = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {child!r}])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print("ready", flush=True)
time.sleep(60)
"""
LINGERING_CHILD = """
import signal, sys, time
def end(*_):
    time.sleep({linger})
    open({mark!r}, "w").write("ended")
    sys.exit(0)
signal.signal(signal.SIGTERM, end)
time.sleep(60)
"""
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def start(code: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_the_wait_covers_a_member_that_outlives_the_child(tmp_path: Path):
    mark = tmp_path / "mark"
    process = start(PARENT.format(child=LINGERING_CHILD.format(linger=0.8, mark=str(mark))))
    time.sleep(0.5)  # the grandchild has installed its handler
    started = time.monotonic()
    status = stop_process_group(process, signal.SIGTERM, grace_s=20)
    assert status == 7
    assert mark.read_text() == "ended"  # not killed: it was given the time it needed
    assert 0.7 < time.monotonic() - started < 10
    assert not group_exists(process.pid)


def test_a_member_deaf_to_the_signal_is_killed_after_the_grace_period():
    process = start(DEAF)
    started = time.monotonic()
    assert stop_process_group(process, signal.SIGTERM, grace_s=1.0) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - started < 8
    assert not group_exists(process.pid)


def test_an_exited_child_is_only_reaped():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)
    while process.poll() is None:
        time.sleep(0.05)
    assert stop_process_group(process, signal.SIGTERM, grace_s=1.0) == 3
