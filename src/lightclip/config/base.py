"""What every section shares: the strict base model, devices, attribute columns and name checks."""

from __future__ import annotations

import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

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

# -- names of models (evaluate, register) and k lists ----------------------------------------

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
