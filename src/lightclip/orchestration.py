"""The library behind the Prefect flow ``retrain`` (``pipelines/retrain.py``); no Prefect here.

DVC stays the source of truth for stages, caching and lineage: the flow runs ``dvc repro`` stage
by stage, so an unchanged stage does no work and every result lands in ``dvc.lock``. This module
decides *what* runs and reports on it, so that the flow file only wires Prefect around it:

- :func:`stage_groups`: the stages of ``dvc.yaml`` in dependency order, one group per top-level
  stage name (``foreach``/``matrix`` entries ``distill@x`` belong to ``distill``), ``register``
  last. Nothing is hard-coded: a stage added to ``dvc.yaml`` becomes a task.
- :func:`apply_params_overrides`: ``key=value`` overrides with the semantics of
  ``dvc exp run -S`` in the workspace (the edited ``params.yaml`` stays, so ``dvc.lock``, the
  saved DVC experiment and the stages' MLflow params all show them), validated before anything
  runs.
- :func:`pipeline_status`: ``dvc status`` over ``dvc.yaml`` and ``data.dvc``; empty means every stage's
  code, data, params and outputs match what its last successful run recorded in ``dvc.lock``,
  i.e. the flow is "up to date" and ends without running a stage.
- :func:`create_workspace`: a flow run's own git worktree of the project (``workspace="worktree"``,
  the pool deployment), so that runs at once on several workers never touch each other's files;
  they share the DVC cache, the DVC remote and the tracking server, never a working tree.
- :class:`RetrainReport`: the Markdown artifact each flow run ends with (metrics, gate verdict,
  MLflow run, model version).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import networkx as nx
import yaml
from dvc.config import Config as DvcConfig
from dvc.config_schema import RelPath
from dvc.repo import Repo
from dvc.utils.hydra import apply_overrides

from lightclip.config import ConfigError, load_params
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.env import TELEMETRY_OFF
from lightclip.errors import LightclipError
from lightclip.io import staged_dir
from lightclip.processes import stop_process_group
from lightclip.tracking import data_version, default_tracking_uri, flatten

DVC_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
DATA_DVC_FILE = "data.dvc"
RAW_DATA_DIR = "data/raw"
EVAL_METRICS_FILE = "metrics/eval.json"
REGISTER_METRICS_FILE = "metrics/register.json"
#: Stages that publish models: always run after every other stage of the pipeline.
LAST_STAGES: tuple[str, ...] = ("register",)
REPORT_ARTIFACT_KEY = "retrain-report"
DEFAULT_PREFECT_PORT = 4200
#: Lines of a failed command's output kept in the error message.
ERROR_TAIL_LINES = 40
#: Seconds an interrupted ``dvc repro`` and its stage get to end (and close their MLflow runs) before SIGKILL.
STOP_GRACE_S = 10.0
#: Where a flow run's own workspace (a git worktree) lives: git and DVC ignore ``.dvc/tmp``, as
#: for DVC's own ``exp run --temp`` workspaces.
WORKSPACES_DIR = ".dvc/tmp/lightclip-workspaces"
#: ``in-place``: the project's working tree (``make serve``, one run at a time); ``worktree``: a
#: fresh git worktree of the project's ``HEAD`` per flow run (the pool deployment).
WORKSPACE_MODES: tuple[str, ...] = ("in-place", "worktree")
#: Seconds between a flow run's heartbeats: Prefect's minimum (``flow_engine.MINIMUM_HEARTBEAT_INTERVAL``).
HEARTBEAT_SECONDS = 30

Log = Callable[[str], None]


class OrchestrationError(LightclipError, RuntimeError):
    """Something the flow cannot do; the message says what and how to fix it."""


class StageFailed(OrchestrationError):
    """A ``dvc repro`` of a stage group exited non-zero; carries the tail of its output."""

    def __init__(self, group: str, returncode: int, tail: list[str]) -> None:
        self.group = group
        self.returncode = returncode
        self.tail = tail
        super().__init__(f"stage {group!r} failed (dvc repro exit code {returncode}):\n" + "\n".join(tail))


# -- the stages, in dependency order ---------------------------------------------------------


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


def _run_checked(command: list[str], cwd: Path, env: Mapping[str, str]) -> str:
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
    out = _run_checked(dvc_command("status", "--json", *targets), Path(project), env).strip()
    try:
        changes = json.loads(out or "{}")
    except json.JSONDecodeError as exc:
        raise OrchestrationError(f"dvc status --json printed something else than JSON: {out[:500]!r}") from exc
    return PipelineStatus(changes)


# -- inputs: the catalogue and params overrides ------------------------------------------------


def prepare_data(project: Path, data: str | Path | None, env: Mapping[str, str], log: Log) -> str:
    """Make ``data/raw`` the catalogue to train on and return its DVC hash.

    ``data=None``: the tracked catalogue (``data.dvc``); it is restored from the DVC cache or
    remote when missing, and a ``data/raw`` that differs from ``data.dvc`` is an error (train on
    tracked data only). A directory: that catalogue replaces ``data/raw`` and is tracked
    (``dvc commit data.dvc``), exactly as the README's "your own catalogue" recipe.
    """
    project = Path(project)
    raw = project / RAW_DATA_DIR
    dvc_file = project / DATA_DVC_FILE
    if data is not None:
        source = Path(data).expanduser().resolve()
        _check_catalogue(source)
        if source != raw.resolve():
            with staged_dir(raw) as staging:
                shutil.copytree(source, staging, dirs_exist_ok=True)
            log(f"data: copied the catalogue {source} to {RAW_DATA_DIR}")
        if not dvc_file.is_file():
            dvc_file.write_text(f"outs:\n- path: {RAW_DATA_DIR}\n", encoding="utf-8")
        _run_checked(dvc_command("commit", "--force", "--quiet", DATA_DVC_FILE), project, env)
        log(f"data: {DATA_DVC_FILE} now tracks it (md5 {data_version(project)})")
        return data_version(project)
    if not dvc_file.is_file():
        log(f"data: no {DATA_DVC_FILE}; the stages read {RAW_DATA_DIR} as it is")
        return data_version(project)
    if not raw.exists():
        log(f"data: {RAW_DATA_DIR} is missing; restoring it from the DVC cache or remote")
        result = subprocess.run(dvc_command("checkout", "--quiet", DATA_DVC_FILE), cwd=project, env=dict(env), capture_output=True, text=True)
        if result.returncode != 0 or not raw.exists():
            _run_checked(dvc_command("pull", "--quiet", DATA_DVC_FILE), project, env)
    status = json.loads(_run_checked(dvc_command("status", "--json", DATA_DVC_FILE), project, env).strip() or "{}")
    if status:
        raise OrchestrationError(
            f"{RAW_DATA_DIR} differs from {DATA_DVC_FILE} ({status}): track it with `dvc commit {DATA_DVC_FILE}` "
            f"or restore it with `dvc checkout {DATA_DVC_FILE}`, or pass the catalogue as the flow's `data`"
        )
    return data_version(project)


def _check_catalogue(source: Path) -> None:
    """A catalogue directory whose images all lie inside it (it is copied as a whole)."""
    try:
        catalogue = Catalogue.load(source)
    except (CatalogueError, FileNotFoundError, OSError) as exc:
        raise OrchestrationError(f"data: {source} is not a catalogue directory ({exc}); import it first (`lightclip data import-*`)") from None
    outside = [p for p in catalogue.image_paths() if not p.resolve().is_relative_to(source)]
    if outside:
        raise OrchestrationError(f"data: {source} points at images outside itself (e.g. {outside[0]}); import it as a self-contained catalogue first")


def parse_override_value(text: Any) -> Any:
    """A ``-S key=value`` value as DVC/Hydra reads it: YAML (``0.001``, ``true``, ``null``, ``[1, 2]``)."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def normalise_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``{"a.b": "1"}`` or ``["a.b=1"]`` -> ``{"a.b": 1}`` (values parsed as YAML)."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for entry in overrides:
            if "=" not in entry:
                raise OrchestrationError(f"params override {entry!r}: expected key=value, e.g. pretrain.train.epochs=30")
            key, value = entry.split("=", 1)
            items.append((key, value))
    result: dict[str, Any] = {}
    for key, value in items:
        key = str(key).strip()
        if not re.match(r"^[A-Za-z_][\w-]*(\.[A-Za-z_0-9][\w-]*)*$", key):
            raise OrchestrationError(f"params override key {key!r}: expected a dotted key such as pretrain.train.epochs")
        result[key] = parse_override_value(value)
    return result


