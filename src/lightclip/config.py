"""Typed, validated run configuration loaded once from ``params.yaml``.

Config flows one way: ``params.yaml`` -> :class:`Params` -> the functions of each stage.
Every section is a frozen pydantic model that forbids unknown keys, so a misspelt key is an
error that names the key and the keys (or values) that are allowed, never a silent default.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lightclip.edges import LOSSES, check_edge_loss, expand_edge, needs_teacher
from lightclip.errors import LightclipError

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


#: ``model.resize_mode`` -> open_clip's ``resize_mode`` name (what model.json records).
RESIZE_MODES: dict[str, str] = {"crop": "shortest", "pad": "longest", "squash": "squash"}


class ConfigError(LightclipError, ValueError):
    """A params file that cannot be used; the message names the file, key and what is allowed."""


#: Where a stage's torch work runs: ``auto`` = CUDA when present, else CPU (resolved by
#: :func:`lightclip.devices.resolve_device`, the one place that reads it; docs/devices.md).
Device = Literal["auto", "cpu", "cuda", "mps"]


def _numeric(annotation: Any) -> bool:
    """Whether a field holds a number (``int``, ``float``, optionally ``None`` or both)."""
    args = get_args(annotation)
    if args and get_origin(annotation) in (Union, UnionType):
        return any(_numeric(a) for a in args if a is not type(None))
    return annotation in (int, float)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1; in YAML `epochs: yes` is a typo, never a count
        if isinstance(value, bool) and info.field_name is not None and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be a number, got the boolean {value!r}")
        return value


class SynthConfig(StrictModel):
    """The embedded synthetic catalogue (``lightclip data synth``)."""

    seed: int = 0
    n_items: int = Field(3000, ge=10, le=1_000_000)
    image_size: int = Field(64, ge=32, le=512)


#: The attribute values of the Kaggle fashion catalogue (and of the synthetic default).
_KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "gender": ("Men", "Women", "Boys", "Girls", "Unisex"),
    "masterCategory": ("Apparel", "Accessories", "Footwear", "Personal Care", "Free Items", "Sporting Goods", "Home"),
    "season": ("Summer", "Winter", "Fall", "Spring"),
    "usage": ("Casual", "Ethnic", "Formal", "Sports", "Smart Casual", "Travel", "Party", "Home"),
    "baseColour": (
        "Beige", "Black", "Blue", "Bronze", "Brown", "Burgundy", "Charcoal", "Coffee Brown", "Copper", "Cream",
        "Fluorescent Green", "Gold", "Green", "Grey", "Grey Melange", "Khaki", "Lavender", "Magenta", "Maroon",
        "Mauve", "Metallic", "Multi", "Mustard", "Navy Blue", "Nude", "Off White", "Olive", "Orange", "Peach",
        "Pink", "Purple", "Red", "Rust", "Sea Green", "Silver", "Skin", "Steel", "Tan", "Taupe", "Teal",
        "Turquoise Blue", "White", "Yellow",
    ),
}


#: The most pixels (width x height) an image may have; larger files are refused before decoding.
MAX_IMAGE_PIXELS: int = 50_000_000
#: Pillow refuses anything above twice its ``Image.MAX_IMAGE_PIXELS`` as a decompression bomb.
PIL_PIXEL_LIMIT: int = 2 * 89_478_485


class ValidateConfig(StrictModel):
    """The Great Expectations suite run by the ``validate`` stage."""

    #: ``quarantine``: rows failing an error-level check go to ``quarantine.csv`` with their reason
    #: and the rest is the catalogue (a real export with two "NA" titles passes); ``fail``: any one fails the stage.
    on_error: Literal["fail", "quarantine"] = "quarantine"
    #: Above this fraction of quarantined rows the stage fails even in quarantine mode: a broken
    #: export (a lost image folder) must not pass as a small catalogue.
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    #: Attribute values outside ``allowed_values`` (a growing taxonomy): ``warn`` keeps and counts
    #: them per column, ``quarantine`` makes them an error-level row check, ``fail`` fails the stage naming the values.
    unseen_values: Literal["warn", "quarantine", "fail"] = "warn"
    title_min_chars: int = Field(3, ge=1)
    title_max_chars: int = Field(200, ge=1)
    placeholder_titles: list[str] = Field(
        default_factory=lambda: ["n/a", "na", "none", "null", "nan", "title", "untitled", "tbd", "todo", "test", "xxx", "-", "?"]
    )
    min_image_side: int = Field(32, ge=1)
    #: Larger images are quarantined as ``image_too_large``; the image cache, serving and search use the default.
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, le=PIL_PIXEL_LIMIT)
    year_min: int = 2000
    year_max: int = 2030
    #: Known values per attribute column; a column not listed is not checked.
    allowed_values: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in _KNOWN_VALUES.items()})

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


#: ``split.by`` values besides an attribute column.
SPLIT_ORDERS: tuple[str, ...] = ("random", "id_order")


class SplitConfig(StrictModel):
    """Deterministic train/val/test split; sizes are fractions (0-1) or item counts (>= 1).

    ``by``: ``random`` (seeded), ``id_order`` (the largest ids are the test set, the next ones
    val: new products) or an attribute column such as ``year`` (its latest values are the test set).
    """

    seed: int = 0
    val: SplitSize = 0.1
    test: SplitSize = 0.2
    by: str = "random"

    @field_validator("by")
    @classmethod
    def _known_order(cls, value: str) -> str:
        if value not in SPLIT_ORDERS and value not in ATTRIBUTE_COLUMNS:
            raise ValueError(f"unknown split order {value!r}; allowed: {list(SPLIT_ORDERS)} or a column of {list(ATTRIBUTE_COLUMNS)}")
        return value

    @field_validator("val", "test")
    @classmethod
    def _positive(cls, value: SplitSize) -> SplitSize:
        if isinstance(value, bool) or value < 0 or (isinstance(value, float) and value >= 1.0):
            raise ValueError("must be a fraction in [0, 1) or a non-negative item count")
        return value


class KGConfig(StrictModel):
    """The ``build_kg`` stage: concept mining and each concept's prototype images.

    Mining (``lightclip.kg.concepts``): ``min_count`` titles a phrase or a learned head must occur
    in; ``max_modifiers`` modifiers at most in a concept (the deepest level below a product type);
    ``max_run`` modifiers read before the head; ``min_brand_types`` distinct heads a bare first word
    must start titles of to be a brand; ``max_brand_units`` the longest brand span before a gender
    word; ``min_modifier_heads`` / ``min_modifier_brands`` distinct heads / brands a non-lexicon
    word must precede to be a modifier (a word of one brand only is a product-line name);
    ``learn_modifiers`` learn modifiers from the data at all (else the lexicon only).

    Prototypes: ``prototypes_per_concept`` images per concept chosen by FAISS top
    ``prototype_pool`` then maximal marginal relevance (``mmr_lambda``). The knowledge graph
    records this rule beside its prototypes, and pre-training re-picks prototypes with it.
    """

    min_count: int = Field(3, ge=1)
    max_modifiers: int = Field(3, ge=0, le=6)
    max_run: int = Field(6, ge=1, le=10)
    min_brand_types: int = Field(2, ge=1)
    max_brand_units: int = Field(4, ge=1, le=8)
    min_modifier_heads: int = Field(2, ge=1)
    min_modifier_brands: int = Field(2, ge=1)
    learn_modifiers: bool = True
    prototypes_per_concept: int = Field(10, ge=1, le=32, description="prototype images per concept (the reference: 10)")
    #: MMR trade-off: 1 = pure relevance, 0 = pure diversity.
    mmr_lambda: float = Field(0.7, ge=0.0, le=1.0)
    #: Candidates retrieved per concept before MMR re-ranking.
    prototype_pool: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _run_holds_modifiers(self) -> "KGConfig":
        if self.max_run < self.max_modifiers:
            raise ValueError(f"max_run ({self.max_run}) must be >= max_modifiers ({self.max_modifiers})")
        return self

    def prototype_selection(self) -> dict[str, Any]:
        """How prototypes are chosen; saved beside them so pre-training re-picks them the same way."""
        return self.model_dump(include={"prototypes_per_concept", "mmr_lambda", "prototype_pool"})


class ModelConfig(StrictModel):
    """Which model: an architecture (ours, ``lc-*``, or any open_clip built-in) and its weights.

    ``pretrained``: None = random init (the embedded default: no network); a downloaded open_clip
    directory (``open_clip_config.json`` + weights), a checkpoint file or a directory written by
    lightclip; or an open_clip tag or ``hf-hub:org/name`` (downloads: off by default). See docs/pretrained.md.
    The architecture is checked against open_clip when the model is built
    (``lightclip.models.ModelSpec``), so that loading params never imports torch.
    """

    arch: str = "lc-vit-t"
    pretrained: str | None = None
    #: How an image is fitted to the model's square input (``lightclip.imagecache.fit_image``):
    #: ``crop`` (shortest side, centre crop), ``pad`` (longest side, white borders), ``squash``.
    #: Recorded in model.json, so evaluation, the index and serving use the model's own.
    resize_mode: Literal["crop", "pad", "squash"] = "crop"


class TrainImagesConfig(StrictModel):
    """Where training reads the train split's images (``lightclip.trainstream``, docs/scaling.md "Training from shards")."""

    #: cache: decode the split once into the memory-mapped uint8 array (a global permutation per
    #: epoch); webdataset: stream ``shards`` (shard order drawn per epoch, a shuffle buffer; memory
    #: bounded by the buffer and one batch).
    source: Literal["cache", "webdataset"] = "cache"
    shards: str | None = Field(None, description="webdataset: shard spec (globs, {000000..000009}, '::' between specs)")
    shuffle_buffer: int = Field(1000, ge=1, description="webdataset: samples (encoded bytes) held for the shuffle")
    decode_threads: int | None = Field(None, ge=1, description="webdataset decoding threads; None = the CPUs this process may use")

    @model_validator(mode="after")
    def _shards_named(self) -> "TrainImagesConfig":
        if self.source == "webdataset" and not self.shards:
            raise ValueError("train.images.source is webdataset but train.images.shards is null: name the shards (e.g. data/shards/shard-*.tar)")
        return self


