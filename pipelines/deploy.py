"""Serve the deployment ``retrain/scheduled``: the flow ``retrain`` on the cron of ``params.yaml``.

    make prefect-server   # terminal 1: the Prefect server (UI + API) on 127.0.0.1:4200
    make serve            # terminal 2: this script; runs scheduled and manual runs until Ctrl-C

A Prefect runner registers the deployment with its schedule (``orchestration.cron`` and
``timezone``) and then polls the server and executes the runs, one at a time (DVC locks the
workspace anyway). Schedules need a real server: a temporary one cannot run them, so this script
refuses to start without one (``PREFECT_API_URL``, or the local server when it is up).

SIGINT (Ctrl-C) and SIGTERM stop it the same way: the flow run in progress is cancelled (its
``dvc repro`` and stage get the signal and are killed if they outlive a grace period), the
schedule is paused and the script exits with 130 (SIGINT) or 143 (SIGTERM), nothing left
running. ``flow.serve`` alone would wait for the run in progress to finish on SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from lightclip.env import configure_environment  # noqa: E402

configure_environment(REPO_ROOT)

from lightclip import orchestration as orch  # noqa: E402
from lightclip.config import load_params  # noqa: E402

DEPLOYMENT_NAME = "scheduled"


def reap_children(timeout: float = 5.0) -> None:
    """Wait for the children that are ending: the runner does not collect the flow-run process it
    cancelled, which would stay behind as a zombie. Bounded: ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            time.sleep(0.05)  # a child still runs: give it the rest of the time


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
    from prefect.runner import Runner
    from prefect.schedules import Cron

    from retrain import retrain  # noqa: E402  (pipelines/ is on sys.path when run as a script)

    class StoppingRunner(Runner):
        """A runner that stops on SIGINT as it does on SIGTERM: in-flight runs cancelled, schedule paused.

        Prefect's runner handles SIGTERM only; on SIGINT ``flow.serve`` waits for the run in
        progress to end, which for a training run means hours. The signal received is kept for
        the exit status.
        """

        stop_signal: int | None = None

        def handle_sigterm(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                print(f"{name} received: already stopping (the run in progress is being cancelled)", file=sys.stderr, flush=True)
                return
            self.stop_signal = signum
            if not self.started:
                raise SystemExit(128 + signum)  # nothing runs yet: stop right here
            print(f"{name} received: cancelling the flow run in progress, pausing the schedule, stopping", file=sys.stderr, flush=True)
            self.stopping = True
            self.execute_in_background(self.astop)

    runner = StoppingRunner(name=args.name, limit=1, pause_on_shutdown=True)
    for signum in (signal.SIGINT, signal.SIGTERM):  # the runner sets SIGTERM again when it starts, to the same method
        signal.signal(signum, runner.handle_sigterm)
    cron = args.cron or config.cron
    runner.add_flow(
        retrain,
        name=args.name,
        schedules=[Cron(cron, timezone=config.timezone)],
        parameters={"project_dir": str(project)},
        description=f"Retrain {project} on the cron of params.yaml (orchestration.cron); up to date runs end in seconds.",
        tags=["lightclip", "retrain"],
    )
    print(f"serving retrain/{args.name} for {project}: cron '{cron}' ({config.timezone}), API {url}; Ctrl-C or SIGTERM to stop", flush=True)
    asyncio.run(runner.start())
    reap_children()
    if runner.stop_signal is not None:
        print(f"stopped by {signal.Signals(runner.stop_signal).name}", file=sys.stderr, flush=True)
        return 128 + runner.stop_signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