def _flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text[: -len("\n...")].strip() if text.endswith("\n...") else text


def set_yaml_value(text: str, key: str, value: Any) -> str | None:
    """Replace the one-line value of dotted ``key`` in a block-style YAML text, keeping the rest.

    Only the value's text changes: comments, quoting and flow-style lists elsewhere stay as
    the user wrote them. Returns None when the key is not a one-line entry (a nested block),
    so the caller can fall back to DVC's own rewrite.
    """
    lines = text.splitlines(keepends=True)
    parts = key.split(".")
    start, end, parent_indent = 0, len(lines), -1
    for depth, part in enumerate(parts):
        pattern = re.compile(r"^(\s*)(['\"]?)" + re.escape(part) + r"\2\s*:(\s|$)")
        found = None
        child_indent = None
        for i in range(start, end):
            line = lines[i]
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            indent = len(line) - len(line.lstrip(" "))
            if indent <= parent_indent:
                end = i
                break
            if child_indent is None:
                child_indent = indent
            if indent != child_indent:
                continue
            if pattern.match(line):
                found = i
                break
        if found is None:
            return None
        if depth < len(parts) - 1:
            parent_indent = child_indent if child_indent is not None else 0
            block_end = len(lines)
            for j in range(found + 1, len(lines)):
                s = lines[j].strip()
                if s and not s.startswith("#") and len(lines[j]) - len(lines[j].lstrip(" ")) <= parent_indent:
                    block_end = j
                    break
            start, end = found + 1, block_end
            continue
        line = lines[found]
        match = re.match(r"^(\s*['\"]?" + re.escape(part) + r"['\"]?\s*:)([ \t]*)(.*?)(\r?\n)?$", line)
        if match is None:
            return None
        head, _, rest, newline = match.group(1), match.group(2), match.group(3), match.group(4) or ""
        old_value, comment = _split_comment(rest)
        if not old_value.strip() or old_value.strip()[0] in "|>&*!":
            return None  # a nested block, a block scalar, an anchor/alias or a tag: not ours to edit
        new_value = _flow_yaml(value)
        padding = comment_pad = ""
        if comment:
            width = len(old_value)
            comment_pad = " " * max(1, width - len(new_value)) if len(new_value) < width else " "
            padding = comment_pad + comment
        lines[found] = f"{head} {new_value}{padding}{newline}"
        return "".join(lines)
    return None


