"""Zero-shot baselines: a pretrained open_clip model evaluated beside the teacher and students.

``evaluate.baselines`` names models by architecture and weights (``{arch, pretrained}``, the
shape of ``pretrain.model``: a downloaded open_clip directory, a checkpoint file, a tag or
``hf-hub:`` name). Each is loaded once through the same path pre-training takes
(:func:`lightclip.models.zoo.create_model`) and saved as a lightclip model directory under
``<cache>/baselines``, so evaluating it is evaluating any saved model (its own image size,
mean/std and tokenizer from ``model.json``). The directory is keyed by the spec and the sha256 of
the local weights (:func:`~lightclip.models.zoo.pretrained_identity`): a changed download is converted again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

from pydantic import ValidationError

from lightclip.config import ModelConfig
from lightclip.evaluation.errors import EvaluationError
from lightclip.io import staged_dir
from lightclip.models.zoo import INFO_FILE, ModelSpec, create_model, pretrained_identity, save_model

BASELINE_STAGE = "baseline"


def _resolved(config: ModelConfig, project_dir: Path | None) -> ModelConfig:
    pretrained = config.pretrained
    if pretrained is not None and project_dir is not None and not Path(pretrained).expanduser().is_absolute() and (project_dir / pretrained).exists():
        return config.model_copy(update={"pretrained": str(project_dir / pretrained)})
    return config


def baseline_dir(name: str, config: ModelConfig, cache_dir: Path, project_dir: Path | None = None) -> Path:
    """The saved lightclip model of baseline ``name`` (created on first use, then reused)."""
    config = _resolved(config, project_dir)
    try:
        spec = ModelSpec(**config.model_dump())
    except ValidationError as exc:
        raise EvaluationError(f"evaluate.baselines.{name}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    identity = json.dumps({"model": config.model_dump(mode="json"), "weights": pretrained_identity(config.pretrained)}, sort_keys=True)
    directory = Path(cache_dir) / "baselines" / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if not (directory / INFO_FILE).is_file():
        model, _ = create_model(spec)
        with staged_dir(directory) as tmp:
            save_model(model, spec, tmp, extra={"stage": BASELINE_STAGE, "pretrained": config.pretrained})
    return directory


def baseline_dirs(baselines: Mapping[str, ModelConfig], models: Mapping[str, object], cache_dir: Path, project_dir: Path | None = None) -> dict[str, Path]:
    """Every baseline's saved directory; a name also in ``evaluate.models`` is an error."""
    clash = sorted(set(baselines) & set(models))
    if clash:
        raise EvaluationError(f"evaluate.baselines: {clash} also name(s) in evaluate.models; give the baseline another name")
    return {name: baseline_dir(name, config, cache_dir, project_dir) for name, config in baselines.items()}
