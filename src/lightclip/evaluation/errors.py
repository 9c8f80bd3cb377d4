"""The evaluation's one error type (its own module so every part of the package can raise it)."""

from __future__ import annotations

from lightclip.errors import LightclipError


class EvaluationError(LightclipError, ValueError):
    """An evaluation that cannot run (no items, a missing model, inconsistent inputs); the message says why."""