def _split_comment(rest: str) -> tuple[str, str]:
    """``'0.1   # note'`` -> ``('0.1   ', '# note')``, quotes respected."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i], rest[i:]
    return rest, ""


def _get(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(key)
        data = data[part]
    return data


def apply_params_overrides(project: Path, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Apply ``key=value`` overrides to ``params.yaml`` as ``dvc exp run -S`` does; returns ``{key: (old, new)}``.

    Semantics are DVC's (in the workspace, not ``--temp``): the file is edited and stays
    edited, the stages then run on it, ``dvc.lock`` records the values, and the saved DVC
    experiment and every stage's MLflow params show them; ``git checkout params.yaml`` reverts.
    Like ``-S`` without ``+``, a key must already exist. Unlike DVC's rewrite, only the value's
    text changes (comments and layout stay), except for nested blocks, which go through DVC's
    own ``apply_overrides``. The result is validated as a whole (:func:`lightclip.config.load_params`)
    and the file is restored when it is not valid, so a bad override fails before any stage runs.
    """
    path = Path(project) / PARAMS_FILE
    original = path.read_text(encoding="utf-8")
    data = yaml.safe_load(original) or {}
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        try:
            changes[key] = (_get(data, key), value)
        except KeyError:
            raise OrchestrationError(f"params override {key!r}: no such key in {PARAMS_FILE} (like `dvc exp run -S`, an override changes an existing key)") from None
    text = original
    fallback: list[str] = []
    for key, value in overrides.items():
        edited = set_yaml_value(text, key, value)
        try:
            exact = edited is not None and _get(yaml.safe_load(edited), key) == value
        except (yaml.YAMLError, KeyError):
            exact = False  # e.g. a flow list wrapped over several lines: let DVC rewrite it
        if exact:
            text = edited
        else:
            fallback.append(f"{key}={_flow_yaml(value)}")
    try:
        path.write_text(text, encoding="utf-8")
        if fallback:
            apply_overrides(str(path), fallback)
        load_params(path)
    except ConfigError as exc:
        path.write_text(original, encoding="utf-8")
        raise OrchestrationError(f"params overrides {dict(overrides)} make {PARAMS_FILE} invalid; it was left unchanged:\n{exc}") from None
    except Exception:
        path.write_text(original, encoding="utf-8")
        raise
    return changes


