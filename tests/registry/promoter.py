"""A "machine" promoting one version again and again: run as its own process, with its own empty
project directory and only ``MLFLOW_TRACKING_URI`` (and ``LIGHTCLIP_ACTOR``, to tell the two
apart in the audit log) in its environment.

    python promoter.py MODEL VERSION ROUNDS WORKDIR

It writes ``WORKDIR/ready-VERSION`` once imported, waits for ``WORKDIR/go`` (so both machines
start together), then promotes ``VERSION`` of ``MODEL`` to ``@production`` ``ROUNDS`` times,
with a slowed-down alias write that widens the read-then-write window a lost update needs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lightclip.config import PromoteConfig
from lightclip.registry import ModelRegistry

SLOW_ALIAS_S = 0.05


def main(model: str, version: str, rounds: int, workdir: Path) -> None:
    project = workdir / f"machine-v{version}"
    project.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(project)
    write_alias = registry.client.set_registered_model_alias

    def slow_alias(*args, **kwargs):
        time.sleep(SLOW_ALIAS_S)
        return write_alias(*args, **kwargs)

    registry.client.set_registered_model_alias = slow_alias
    (workdir / f"ready-{version}").touch()
    deadline = time.monotonic() + 120
    while not (workdir / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{workdir / 'go'} never appeared")
        time.sleep(0.01)
    for i in range(rounds):
        registry.promote(model, to="production", version=version, config=PromoteConfig(), reason=f"round {i}")
        time.sleep(0.01)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
