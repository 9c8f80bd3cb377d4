"""Typed, validated run configuration loaded once from ``params.yaml``.

Config flows one way: ``params.yaml`` -> :class:`Params` -> the functions of each stage.
Every section is a frozen pydantic model that forbids unknown keys, so a misspelt key is an
error that names the key and the keys (or values) that are allowed, never a silent default.

The sections live in submodules by concern (``base``, ``data``, ``training``, ``distillation``,
``evaluation``, ``operations``); every name is importable from ``lightclip.config`` itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lightclip.config.base import (  # noqa: F401 (re-exported)
    ATTRIBUTE_COLUMNS,
    ConfigError,
    Device,
    RESIZE_MODES,
    StrictModel,
)
from lightclip.config.data import (  # noqa: F401 (re-exported)
    KGConfig,
    MAX_IMAGE_PIXELS,
    PIL_PIXEL_LIMIT,
    SPLIT_ORDERS,
    SplitConfig,
    SplitSize,
    SynthConfig,
    ValidateConfig,
)
from lightclip.config.training import (  # noqa: F401 (re-exported)
    BatchGroupsConfig,
    ConceptLossConfig,
    FinetuneConfig,
    ImageSourceConfig,
    ModelConfig,
    PretrainConfig,
    TeacherEmbedConfig,
    TrainConfig,
    TrainImagesConfig,
)
from lightclip.config.distillation import (  # noqa: F401 (re-exported)
    BASELINE_EDGES,
    DistillAblationConfig,
    DistillConfig,
    DistillJob,
    EdgeLossConfig,
    FULL_GRAPH_EDGES,
    check_graph,
    concrete_edges,
)
from lightclip.config.evaluation import (  # noqa: F401 (re-exported)
    BenchConfig,
    EvaluateConfig,
    HnswConfig,
    IndexConfig,
    IvfConfig,
)
from lightclip.config.operations import (  # noqa: F401 (re-exported)
    OrchestrationConfig,
    PromoteConfig,
    RegisterConfig,
    ServeConfig,
    TrackingConfig,
)


class Params(StrictModel):
    """All of ``params.yaml``: one section per stage."""

    synth: SynthConfig = SynthConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    build_kg: KGConfig = KGConfig()
    pretrain: PretrainConfig = PretrainConfig()
    teacher_embed: TeacherEmbedConfig = TeacherEmbedConfig()
    distill: DistillConfig = DistillConfig()
    distill_ablation: DistillAblationConfig = DistillAblationConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    index: IndexConfig = IndexConfig()
    bench: BenchConfig = BenchConfig()
    serve: ServeConfig = ServeConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")  # `register` would shadow ABC.register
    promote: PromoteConfig = PromoteConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    tracking: TrackingConfig = TrackingConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (for logging as run params)."""
        return self.model_dump(by_alias=True, mode="json")[name]

    def distill_job(self, student: str | None = None, *, variant: str | None = None, seed: int | None = None) -> DistillJob:
        """The distillation run the pipeline (or the ablation, with ``variant``) asks for.

        ``student`` defaults to the first of ``distill.students`` (of ``distill_ablation.students``
        for a variant); ``seed`` to ``distill.train.seed``.
        """
        if variant is not None:
            return self.distill_ablation.job(self.distill, variant, self.distill.train.seed if seed is None else seed, student)
        return self.distill.job(student or next(iter(self.distill.students)), seed=seed)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for listing the allowed keys).

    List positions and dict keys in ``loc`` step into the item type (``distill.edges.0`` is an
    ``EdgeLossConfig``, ``distill.students.xt`` a ``ModelConfig``).
    """
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next((info for name, info in current.model_fields.items() if part in (name, info.alias)), None)
            if field is None:
                return current
            current = field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _describe(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(Params, loc[:-1]) or Params
        return f"{source}: unknown key '{key}'; allowed keys here: {', '.join(_allowed_keys(owner))}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{source}: '{key}' = {error.get('input')!r} is not allowed; allowed values: {expected}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{source}: '{key}': {message} (got {error.get('input')!r})"


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ConfigError` naming every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, source) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(data, source=str(path))
