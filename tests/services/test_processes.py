"""Detached processes: pid files that survive pid reuse, group stops, port checks, bounded waits."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from lightclip.services.processes import (
    ProcessRecord,
    ServicesError,
    group_members,
    is_alive,
    kill_orphans,
    port_is_free,
    process_record,
    read_pid_file,
    start_detached,
    stop_group,
    wait_until,
    write_pid_file,
)

#: A parent that starts a child in its group and ignores nothing: both must go on stop.
PARENT_AND_CHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"


def test_start_detached_runs_in_its_own_group_and_stop_takes_the_whole_group(tmp_path: Path):
    log = tmp_path / "logs" / "svc.log"
    process = start_detached([sys.executable, "-c", PARENT_AND_CHILD], log_file=log, env=os.environ, cwd=tmp_path / "cwd")
    record = process_record(process.pid)
    assert record is not None and os.getpgid(process.pid) == process.pid
    wait_until(lambda: len(group_members(process.pid)) == 2, what="child", timeout_s=10)
    write_pid_file(tmp_path / "svc.pid", record)
    assert read_pid_file(tmp_path / "svc.pid") == record and is_alive(record)
    assert stop_group(record, name="svc", timeout_s=10) is True
    process.wait(timeout=5)
    assert not is_alive(record) and group_members(process.pid) == []
    assert "up" in log.read_text() and "start:" in log.read_text()


def test_the_orphans_of_a_killed_leader_are_cleared(tmp_path: Path):
    """A leader killed with SIGKILL leaves its child running in the group: kill_orphans ends it,
    whether the leader's zombie is reaped yet or not; a live leader's group is left alone."""
    process = start_detached([sys.executable, "-c", PARENT_AND_CHILD], log_file=tmp_path / "svc.log", env=os.environ, cwd=tmp_path)
    record = process_record(process.pid)
    assert record is not None
    wait_until(lambda: len(group_members(process.pid)) == 2, what="child", timeout_s=10)
    assert kill_orphans(record) == [] and len(group_members(process.pid)) == 2  # the leader lives
    os.kill(process.pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(record), what="leader gone", timeout_s=5)
    orphans = kill_orphans(record)  # the leader is still an unreaped zombie here
    assert len(orphans) == 1 and group_members(process.pid) == []
    process.wait(timeout=5)


def test_a_reused_pid_is_not_the_service(tmp_path: Path):
    """A record whose start time differs (the pid now belongs to someone else) is neither alive nor signalled."""
    me = process_record(os.getpid())
    assert me is not None and is_alive(me)
    impostor = ProcessRecord(pid=me.pid, start_ticks=me.start_ticks + 1)
    assert not is_alive(impostor)
    assert stop_group(impostor, name="x", timeout_s=1) is True  # nothing to stop, nothing signalled
    assert read_pid_file(tmp_path / "absent.pid") is None


def test_port_is_free_sees_a_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(port)


def test_wait_until_times_out_naming_what_and_the_log(tmp_path: Path):
    log = tmp_path / "svc.log"
    log.write_text("line one\nFATAL: could not bind\n")

    def probe() -> bool:
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with pytest.raises(ServicesError, match=r"(?s)mlflow \(http://x\): not ready after 0 s \(ConnectionRefusedError: refused\).*FATAL: could not bind"):
        wait_until(probe, what="mlflow (http://x)", timeout_s=0.3, log_file=log)
    assert time.monotonic() - started < 2


def test_wait_until_stops_at_once_when_the_process_died(tmp_path: Path):
    with pytest.raises(ServicesError, match="prefect: the process exited"):
        wait_until(lambda: False, what="prefect", timeout_s=30, alive=lambda: False)


def test_wait_until_returns_the_first_truthy_answer():
    answers = iter([None, 0, "ready"])
    assert wait_until(lambda: next(answers), what="x", timeout_s=5, interval_s=0.01) == "ready"


def ignored_signals(pid: int) -> int:
    """The ``SigIgn`` mask of ``pid`` (bit n-1 = signal n ignored)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return int(line.split()[1], 16)


def test_a_service_started_by_a_background_job_can_still_be_interrupted(tmp_path: Path):
    """A shell's background job (CI) runs with SIGINT ignored; a service started from it must not
    inherit that, or a Prefect worker (which stops by sending itself SIGINT) never stops."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` gives the test process
    try:
        process = start_detached(["sleep", "60"], log_file=tmp_path / "svc.log", env=os.environ, cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        mask = ignored_signals(process.pid)
        assert not mask & (1 << (signal.SIGINT - 1)) and not mask & (1 << (signal.SIGQUIT - 1))
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=5) == -signal.SIGINT  # the default action: it ends
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
