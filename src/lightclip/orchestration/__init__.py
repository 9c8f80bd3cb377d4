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

One module per part: ``common`` (constants, errors), ``stages`` (the stage graph, ``dvc repro``),
``inputs`` (catalogue, overrides), ``workspaces`` (DVC experiments, git worktrees, parent-run
tags), ``report`` and ``prefect_server``; every public name is re-exported here.
"""

from __future__ import annotations

from lightclip.orchestration.common import (  # noqa: F401 (re-exported)
    DATA_DVC_FILE,
    DEFAULT_PREFECT_PORT,
    DVC_FILE,
    ERROR_TAIL_LINES,
    EVAL_METRICS_FILE,
    HEARTBEAT_SECONDS,
    LAST_STAGES,
    Log,
    OrchestrationError,
    PARAMS_FILE,
    RAW_DATA_DIR,
    REGISTER_METRICS_FILE,
    REPORT_ARTIFACT_KEY,
    STOP_GRACE_S,
    StageFailed,
    WORKSPACES_DIR,
    WORKSPACE_MODES,
)
from lightclip.orchestration.stages import (  # noqa: F401 (re-exported)
    PipelineStatus,
    StageGroup,
    StageOutcome,
    dvc_command,
    group_name,
    order_groups,
    pipeline_status,
    run_checked,
    run_logged,
    run_stage_group,
    stage_env,
    stage_groups,
)
from lightclip.orchestration.inputs import (  # noqa: F401 (re-exported)
    apply_params_overrides,
    flow_yaml,
    normalise_overrides,
    parse_override_value,
    prepare_data,
    set_yaml_value,
)
from lightclip.orchestration.workspaces import (  # noqa: F401 (re-exported)
    Workspace,
    crash_retry_budget_left,
    create_workspace,
    experiment_files,
    experiment_name,
    experiment_targets,
    git_common_dir,
    git_has_commit,
    mlflow_flow_run_tag,
    parent_run_tags,
    push_outputs,
    remove_workspace,
    repository_lock,
    save_experiment,
    tracking_env,
    workspace_env,
    workspace_path,
)
from lightclip.orchestration.report import (  # noqa: F401 (re-exported)
    RetrainReport,
    read_json,
    read_register,
    registrations,
    report_metrics,
)
from lightclip.orchestration.prefect_server import (  # noqa: F401 (re-exported)
    local_api_url,
    resolve_api_url,
    server_is_up,
)
