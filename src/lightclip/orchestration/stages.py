"""The stages of ``dvc.yaml`` in dependency order, and running them with ``dvc repro``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
from dvc.repo import Repo

from lightclip.env import TELEMETRY_OFF
from lightclip.orchestration.common import DATA_DVC_FILE, DVC_FILE, ERROR_TAIL_LINES, LAST_STAGES, Log, OrchestrationError, STOP_GRACE_S, StageFailed
from lightclip.processes import stop_process_group


@dataclass(frozen=True)
class StageGroup:
    """One task of the flow: a top-level stage of ``dvc.yaml`` and its DVC addresses."""

    name: str
    targets: tuple[str, ...]


def group_name(address: str) -> str:
    """``distill@xt`` -> ``distill``: foreach/matrix entries belong to their stage's task."""
    return address.split("@", 1)[0]


def order_groups(addresses: list[str], edges: Iterable[tuple[str, str]]) -> list[StageGroup]:
    """Group stage addresses by top-level name and order the groups by their dependencies.

    ``addresses``: the pipeline's stages in ``dvc.yaml`` order; ``edges``: ``(stage, dependency)``
    pairs. Ties keep the file order, and the :data:`LAST_STAGES` go last (nothing may depend on
    them), so publishing a model is always the final step of a run.
    """
    position: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for address in addresses:
        name = group_name(address)
        position.setdefault(name, len(position))
        members.setdefault(name, []).append(address)
    graph = nx.DiGraph()
    graph.add_nodes_from(members)
    for stage, dependency in edges:
        a, b = group_name(dependency), group_name(stage)
        if a != b and a in members and b in members:
            graph.add_edge(a, b)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise OrchestrationError(f"the stage groups depend on each other in a cycle: {cycle}")
    last = [name for name in LAST_STAGES if name in members]
    for name in last:
        dependents = sorted(graph.successors(name))
        if dependents:
            raise OrchestrationError(f"stage {name!r} must be the last step, but {dependents} depend on it")
    order = [name for name in nx.lexicographical_topological_sort(graph, key=lambda n: (n in last, position[n]))]
    return [StageGroup(name, tuple(members[name])) for name in order]


def stage_groups(project: Path) -> list[StageGroup]:
    """The pipeline stages of ``project/dvc.yaml`` as tasks, in dependency order (read with DVC)."""
    dvc_file = (Path(project) / DVC_FILE).resolve()
    if not dvc_file.is_file():
        raise OrchestrationError(f"{dvc_file}: no DVC pipeline here")
    with Repo(str(project)) as repo:
        graph = repo.index.graph
        stages = [s for s in repo.index.stages if getattr(s, "name", None) and Path(s.dvcfile.path).resolve() == dvc_file]
        ours = set(stages)
        edges = [(a.name, b.name) for a, b in graph.edges if a in ours and b in ours]
        addresses = [s.name for s in stages]
    if not addresses:
        raise OrchestrationError(f"{dvc_file} defines no stages")
    return order_groups(addresses, edges)


# -- running DVC -------------------------------------------------------------------------------


def stage_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of DVC and its stage commands: this venv's ``bin`` first on ``PATH``.

    Stage commands call ``lightclip`` from ``PATH``; a flow started by a Prefect runner may
    not have the venv activated. Telemetry stays off (see :mod:`lightclip.env`).
    """
    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    bin_dir = str(Path(sys.executable).parent)
    parts = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in parts if p and p != bin_dir]])
    env.update(extra or {})
    return env


def dvc_command(*args: str) -> list[str]:
    """``dvc ARGS`` with the dvc of this interpreter (no reliance on ``PATH``)."""
    return [sys.executable, "-m", "dvc", *args]


def run_logged(command: list[str], cwd: Path, env: Mapping[str, str], log: Log) -> tuple[int, list[str]]:
    """Run ``command``, passing each output line to ``log``; returns the exit code and all lines.

    Progress bars redraw with carriage returns: only the last state of each line is logged.
    The command runs in its own process group: when this process is interrupted (Ctrl-C, or the
    SIGTERM a Prefect runner sends to cancel a flow run), the signal is passed on to the command
    and every stage it started, and they are killed if they outlive :data:`STOP_GRACE_S`, so
    that no ``dvc repro`` or stage keeps running after the flow run has ended.
    """
    lines: list[str] = []
    proc = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\r")[-1].rstrip()
            if text:
                lines.append(text)
                log(text)
        returncode = proc.wait()
    except BaseException as exc:
        stop_process_group(proc, signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM, grace_s=STOP_GRACE_S)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return returncode, lines


def run_checked(command: list[str], cwd: Path, env: Mapping[str, str]) -> str:
    """``command``'s stdout; a non-zero exit raises :class:`OrchestrationError` with its output."""
    result = subprocess.run(command, cwd=cwd, env=dict(env), capture_output=True, text=True)
    if result.returncode != 0:
        raise OrchestrationError(f"'{' '.join(command[2:] if command[:2] == [sys.executable, '-m'] else command)}' failed:\n{result.stdout}{result.stderr}".rstrip())
    return result.stdout