class TrainConfig(StrictModel):
    """How to train (shared by every trainer)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)  # open_clip's ViT defaults
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of lr")
    grad_clip_norm: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")
    seed: int = 0
    early_stop_patience: int = Field(5, ge=0, description="epochs without a better val/mean_recall; 0 = off")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast: bf16 on CPU or CUDA; fp16 (with a grad scaler) on CUDA only")
    device: Device = Field("auto", description="auto = CUDA when present, else CPU; see docs/devices.md")
    num_threads: int | None = Field(None, ge=1, description="torch threads; None = the CPUs this process may use (affinity, cgroup quota; LIGHTCLIP_THREADS overrides)")
    log_every_n_steps: int = Field(10, ge=1)
    nproc: int = Field(1, ge=1, description="ranks on this machine: >1 = data parallel through torchrun (batch_size stays the global batch); see docs/distributed.md")
    images: TrainImagesConfig = TrainImagesConfig()


class ConceptLossConfig(StrictModel):
    """FashionKLIP concept alignment (the weight itself is ``concept_weight``; 0 = off)."""

    prompt: str = "a photo of {}"
    max_slots: int = Field(5, ge=1, description="concept slots per pair (the reference: 5)")
    top_k: int = Field(5, ge=1, description="prototypes kept per slot, by similarity to the pair's image")
    prototype_weight: float = Field(1.0, ge=0)
    image_weight: float = Field(1.0, ge=0)
    adaptive: bool = Field(False, description="the reference's (1-a)*clip + a*concept, a = weight*clip/concept")
    refresh_every_epochs: int = Field(1, ge=0, description="re-pick prototypes with the current teacher every N epochs; 0 = never")


class FinetuneConfig(StrictModel):
    """How a teacher that starts from pretrained weights is fine-tuned (see ``lightclip.finetune``).

    A tower's parameter trains at ``lr x lr_scale x layer_decay ** (blocks + 1 - depth)``
    (depth 0 = its embeddings, 1..blocks = its blocks, blocks + 1 = final norm and projection);
    ``logit_scale`` at ``lr``. ``freeze``: towers kept exactly as loaded (out of the optimizer);
    ``freeze_layers``: the embeddings and first N blocks of every other tower. The defaults train
    everything at ``lr``, as from scratch.
    """

    lr_scale: float = Field(1.0, gt=0.0, le=1.0, description="lr multiplier of the image and text towers (not logit_scale)")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="layer-wise lr decay per block below the top; 1 = off")
    freeze: list[Literal["image", "text"]] = Field(default_factory=list, description="towers not trained at all")
    freeze_layers: int = Field(0, ge=0, description="embeddings + first N blocks of each tower not frozen whole; 0 = none")

    @field_validator("freeze")
    @classmethod
    def _unique_towers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate towers in {value}")
        if len(value) == 2:
            raise ValueError("both towers frozen leaves only logit_scale to train; freeze one at most")
        return value


class PretrainConfig(StrictModel):
    """The ``pretrain`` stage: the FashionKLIP teacher (CLIP + concept-level alignment)."""

    model: ModelConfig = ModelConfig(arch="lc-vit-t")
    train: TrainConfig = TrainConfig(epochs=12)
    #: Weight of the concept term; 0 = plain CLIP training (the ablation's baseline).
    concept_weight: float = Field(0.2, ge=0.0)
    concept: ConceptLossConfig = ConceptLossConfig()
    hflip: bool = True
    #: Members of the teacher: 1 = one model; n > 1 trains n models (seeds seed, seed+1, ...)
    #: and ships their ensemble (mean cosine similarity), the teacher that beats a lone student
    #: from scratch (see lightclip.models.ensemble).
    ensemble_members: int = Field(2, ge=1, le=8)
    #: Lower / layer-wise learning rates and frozen towers for a pretrained ``model.pretrained``.
    finetune: FinetuneConfig = FinetuneConfig()


# -- CocaCLIP/ConaCLIP distillation ------------------------------------------------------------
# The edge vocabulary and its rules live in lightclip.edges (torch-free); these models validate
# params against it once, and the losses trust what was validated.


def _strict_number(value: Any, what: str) -> Any:
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


class EdgeLossConfig(StrictModel):
    """One supervised edge of the distillation graph: ``{edge, loss, weight, temperature}``.

    ``edge``: a concrete edge (:data:`lightclip.edges.EDGES`) or a group (``intra_ts``,
    ``inter_ts``, ``intra_ss``) that stands for both modalities, each weighted by ``weight``.
    ``temperature``: ``null`` = the student's learned logit scale (1/tau, as CLIP; detached for
    ``sd``); a number = that fixed tau. Not used by ``fd`` (setting it there is an error).
    """

    edge: str
    loss: str
    weight: float = Field(1.0, ge=0.0)
    temperature: float | None = Field(None, gt=0.0)

    @field_validator("edge")
    @classmethod
    def _known_edge(cls, value: str) -> str:
        expand_edge(value)
        return value

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in LOSSES:
            raise ValueError(f"unknown distillation loss {value!r}; valid losses: {', '.join(LOSSES)}")
        return value

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_number(cls, value: Any) -> Any:
        return _strict_number(value, "weight")

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature_is_number(cls, value: Any) -> Any:
        return _strict_number(value, "temperature")

    @model_validator(mode="after")
    def _valid_combination(self) -> "EdgeLossConfig":
        check_edge_loss(self.edge, self.loss)
        if self.loss == "fd" and self.temperature is not None:
            raise ValueError(f"edge {self.edge!r}: loss 'fd' has no temperature (got {self.temperature}); remove it")
        return self

    @property
    def edges(self) -> tuple[str, ...]:
        """The concrete edges this entry supervises."""
        return expand_edge(self.edge)


def check_graph(edges: list[EdgeLossConfig]) -> list[EdgeLossConfig]:
    """A non-empty list in which no (concrete edge, loss) appears twice."""
    if not edges:
        raise ValueError("edges: at least one edge (the baseline is [{edge: inter_ss, loss: infonce, weight: 1}])")
    seen: dict[tuple[str, str], str] = {}
    for entry in edges:
        for edge in entry.edges:
            key = (edge, entry.loss)
            if key in seen:
                raise ValueError(f"edges: {edge}/{entry.loss} is listed twice (by {seen[key]!r} and {entry.edge!r})")
            seen[key] = entry.edge
    return edges


def concrete_edges(edges: list[EdgeLossConfig]) -> list[tuple[str, EdgeLossConfig]]:
    """``(concrete edge, its entry)`` for every edge the entries supervise, in order."""
    return [(edge, entry) for entry in edges for edge in entry.edges]


def _edges(*specs: tuple[str, str]) -> list[EdgeLossConfig]:
    return [EdgeLossConfig(edge=edge, loss=loss) for edge, loss in specs]


#: The no-distillation baseline: the student's own CLIP loss only.
BASELINE_EDGES: tuple[tuple[str, str], ...] = (("inter_ss", "infonce"),)
#: The fully-connected graph: every interaction type supervised (InterSS infonce = the student's
#: CLIP loss; IntraTS infonce + fd; InterTS infonce; IntraSS sd), all with weight 1.
FULL_GRAPH_EDGES: tuple[tuple[str, str], ...] = (
    ("inter_ss", "infonce"), ("intra_ts", "infonce"), ("intra_ts", "fd"), ("inter_ts", "infonce"), ("intra_ss", "sd"),
)
_ABLATION_VARIANTS: dict[str, tuple[tuple[str, str], ...]] = {
    "no_distill": BASELINE_EDGES,
    "intra_ts_fd": (("inter_ss", "infonce"), ("intra_ts", "fd")),
    "sd_ts": (("inter_ss", "infonce"), ("intra_ts", "sd"), ("inter_ts", "sd")),
    "full": FULL_GRAPH_EDGES,
}


class ImageSourceConfig(StrictModel):
    """Where ``teacher_embed``, ``evaluate`` and ``index`` read a split's images (``lightclip.imagestream``, docs/scaling.md)."""

    #: cache: decode once into the memory-mapped uint8 array (reused by later stages); stream:
    #: decode the image files batch by batch (memory bounded by a batch); webdataset: stream ``shards``.
    source: Literal["cache", "stream", "webdataset"] = "cache"
    shards: str | None = Field(None, description="webdataset: shard spec (globs, {000000..000009}, '::' between specs)")
    decode_threads: int | None = Field(None, ge=1, description="stream/webdataset decoding threads; None = the CPUs this process may use")


