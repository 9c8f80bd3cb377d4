"""Typed, validated run configuration loaded once from ``params.yaml``.

Config flows one way: ``params.yaml`` -> :class:`Params` -> the functions of each stage.
Every section is a frozen pydantic model that forbids unknown keys, so a misspelt key is an
error that names the key and the keys (or values) that are allowed, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
)


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, key and what is allowed."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SynthConfig(StrictModel):
    """The embedded synthetic catalogue (``lightclip data synth``)."""

    seed: int = 0
    n_items: int = Field(3000, ge=10, le=1_000_000)
    image_size: int = Field(64, ge=32, le=512)


class ValidateConfig(StrictModel):
    """The Great Expectations suite run by the ``validate`` stage."""

    on_error: Literal["fail", "quarantine"] = "fail"
    title_min_chars: int = Field(3, ge=1)
    title_max_chars: int = Field(200, ge=1)
    placeholder_titles: list[str] = Field(
        default_factory=lambda: ["n/a", "na", "none", "null", "nan", "title", "untitled", "tbd", "todo", "test", "xxx", "-", "?"]
    )
    min_image_side: int = Field(32, ge=1)
    year_min: int = 1990
    year_max: int = 2030
    #: Known values per attribute column; a column not listed is not checked.
    allowed_values: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("allowed_values")
    @classmethod
    def _known_columns(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - set(ATTRIBUTE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown attribute column(s) {unknown}; allowed: {list(ATTRIBUTE_COLUMNS)}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> "ValidateConfig":
        if self.title_min_chars > self.title_max_chars:
            raise ValueError("title_min_chars must not exceed title_max_chars")
        if self.year_min > self.year_max:
            raise ValueError("year_min must not exceed year_max")
        return self


SplitSize = Union[int, float]


class SplitConfig(StrictModel):
    """Deterministic train/val/test split; sizes are fractions (0-1) or item counts (>= 1)."""

    seed: int = 0
    val: SplitSize = 0.1
    test: SplitSize = 0.1

    @field_validator("val", "test")
    @classmethod
    def _positive(cls, value: SplitSize) -> SplitSize:
        if isinstance(value, bool) or value < 0 or (isinstance(value, float) and value >= 1.0):
            raise ValueError("must be a fraction in [0, 1) or a non-negative item count")
        return value


class KGConfig(StrictModel):
    """The ``build_kg`` stage: concept mining knobs (see ``lightclip.kg.concepts.KGMiningConfig``)
    and the visual side (prototype images per concept, chosen with maximal marginal relevance)."""

    min_count: int = Field(3, ge=1)
    max_modifiers: int = Field(3, ge=0, le=6)
    max_run: int = Field(6, ge=1, le=10)
    min_brand_types: int = Field(2, ge=1)
    max_brand_units: int = Field(4, ge=1, le=8)
    min_modifier_heads: int = Field(2, ge=1)
    min_modifier_brands: int = Field(2, ge=1)
    learn_modifiers: bool = True
    prototypes_per_concept: int = Field(4, ge=1, le=32)
    #: MMR trade-off: 1 = pure relevance, 0 = pure diversity.
    mmr_lambda: float = Field(0.7, ge=0.0, le=1.0)
    #: Candidates retrieved per concept before MMR re-ranking.
    prototype_pool: int = Field(64, ge=1)

    def mining_fields(self) -> dict[str, Any]:
        """The fields that parameterise concept mining (a ``KGMiningConfig``)."""
        return self.model_dump(include={"min_count", "max_modifiers", "max_run", "min_brand_types", "max_brand_units", "min_modifier_heads", "min_modifier_brands", "learn_modifiers"})


class ModelConfig(StrictModel):
    """Which model: an architecture (ours, ``lc-*``, or any open_clip built-in) and its weights.

    ``pretrained``: None = random init (the embedded default: no network); a local checkpoint
    file or a directory written by lightclip; or an open_clip tag (downloads: off by default).
    The architecture is checked against open_clip when the model is built
    (``lightclip.models.ModelSpec``), so that loading params never imports torch.
    """

    arch: str = "lc-vit-t"
    pretrained: str | None = None


class TrainConfig(StrictModel):
    """How to train (shared by every trainer)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)  # open_clip's ViT defaults
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    grad_clip_norm: float = Field(0.0, ge=0, description="max global grad norm; 0 = no clipping")
    seed: int = 0
    early_stop_patience: int = Field(0, ge=0, description="epochs without a better val/mean_recall; 0 = off")
    amp: Literal["none", "bf16"] = "none"
    num_threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    log_every_n_steps: int = Field(10, ge=1)


class ConceptLossConfig(StrictModel):
    """FashionKLIP concept alignment (the weight itself is ``concept_weight``; 0 = off)."""

    prompt: str = "a photo of {}"
    max_slots: int = Field(5, ge=1, description="concept slots per pair (the reference: 5)")
    prototypes_per_concept: int = Field(10, ge=1, description="prototype images per concept (the reference: 10)")
    top_k: int = Field(5, ge=1, description="prototypes kept per slot, by similarity to the pair's image")
    prototype_weight: float = Field(1.0, ge=0)
    image_weight: float = Field(1.0, ge=0)
    adaptive: bool = Field(False, description="the reference's (1-a)*clip + a*concept, a = weight*clip/concept")
    refresh_every_epochs: int = Field(1, ge=0, description="re-pick prototypes with the current teacher every N epochs; 0 = never")


class PretrainConfig(StrictModel):
    """The ``pretrain`` stage: the FashionKLIP teacher (CLIP + concept-level alignment)."""

    model: ModelConfig = ModelConfig(arch="lc-vit-t")
    train: TrainConfig = TrainConfig()
    #: Weight of the concept term; 0 = plain CLIP training (the ablation's baseline).
    concept_weight: float = Field(0.2, ge=0.0)
    concept: ConceptLossConfig = ConceptLossConfig()
    hflip: bool = True


class TrackingConfig(StrictModel):
    """Where runs go: one MLflow experiment per pipeline."""

    experiment: str = "lightclip"


class Params(StrictModel):
    """All of ``params.yaml``: one section per stage."""

    synth: SynthConfig = SynthConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    build_kg: KGConfig = KGConfig()
    pretrain: PretrainConfig = PretrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain data (for logging as run params)."""
        return self.model_dump(by_alias=True, mode="json")[name]


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for listing the allowed keys)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        field = None
        for name, info in current.model_fields.items():
            if part in (name, info.alias):
                field = info
                break
        if field is None:
            return current
        annotation = field.annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return current


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
    return f"{source}: '{key}': {error['msg']} (got {error.get('input')!r})"


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
