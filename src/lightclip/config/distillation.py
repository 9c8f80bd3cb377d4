"""CocaCLIP/ConaCLIP distillation: graph edges, student jobs and the ablation."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from lightclip.config.base import ConfigError, StrictModel, _check_model_names
from lightclip.config.training import ModelConfig, TrainConfig
from lightclip.edges import LOSSES, check_edge_loss, expand_edge, needs_teacher


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
        default_factory=lambda: {"xt": ModelConfig(arch="lc-vit-xt"), "xxt": ModelConfig(arch="lc-vit-xxt"), "fast": ModelConfig(arch="lc-fast")}
    )
    train: TrainConfig = TrainConfig(epochs=40)
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