class TeacherEmbedConfig(StrictModel):
    """The ``teacher_embed`` stage: the frozen teacher's embeddings of catalogue splits, computed once."""

    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    batch_size: int = Field(256, ge=1)
    #: Also store the embeddings of the horizontally flipped images (``distill.hflip`` with the cache).
    hflip: bool = True
    num_threads: int | None = Field(None, ge=1, description="torch threads; None = the CPUs this process may use (affinity, cgroup quota; LIGHTCLIP_THREADS overrides)")
    device: Device = Field("auto", description="where the teacher runs; see docs/devices.md")
    images: ImageSourceConfig = ImageSourceConfig()

    @field_validator("splits")
    @classmethod
    def _unique_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one split")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate splits in {value}")
        return value


class DistillJob(StrictModel):
    """One distillation run, fully resolved: which student, which edges, which seed.

    Built by :meth:`Params.distill_job` from ``distill`` (and ``distill_ablation`` for a
    variant); everything that changes the trained weights is in here, and only that.
    """

    student_name: str
    student: ModelConfig
    train: TrainConfig
    edges: list[EdgeLossConfig]
    projection: bool
    teacher_online: bool
    hflip: bool
    variant: str | None = None

    @field_validator("edges")
    @classmethod
    def _graph(cls, value: list[EdgeLossConfig]) -> list[EdgeLossConfig]:
        return check_graph(value)

    @property
    def needs_teacher(self) -> bool:
        return needs_teacher(edge for edge, _ in concrete_edges(self.edges))

    def trajectory(self) -> dict[str, Any]:
        """What identifies the trained weights (for resuming the same run): no names."""
        return self.model_dump(mode="json", exclude={"student_name", "variant"})

    @property
    def run_name(self) -> str:
        if self.variant is None:
            return f"distill-{self.student_name}"
        return f"distill-{self.student_name}-{self.variant}-seed{self.train.seed}"