# -- the DVC experiment and the MLflow parent run ----------------------------------------------


def git_has_commit(project: Path) -> bool:
    """Whether ``project`` is a git repository with a ``HEAD`` (``dvc exp save`` needs one)."""
    result = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=project, capture_output=True, text=True)
    return result.returncode == 0


def experiment_name(flow_run_name: str | None, now: float | None = None) -> str:
    """A DVC experiment name for one flow run: ``retrain-20261127-0200-<flow run name>``."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(now))
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", flow_run_name or "manual").strip("-")[:40] or "manual"
    return f"retrain-{stamp}-{slug}"


def experiment_targets(project: Path) -> list[str]:
    """What a flow run's experiment records: the flow's pipeline (``dvc.yaml``) and ``data.dvc``.

    ``dvc exp save`` without targets commits every pipeline of the repository, and fails on the
    first one whose outputs are absent (the ablation sweep of ``pipelines/ablation``, which the
    flow does not run): "output 'models/ablation/...' does not exist".
    """
    return [DVC_FILE] + ([DATA_DVC_FILE] if (Path(project) / DATA_DVC_FILE).is_file() else [])


def experiment_files(project: Path) -> list[str]:
    """The untracked files that belong in the experiment commit, as ``dvc exp run`` would stage them.

    For the stages of ``dvc.yaml``: the pipeline and its lock file, the dependencies that no stage
    produces (code) and the outputs DVC leaves to git (``cache: false``: metrics, plot data,
    reports). Only files git does not track yet and does not ignore: a tracked file goes into the
    commit anyway, and an ignored one (``__pycache__``) must not.
    """
    project = Path(project).resolve()
    dvc_file = project / DVC_FILE
    candidates = [dvc_file, project / "dvc.lock"]
    with Repo(str(project)) as repo:
        stages = [s for s in repo.index.stages if Path(s.dvcfile.path).resolve() == dvc_file]
        produced = {Path(out.fs_path).resolve() for stage in repo.index.stages for out in stage.outs}
        for stage in stages:
            candidates += [Path(d.fs_path) for d in stage.deps if d.is_in_repo and Path(d.fs_path).resolve() not in produced]
            candidates += [Path(o.fs_path) for o in stage.outs if o.is_in_repo and not o.use_cache]
    wanted = [c.resolve() for c in candidates]
    result = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z"], cwd=project, capture_output=True, text=True)
    if result.returncode != 0:
        raise OrchestrationError(f"git ls-files in {project} failed: {result.stderr.strip()}")
    files = []
    for name in filter(None, result.stdout.split("\0")):
        path = (project / name).resolve()
        if any(path == w or path.is_relative_to(w) for w in wanted):
            files.append(name)
    return sorted(files)


def save_experiment(project: Path, name: str, env: Mapping[str, str]) -> None:
    """``dvc exp save``: the run's params, ``dvc.lock`` and metrics as a DVC experiment (``dvc exp show``).

    Limited to :func:`experiment_targets` (other pipelines of the repository are not the flow's,
    and their outputs may be absent), with the pipeline's untracked files included
    (:func:`experiment_files`), so that the experiment holds the metrics it reports.
    """
    project = Path(project)
    include = [arg for path in experiment_files(project) for arg in ("--include-untracked", path)]
    message = f"lightclip retrain: experiment {name}"
    with repository_lock(project):  # git worktrees of one repository share refs/exps (stash, exec refs)
        _run_checked(dvc_command("exp", "save", "--name", name, "--message", message, *include, *experiment_targets(project)), project, env)


# -- a workspace per flow run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    """A flow run's own checkout of ``origin``: a git worktree at ``commit``, sharing the DVC cache."""

    origin: Path
    path: Path
    commit: str


def git_common_dir(project: Path) -> Path:
    """The repository's shared git directory (the same for every worktree of it)."""
    result = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=project, capture_output=True, text=True)
    if result.returncode != 0:
        raise OrchestrationError(f"{project} is not a git repository: {result.stderr.strip()}")
    return Path(result.stdout.strip())


