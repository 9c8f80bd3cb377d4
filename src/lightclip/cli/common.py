"""What every command handler shares: the project and its params from the arguments, and
``_stage``, which runs one stage function inside its MLflow run (the contract of
:mod:`lightclip.stage`)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

from lightclip.config import Params, TrackingConfig, load_params
from lightclip.errors import LightclipError
from lightclip.io import read_json
from lightclip.stage import StageContext
from lightclip.tracking import StageInterrupted, project_root, stage_run


#: Seconds `lightclip pipeline` gives `dvc repro` and its stage to stop after passing a signal on, then SIGKILL.
PIPELINE_STOP_GRACE_S = 30.0


class CliError(LightclipError):
    """An error in the command line itself; printed without a traceback."""


def _project(args: argparse.Namespace) -> Path:
    """Where the MLflow store and ``.cache`` live: ``--project``, else found from the working
    directory (:func:`lightclip.tracking.project_root`), never from where the params file is."""
    if args.project is None:
        return project_root(Path.cwd())
    if not Path(args.project).is_dir():
        raise CliError(f"--project {args.project}: not a directory")
    return Path(args.project).resolve()


def _params_path(args: argparse.Namespace) -> Path:
    """``--params``, else the project's ``params.yaml``."""
    return Path(args.params) if args.params else _project(args) / "params.yaml"


def _params(args: argparse.Namespace) -> Params:
    return load_params(_params_path(args))


def _tracking(args: argparse.Namespace) -> TrackingConfig:
    """The ``tracking`` section; its defaults when no params file was given and the project has
    none, so that commands reading no other params (the importers) run without one."""
    if args.params is None and not _params_path(args).is_file():
        return TrackingConfig()
    return _params(args).tracking


def _context(args: argparse.Namespace) -> StageContext:
    return StageContext(project_dir=_project(args), progress=not args.quiet, resume=getattr(args, "resume", False))


def _main_rank() -> bool:
    """False in the ranks 1.. that ``torchrun`` started (read from its ``RANK``, without importing torch)."""
    return os.environ.get("RANK", "0") == "0"


def _launch_ranks(args: argparse.Namespace, nproc: int) -> int:
    """``train.nproc > 1`` outside ``torchrun``: run this very command in ``nproc`` ranks through it."""
    from lightclip.distributed import launch_local

    status = launch_local(nproc, args.argv)
    if status:
        raise CliError(f"{args.command} in {nproc} ranks: torchrun exited with status {status} (the failing rank's error is above)")
    return 0


def _stage(
    args: argparse.Namespace,
    stage: str,
    run_params: Mapping[str, Any],
    call: Callable[[StageContext], Any],
    *,
    metrics: Callable[[Any], Mapping[str, Any]] = lambda result: result,
    metrics_file: Path | None = None,
    artifacts: Iterable[tuple[Path | str, str | None]] = (),
    tags: Callable[[Any], Mapping[str, Any]] | None = None,
    run_name: str | None = None,
) -> Any:
    """Run one stage function in its MLflow run; log its metrics, tags and output artifacts.

    Artifacts that exist are logged even when the stage fails (a failed validation's report),
    and so are the numbers of ``metrics_file`` when the stage failed after writing it.
    """
    if not _main_rank():  # under torchrun, rank 0 alone opens the run, logs and writes
        return call(_context(args))
    tracking = _tracking(args)
    context = _context(args)
    try:
        with stage_run(stage, run_params, project_dir=context.project_dir, experiment=tracking.experiment, run_name=run_name,
                       settings=tracking) as run:
            context = replace(context, log_metrics=lambda values, step: run.log_metrics(values, step=step))
            try:
                result = call(context)
            except LightclipError:
                if metrics_file is not None and Path(metrics_file).is_file():
                    run.log_metrics(read_json(metrics_file))
                raise
            else:
                run.log_metrics(metrics(result))
                if tags is not None:
                    run.set_tags(tags(result))
            finally:
                for path, artifact_path in artifacts:
                    run.log_artifact(Path(path), artifact_path=artifact_path)
    except StageInterrupted as exc:
        _stopped(args, exc)
    return result


def _stopped(args: argparse.Namespace, exc: StageInterrupted) -> NoReturn:
    """One line and the shell's exit status for a signal (130 for SIGINT, 143 for SIGTERM)."""
    print(f"lightclip {args.command}: stopped by {exc.signal_name}; its MLflow run was ended KILLED", file=sys.stderr, flush=True)
    raise SystemExit(exc.exit_code)


def _named_models(specs: Sequence[str] | None) -> dict[str, str] | None:
    """``NAME=DIR`` pairs (``--model``) as a mapping; None when none were given."""
    if not specs:
        return None
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--model {spec!r}: expected NAME=DIR, e.g. teacher=models/teacher")
        models[name] = path
    return models


def _with(config: Any, **updates: Any) -> Any:
    """``config`` with the given fields replaced, validated again (command-line overrides)."""
    updates = {k: v for k, v in updates.items() if v is not None}
    return type(config).model_validate({**config.model_dump(), **updates}) if updates else config
