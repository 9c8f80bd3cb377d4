"""Process environment for every entry point: telemetry off, homes inside the project.

Libraries in our stack phone home or write into ``~`` unless told otherwise; each entry point
(CLI, tests, Makefile, CI) calls :func:`configure_environment` before importing them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Values that must hold in every lightclip process (see ../shared/STACK.md).
TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "true",  # MLflow only honours exactly "true"
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_environment(project_dir: Path | None = None, allow_hub: bool = False) -> dict[str, str]:
    """Turn telemetry off and keep tool homes inside ``project_dir``; returns what was set.

    Values the user already exported win for the *home* variables (so a test can point them
    at a temp dir), but telemetry switches are always forced off. ``HF_HUB_OFFLINE`` is set
    unless the caller explicitly allows hub downloads, since huggingface_hub otherwise retries
    for tens of seconds on a machine without network.
    """
    applied: dict[str, str] = {}
    for key, value in TELEMETRY_OFF.items():
        os.environ[key] = value
        applied[key] = value
    if not allow_hub:
        os.environ["HF_HUB_OFFLINE"] = "1"
        applied["HF_HUB_OFFLINE"] = "1"
    if project_dir is not None:
        root = Path(project_dir).resolve()
        homes = {
            "PREFECT_HOME": str(root / ".prefect"),
            "DVC_SITE_CACHE_DIR": str(root / ".cache" / "dvc-site"),
            "MPLCONFIGDIR": str(root / ".cache" / "matplotlib"),
        }
        for key, value in homes.items():
            os.environ.setdefault(key, value)
            applied[key] = os.environ[key]
    return applied
