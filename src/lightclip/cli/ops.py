"""Running and operating the project: the pipeline under its parent run, moving a tracking store,
the retrieval service, the team services, the DVC plots page."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from lightclip.cli.common import CliError, PIPELINE_STOP_GRACE_S, _params, _project, _stopped, _tracking, _with
from lightclip.processes import stop_process_group
from lightclip.tracking import StageInterrupted, pipeline_run


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Open the parent MLflow run and run ``dvc repro`` inside it (stages nest under it).

    ``dvc repro`` runs in its own process group: SIGINT or SIGTERM to this process is passed on to
    it and its stage once (they end their runs KILLED), then the parent run ends KILLED.
    """
    params = _params(args)
    command = ["dvc", "repro", *args.targets] + (["--force"] if args.force else [])
    try:
        with pipeline_run(args.name, {"command": " ".join(command)}, project_dir=_project(args), experiment=params.tracking.experiment,
                          settings=params.tracking) as run:
            print(f"pipeline run {run.run_id}: {' '.join(command)}", flush=True)
            process = subprocess.Popen(command, cwd=_project(args), start_new_session=True)
            try:
                returncode = process.wait()
            except StageInterrupted as exc:
                stop_process_group(process, exc.signum, grace_s=PIPELINE_STOP_GRACE_S)
                raise
            run.set_tags({"lightclip.exit_code": returncode})
            if returncode != 0:
                raise CliError(f"'{' '.join(command)}' failed with exit code {returncode}")
    except StageInterrupted as exc:
        _stopped(args, exc)
    return 0


def cmd_tracking_migrate(args: argparse.Namespace) -> int:
    """Copy the project's tracking store (default: its SQLite ``mlflow/mlflow.db``) to ``--to``, then
    compare both object by object (docs/tracking_server.md)."""
    from lightclip.tracking import apply_http_limits, default_tracking_uri, sqlite_path
    from lightclip.tracking_migration import MigrationError, migrate, verify

    source = args.source or default_tracking_uri(_project(args))
    path = sqlite_path(source)
    if path is not None and not path.is_file():
        raise CliError(f"--from {source}: no such store ({path})")
    apply_http_limits(_tracking(args))
    report = migrate(source, args.to, log=(lambda _: None) if args.quiet else print)
    print(report.summary())
    problems = verify(source, args.to, report)
    if problems:
        raise MigrationError(f"{len(problems)} difference(s) between {source} and {args.to} after the copy: " + "; ".join(problems[:5]))
    print(f"verified: every copied run, metric history, artifact listing, model version and alias matches {source}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lightclip.service import run_serve

    params = _params(args)
    config = _with(params.serve, model=args.model, host=args.host, port=args.port, catalogue=args.catalogue, index=args.index,
                   runtime=args.runtime)
    run_serve(config, params.index, _project(args))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    """Start, stop or list the team deployment (docs/team.md); `up` also writes the project's DVC remote `team`."""
    from lightclip.services import TEAM_REMOTE, TeamServices, configure_dvc_remote

    project = _project(args)
    state_dir = Path(args.dir) if args.dir else project / ".services"
    team = TeamServices(state_dir)
    if args.services_command == "up":
        started = time.monotonic()
        team.up()
        print(f"team services up in {time.monotonic() - started:.1f} s (state: {state_dir})")
        if (project / ".dvc").is_dir():
            print(f"DVC remote {TEAM_REMOTE!r} written to {configure_dvc_remote(project, team.env())}")
        print(f"clients: source {team.env_file}")
    elif args.services_command == "down":
        team.down()
        print(f"team services stopped; their data stays in {state_dir}")
    for status in team.status():
        state = f"running  pid {status.pid}" if status.running else "stopped"
        print(f"  {status.name:<12} {status.url or '-':<48} {state}")
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    """The DVC plots of dvc.yaml as one self-contained HTML page (inline SVG: no CDN, works offline)."""
    from lightclip.plots import render

    report = render(_project(args), args.rev or (), dvc_file=args.dvc_file, out=args.out)
    print(report.summary())
    return 0
