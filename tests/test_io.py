"""Threads follow the CPUs the process may use: its affinity mask, capped by its cgroup CPU quota.

The affinity case runs a real process restricted to one CPU; the quota cases read crafted
``cpu.max`` / ``cpu.cfs_*`` files in a directory tree laid out like a cgroup mount (the
``/proc/self/cgroup`` and ``mountinfo`` texts point at it); where the test may create a cgroup,
a real quota is set on a real process too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightclip import io
from lightclip.io import THREADS_ENV, ThreadsError, cgroup_cpu_quota, parse_cfs_quota, parse_cpu_max, usable_cpus

#: A child that reports what lightclip chose, twice (the choice is logged once per process).
CHILD = (
    "import torch\n"
    "from lightclip import io\n"
    "io.log_to_stderr()\n"
    "first, second = io.default_threads(), io.default_threads()\n"
    "with io.torch_threads(None) as n:\n"
    "    print(first, second, n, torch.get_num_threads())\n"
)


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS")}


def _mountinfo_v2(mount: Path, root: str = "/") -> str:
    return f"30 23 0:26 {root} {mount} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def _mountinfo_v1(mount: Path) -> str:
    return (f"31 23 0:28 / {mount.parent / 'memory'} rw,relatime - cgroup cgroup rw,memory\n"
            f"32 23 0:29 / {mount} rw,relatime - cgroup cgroup rw,cpu,cpuacct\n")


def test_cpu_max_values():
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("max") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000 100000") == 0.5
    assert parse_cpu_max("400000 100000") == 4.0
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("250000", "100000") == 2.5
    for bad in ("", "abc 100000", "0 100000", "100000 0", "1 2 3"):
        with pytest.raises(ValueError):
            parse_cpu_max(bad)


@pytest.mark.parametrize(("cpu_max", "affinity", "threads"), [
    ("max 100000", 4, 4),  # no quota: the affinity mask
    ("150000 100000", 4, 1),  # 1.5 CPUs -> 1 thread (rounded down)
    ("50000 100000", 4, 1),  # half a CPU -> still 1
    ("300000 100000", 2, 2),  # a quota above the affinity: the affinity binds
    ("200000 100000", 8, 2),
])
def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path, cpu_max: str, affinity: int, threads: int):
    group = tmp_path / "cg" / "job"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text(cpu_max + "\n")
    budget = usable_cpus(affinity=affinity, proc_cgroup="0::/job\n", mountinfo=_mountinfo_v2(tmp_path / "cg"), environ={})
    assert budget.threads == budget.usable == threads and budget.affinity == affinity
    if cpu_max.startswith("max"):
        assert budget.quota is None and budget.describe() == f"threads: {threads} (affinity {affinity}, cgroup quota none)"
    else:
        assert budget.quota_source == str(group / "cpu.max")
        assert budget.describe() == f"threads: {threads} (affinity {affinity}, cgroup quota {budget.quota:g} CPUs ({group / 'cpu.max'}))"


def test_a_parents_quota_binds_its_children(tmp_path: Path):
    mount = tmp_path / "cg"
    (mount / "a" / "b").mkdir(parents=True)
    (mount / "cpu.max").write_text("max 100000\n")
    (mount / "a" / "cpu.max").write_text("150000 100000\n")  # the parent: 1.5 CPUs
    (mount / "a" / "b" / "cpu.max").write_text("max 100000\n")  # the process's own: none
    assert cgroup_cpu_quota("0::/a/b\n", _mountinfo_v2(mount)) == (1.5, str(mount / "a" / "cpu.max"))
    (mount / "a" / "b" / "cpu.max").write_text("100000 100000\n")  # tighter below: that one wins
    assert cgroup_cpu_quota("0::/a/b\n", _mountinfo_v2(mount)) == (1.0, str(mount / "a" / "b" / "cpu.max"))


def test_a_container_sees_its_own_cgroup_at_the_mount_point(tmp_path: Path):
    """Without a cgroup namespace the mount's root is the container's cgroup (mountinfo field 4)."""
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    mountinfo = _mountinfo_v2(tmp_path, root="/docker/abc")
    assert cgroup_cpu_quota("0::/docker/abc\n", mountinfo) == (2.0, str(tmp_path / "cpu.max"))
    assert cgroup_cpu_quota("0::/elsewhere\n", mountinfo) == (None, None)  # not under this mount
    assert cgroup_cpu_quota("", mountinfo) == (None, None)


def test_cgroup_v1_cfs_quota(tmp_path: Path):
    mount = tmp_path / "cpu,cpuacct"
    (mount / "job").mkdir(parents=True)
    (mount / "job" / "cpu.cfs_quota_us").write_text("250000\n")
    (mount / "job" / "cpu.cfs_period_us").write_text("100000\n")
    proc = "5:memory:/job\n4:cpu,cpuacct:/job\n0::/\n"
    budget = usable_cpus(affinity=8, proc_cgroup=proc, mountinfo=_mountinfo_v1(mount), environ={})
    assert (budget.threads, budget.quota, budget.quota_source) == (2, 2.5, str(mount / "job" / "cpu.cfs_quota_us"))
    (mount / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(affinity=8, proc_cgroup=proc, mountinfo=_mountinfo_v1(mount), environ={}).threads == 8


def test_an_unreadable_quota_is_ignored_with_a_warning_naming_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (tmp_path / "cpu.max").write_text("lots 100000\n")
    with caplog.at_level(logging.WARNING, logger="lightclip.io"):
        budget = usable_cpus(affinity=3, proc_cgroup="0::/\n", mountinfo=_mountinfo_v2(tmp_path), environ={})
    assert budget.threads == 3 and budget.quota is None
    assert f"{tmp_path / 'cpu.max'}: cannot read the CPU quota" in caplog.text


def test_lightclip_threads_overrides_and_a_bad_value_names_the_variable(tmp_path: Path):
    budget = usable_cpus(affinity=2, proc_cgroup="", mountinfo="", environ={THREADS_ENV: "3"})
    assert (budget.threads, budget.usable, budget.override) == (3, 2, 3)
    assert budget.describe() == "threads: 3 (LIGHTCLIP_THREADS=3; affinity 2, cgroup quota none)"
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ThreadsError, match=f"environment variable LIGHTCLIP_THREADS='{bad}': expected a whole number"):
            usable_cpus(affinity=2, proc_cgroup="", mountinfo="", environ={THREADS_ENV: bad})


def test_a_process_restricted_to_one_cpu_runs_one_thread():
    """A real process whose affinity mask is one CPU: one torch thread, the choice logged once."""
    cpu = min(os.sched_getaffinity(0))
    result = subprocess.run([sys.executable, "-c", CHILD], env=_child_env(), capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1", "1", "1"]
    lines = [line for line in result.stderr.splitlines() if line.startswith("threads:")]
    assert len(lines) == 1 and lines[0].startswith("threads: 1 (affinity 1, cgroup quota "), result.stderr


def _writable_cpu_cgroup() -> Path | None:
    """A cgroup v1 ``cpu`` hierarchy directory where this test may create a child (root only)."""
    proc = Path("/proc/self/cgroup").read_text()
    v2, v1 = io._cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    for line in proc.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            for root, mount in v1:
                directory = io._under_mount(path, root, mount)
                if directory is not None and (directory / "cpu.cfs_quota_us").is_file() and os.access(directory, os.W_OK):
                    return directory
    return None


def test_a_real_cgroup_quota_caps_the_threads():
    """A real process put in a real cgroup with a quota of half a CPU: one thread, the file named."""
    parent = _writable_cpu_cgroup()
    if parent is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a writable cgroup v1 cpu hierarchy (root) and 2 CPUs")
    group = parent / f"lightclip-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text("50000\n")
        procs = group / "cgroup.procs"
        result = subprocess.run([sys.executable, "-c", CHILD], env=_child_env(), capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda: procs.write_text(f"{os.getpid()}\n"))
    finally:
        group.rmdir()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1", "1", "1"]
    expected = f"threads: 1 (affinity {len(os.sched_getaffinity(0))}, cgroup quota 0.5 CPUs ({group / 'cpu.cfs_quota_us'}))"
    assert expected in result.stderr.splitlines(), result.stderr