class DistillConfig(StrictModel):
    """The ``distill`` stage: CocaCLIP/ConaCLIP distillation of the teacher into small students.

    ``students``: name -> model; each is a DVC stage ``distill@<name>`` writing
    ``models/students/<name>``. ``edges``: the supervised edges of the graph (the baseline
    without distillation is ``[{edge: inter_ss, loss: infonce, weight: 1}]``). ``projection``:
    learned linear maps from the student's embedding width to the teacher's (only when they
    differ, only for the teacher-student edges); ``false`` with different widths is an error.
    ``teacher_online``: run the frozen teacher on every batch (on the same augmented images)
    instead of reading the ``teacher_embed`` cache.
    """

    students: dict[str, ModelConfig] = Field(
        default_factory=lambda: {"xt": ModelConfig(arch="lc-vit-xt"), "xxt": ModelConfig(arch="lc-vit-xxt")}
    )
    train: TrainConfig = TrainConfig(epochs=15)
    edges: list[EdgeLossConfig] = Field(default_factory=lambda: _edges(*FULL_GRAPH_EDGES))
    projection: bool = True
    teacher_online: bool = False
    hflip: bool = True

    @field_validator("edges")
    @classmethod
    def _graph(cls, value: list[EdgeLossConfig]) -> list[EdgeLossConfig]:
        return check_graph(value)

    @field_validator("students")
    @classmethod
    def _some_student(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not value:
            raise ValueError("name at least one student, e.g. {xt: {arch: lc-vit-xt}}")
        return _check_model_names(value)

    def job(self, student: str, *, edges: list[EdgeLossConfig] | None = None, seed: int | None = None, variant: str | None = None) -> DistillJob:
        """The run that trains the student called ``student`` (optionally other edges or seed)."""
        if student not in self.students:
            raise ConfigError(f"distill.students has no student {student!r}; students: {', '.join(self.students)}")
        train = self.train if seed is None else self.train.model_copy(update={"seed": seed})
        return DistillJob(
            student_name=student,
            student=self.students[student],
            train=train,
            edges=self.edges if edges is None else edges,
            projection=self.projection,
            teacher_online=self.teacher_online,
            hflip=self.hflip,
            variant=variant,
        )


class DistillAblationConfig(StrictModel):
    """The distillation ablation sweep (``pipelines/ablation/dvc.yaml``): students x edge sets x seeds.

    Every variant trains ``distill.students[student]`` with ``distill.train``, changing only the
    edges (and the seed), so the table isolates what each kind of supervision brings to each
    student size.
    """

    students: list[str] = Field(default_factory=lambda: ["xt", "xxt"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    variants: dict[str, list[EdgeLossConfig]] = Field(
        default_factory=lambda: {name: _edges(*specs) for name, specs in _ABLATION_VARIANTS.items()}
    )

    @field_validator("variants")
    @classmethod
    def _variants_are_graphs(cls, value: dict[str, list[EdgeLossConfig]]) -> dict[str, list[EdgeLossConfig]]:
        for name, edges in value.items():
            try:
                check_graph(edges)
            except ValueError as exc:
                raise ValueError(f"variants.{name}: {exc}") from None
        return value

    def job(self, distill: DistillConfig, variant: str, seed: int, student: str | None = None) -> DistillJob:
        """``distill`` with this variant's edges, ``student`` (default: the first of ``students``) and ``seed``."""
        if variant not in self.variants:
            raise ConfigError(f"distill_ablation.variants has no variant {variant!r}; variants: {', '.join(self.variants) or 'none'}")
        student = self.students[0] if student is None else student
        if student not in self.students:
            raise ConfigError(f"distill_ablation.students has no student {student!r}; students: {', '.join(self.students)}")
        return distill.job(student, edges=self.variants[variant], seed=seed, variant=variant)


class TrackingConfig(StrictModel):
    """Where runs go (one MLflow experiment per pipeline) and how long an unanswering store may take."""

    experiment: str = "lightclip"
    timeout_seconds: int = Field(10, ge=1, le=600)  # one HTTP request, or the wait for a SQLite write lock
    retries: int = Field(2, ge=0, le=10)  # HTTP retries after the first attempt


# -- evaluation, the catalogue index and the speed benchmark ---------------------------------

_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _check_model_names(models: dict[str, str] | None) -> dict[str, str] | None:
    for name in models or {}:
        if not re.match(_MODEL_NAME, name):
            raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (it names files and metrics)")
    return models


def _check_ks(value: list[int]) -> list[int]:
    if not value or any(k < 1 for k in value):
        raise ValueError("must be a non-empty list of positive integers")
    return sorted(set(value))


class EvaluateConfig(StrictModel):
    """The ``evaluate`` stage: retrieval metrics of each model on one split (see ``lightclip.evaluation``)."""

    #: name -> saved model directory; every one is evaluated, a missing one is an error.
    models: dict[str, str] = Field(
        default_factory=lambda: {"teacher": "models/teacher", "xt": "models/students/xt", "xxt": "models/students/xxt"}
    )
    split: Literal["train", "val", "test"] = "test"
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="R@k and t2i P@k")
    curve_ks: list[int] = Field(default_factory=lambda: [1, 2, 3, 5, 10, 20, 50], description="the recall@k plot's points")
    #: Which other items' titles count as positives besides the item's own: identical titles,
    #: byte-identical decoded images.
    positives: list[Literal["title", "image"]] = Field(default_factory=lambda: ["title", "image"])
    #: Attribute groups for text->image precision@k (skipped when the catalogue lacks them).
    attributes: list[list[str]] = Field(default_factory=lambda: [["articleType"], ["articleType", "baseColour"]])
    batch_size: int = Field(256, ge=1)
    num_threads: int | None = Field(None, ge=1)
    device: Device = Field("auto", description="where the models embed the split; see docs/devices.md")
    images: ImageSourceConfig = ImageSourceConfig()
    #: name -> a pretrained model ({arch, pretrained} as pretrain.model), evaluated zero-shot beside
    #: ``models`` (a baseline row; never registered). See docs/pretrained.md.
    baselines: dict[str, ModelConfig] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one model directory, e.g. {teacher: models/teacher}")
        return _check_model_names(value)

    @field_validator("baselines")
    @classmethod
    def _baseline_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        _check_model_names(value)
        return value

    @field_validator("ks", "curve_ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        return _check_ks(value)

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, value: list[list[str]]) -> list[list[str]]:
        for group in value:
            unknown = sorted(set(group) - set(ATTRIBUTE_COLUMNS))
            if not group or unknown:
                raise ValueError(f"attribute group {group}: unknown column(s) {unknown}; allowed: {list(ATTRIBUTE_COLUMNS)}")
        return value


class IvfConfig(StrictModel):
    nlist: int | None = Field(None, ge=1, description="inverted lists; null = about 4 sqrt(N), >= 39 points per list")
    nprobe: int = Field(32, ge=1, description="lists visited per query")
    train_points_per_list: int = Field(64, ge=1, description="k-means training sample = this x nlist (at most N)")


class HnswConfig(StrictModel):
    m: int = Field(32, ge=2, le=256, description="graph degree")
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)


class IndexConfig(StrictModel):
    """The ``index`` stage: a FAISS index over the catalogue's image embeddings (see ``lightclip.index``)."""

    model: str = "models/teacher"
    split: Literal["train", "val", "test"] | None = None  # null = every item
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    ivf: IvfConfig = IvfConfig()
    hnsw: HnswConfig = HnswConfig()
    batch_size: int = Field(256, ge=1)
    eval_queries: int = Field(500, ge=0, description="titles used as queries for recall@10 vs flat and query latency")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: Device = Field("auto", description="where the model embeds the catalogue; see docs/devices.md")
    images: ImageSourceConfig = ImageSourceConfig()


class BenchConfig(StrictModel):
    """``lightclip bench``: encode latency/throughput, index scaling, size and memory per model."""

    models: dict[str, str] | None = None  # null = evaluate.models
    teacher: str = "teacher"  # the model the others are compared with (ratios)
    warmup: int = Field(10, ge=1)
    runs: int = Field(100, ge=100, description="timed batch-1 calls per measurement")
    batch_size: int = Field(64, ge=1, description="throughput batch")
    throughput_batches: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1, description="interleaved rounds over the models for latency and throughput")
    gallery_size: int = Field(10000, ge=10, description="gallery of the evaluate-overhead check")
    eval_rounds: int = Field(3, ge=1, description="embed-then-score rounds of the evaluate-overhead check (medians compared)")
    index_sizes: list[int] = Field(default_factory=lambda: [10000, 100000, 1000000])
    index_kinds: list[Literal["flat", "ivf", "hnsw"]] = Field(default_factory=lambda: ["flat", "ivf", "hnsw"])
    index_queries: int = Field(200, ge=1)
    hnsw_max_build_seconds: float = Field(600.0, gt=0, description="skip an HNSW size whose estimated build exceeds this")
    num_threads: int | None = Field(None, ge=1)
    seed: int = 0

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_model_names(value)

    @field_validator("index_sizes")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        return _check_ks(value)


