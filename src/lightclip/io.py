"""Small shared I/O: JSON outputs, atomic files and directories, torch/FAISS thread counts.

Every stage writes its outputs through these helpers so that a kill never leaves half a file or
half a directory behind (DVC would otherwise cache a broken output) and every JSON output has
one format (sorted keys, two-space indent, trailing newline: stable diffs in git).

Thread counts: a config's ``null`` means :func:`default_threads`, the CPUs this process may
really use (its CPU affinity, capped by its cgroup's CPU quota), not the cores of the host. On a
busy or containerised machine more OpenMP threads than usable CPUs wait on each other for a
core, and a training step gets many times slower than on one thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from lightclip.errors import LightclipError

log = logging.getLogger(__name__)

#: Explicit thread count for every ``null`` threads setting (torch, FAISS, image decoding).
THREADS_ENV = "LIGHTCLIP_THREADS"


def write_json(path: Path | str, payload: Any, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``payload`` as JSON atomically (parents created); returns the path."""
    path = Path(path)
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_format_json(path: Path | str, expected_format: str, error: type[Exception], *, missing: str, foreign: str | None = None) -> dict[str, Any]:
    """A JSON object one of lightclip's writers stamped with ``"format": expected_format``.

    A missing file raises ``error(missing)``; a file that is not JSON, or not of that format,
    raises ``error`` naming it (``foreign``: the message for the latter, default: the format found).
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        data = read_json(path)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != expected_format:
        raise error(foreign or f"{path}: unknown format {found!r}; expected {expected_format!r}")
    return data


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to a per-process temporary sibling, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers never share a temp file
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_dir(out_dir: Path | str) -> Iterator[Path]:
    """Build a directory output in a hidden sibling, then swap it in for ``out_dir``.

    Yields the (fresh, empty) staging directory. On success the old ``out_dir`` is removed and
    the staging directory renamed to it; on any exception the staging directory is removed and
    ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.is_dir() and not out_dir.is_symlink():
        shutil.rmtree(out_dir)
    elif out_dir.exists() or out_dir.is_symlink():
        out_dir.unlink()
    os.replace(tmp, out_dir)


class ThreadsError(LightclipError, ValueError):
    """A thread count the user set (``LIGHTCLIP_THREADS``) that is not a whole number >= 1."""


@dataclass(frozen=True)
class CpuBudget:
    """How many threads this process should run, and how that was found."""

    threads: int  # what a null threads setting means: ``usable``, or the override
    usable: int  # the affinity capped by the quota (rounded down, at least 1)
    affinity: int  # CPUs in the process's affinity mask (os.sched_getaffinity)
    quota: float | None  # CPUs granted by the cgroup CPU quota; None = no quota
    quota_source: str | None  # the file that set the quota
    override: int | None = None  # LIGHTCLIP_THREADS, when set

    def describe(self) -> str:
        """One line, e.g. ``threads: 2 (affinity 2, cgroup quota none)``."""
        quota = "none" if self.quota is None else f"{self.quota:g} CPU{'' if self.quota == 1 else 's'} ({self.quota_source})"
        found = f"affinity {self.affinity}, cgroup quota {quota}"
        if self.override is not None:
            return f"threads: {self.threads} ({THREADS_ENV}={self.override}; {found})"
        return f"threads: {self.threads} ({found})"


