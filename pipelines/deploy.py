"""Serve the deployment ``retrain/scheduled``: the flow ``retrain`` on the cron of ``params.yaml``.

    make prefect-server   # terminal 1: the Prefect server (UI + API) on 127.0.0.1:4200
    make serve            # terminal 2: this script; runs scheduled and manual runs until Ctrl-C

``flow.serve`` registers the deployment with its schedule (``orchestration.cron`` and
``timezone``) and then polls the server and executes the runs, one at a time (DVC locks the
workspace anyway). Schedules need a real server: a temporary one cannot run them, so this script
refuses to start without one (``PREFECT_API_URL``, or the local server when it is up).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from lightclip.env import configure_environment  # noqa: E402

configure_environment(REPO_ROOT)

from lightclip import orchestration as orch  # noqa: E402
from lightclip.config import load_params  # noqa: E402

DEPLOYMENT_NAME = "scheduled"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the Prefect deployment retrain/scheduled (cron from params.yaml).")
    parser.add_argument("--project", default=str(REPO_ROOT), help="the lightclip project the runs retrain (default: this repository)")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default: {DEPLOYMENT_NAME})")
    parser.add_argument("--cron", help="override orchestration.cron of params.yaml")
    args = parser.parse_args(argv)

    project = Path(args.project).resolve()
    config = load_params(project / orch.PARAMS_FILE).orchestration
    url = orch.resolve_api_url()
    if not url or not orch.server_is_up(url):
        print(f"no Prefect server at {url or orch.local_api_url()}: start one with `make prefect-server` (or set PREFECT_API_URL)", file=sys.stderr)
        return 2
    os.environ["PREFECT_API_URL"] = url

    # Prefect is imported only now, after PREFECT_API_URL is set: the runner and its runs use it.
    from prefect.schedules import Cron

    from retrain import retrain  # noqa: E402  (pipelines/ is on sys.path when run as a script)

    cron = args.cron or config.cron
    print(f"serving retrain/{args.name} for {project}: cron '{cron}' ({config.timezone}), API {url}", flush=True)
    retrain.serve(
        name=args.name,
        schedules=[Cron(cron, timezone=config.timezone)],
        parameters={"project_dir": str(project)},
        description=f"Retrain {project} on the cron of params.yaml (orchestration.cron); up to date runs end in seconds.",
        tags=["lightclip", "retrain"],
        limit=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