class ServeConfig(StrictModel):
    """``lightclip serve``: the retrieval service and storefront page (see ``lightclip.service``).

    ``model``: a registered model at an alias (``name@alias``) or version (``name/3``), or a
    model directory; the default ``@production`` falls back to ``@staging`` with a warning. The
    index is always built from the served weights (cached by their sha256 under ``.cache/serve``,
    or ``index`` reused when it records the same sha256); ``catalogue`` is what it indexes.
    """

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535, description="0 = any free port")
    model: str = "lightclip-student@production"
    catalogue: str = "data/split"
    index: str = "models/index"
    poll_seconds: float = Field(10.0, gt=0.0, description="how often the alias is re-read for a hot swap")
    batch_window_ms: float = Field(2.0, ge=0.0, description="text queries arriving within this window are embedded together")
    max_batch: int = Field(32, ge=1)
    max_upload_bytes: int = Field(5_000_000, ge=1024)
    max_query_chars: int = Field(300, ge=1)
    k_default: int = Field(12, ge=1)
    k_max: int = Field(100, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads for the model; null = the usable CPUs")

    @model_validator(mode="after")
    def _k(self) -> "ServeConfig":
        if self.k_default > self.k_max:
            raise ValueError(f"k_default ({self.k_default}) is above k_max ({self.k_max})")
        return self


# -- the model registry: register, gate, promote (see lightclip.registry) ----------------------

_REGISTERED_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class RegisterConfig(StrictModel):
    """The ``register`` stage: every model of ``evaluate.models`` logged and registered in MLflow.

    The model named ``teacher`` goes to ``teacher_model_name``; every other one is a student and
    a version of ``model_name``. The encode latency the gate reads is measured here, on the
    registered weights: batch 1, one image + one title (tokenisation included), ``latency_rounds``
    rounds of ``latency_runs`` calls (each beside a reference matmul) after ``latency_warmup``, on
    ``latency_threads`` torch threads; up to ``latency_max_rounds`` rounds when the machine is busy
    (see ``lightclip.registry.packaging.measure_encode_latency``).
    """

    model_name: str = "lightclip-student"
    teacher_model_name: str = "lightclip-teacher"
    teacher: str = "teacher"  # the name of the teacher in evaluate.models
    latency_runs: int = Field(20, ge=5, description="timed calls per round")
    latency_rounds: int = Field(5, ge=1, description="rounds; the figure is the lowest per-round p50")
    latency_max_rounds: int = Field(15, ge=1, description="rounds at most, when the machine is busy")
    latency_warmup: int = Field(5, ge=0)
    latency_threads: int | None = Field(1, ge=1, description="torch threads while timing; null = all cores")

    @field_validator("model_name", "teacher_model_name")
    @classmethod
    def _registered_name(cls, value: str) -> str:
        if not re.match(_REGISTERED_NAME, value):
            raise ValueError(f"registered model name {value!r}: use letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> "RegisterConfig":
        if self.model_name == self.teacher_model_name:
            raise ValueError(f"model_name and teacher_model_name are both {self.model_name!r}; students and the teacher need their own names")
        if self.latency_max_rounds < self.latency_rounds:
            raise ValueError(f"latency_max_rounds ({self.latency_max_rounds}) is below latency_rounds ({self.latency_rounds})")
        return self


class PromoteConfig(StrictModel):
    """The promotion gate: what a student needs to get the ``staging`` (and ``production``) alias.

    A candidate passes when (1) its test mean recall >= ``min_teacher_fraction`` x the teacher's
    on the same test set, (2) its encode latency p50 <= ``max_encode_ms`` and (3) its test mean
    recall >= the current holder's of the target alias minus ``max_regression`` points, when
    both were evaluated on the same test set (``require_same_test_set``: fail instead of skipping
    the comparison when they were not). ``auto``: the register stage gives ``@staging`` to the
    best passing student.

    The test set measures (1) with sampling error: the register stage resamples the test items
    (a paired bootstrap of student and teacher, ``fraction_interval_level``,
    ``fraction_interval_resamples``) and ``teacher_fraction_decision`` says what passes:
    ``point``: the ratio itself >= ``min_teacher_fraction``; ``interval``: not shown to be below
    it (the interval's upper end reaches it); ``strict``: shown to reach it (the lower end does).
    Without per-item ranks (no interval) every decision falls back to ``point`` and says so.
    """

    auto: bool = True
    min_teacher_fraction: float = Field(0.9, ge=0.0, le=2.0)
    teacher_fraction_decision: Literal["point", "interval", "strict"] = "interval"
    fraction_interval_level: float = Field(0.95, gt=0.0, lt=1.0)
    fraction_interval_resamples: int = Field(2000, ge=100)
    max_encode_ms: float = Field(10.0, gt=0.0)
    max_regression: float = Field(1.0, ge=0.0, description="points of test mean recall")
    require_same_test_set: bool = False


# -- Prefect orchestration: the scheduled retraining flow (see lightclip.orchestration) ----------

_CRON_FIELD = r"^[0-9A-Za-z*/,?#LW-]+$"


class OrchestrationConfig(StrictModel):
    """The Prefect flow ``retrain`` (``pipelines/retrain.py``) and its deployment ``retrain/scheduled``.

    ``cron``/``timezone``: when the deployment runs (5-field cron, checked in full by Prefect when
    the deployment is served). ``retries``: how often a failed stage task is retried before the
    flow fails; the first retry waits ``retry_delay_seconds``, and each next one twice as long
    when ``exponential_backoff`` (transient causes: a busy machine, a lock, memory).
    The deployment to a work pool (``pipelines/deploy_pool.py``): a running flow run that sent no
    heartbeat (every 30 s) for ``heartbeat_timeout_seconds`` is marked Crashed (its worker or
    machine was lost), and a crashed run is scheduled again, ``crash_retries`` times at most.
    """

    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    retries: int = Field(2, ge=0, le=10)
    retry_delay_seconds: float = Field(60.0, ge=0.0)
    exponential_backoff: bool = True
    crash_retries: int = Field(1, ge=0, le=10)
    heartbeat_timeout_seconds: float = Field(120.0, ge=40.0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(re.match(_CRON_FIELD, f) for f in fields):
            raise ValueError(f"cron {value!r}: expected 5 fields 'minute hour day-of-month month day-of-week', e.g. '0 2 * * *'")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {value!r}, e.g. UTC or Europe/Paris") from None
        return value

    def retry_delays(self) -> list[float]:
        """Seconds to wait before each retry (Prefect's ``retry_delay_seconds`` as a list)."""
        factor = 2.0 if self.exponential_backoff else 1.0
        return [self.retry_delay_seconds * factor**attempt for attempt in range(self.retries)]


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
