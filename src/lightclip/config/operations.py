"""Operating the models: tracking, serving, registration, promotion and scheduled retraining."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from lightclip.config.base import StrictModel


class TrackingConfig(StrictModel):
    """Where runs go (one MLflow experiment per pipeline) and how long an unanswering store may take."""

    experiment: str = "lightclip"
    timeout_seconds: int = Field(10, ge=1, le=600)  # one HTTP request, or the wait for a SQLite write lock
    retries: int = Field(2, ge=0, le=10)  # HTTP retries after the first attempt




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
    threads: int | None = Field(None, ge=1, description="torch, ONNX Runtime and FAISS threads for the model; null = the usable CPUs less one for the event loop")
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto", description="auto = ONNX Runtime when the served version carries an ONNX export (register.runtime: onnx), else PyTorch; "
        "onnx-int8 = the export's int8 graphs")

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
    (see ``lightclip.registry.packaging.measure_encode_latency``), on the runtime the version
    will be served on: ``runtime``. A version already registered with the same weights keeps
    the runtime its artifact carries.
    """

    model_name: str = "lightclip-student"
    teacher_model_name: str = "lightclip-teacher"
    teacher: str = "teacher"  # the name of the teacher in evaluate.models
    latency_runs: int = Field(20, ge=5, description="timed calls per round")
    latency_rounds: int = Field(5, ge=1, description="rounds; the figure is the lowest per-round p50")
    latency_max_rounds: int = Field(15, ge=1, description="rounds at most, when the machine is busy")
    latency_warmup: int = Field(5, ge=0)
    latency_threads: int | None = Field(1, ge=1, description="torch threads while timing; null = all cores")
    runtime: Literal["torch", "onnx"] = Field(
        "onnx", description="what a new version carries and is gated on: onnx = both towers exported to ONNX beside the weights "
                             "(checked against them), the latency timed on ONNX Runtime, which serve and the pyfunc then run")

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