@dataclass
class StageOutcome:
    """What one ``dvc repro`` of a stage group did."""

    group: str
    ran: list[str]
    skipped: list[str]
    seconds: float


_RUNNING = re.compile(r"^Running stage '([^']+)'")
#: DVC's advice after a repro (git add, autostage, push): noise in a flow's log.
_DVC_HINTS = re.compile(r"^(To track the changes with git|\tgit add |To enable auto staging|\tdvc config core.autostage|Use `dvc push`)")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")


def run_stage_group(project: Path, group: StageGroup, *, env: Mapping[str, str], log: Log, force: bool = False) -> StageOutcome:
    """``dvc repro --single-item`` of one group's stages; raises :class:`StageFailed` on failure.

    ``--single-item``: the flow runs the groups in dependency order itself, so each task does its
    own stages only and a retry re-runs just the failed one. DVC skips a stage whose inputs match
    ``dvc.lock``.
    """
    command = dvc_command("repro", "--single-item", *(["--force"] if force else []), *group.targets)
    start = time.monotonic()
    returncode, lines = run_logged(command, Path(project), env, lambda line: None if _DVC_HINTS.match(line) else log(line))
    if returncode != 0:
        raise StageFailed(group.name, returncode, lines[-ERROR_TAIL_LINES:])
    ran = [m.group(1) for line in lines if (m := _RUNNING.match(line))]
    skipped = [m.group(1) for line in lines if (m := _SKIPPED.match(line))]
    return StageOutcome(group.name, ran, skipped, round(time.monotonic() - start, 2))


@dataclass(frozen=True)
class PipelineStatus:
    """``dvc status --json`` of the whole project: stage (or ``.dvc`` file) -> what changed."""

    changes: dict[str, Any]

    @property
    def up_to_date(self) -> bool:
        return not self.changes

    def summary(self) -> str:
        """One line per changed stage, e.g. ``pretrain: changed deps (params.yaml: pretrain.train.lr)``."""
        if not self.changes:
            return "nothing changed since the last successful run of every stage (dvc.lock)"
        lines = []
        for stage, entries in self.changes.items():
            parts = []
            for entry in entries if isinstance(entries, list) else [entries]:
                if isinstance(entry, str):
                    parts.append(entry)
                    continue
                for kind, detail in entry.items():
                    if isinstance(detail, dict):
                        items = ", ".join(f"{k}: {v if not isinstance(v, dict) else ', '.join(f'{a} {b}' for a, b in v.items())}" for k, v in detail.items())
                        parts.append(f"{kind} ({items})")
                    else:
                        parts.append(f"{kind} ({detail})")
            lines.append(f"{stage}: {'; '.join(parts)}")
        return "\n".join(lines)


def pipeline_status(project: Path, env: Mapping[str, str]) -> PipelineStatus:
    """What changed since the last successful run: ``dvc status`` over ``dvc.yaml`` and ``data.dvc``.

    The rule: a stage is current when its command, code and data dependencies, params and
    outputs all match its entry in ``dvc.lock``, which DVC writes only when the stage succeeds.
    A run that failed half-way therefore leaves the failed stage (and what follows it) changed.
    Other pipelines of the repository (e.g. an ablation sweep's ``dvc.yaml`` in a subdirectory)
    are not the flow's and are left out.
    """
    targets = [DVC_FILE] + ([DATA_DVC_FILE] if (Path(project) / DATA_DVC_FILE).is_file() else [])
    out = run_checked(dvc_command("status", "--json", *targets), Path(project), env).strip()
    try:
        changes = json.loads(out or "{}")
    except json.JSONDecodeError as exc:
        raise OrchestrationError(f"dvc status --json printed something else than JSON: {out[:500]!r}") from exc
    return PipelineStatus(changes)
