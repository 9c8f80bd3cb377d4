"""Constants, the log callback type and the errors every part of the orchestration shares."""

from __future__ import annotations

from typing import Callable

from lightclip.errors import LightclipError


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
