"""Detached service processes: start with a log file and a pid file, check, stop by process group.

The services outlive the command that starts them (``lightclip services up`` returns), so each
runs in its own session and process group, writes its output to a log file, and is found again
through a pid file that also records the process's start time: a pid reused by an unrelated
process after a reboot or a crash is never mistaken for the service, and never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

from lightclip.errors import LightclipError

T = TypeVar("T")


class ServicesError(LightclipError, RuntimeError):
    """A team service could not be started, reached or stopped; the message names the service."""


@dataclass(frozen=True)
class ProcessRecord:
    """What a pid file holds: the pid and the kernel's start time of that process (clock ticks)."""

    pid: int
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


def process_record(pid: int) -> ProcessRecord | None:
    """The record of a live process, or None when there is no such process."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return ProcessRecord(pid=pid, start_ticks=int(fields[19]))  # field 22 of stat: starttime


def is_alive(record: ProcessRecord | None) -> bool:
    """True when the recorded process still runs (same pid *and* start time, not a zombie)."""
    if record is None:
        return False
    fields = _stat_fields(record.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == record.start_ticks


def write_pid_file(path: Path, record: ProcessRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{record.pid} {record.start_ticks}\n")


def read_pid_file(path: Path) -> ProcessRecord | None:
    """The record in a pid file; None when the file is absent or unreadable (a stale leftover)."""
    try:
        pid, ticks = path.read_text().split()
        return ProcessRecord(pid=int(pid), start_ticks=int(ticks))
    except (FileNotFoundError, ValueError):
        return None


#: Signals a service must be able to receive whoever started it: a shell starts background jobs
#: (``cmd &``, CI scripts) with SIGINT and SIGQUIT ignored, exec keeps an ignored signal ignored,
#: and a Prefect worker stops on SIGTERM by sending itself SIGINT: ignored, it waited for SIGKILL.
DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


def _default_signals() -> None:
    """``preexec_fn``: only ``signal.signal`` calls (async-signal-safe), between fork and exec."""
    for sig in DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def start_detached(command: Sequence[str], *, log_file: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session (its own process group) with SIGINT and SIGQUIT at their
    default actions (:data:`DEFAULT_SIGNALS`), stdout and stderr appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} start: {' '.join(command)}\n".encode())
        log.flush()
        try:
            return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env), cwd=cwd, start_new_session=True, preexec_fn=_default_signals)
        except FileNotFoundError as exc:
            raise ServicesError(f"cannot start {command[0]}: {exc.strerror}") from exc


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def stop_group(record: ProcessRecord, *, name: str, timeout_s: float, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``sig`` to the recorded process's group, wait up to ``timeout_s`` for the whole group to
    exit, then SIGKILL what is left. Returns True when it stopped within the grace period.

    Only a process whose pid *and* start time match the record is signalled, or, when the
    recorded leader is gone (killed with SIGKILL in a fault test), what is left of its group.
    """
    if not is_alive(record):
        kill_orphans(record)
        return True
    try:
        pgid = os.getpgid(record.pid)
    except ProcessLookupError:
        return True
    if pgid != record.pid:  # not a group leader of its own: signal only the process itself
        os.kill(record.pid, sig)
        pgid = -1
    else:
        os.killpg(pgid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(record) and (pgid < 0 or not group_members(pgid)):
            return True
        time.sleep(0.1)
    if pgid > 0:
        for pid in group_members(pgid):
            os.kill(pid, signal.SIGKILL)
    elif is_alive(record):
        os.kill(record.pid, signal.SIGKILL)
    return False


def kill_orphans(record: ProcessRecord) -> list[int]:
    """SIGKILL what is left of a dead leader's process group (a server's workers still holding its
    port); returns their pids. The kernel does not hand out a pid still in use as a group id, so
    while the leader's pid is unused (or still the leader's zombie) every member of that group is
    the service's own."""
    if is_alive(record):
        return []
    current = process_record(record.pid)
    if current is not None and current.start_ticks != record.start_ticks:
        return []  # the pid belongs to another process now: not ours to judge
    orphans = group_members(record.pid)
    for pid in orphans:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(record.pid) and time.monotonic() < deadline:  # their ports close as they exit
        time.sleep(0.05)
    return orphans


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (TIME_WAIT leftovers of a stopped server do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now (the kernel's choice, held open until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(check: Callable[[], T | None], *, what: str, timeout_s: float, interval_s: float = 0.2,
               alive: Callable[[], bool] | None = None, log_file: Path | None = None) -> T:
    """Poll ``check`` until it returns a truthy value, at most ``timeout_s`` seconds.

    Exceptions from ``check`` count as "not yet" (the server is still starting). When ``alive``
    says the process died, or time runs out, the error names ``what``, the last failure and the
    log file's last lines, so the user sees why without opening it.
    """
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - any failure of a starting server means "not yet"
            last_error = f"{type(exc).__name__}: {exc}"
        if alive is not None and not alive():
            raise ServicesError(f"{what}: the process exited ({last_error}){log_tail(log_file)}")
        if time.monotonic() >= deadline:
            raise ServicesError(f"{what}: not ready after {timeout_s:.0f} s ({last_error}){log_tail(log_file)}")
        time.sleep(interval_s)


def log_tail(log_file: Path | None, lines: int = 8) -> str:
    """The last lines of a log file, formatted to follow an error message ('' when there is none)."""
    if log_file is None or not log_file.is_file():
        return ""
    with open(log_file, "rb") as handle:
        handle.seek(max(0, log_file.stat().st_size - 8192))
        tail = handle.read().decode(errors="replace").splitlines()[-lines:]
    return f"; see {log_file}, which ends:\n  " + "\n  ".join(tail)
