"""The model registry: register the teacher and the students in MLflow, gate them, move aliases.

* :mod:`~lightclip.registry.gate`: the promotion gate, a pure function from the evidence
  recorded on a version and the ``promote`` params to named checks with reasons;
* :mod:`~lightclip.registry.aliases`: the alias store (:class:`ModelRegistry`): versions,
  ``@staging``/``@production``, promote, rollback, alias history, the lock and the audit log;
* :mod:`~lightclip.registry.packaging`: what goes into a registered version (the
  models-from-code pyfunc, its tags and model card, the latency and test-set evidence);
* :mod:`~lightclip.registry.stage`: the ``register`` stage and the ``lightclip registry`` views.

The gate function itself is imported from its module (``from lightclip.registry.gate import
gate``): re-exporting it here would hide the submodule of the same name.
"""

from lightclip.registry.aliases import AliasMove, ModelRegistry, RegistryError, file_lock
from lightclip.registry.gate import TAG_ENCODE_MS, TAG_MEAN_RECALL, TAG_TEACHER_RECALL, TAG_TEST_SET, Check, Evidence, GateResult, gate_tag
from lightclip.registry.stage import (
    RegisterInputs,
    RegisterOutputs,
    format_report,
    format_version,
    format_versions,
    read_eval,
    register_one,
    run_metrics,
    run_register,
    run_tags,
)

__all__ = [
    "AliasMove",
    "Check",
    "Evidence",
    "GateResult",
    "ModelRegistry",
    "RegisterInputs",
    "RegisterOutputs",
    "RegistryError",
    "TAG_ENCODE_MS",
    "TAG_MEAN_RECALL",
    "TAG_TEACHER_RECALL",
    "TAG_TEST_SET",
    "file_lock",
    "format_report",
    "format_version",
    "format_versions",
    "gate_tag",
    "read_eval",
    "register_one",
    "run_metrics",
    "run_register",
    "run_tags",
]
