"""The model registry: register the teacher and the students in MLflow, gate them, move aliases.

* :mod:`~lightclip.registry.gate`: the promotion gate, a pure function from the evidence
  recorded on a version and the ``promote`` params to named checks with reasons;
* :mod:`~lightclip.registry.aliases`: the alias store (:class:`ModelRegistry`): versions,
  ``@staging``/``@production``, promote, rollback, alias history, and the
  ``lightclip registry list/show/audit`` views;
* :mod:`~lightclip.registry.lock` and :mod:`~lightclip.registry.audit`: the registry lock and
  the audit log of alias moves, both kept in the registry itself, so every client of one
  tracking server shares them;
* :mod:`~lightclip.registry.packaging`: what goes into a registered version (the
  models-from-code pyfunc, its tags and model card, the latency and test-set evidence);
* :mod:`~lightclip.registry.model_code`: the code file of every registered model (unpacks the
  package it carries, sets the pyfunc);
* :mod:`~lightclip.registry.stage`: the ``register`` stage.

The gate function itself is imported from its module (``from lightclip.registry.gate import
gate``): re-exporting it here would hide the submodule of the same name.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightclip.registry.aliases import AliasMove, ModelRegistry, RegistryError, format_audit, format_version, format_versions
from lightclip.registry.audit import AUDIT_MODEL, AuditLog
from lightclip.registry.gate import TAG_ENCODE_MS, TAG_MEAN_RECALL, TAG_TEACHER_RECALL, TAG_TEST_SET, Check, Evidence, GateResult, gate_tag
from lightclip.registry.lock import LOCK_MODEL, RegistryLock, RegistryLockError

#: Names of the register stage, imported on first use: the stage needs torch, open_clip and
#: MLflow's model flavours, which take ``from lightclip.registry import ModelRegistry`` from
#: about 1.4 s to 5.5 s here, and ``lightclip registry list/show/promote/rollback`` need none of them.
_STAGE_NAMES = ("RegisterInputs", "RegisterOutputs", "format_report", "read_eval", "register_one", "run_metrics", "run_register", "run_tags")


def __getattr__(name: str) -> Any:
    if name in _STAGE_NAMES:
        return getattr(import_module("lightclip.registry.stage"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUDIT_MODEL",
    "AliasMove",
    "AuditLog",
    "Check",
    "Evidence",
    "GateResult",
    "LOCK_MODEL",
    "ModelRegistry",
    "RegistryError",
    "RegistryLock",
    "RegistryLockError",
    "TAG_ENCODE_MS",
    "TAG_MEAN_RECALL",
    "TAG_TEACHER_RECALL",
    "TAG_TEST_SET",
    "format_audit",
    "format_version",
    "format_versions",
    "gate_tag",
    *_STAGE_NAMES,
]