@contextmanager
def repository_lock(project: Path) -> Iterator[None]:
    """Hold the repository's lock: one worktree added or removed, or one ``dvc exp save``, at a time.

    Worktrees share the git directory, so two flow runs finishing at once would race on DVC's
    experiment refs (``refs/exps/workspace``, the exec refs) and on git's worktree list.
    """
    path = git_common_dir(project) / "lightclip-workspaces.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def workspace_path(origin: Path, name: str) -> Path:
    """Where the workspace named ``name`` (a flow run id) of ``origin`` lives."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "manual"
    return Path(origin).resolve() / WORKSPACES_DIR / slug


def remove_workspace(origin: Path, path: Path) -> None:
    """Delete a workspace and forget its worktree (also a crashed attempt's leftovers)."""
    origin = Path(origin).resolve()
    with repository_lock(origin):
        if path.exists():
            shutil.rmtree(path)
        subprocess.run(["git", "worktree", "prune"], cwd=origin, capture_output=True, text=True)


def create_workspace(origin: Path, name: str, env: Mapping[str, str], log: Log) -> Workspace:
    """A fresh git worktree of ``origin``'s ``HEAD`` for one flow run, with the DVC cache shared.

    The worktree replaces any left by an earlier attempt of the same flow run (a crash). Its
    ``.dvc/config.local`` points at ``origin``'s cache and at absolute URLs for local remotes
    (a relative remote URL would resolve inside the worktree), and carries ``origin``'s own local
    config (credentials). The committed outputs are then checked out from the shared cache, so
    stages whose inputs did not change are skipped as they would be in ``origin``. Experiments
    saved here are refs of the shared git directory: ``dvc exp show`` in ``origin`` lists them.
    Uncommitted changes of ``origin`` are not part of the workspace (logged).
    """
    origin = Path(origin).resolve()
    if not git_has_commit(origin):
        raise OrchestrationError(f"workspace=worktree needs {origin} to be a git repository with a commit: the run checks out HEAD")
    path = workspace_path(origin, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with repository_lock(origin):
        if path.exists():
            log(f"workspace: removing {path}, left by an earlier attempt of this flow run")
            shutil.rmtree(path)
        subprocess.run(["git", "worktree", "prune"], cwd=origin, capture_output=True, text=True)  # forget removed worktrees
        _run_checked(["git", "worktree", "add", "--detach", str(path), "HEAD"], origin, env)
    commit = _run_checked(["git", "rev-parse", "HEAD"], path, env).strip()
    dirty = _run_checked(["git", "status", "--porcelain", "--untracked-files=no"], origin, env).strip()
    if dirty:
        log(f"workspace: runs the committed HEAD {commit[:12]}; the uncommitted changes in {origin} are not part of it:\n{dirty}")
    _share_dvc_config(origin, path)
    checkout = subprocess.run(dvc_command("checkout", "--allow-missing", "--quiet"), cwd=path, env=dict(env), capture_output=True, text=True)
    if checkout.returncode != 0:
        log(f"workspace: some committed outputs are not in the DVC cache, their stages will run: {(checkout.stdout + checkout.stderr).strip()[-500:]}")
    log(f"workspace: {path} (git worktree at {commit[:12]}, DVC cache of {origin})")
    return Workspace(origin=origin, path=path, commit=commit)


def _share_dvc_config(origin: Path, path: Path) -> None:
    """The workspace's ``.dvc/config.local``: ``origin``'s local config, its cache, absolute local remotes."""
    with Repo(str(origin)) as repo:
        cache_dir = repo.cache.local_cache_dir
        local = repo.config.load_one("local")
        local_remotes = {name: str(conf["url"]) for name, conf in repo.config["remote"].items() if isinstance(conf.get("url"), RelPath)}
    config = DvcConfig(dvc_dir=str(path / ".dvc"))
    with config.edit("local") as conf:
        for section, values in local.items():
            conf.setdefault(section, {}).update(values)
        conf.setdefault("cache", {})["dir"] = cache_dir
        for name, url in local_remotes.items():
            conf.setdefault("remote", {}).setdefault(name, {})["url"] = url


def workspace_env(workspace: Workspace, env: Mapping[str, str]) -> dict[str, str]:
    """The stage environment inside ``workspace``: its own code, ``origin``'s tracking store.

    Stages call ``lightclip``; with the project's package first on ``PYTHONPATH`` they run the
    workspace's code (the commit ``dvc.lock`` records), not whatever the venv's editable install
    points at. Without ``MLFLOW_TRACKING_URI`` a stage would open a store inside the workspace,
    which is deleted after the run: runs go to ``origin``'s store instead.
    """
    out = dict(env)
    out.update(tracking_env(workspace.origin, env))
    src = workspace.path / "src"
    if (src / "lightclip").is_dir():
        out["PYTHONPATH"] = os.pathsep.join([str(src), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return out


def tracking_env(origin: Path, env: Mapping[str, str]) -> dict[str, str]:
    """``MLFLOW_TRACKING_URI`` for runs made outside ``origin``: as set, else ``origin``'s own store."""
    return {"MLFLOW_TRACKING_URI": env.get("MLFLOW_TRACKING_URI") or default_tracking_uri(origin)}


def push_outputs(project: Path, env: Mapping[str, str], log: Log) -> bool:
    """``dvc push`` of the flow's pipeline and data to the default remote; False when there is none."""
    project = Path(project)
    with Repo(str(project)) as repo:
        remote = repo.config["core"].get("remote")
    if not remote:
        log("no default DVC remote: the outputs stay in the DVC cache and the saved experiment")
        return False
    _run_checked(dvc_command("push", "--quiet", *experiment_targets(project)), project, env)
    log(f"pushed the outputs to the DVC remote {remote!r}")
    return True


def crash_retry_budget_left(run_count: int, crash_retries: int) -> bool:
    """Whether attempt ``run_count`` (1 = the first) of a flow run may start.

    A crashed run (its worker or machine lost) is scheduled again by the pool deployment's
    automation; the flow itself refuses to start an attempt beyond ``1 + crash_retries``, so a
    run that crashes every time ends Failed instead of looping.
    """
    return run_count <= 1 + crash_retries


def parent_run_tags(flow_run_id: str | None, flow_run_name: str | None, flow_run_url: str | None, deployment: str | None) -> dict[str, str]:
    """Tags of the MLflow parent run that point back at the Prefect flow run."""
    tags = {
        "prefect.flow_run_id": flow_run_id,
        "prefect.flow_run_name": flow_run_name,
        "prefect.flow_run_url": flow_run_url,
        "prefect.deployment": deployment,
        "lightclip.orchestrator": "prefect",
    }
    return {k: str(v) for k, v in tags.items() if v}


def mlflow_flow_run_tag(run_id: str) -> str:
    """The Prefect flow run tag that points at the MLflow parent run."""
    return f"mlflow-run:{run_id}"


# -- the report --------------------------------------------------------------------------------


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def registrations(register: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model the ``register`` stage registered (teacher first), from its report.

    The report is ``lightclip.registry.run_register``'s: ``teacher`` and ``students`` (name ->
    registered model, version, gate verdict and reasons, whether it got ``@staging``).
    """
    rows = []
    teacher = register.get("teacher")
    if isinstance(teacher, dict):
        rows.append({"name": "teacher", **teacher})
    students = register.get("students")
    for name, entry in (students.items() if isinstance(students, dict) else []):
        if isinstance(entry, dict):
            rows.append({"name": name, **entry})
    return rows


@dataclass
class RetrainReport:
    """What one flow run did; rendered as the run's Markdown artifact and returned by the flow."""

    status: str  # "up to date" | "retrained" | "failed"
    message: str
    project: str
    stages: list[str] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    failed_stage: str | None = None
    changes: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    mlflow_run_id: str | None = None
    mlflow_experiment: str | None = None
    prefect_flow_run_id: str | None = None
    dvc_experiment: str | None = None
    workspace: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    register: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def model_version(self) -> str | None:
        """The student versions this run registered (``lightclip-student v4 (xt), v5 (xxt)``)."""
        students = [r for r in registrations(self.register or {}) if r.get("role") != "teacher" and r["name"] != "teacher" and "version" in r]
        if not students:
            return None
        name = (self.register or {}).get("model_name") or students[0].get("registered_model", "")
        return f"{name} " + ", ".join(f"v{r['version']} ({r['name']})" for r in students)

    @property
    def gate_verdict(self) -> str | None:
        """The promotion gate per student, with its reasons, and where ``@staging`` went."""
        parts = []
        for row in registrations(self.register or {}):
            if row.get("gate") is not None:
                reasons = row.get("reasons") or []
                parts.append(f"{row['name']}: {row['gate']}" + (f" ({'; '.join(map(str, reasons))})" if reasons else ""))
        if not parts:
            return None
        register = self.register or {}
        if "staging_after" in register:
            before, after = register.get("staging_before"), register.get("staging_after")
            parts.append(f"@staging: {'v' + str(before) if before else 'none'} -> {'v' + str(after) if after else 'none'}")
        return "; ".join(parts)

    def markdown(self) -> str:
        title = {"up to date": "up to date", "retrained": "retrained", "failed": f"FAILED at stage `{self.failed_stage}`" if self.failed_stage else "FAILED"}
        out = [f"# Retraining: {title.get(self.status, self.status)}", "", self.message.strip(), ""]
        rows: list[tuple[str, str]] = [("project", f"`{self.project}`")]
        if self.workspace:
            rows.append(("workspace", f"`{self.workspace}` (a git worktree of the project, removed after the run)"))
        if self.mlflow_run_id:
            rows.append(("MLflow parent run", f"`{self.mlflow_run_id}` (experiment `{self.mlflow_experiment}`)"))
        if self.model_version:
            rows.append(("model version", f"`{self.model_version}`"))
        if self.gate_verdict:
            rows.append(("promotion gate", self.gate_verdict))
        aliases = (self.register or {}).get("aliases")
        if isinstance(aliases, dict) and aliases:
            rows.append(("aliases", ", ".join(f"@{a} = v{v}" for a, v in sorted(aliases.items()))))
        if self.dvc_experiment:
            rows.append(("DVC experiment", f"`{self.dvc_experiment}` (`dvc exp show`)"))
        if self.data_hash:
            rows.append(("data (data.dvc md5)", f"`{self.data_hash}`"))
        if self.overrides:
            rows.append(("params overrides", ", ".join(f"`{k}={_flow_yaml(v)}`" for k, v in self.overrides.items())))
        if self.stages:
            ran = set(self.stages_run)
            rows.append(("stages", ", ".join(f"**{s}**" if s in ran else s for s in self.stages) + " (bold: ran)"))
        out += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
        if self.changes and self.status != "up to date":
            out += ["## What changed", "", "```", self.changes, "```", ""]
        if self.metrics:
            models = list(self.metrics)
            names: list[str] = []
            for values in self.metrics.values():
                names += [n for n in values if n not in names]
            out += [f"## Metrics ({EVAL_METRICS_FILE})", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
            for name in names:
                cells = [self.metrics[m].get(name) for m in models]
                out.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
            out.append("")
        rows_registered = registrations(self.register or {})
        if rows_registered:
            out += [f"## Registration ({REGISTER_METRICS_FILE})", "", "| model | registered | gate | reasons | @staging |", "|---|---|---|---|---|"]
            for row in rows_registered:
                reasons = "; ".join(map(str, row.get("reasons") or [])).replace("|", "/")
                staged = "yes" if row.get("staged") else ""
                out.append(f"| {row['name']} | `{row.get('registered_model', '?')}` v{row.get('version', '?')} | {row.get('gate', '')} | {reasons} | {staged} |")
            out.append("")
        elif self.register:
            out += [f"## Registration ({REGISTER_METRICS_FILE})", "", "| key | value |", "|---|---|"]
            out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in flatten(self.register).items()]
            out.append("")
        return "\n".join(out)


def report_metrics(project: Path) -> dict[str, dict[str, float]]:
    """Retrieval metrics per model from ``metrics/eval.json``, timings left out."""
    data = read_json(Path(project) / EVAL_METRICS_FILE)
    if not isinstance(data, dict):
        return {}
    metrics: dict[str, dict[str, float]] = {}
    for model, values in data.items():
        if isinstance(values, dict):
            numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("timing/")}
            if numbers:
                metrics[model] = numbers
    return metrics


def read_register(project: Path) -> dict[str, Any] | None:
    """What the ``register`` stage wrote (version, gate verdict and reasons, aliases), if it ran."""
    data = read_json(Path(project) / REGISTER_METRICS_FILE)
    return data if isinstance(data, dict) else None


# -- the Prefect server --------------------------------------------------------------------------


def local_api_url(port: int | None = None) -> str:
    """The API of ``make prefect-server`` (``PREFECT_PORT``, default 4200) on the loopback."""
    port = port or int(os.environ.get("PREFECT_PORT", DEFAULT_PREFECT_PORT))
    return f"http://127.0.0.1:{port}/api"


def server_is_up(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect server answers ``GET <api>/health``."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_api_url() -> str | None:
    """``PREFECT_API_URL`` when set, else the local server when it is up, else None (a temporary server)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    local = local_api_url()
    return local if server_is_up(local) else None
