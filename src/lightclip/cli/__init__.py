"""The ``lightclip`` command line: one subcommand per stage, each a thin wrapper over the library.

A stage handler only turns arguments into the stage's config, inputs and outputs, runs the
stage function (the contract of :mod:`lightclip.stage`) inside its MLflow run, logs what the
function returned and prints one summary line. ``main(argv)`` takes an argument list so tests
drive the real CLI in-process.

Stage modules are imported inside their handler: together they pull in torch, open_clip,
MLflow, FAISS and Great Expectations (about 5.4 s on a 2-core machine, against well under a
second for the CLI itself), which ``lightclip --help`` and the light commands should not pay
for; ``tests/test_cli.py`` checks that the parser imports none of them.

One module per command group: :mod:`~lightclip.cli.data` (catalogues), :mod:`~lightclip.cli.stages`
(the pipeline stages), :mod:`~lightclip.cli.registry`, :mod:`~lightclip.cli.ops` (pipeline runs,
tracking, serving, services, plots); :mod:`~lightclip.cli.parser` wires them to the commands and
:mod:`~lightclip.cli.common` holds what they share.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from lightclip.cli.common import CliError, _project
from lightclip.cli.parser import build_parser
from lightclip.env import configure_environment
from lightclip.errors import LightclipError
from lightclip.io import log_to_stderr, usable_cpus

__all__ = ["CliError", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what train.nproc re-runs under torchrun
    log_to_stderr()  # lightclip's own log lines (the thread choice, warnings) on stderr
    try:
        configure_environment(_project(args))
        # OpenMP libraries (torch, FAISS) start with the CPUs this process may use, not the host's cores
        os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus().threads))
        return args.handler(args)
    except (LightclipError, FileNotFoundError) as exc:
        print(f"lightclip {args.command}: error: {exc}", file=sys.stderr)
        return 1
