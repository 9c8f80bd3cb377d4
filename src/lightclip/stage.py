"""The one contract every pipeline stage follows.

``run_<stage>(config, inputs, outputs, context) -> dict``:

* ``config``: the stage's typed section of ``params.yaml`` (:mod:`lightclip.config`);
* ``inputs`` / ``outputs``: a small frozen dataclass of paths per stage (what ``dvc.yaml``
  lists as ``deps`` and ``outs``/``metrics``);
* ``context``: a :class:`StageContext`: where the project and its caches are, whether to show
  progress, resume and where per-step metrics go;
* returns the stage's metrics (flat ``name -> number`` where possible), after the stage wrote
  every one of its outputs itself (atomically, through :mod:`lightclip.io`).

The CLI (:mod:`lightclip.cli`) only parses arguments into these objects, opens the MLflow run
(:mod:`lightclip.tracking`), calls the function, logs what it returned and prints a summary;
the Prefect flow and DVC call the same functions through the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs and how it reports; stages never read the environment for these."""

    project_dir: Path
    progress: bool = True
    resume: bool = False
    log_metrics: MetricsCallback | None = None

    @property
    def cache_dir(self) -> Path:
        """Derived, rebuildable state (decoded images, checkpoints): ``<project>/.cache``."""
        return self.project_dir / ".cache"

    @property
    def image_cache_dir(self) -> Path:
        return self.cache_dir / "images"

    def checkpoint_root(self, stage: str) -> Path:
        return self.cache_dir / "checkpoints" / stage

    def resolve(self, path: Path | str) -> Path:
        """``path`` as given when absolute, else relative to the project."""
        path = Path(path)
        return path if path.is_absolute() else self.project_dir / path
