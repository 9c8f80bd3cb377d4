"""The DVC experiment a flow run saves, and a git worktree per flow run for runs at once on several workers."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from dvc.config import Config as DvcConfig
from dvc.config_schema import RelPath
from dvc.repo import Repo

from lightclip.orchestration.common import DATA_DVC_FILE, DVC_FILE, Log, OrchestrationError, WORKSPACES_DIR
from lightclip.orchestration.stages import run_checked, dvc_command
from lightclip.tracking import default_tracking_uri


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
        run_checked(dvc_command("exp", "save", "--name", name, "--message", message, *include, *experiment_targets(project)), project, env)


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
        run_checked(["git", "worktree", "add", "--detach", str(path), "HEAD"], origin, env)
    commit = run_checked(["git", "rev-parse", "HEAD"], path, env).strip()
    dirty = run_checked(["git", "status", "--porcelain", "--untracked-files=no"], origin, env).strip()
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
    run_checked(dvc_command("push", "--quiet", *experiment_targets(project)), project, env)
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