def parse_cpu_max(text: str) -> float | None:
    """CPUs granted by a cgroup v2 ``cpu.max`` (``"$QUOTA $PERIOD"``); ``None`` for ``max`` (no quota)."""
    fields = text.split()
    if not fields or len(fields) > 2:
        raise ValueError(f"expected '$QUOTA $PERIOD', got {text.strip()!r}")
    if fields[0] == "max":
        return None
    quota, period = int(fields[0]), int(fields[1]) if len(fields) == 2 else 100000
    if quota <= 0 or period <= 0:
        raise ValueError(f"quota and period must be positive, got {text.strip()!r}")
    return quota / period


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """CPUs granted by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; ``None`` for -1 (no quota)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    if quota < 0:
        return None
    if quota == 0 or period <= 0:
        raise ValueError(f"quota {quota} / period {period}: expected a positive quota and period")
    return quota / period


def _unescape_mount(path: str) -> str:
    """``/proc/self/mountinfo`` writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _cgroup_mounts(mountinfo: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(root, mount point) of each cgroup v2 mount and of each v1 mount holding the ``cpu`` controller."""
    v2, v1 = [], []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or sep < 5:
            continue
        fstype, super_options = fields[sep + 1], fields[sep + 3].split(",")
        mount = (_unescape_mount(fields[3]), _unescape_mount(fields[4]))
        if fstype == "cgroup2":
            v2.append(mount)
        elif fstype == "cgroup" and "cpu" in super_options:
            v1.append(mount)
    return v2, v1


def _under_mount(cgroup_path: str, root: str, mount_point: str) -> Path | None:
    """The directory of ``cgroup_path`` inside a cgroup mount of hierarchy ``root``, if it is there."""
    root = root.rstrip("/")
    if cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    return Path(mount_point, cgroup_path[len(root):].lstrip("/"))


def cgroup_cpu_quota(proc_cgroup: str, mountinfo: str) -> tuple[float | None, str | None]:
    """The tightest CPU quota on this process's cgroup and its ancestors, and the file that sets it.

    ``proc_cgroup`` is the text of ``/proc/self/cgroup``, ``mountinfo`` that of
    ``/proc/self/mountinfo`` (arguments, so a test can point them at crafted files). cgroup v2
    reads ``cpu.max``; cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. Every level up to
    the mount point counts, because a parent's quota binds its children too. A file that cannot
    be read or parsed is skipped with a warning naming it.
    """
    v2_mounts, v1_mounts = _cgroup_mounts(mountinfo)
    candidates: list[tuple[Path, Path, str]] = []  # (cgroup directory, mount point, version)
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            candidates += [(d, Path(m), "v2") for r, m in v2_mounts if (d := _under_mount(path, r, m)) is not None]
        elif "cpu" in controllers.split(","):
            candidates += [(d, Path(m), "v1") for r, m in v1_mounts if (d := _under_mount(path, r, m)) is not None]
    best: tuple[float | None, str | None] = (None, None)
    for directory, mount, version in candidates:
        level = directory
        while True:
            cpus, source = _read_quota(level, version)
            if cpus is not None and (best[0] is None or cpus < best[0]):
                best = (cpus, source)
            if level == mount or mount not in level.parents:
                break
            level = level.parent
    return best


def _read_quota(directory: Path, version: str) -> tuple[float | None, str | None]:
    files = [directory / "cpu.max"] if version == "v2" else [directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"]
    if not files[0].is_file():
        return None, None
    try:
        texts = [f.read_text(encoding="ascii") for f in files]
        cpus = parse_cpu_max(texts[0]) if version == "v2" else parse_cfs_quota(*texts)
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read the CPU quota (%s); ignored", files[0], exc)
        return None, None
    return cpus, str(files[0])


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def usable_cpus(
    *,
    affinity: int | None = None,
    proc_cgroup: str | None = None,
    mountinfo: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> CpuBudget:
    """The CPUs this process may really use: its affinity mask, capped by its cgroup CPU quota.

    A fractional quota is rounded down (1.5 CPUs -> 1 thread), never below 1. ``LIGHTCLIP_THREADS``
    overrides the result. Each argument defaults to this process's own value (tests pass crafted ones).
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    quota, source = cgroup_cpu_quota(
        _read_text("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup,
        _read_text("/proc/self/mountinfo") if mountinfo is None else mountinfo,
    )
    usable = max(1, min(affinity, math.floor(quota))) if quota is not None else max(1, affinity)
    threads = usable
    raw = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    override = None
    if raw:
        try:
            override = int(raw)
        except ValueError:
            override = 0
        if override < 1:
            raise ThreadsError(f"environment variable {THREADS_ENV}={raw!r}: expected a whole number of threads >= 1 (or unset it)")
        threads = override
    return CpuBudget(threads=threads, usable=usable, affinity=affinity, quota=quota, quota_source=source, override=override)


_BUDGET: tuple[int, CpuBudget] | None = None  # (pid, budget): found once per process


def cpu_budget() -> CpuBudget:
    """:func:`usable_cpus` for this process, found once (and logged once) per process."""
    global _BUDGET
    if _BUDGET is None or _BUDGET[0] != os.getpid():
        budget = usable_cpus()
        _BUDGET = (os.getpid(), budget)
        log.info(budget.describe())
    return _BUDGET[1]


def default_threads() -> int:
    """Threads when a config says ``null``: the CPUs this process may use (:func:`cpu_budget`)."""
    return cpu_budget().threads


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show the ``lightclip.*`` log lines (the thread choice, warnings) on stderr, once per process."""
    logger = logging.getLogger("lightclip")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


@contextmanager
def torch_threads(threads: int | None, *, faiss_too: bool = False) -> Iterator[int]:
    """Run a block on ``threads`` torch threads (``None`` = :func:`default_threads`), then restore.

    ``faiss_too`` sets FAISS's OpenMP threads the same way. Yields the thread count in force.
    """
    # Imported here, not at the top: this module is also the CLI's, and torch is about 1.1 s of
    # the 1.2 s `import lightclip.cli` takes; FAISS is needed only where it is asked for.
    import torch

    count = threads or default_threads()
    previous = torch.get_num_threads()
    previous_faiss = None
    if faiss_too:
        import faiss

        previous_faiss = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(count)
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
        if previous_faiss is not None:
            import faiss

            faiss.omp_set_num_threads(previous_faiss)
