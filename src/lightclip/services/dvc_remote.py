"""The DVC remote ``team`` on the deployment's object store.

Its URL, endpoint and credentials go to ``.dvc/config.local`` (which DVC itself git-ignores),
never to the committed ``.dvc/config``: the committed default remote stays the local directory a
fresh clone works with, and the secrets stay on the machine. Everything is read from the
standard variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``LIGHTCLIP_S3_DVC_BUCKET``), so a real S3 bucket drops in by changing the env file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from dvc.config import Config

from lightclip.services.processes import ServicesError

#: The name of the remote (``dvc push -r team``).
TEAM_REMOTE = "team"
#: The key prefix inside the DVC bucket (one bucket can hold several projects' stores).
DEFAULT_PREFIX = "lightclip"


def configure_dvc_remote(project_dir: Path, env: Mapping[str, str], *, remote: str = TEAM_REMOTE,
                         prefix: str = DEFAULT_PREFIX) -> Path:
    """Write remote ``remote`` (``s3://<bucket>/<prefix>`` with its endpoint and keys) to the
    project's ``.dvc/config.local``; returns that file. The default remote is left as it is."""
    dvc_dir = Path(project_dir).absolute() / ".dvc"
    if not dvc_dir.is_dir():
        raise ServicesError(f"{project_dir}: not a DVC project (no .dvc/); run `dvc init` there first")
    missing = [key for key in ("LIGHTCLIP_S3_DVC_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(key)]
    if missing:
        raise ServicesError(f"DVC remote {remote!r}: {', '.join(missing)} not set (source the team env file)")
    settings = {
        "url": f"s3://{env['LIGHTCLIP_S3_DVC_BUCKET']}/{prefix}",
        "access_key_id": env["AWS_ACCESS_KEY_ID"],
        "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }
    if env.get("AWS_ENDPOINT_URL"):
        settings["endpointurl"] = env["AWS_ENDPOINT_URL"]
    if env.get("AWS_DEFAULT_REGION"):
        settings["region"] = env["AWS_DEFAULT_REGION"]
    config = Config(dvc_dir=str(dvc_dir))
    with config.edit("local") as local:
        local.setdefault("remote", {})[remote] = settings
    config_local = dvc_dir / "config.local"
    config_local.chmod(0o600)
    return config_local
