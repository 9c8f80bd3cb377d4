"""The model registry: register the teacher and the students in MLflow, gate them, move aliases.

* **Register** (:func:`run_register`, the ``register`` stage): every model of ``evaluate.models``
  is logged as an MLflow "models from code" pyfunc (``lightclip/serving.py`` as the code file,
  the saved model directory as an artifact, the ``lightclip`` package as ``code_paths``, explicit
  pip requirements, a signature and an input example; no pickles) and registered: the teacher
  as a version of ``register.teacher_model_name``, every other model as a version of
  ``register.model_name``. A model whose weights (sha256) are already registered reuses that
  version. Each version carries a model card (its description) and tags: git commit, DVC data
  hash, params hash, test-set fingerprint, teacher version, eval metrics, measured latency.
* **Gate** (:func:`gate`): a pure function of what is recorded on the versions and the
  ``promote`` params; its verdict and every reason are written as version tags.
* **Aliases** (``@staging``, ``@production``; never the deprecated stages) move only inside
  :meth:`ModelRegistry.locked` (``promote``, ``rollback``, the register stage): an exclusive
  file lock beside the store, under which the current holder is read, the gate checked, the
  alias moved, both versions tagged, the alias's history kept on the registered model (what
  ``rollback`` pops) and one line appended to the audit log (``registry_audit.jsonl``: who, when,
  action, from, to, why). Two promotions at once are serialised, so the aliases always match
  the end of the audit log.

MLflow is reached only here and in :mod:`lightclip.tracking` (runs).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from lightclip.tracking import TAG_PREFIX, TrackingTarget, mlflow_metric_name

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from lightclip.config import Params, PromoteConfig

AUDIT_FILE = "registry_audit.jsonl"
LOCK_FILE = "registry.lock"
ALIASES: tuple[str, ...] = ("staging", "production")
HISTORY_LIMIT = 100
ACTOR_ENV = "LIGHTCLIP_ACTOR"

# Version tags (all under the lightclip. prefix, so they sort together in the UI).
TAG_ROLE = f"{TAG_PREFIX}role"  # teacher | student
TAG_CANDIDATE = f"{TAG_PREFIX}candidate"  # the model's name in evaluate.models
TAG_MODEL_DIR = f"{TAG_PREFIX}model_dir"
TAG_WEIGHTS = f"{TAG_PREFIX}weights_sha256"
TAG_PARAMS_HASH = f"{TAG_PREFIX}params_hash"
TAG_TEST_SET = f"{TAG_PREFIX}test_set"
TAG_TEACHER_VERSION = f"{TAG_PREFIX}teacher_version"
TAG_TEACHER_RECALL = f"{TAG_PREFIX}teacher_mean_recall"
TAG_MEAN_RECALL = f"{TAG_PREFIX}mean_recall"  # the gate's metric, on the split named by TAG_SPLIT
TAG_SPLIT = f"{TAG_PREFIX}split"
TAG_ENCODE_MS = f"{TAG_PREFIX}speed.encode_ms_p50"
EVAL_TAG_PREFIX = f"{TAG_PREFIX}eval."
SPEED_TAG_PREFIX = f"{TAG_PREFIX}speed."
GATE_TAG_PREFIX = f"{TAG_PREFIX}gate."
ALIAS_TAG_PREFIX = f"{TAG_PREFIX}alias."


class RegistryError(ValueError):
    """A registration or alias move that cannot be done; the message says what and why."""


# ----------------------------------------------------------------------------------------------
# The gate: a pure function of recorded evidence and the promote params
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What the gate reads about one version (recorded as its tags, so a promotion re-checks it)."""

    version: str | None
    mean_recall: float | None
    teacher_mean_recall: float | None
    encode_ms: float | None
    test_set: str | None

    @classmethod
    def from_tags(cls, version: str, tags: Mapping[str, str]) -> "Evidence":
        def number(key: str) -> float | None:
            try:
                return float(tags[key])
            except (KeyError, ValueError):
                return None

        return cls(version=str(version), mean_recall=number(TAG_MEAN_RECALL), teacher_mean_recall=number(TAG_TEACHER_RECALL),
                   encode_ms=number(TAG_ENCODE_MS), test_set=tags.get(TAG_TEST_SET))


@dataclass(frozen=True)
class Check:
    """One rule of the gate: ``passed`` is None when it did not apply (and does not block)."""

    name: str
    passed: bool | None
    reason: str

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "fail", None: "skipped"}[self.passed]


@dataclass(frozen=True)
class GateResult:
    alias: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.verdict}: {c.reason}" for c in self.checks]

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if c.passed is False]

    def tags(self, *, at: str) -> dict[str, str]:
        """The verdict and every reason as version tags, under ``lightclip.gate.<alias>``."""
        prefix = gate_tag(self.alias)
        tags = {prefix: self.verdict, f"{prefix}.checked_at": at, f"{prefix}.reasons": "; ".join(self.failures) or "all checks passed"}
        tags.update({f"{prefix}.{c.name}": f"{c.verdict}: {c.reason}" for c in self.checks})
        return tags

    def markdown(self) -> str:
        """The gate's section of the model card."""
        return "\n".join([f"## Promotion gate (@{self.alias}): {self.verdict}"] + [f"- {r}" for r in self.reasons]) + "\n"


def gate_tag(alias: str) -> str:
    """The tag holding a version's gate verdict for ``@alias`` (its reasons are ``<tag>.<check>``)."""
    return f"{GATE_TAG_PREFIX}{alias}"


def gate(candidate: Evidence, incumbent: Evidence | None, config: "PromoteConfig", alias: str = "staging") -> GateResult:
    """Does ``candidate`` deserve ``@alias``, now held by ``incumbent`` (None: nobody)?"""
    checks: list[Check] = []
    recall, teacher = candidate.mean_recall, candidate.teacher_mean_recall
    if recall is None:
        checks.append(Check("teacher_fraction", False, f"no test mean recall recorded (tag {TAG_MEAN_RECALL})"))
    elif teacher is None:
        checks.append(Check("teacher_fraction", False, f"no teacher mean recall recorded (tag {TAG_TEACHER_RECALL})"))
    else:
        bound = config.min_teacher_fraction * teacher
        ratio = recall / teacher if teacher else float("inf")
        sign = ">=" if recall >= bound else "<"
        checks.append(Check("teacher_fraction", recall >= bound,
                            f"test mean recall {recall:.2f} {sign} {config.min_teacher_fraction:g} x teacher's {teacher:.2f} = {bound:.2f} "
                            f"(it is {ratio:.1%} of the teacher)"))
    if candidate.encode_ms is None:
        checks.append(Check("latency", False, f"no encode latency recorded (tag {TAG_ENCODE_MS})"))
    else:
        ok = candidate.encode_ms <= config.max_encode_ms
        checks.append(Check("latency", ok, f"encode p50 {candidate.encode_ms:.2f} ms {'<=' if ok else '>'} {config.max_encode_ms:g} ms"))
    if incumbent is None or incumbent.version is None:
        checks.append(Check("regression", True, f"no version at @{alias} yet"))
    elif incumbent.version == candidate.version:
        checks.append(Check("regression", True, f"it is the version at @{alias}"))
    elif incumbent.test_set != candidate.test_set or incumbent.test_set is None:
        why = f"@{alias} v{incumbent.version} was evaluated on test set {incumbent.test_set}, this one on {candidate.test_set}"
        if config.require_same_test_set:
            checks.append(Check("regression", False, f"not comparable: {why} (promote.require_same_test_set)"))
        else:
            checks.append(Check("regression", None, f"not comparable: {why}"))
    elif recall is None or incumbent.mean_recall is None:
        checks.append(Check("regression", False, f"no test mean recall recorded on v{candidate.version} or @{alias} v{incumbent.version}"))
    else:
        bound = incumbent.mean_recall - config.max_regression
        ok = recall >= bound
        checks.append(Check("regression", ok,
                            f"test mean recall {recall:.2f} {'>=' if ok else '<'} @{alias} v{incumbent.version}'s "
                            f"{incumbent.mean_recall:.2f} - {config.max_regression:g} = {bound:.2f}"))
    return GateResult(alias=alias, checks=tuple(checks))


# ----------------------------------------------------------------------------------------------
# Alias moves: lock, history, audit
# ----------------------------------------------------------------------------------------------


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def actor() -> str:
    """Who moves an alias: ``LIGHTCLIP_ACTOR`` (e.g. a CI job) or ``user@host``."""
    explicit = os.environ.get(ACTOR_ENV)
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except Exception:  # no user name in a container
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def state_dir(tracking_uri: str, project_dir: Path) -> Path:
    """Where the lock and the audit log live: beside a SQLite store, else ``<project>/mlflow``."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent
    return Path(project_dir).resolve() / "mlflow"


@contextmanager
def file_lock(path: Path, timeout: float = 120.0, poll: float = 0.05) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (released when the process dies, even killed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise RegistryError(f"{path}: the registry lock is still held after {timeout:.0f}s (by {holder})") from None
                time.sleep(poll)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} ({actor()}) since {now_utc()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias, as written to the audit log and the tags."""

    model: str
    alias: str
    from_version: str | None
    to_version: str
    action: str  # register | promote | rollback
    reason: str
    actor: str
    at: str
    gate: str | None = None

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"], data["to"] = data.pop("from_version"), data.pop("to_version")
        return data


def _history_tag(alias: str) -> str:
    return f"{ALIAS_TAG_PREFIX}{alias}.history"


def _parse_history(text: str | None) -> list[str]:
    return [v for v in (text or "").split(",") if v]


def _version_ref(text: str) -> tuple[str | None, str | None]:
    """``"3"`` -> (version, None); ``"@staging"`` or ``"staging"`` -> (None, alias)."""
    text = str(text).strip()
    if text.isdigit():
        return text, None
    return None, text.lstrip("@")


class ModelRegistry:
    """The project's MLflow model registry, with alias moves serialised by a file lock."""

    def __init__(self, project_dir: Path | str, tracking_uri: str | None = None, *, lock_timeout: float = 120.0) -> None:
        from mlflow.tracking import MlflowClient

        self.project_dir = Path(project_dir).resolve()
        self.uri = tracking_uri or TrackingTarget.for_project(self.project_dir, "lightclip").uri
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.state_dir = state_dir(self.uri, self.project_dir)
        self.audit_path = self.state_dir / AUDIT_FILE
        self.lock_path = self.state_dir / LOCK_FILE
        self.lock_timeout = lock_timeout

    # -- reading -----------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def model(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            known = [m.name for m in self.client.search_registered_models()]
            raise RegistryError(f"no registered model {name!r} in {self.uri} (registered: {', '.join(known) or 'none'}; run `lightclip register`)") from None

    def versions(self, name: str) -> list["ModelVersion"]:
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted(found, key=lambda v: int(v.version))

    def aliases(self, name: str) -> dict[str, str]:
        return {alias: str(version) for alias, version in (self.model(name).aliases or {}).items()}

    def holder(self, name: str, alias: str) -> "ModelVersion | None":
        """The version at ``@alias``, or None when the alias is not set."""
        version = self.aliases(name).get(alias)
        return self.client.get_model_version(name, version) if version is not None else None

    def version(self, name: str, ref: str) -> "ModelVersion":
        """A version by number (``3``) or alias (``@staging``); errors name what exists."""
        from mlflow.exceptions import MlflowException

        number, alias = _version_ref(ref)
        if alias is not None:
            aliases = self.aliases(name)
            if alias not in aliases:
                listed = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
                raise RegistryError(f"{name}: alias @{alias} is not set (aliases: {listed})")
            number = aliases[alias]
        self.model(name)
        try:
            return self.client.get_model_version(name, str(number))
        except MlflowException:
            have = ", ".join(str(v.version) for v in self.versions(name)) or "none"
            raise RegistryError(f"{name}: no version {number} (versions: {have})") from None

    def find_by_weights(self, name: str, sha256: str) -> "ModelVersion | None":
        if not self.exists(name):
            return None
        for version in self.versions(name):
            if version.tags.get(TAG_WEIGHTS) == sha256:
                return version
        return None

    def history(self, name: str, alias: str) -> list[str]:
        return _parse_history(self.model(name).tags.get(_history_tag(alias)))

    def audit(self) -> list[dict[str, Any]]:
        """Every alias move recorded in the audit log, oldest first."""
        if not self.audit_path.is_file():
            return []
        return [json.loads(line) for line in self.audit_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- writing -----------------------------------------------------------------------------

    def ensure_model(self, name: str, description: str) -> None:
        from mlflow.exceptions import MlflowException

        if self.exists(name):
            if self.client.get_registered_model(name).description != description:
                self.client.update_registered_model(name, description=description)
            return
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by another process
            if not self.exists(name):
                raise

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any], current: Mapping[str, str] | None = None) -> None:
        """Set tags one by one (the registry has no batch call), skipping those ``current`` already has."""
        for key, value in tags.items():
            if current is None or current.get(key) != str(value):
                self.client.set_model_version_tag(name, str(version), key, str(value))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry lock: alias moves (read holder, check, move, log) happen inside it."""
        with file_lock(self.lock_path, timeout=self.lock_timeout):
            yield

    def _move_unlocked(self, name: str, alias: str, version: str, *, action: str, reason: str, gate_verdict: str | None = None,
                       history: list[str] | None = None) -> AliasMove:
        """Move ``@alias`` to ``version``; the caller holds the lock."""
        current = self.aliases(name).get(alias)
        move = AliasMove(model=name, alias=alias, from_version=current, to_version=str(version), action=action, reason=reason,
                         actor=actor(), at=now_utc(), gate=gate_verdict)
        self.client.set_registered_model_alias(name, alias, str(version))
        if history is None:
            history = self.history(name, alias)
            if current is not None and (not history or history[-1] != current):
                history.append(current)  # set outside lightclip (e.g. in the UI): still a holder to roll back to
            if not history or history[-1] != str(version):
                history.append(str(version))
        history = history[-HISTORY_LIMIT:]
        self.client.set_registered_model_tag(name, _history_tag(alias), ",".join(history))
        prefix = f"{ALIAS_TAG_PREFIX}{alias}."
        self.set_version_tags(name, str(version), {f"{prefix}moved_at": move.at, f"{prefix}moved_by": move.actor, f"{prefix}moved_from": current or "none",
                                                   f"{prefix}action": action, f"{prefix}reason": reason})
        if current is not None and current != str(version):
            self.set_version_tags(name, current, {f"{prefix}replaced_at": move.at, f"{prefix}replaced_by": f"v{version} ({action} by {move.actor})"})
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.audit_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(move.record(), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return move

    def promote(self, name: str, *, to: str, config: "PromoteConfig", version: str | None = None, source: str = "staging",
                reason: str = "", action: str = "promote") -> tuple[AliasMove | None, GateResult, "ModelVersion"]:
        """Move ``@to`` to ``version`` (default: the holder of ``@source``) if it passes the gate.

        The gate is re-checked inside the lock against the current holder of ``@to``, with the
        evidence recorded on the versions; its verdict is tagged on the candidate either way.
        Returns (the move or None when it failed or was already there, the gate, the candidate).
        """
        self.model(name)
        if version is None and source == to:
            raise RegistryError(f"promote: the source alias and the target are both @{to}; pass --version or another source")
        with self.locked():
            if version is None:
                holder = self.holder(name, source)
                if holder is None:
                    raise RegistryError(f"nothing to promote: {name} has no version at @{source} (run `lightclip register`, or pass --version)")
                version = str(holder.version)
            candidate = self.version(name, str(version))
            current = self.holder(name, to)
            incumbent = Evidence.from_tags(current.version, current.tags) if current is not None else None
            result = gate(Evidence.from_tags(candidate.version, candidate.tags), incumbent, config, alias=to)
            self.set_version_tags(name, candidate.version, result.tags(at=now_utc()))
            if not result.passed or (current is not None and str(current.version) == str(candidate.version)):
                return None, result, candidate
            why = reason or f"gate passed for @{to}"
            move = self._move_unlocked(name, to, str(candidate.version), action=action, reason=why, gate_verdict=result.verdict)
        return move, result, candidate

    def rollback(self, name: str, alias: str, *, reason: str = "") -> AliasMove:
        """Move ``@alias`` back to its previous holder (the alias history is a stack)."""
        self.model(name)
        with self.locked():
            current = self.aliases(name).get(alias)
            if current is None:
                listed = ", ".join(f"@{a}" for a in sorted(self.aliases(name))) or "none"
                raise RegistryError(f"{name}: alias @{alias} is not set, nothing to roll back (aliases: {listed})")
            history = self.history(name, alias)
            while history and history[-1] == current:
                history.pop()
            if not history:
                raise RegistryError(f"{name}: @{alias} (v{current}) has no previous holder recorded; nothing to roll back to")
            target = history[-1]
            self.version(name, target)
            return self._move_unlocked(name, alias, target, action="rollback", reason=reason or f"rollback of v{current}", history=history)


# ----------------------------------------------------------------------------------------------
# Measuring and describing a model
# ----------------------------------------------------------------------------------------------

def measure_encode_latency(model_dir: Path, *, runs: int, warmup: int, threads: int | None) -> dict[str, float]:
    """Batch-1 latency of one image + one title (tokenisation included): p50/p95 in ms.

    The gate reads ``encode_ms_p50``. Timed here, on the weights being registered, with the
    helpers of ``lightclip bench``; one thread by default, because on a busy 2-core machine
    OpenMP threads waiting for a core make batch-1 timings meaningless.
    """
    import torch

    from lightclip.bench import SAMPLE_TITLE, p50_p95_ms, time_calls
    from lightclip.models.zoo import encode_text, load_model, load_tokenizer, preprocess_config

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    size = int(preprocess_config(model)["size"])
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():

            def encode() -> None:
                model.encode_image(image, normalize=True)
                encode_text(model, tokenizer([SAMPLE_TITLE]), normalize=True)

            samples = time_calls(encode, warmup=warmup, runs=runs)
    finally:
        torch.set_num_threads(previous)
    p50, p95 = p50_p95_ms(samples)
    return {"encode_ms_p50": p50, "encode_ms_p95": p95, "runs": float(runs), "threads": float(threads or previous)}


def test_set_fingerprint(catalogue_dir: Path, split: str) -> tuple[str, int]:
    """A short hash of the evaluated split (ids, titles, image bytes) and its size.

    Two versions are compared by the gate only when they were evaluated on the same fingerprint.
    """
    from lightclip.data.catalogue import Catalogue, file_sha256

    catalogue = Catalogue.load(catalogue_dir)
    items = catalogue.split(split)
    if len(items) == 0:
        raise RegistryError(f"{catalogue.table_path}: split {split!r} has no items (evaluate.split)")
    digest = hashlib.sha256(f"lightclip-test-set/1:{split}\n".encode())
    for item_id, title, image in zip(items["id"], items["title"], items["image"]):
        digest.update(f"{item_id}\t{title}\t{file_sha256(catalogue.image_path(image))}\n".encode())
    return digest.hexdigest()[:16], len(items)


def params_hash(params: "Params") -> str:
    """sha256 (16 hex) of the whole validated params file, canonical JSON."""
    text = json.dumps(params.model_dump(by_alias=True, mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pip_requirements() -> list[str]:
    """What the pyfunc imports, pinned to the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pillow", "pandas", "pyarrow", "pydantic", "pyyaml"):
        try:
            out.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def signature(embed_dim: int) -> Any:
    """Input: ``text`` (titles) and/or ``image`` (base64 image files), one per row; output: embeddings."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from lightclip.serving import IMAGE_COLUMN, TEXT_COLUMN

    inputs = Schema([ColSpec("string", TEXT_COLUMN, required=False), ColSpec("string", IMAGE_COLUMN, required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, int(embed_dim)))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(image_size: int) -> Any:
    """Two titles and one image (a base64 PNG): the shape of a mixed request."""
    import base64
    import io

    import pandas as pd
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (image_size, image_size), (176, 32, 48))
    ImageDraw.Draw(image).rectangle([image_size // 4, image_size // 4, 3 * image_size // 4, 3 * image_size // 4], fill=(240, 220, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return pd.DataFrame({"text": ["Harbor Lane Women Red Floral Midi Dress", "Maple Row Men Navy Blue Check Shirt", None],
                         "image": [None, None, encoded]})


@contextmanager
def package_source() -> Iterator[Path]:
    """A clean copy of the ``lightclip`` package source (no caches) to ship as ``code_paths``."""
    import lightclip

    source = Path(lightclip.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="lightclip-code-") as tmp:
        target = Path(tmp) / "lightclip"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        yield target


@contextmanager
def model_files(model_dir: Path) -> Iterator[Path]:
    """The files that make the model (weights + ``model.json``) in a directory named ``model``.

    Training by-products beside them (history, prototypes) are not shipped; the stable name
    gives every logged model the same layout (``artifacts/model/``).
    """
    from lightclip.models.zoo import INFO_FILE, WEIGHTS_FILE

    with tempfile.TemporaryDirectory(prefix="lightclip-model-") as tmp:
        target = Path(tmp) / "model"
        target.mkdir()
        for name in (WEIGHTS_FILE, INFO_FILE):
            shutil.copy2(Path(model_dir) / name, target / name)
        yield target


def _describe_value(value: Any) -> str:
    """``model.json`` extras in words: a list of dicts (the distillation edges) as ``a/b x1.0, ...``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        def one(entry: dict) -> str:
            weight = entry.get("weight")
            text = "/".join(str(x) for k, x in entry.items() if x is not None and k != "weight")
            return text + (f" x{weight:g}" if isinstance(weight, (int, float)) else "")

        return ", ".join(one(v) for v in value)
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def model_card(
    *,
    name: str,
    role: str,
    info: Mapping[str, Any],
    metrics: Mapping[str, Any],
    split: str,
    speed: Mapping[str, float],
    lineage: Mapping[str, str],
    teacher: Mapping[str, Any] | None,
    file_mb: float,
    embed_dim: int,
) -> str:
    """The version description (Markdown): what it is, how it was made, how good, how fast, limits."""
    params = info.get("parameters") or {}
    extra = info.get("extra") or {}
    image = info.get("image") or {}
    tokenizer = info.get("tokenizer") or {}
    method = "; ".join(f"{k}: {_describe_value(v)}" for k, v in extra.items() if k != "teacher_sha256") or "not recorded"
    p = f"{split}/"
    lines = [
        f"# lightclip {role} `{name}` ({info.get('arch', '?')})",
        "",
        f"Text-image retrieval embedder for a product catalogue: titles and images map to one {embed_dim}-d space (cosine similarity).",
        "",
        "## Lineage",
        f"- method: {method}",
    ]
    if teacher:
        ratio = metrics.get(f"{p}mean_recall", 0.0) / teacher["mean_recall"] if teacher.get("mean_recall") else float("nan")
        lines.append(f"- teacher: `{teacher['ref']}` (test mean recall {_fmt(teacher.get('mean_recall'))}; this student reaches {ratio:.1%} of it)")
    lines += [
        f"- data: DVC hash `{lineage.get('data_hash')}` (data.dvc); {split} set `{lineage.get('test_set')}` ({int(metrics.get(f'{p}n_items', 0))} items)",
        f"- code: git `{lineage.get('git_commit')}` (dirty: {lineage.get('git_dirty')}); params hash `{lineage.get('params_hash')}`",
        f"- weights: sha256 `{lineage.get('weights_sha256')}`, {file_mb:.1f} MiB; {params.get('total', 0) / 1e6:.2f}M parameters "
        f"({params.get('non_embedding', 0) / 1e6:.2f}M non-embedding)",
        "",
        f"## Metrics ({split} split, percent)",
        "| metric | value |",
        "|---|---|",
        f"| mean recall (i2t and t2i R@1/5/10) | {_fmt(metrics.get(f'{p}mean_recall'))} |",
    ]
    for direction in ("i2t", "t2i"):
        values = [metrics.get(f"{p}{direction}_R@{k}") for k in (1, 5, 10)]
        if all(v is not None for v in values):
            lines.append(f"| {direction} R@1 / R@5 / R@10 | {' / '.join(_fmt(v, 1) for v in values)} |")
    for key in sorted(metrics):
        if key.startswith(f"{p}t2i_P@"):
            lines.append(f"| {key[len(p):]} | {_fmt(metrics[key], 1)} |")
    lines += [
        "",
        "## Speed (the registering machine)",
        f"- encode one image + one title (batch 1, tokenisation included, {int(speed.get('threads', 1))} thread(s)): "
        f"p50 {speed.get('encode_ms_p50', float('nan')):.2f} ms, p95 {speed.get('encode_ms_p95', float('nan')):.2f} ms over {int(speed.get('runs', 0))} runs",
        "",
        "## Use",
        "`mlflow.pyfunc.load_model(\"models:/<name>@staging\").predict(df)`: `df` has a `text` column (titles) and/or an `image` "
        "column (base64-encoded image files, or bytes in-process), one of the two per row; the result is a float32 array, one "
        "L2-normalised embedding per row.",
        "",
        "## Limits",
        f"- images are resized to {image.get('size', '?')} px (shortest side, centre crop): fine detail below that is invisible to the model",
        f"- titles are cut at {tokenizer.get('context_length', '?')} tokens ({tokenizer.get('name', tokenizer.get('type', '?'))} tokenizer, English)",
        f"- metrics hold for this catalogue's {split} split only (same distribution as training); other catalogues need their own evaluation",
        "- latency was measured on the machine that registered the model; it is a relative number, not a serving SLA",
        "- no evaluation of robustness, fairness or adversarial inputs",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The register stage
# ----------------------------------------------------------------------------------------------


@dataclass
class Registered:
    """One model of ``evaluate.models`` after registration."""

    name: str
    role: str
    registered_model: str
    version: str
    reused: bool
    mean_recall: float
    speed: dict[str, float]
    model_dir: str
    weights_sha256: str
    teacher_version: str | None = None
    gate: GateResult | None = None
    staged: bool = False
    card: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"registered_model": self.registered_model, "version": self.version, "reused": self.reused,
                               "role": self.role, "model_dir": self.model_dir, "mean_recall": self.mean_recall,
                               "encode_ms_p50": self.speed.get("encode_ms_p50")}
        if self.teacher_version:
            out["teacher_version"] = self.teacher_version
        if self.gate is not None:
            out.update(gate=self.gate.verdict, reasons=self.gate.reasons, staged=self.staged)
        return out


def read_eval(eval_path: Path, models: Mapping[str, str], split: str) -> dict[str, dict[str, Any]]:
    """Each model's entry of ``metrics/eval.json``; a missing file, model or metric is an error."""
    if not eval_path.is_file():
        raise RegistryError(f"{eval_path}: not found; run the evaluate stage first (`lightclip evaluate`)")
    try:
        data = json.loads(eval_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{eval_path}: not valid JSON: {exc}") from None
    out = {}
    for name, directory in models.items():
        entry = data.get(name)
        if not isinstance(entry, dict):
            raise RegistryError(f"{eval_path}: no metrics for model {name!r} (it has: {', '.join(sorted(data)) or 'none'}); "
                                f"re-run `lightclip evaluate` with {name} in evaluate.models")
        key = f"{split}/mean_recall"
        if not isinstance(entry.get(key), (int, float)):
            raise RegistryError(f"{eval_path}: model {name!r} has no {key!r} (evaluate.split is {split!r}); re-run `lightclip evaluate`")
        recorded = entry.get("model_dir")
        if recorded is not None and Path(str(recorded)) != Path(str(directory)):
            raise RegistryError(f"{eval_path}: {name!r} was evaluated from {recorded} but evaluate.models says {directory}; re-run `lightclip evaluate`")
        out[name] = entry
    return out


def _resolve_model_dirs(models: Mapping[str, str], project_dir: Path) -> dict[str, Path]:
    from lightclip.evaluation import EvaluationError, check_model_dirs

    try:
        return check_model_dirs(models, project_dir)
    except EvaluationError as exc:
        raise RegistryError(str(exc)) from None


def log_pyfunc(model_dir: Path, *, artifact_name: str, embed_dim: int, image_size: int) -> Any:
    """Log one saved model as a models-from-code pyfunc in the active run; returns MLflow's ModelInfo."""
    import mlflow

    from lightclip import serving
    from lightclip.serving import MODEL_ARTIFACT

    with package_source() as code, model_files(model_dir) as files:
        return mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=str(Path(serving.__file__).resolve()),
            artifacts={MODEL_ARTIFACT: str(files)},
            code_paths=[str(code)],
            signature=signature(embed_dim),
            input_example=input_example(image_size),
            pip_requirements=pip_requirements(),
        )


def register_one(
    registry: ModelRegistry,
    *,
    registered_name: str,
    name: str,
    role: str,
    model_dir: Path,
    eval_entry: Mapping[str, Any],
    split: str,
    speed: Mapping[str, float],
    lineage: Mapping[str, str],
    teacher: Mapping[str, Any] | None,
    run_id: str | None,
    model_description: str,
) -> Registered:
    """Log and register ``model_dir`` (or reuse the version with the same weights); tag it, describe it."""
    from lightclip.data.catalogue import file_sha256
    from lightclip.models.zoo import WEIGHTS_FILE, read_model_info
    from lightclip.serving import Embedder

    weights = model_dir / WEIGHTS_FILE
    sha = file_sha256(weights)
    info = read_model_info(model_dir)
    embedder = Embedder(model_dir)  # the embedding width and input size, whatever the architecture
    embed_dim, image_size = embedder.embed_dim, int(embedder.preprocess["size"])
    lineage = {**lineage, "weights_sha256": sha}
    metrics = {k: v for k, v in eval_entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mean_recall = float(metrics[f"{split}/mean_recall"])
    tags: dict[str, str] = {
        TAG_ROLE: role,
        TAG_CANDIDATE: name,
        TAG_MODEL_DIR: str(eval_entry.get("model_dir", model_dir)),
        TAG_WEIGHTS: sha,
        f"{TAG_PREFIX}arch": str(info.get("arch")),
        f"{TAG_PREFIX}git_commit": lineage.get("git_commit", "unknown"),
        f"{TAG_PREFIX}git_dirty": lineage.get("git_dirty", "unknown"),
        f"{TAG_PREFIX}data_hash": lineage.get("data_hash", "untracked"),
        TAG_PARAMS_HASH: lineage.get("params_hash", ""),
        TAG_TEST_SET: lineage.get("test_set", ""),
        TAG_SPLIT: split,
        TAG_MEAN_RECALL: f"{mean_recall:.6f}",
        f"{TAG_PREFIX}registered_at": now_utc(),
        f"{TAG_PREFIX}registered_by": actor(),
    }
    if run_id:
        tags[f"{TAG_PREFIX}register_run_id"] = run_id
    tags.update({f"{EVAL_TAG_PREFIX}{mlflow_metric_name(k)}": f"{v:.6g}" for k, v in metrics.items()})
    tags.update({f"{SPEED_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in speed.items()})
    if teacher:
        tags[TAG_TEACHER_VERSION] = str(teacher["ref"])
        tags[TAG_TEACHER_RECALL] = f"{float(teacher['mean_recall']):.6f}"
    card = model_card(name=name, role=role, info=info, metrics=metrics, split=split, speed=speed, lineage=lineage, teacher=teacher,
                      file_mb=weights.stat().st_size / 2**20, embed_dim=embed_dim)
    registry.ensure_model(registered_name, model_description)
    existing = registry.find_by_weights(registered_name, sha)
    if existing is not None:
        version, reused = str(existing.version), True
        keep_first = (f"{TAG_PREFIX}registered_at", f"{TAG_PREFIX}registered_by")  # when and by whom it was first registered
        registry.set_version_tags(registered_name, version, {k: v for k, v in tags.items() if k not in keep_first}, current=existing.tags)
        registry.client.update_model_version(registered_name, version, description=card)
    else:
        logged = log_pyfunc(model_dir, artifact_name=name, embed_dim=embed_dim, image_size=image_size)
        created = registry.client.create_model_version(registered_name, source=logged.model_uri, run_id=run_id, tags=tags,
                                                       description=card, model_id=logged.model_id)
        version, reused = str(created.version), False
    return Registered(name=name, role=role, registered_model=registered_name, version=version, reused=reused, mean_recall=mean_recall,
                      speed=dict(speed), model_dir=str(eval_entry.get("model_dir", model_dir)), weights_sha256=sha,
                      teacher_version=str(teacher["ref"]) if teacher else None, card=card)


STUDENT_MODEL_DESCRIPTION = (
    "lightclip students: small text-image embedders distilled from the lightclip teacher. Every version has a model card "
    "(its description), lineage and metric tags, and the promotion gate's verdict and reasons (tags `lightclip.gate.<alias>`). "
    "Aliases: `@staging` is set by the register stage when the gate passes, `@production` by "
    "`lightclip registry promote --to production`; `lightclip registry rollback --alias ...` undoes a move. Every move is "
    "recorded in the version tags `lightclip.alias.<alias>.*` and in `mlflow/registry_audit.jsonl`."
)
TEACHER_MODEL_DESCRIPTION = "lightclip teachers (FashionKLIP, knowledge-enhanced CLIP): the models the students are distilled from and gated against."


def run_register(
    params: "Params",
    *,
    project_dir: Path,
    eval_path: Path,
    catalogue_dir: Path,
    registry: ModelRegistry | None = None,
    run: Any | None = None,
    auto_promote: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ``register`` stage: register the teacher and every student, gate them, stage the best.

    Returns the report written to ``metrics/register.json``: versions, gate verdicts and reasons,
    alias holders before and after.
    """
    from lightclip.tracking import data_version, lineage_tags

    cfg, promote = params.register_, params.promote
    models = dict(params.evaluate.models)
    split = params.evaluate.split
    if cfg.teacher not in models:
        raise RegistryError(f"register.teacher {cfg.teacher!r} is not a model of evaluate.models ({', '.join(models)}); "
                            "the gate compares every student with it")
    project_dir = Path(project_dir)
    model_dirs = _resolve_model_dirs(models, project_dir)
    entries = read_eval(Path(eval_path), models, split)
    test_set, n_test = test_set_fingerprint(Path(catalogue_dir), split)
    run_tags = lineage_tags(project_dir, "register")
    lineage = {
        "git_commit": run_tags[f"{TAG_PREFIX}git_commit"],
        "git_dirty": run_tags[f"{TAG_PREFIX}git_dirty"],
        "data_hash": data_version(project_dir),
        "params_hash": params_hash(params),
        "test_set": test_set,
    }
    registry = registry or ModelRegistry(project_dir)
    run_id = getattr(run, "run_id", None)
    auto = promote.auto if auto_promote is None else auto_promote

    speeds = {}
    for name, directory in model_dirs.items():
        speeds[name] = measure_encode_latency(directory, runs=cfg.latency_runs, warmup=cfg.latency_warmup, threads=cfg.latency_threads)
        log(f"  {name}: encode p50 {speeds[name]['encode_ms_p50']:.2f} ms (image + title, batch 1)")

    teacher = register_one(registry, registered_name=cfg.teacher_model_name, name=cfg.teacher, role="teacher", model_dir=model_dirs[cfg.teacher],
                           eval_entry=entries[cfg.teacher], split=split, speed=speeds[cfg.teacher], lineage=lineage, teacher=None,
                           run_id=run_id, model_description=TEACHER_MODEL_DESCRIPTION)
    log(f"  {cfg.teacher}: {teacher.registered_model} v{teacher.version}{' (same weights: reused)' if teacher.reused else ''}")
    teacher_ref = f"{teacher.registered_model}/{teacher.version}"

    students: list[Registered] = []
    for name in models:
        if name == cfg.teacher:
            continue
        teacher_info = {"ref": teacher_ref, "mean_recall": teacher.mean_recall}
        distilled_from = (_model_extra(model_dirs[name]) or {}).get("teacher_sha256")
        if distilled_from and distilled_from != teacher.weights_sha256:
            found = registry.find_by_weights(teacher.registered_model, distilled_from)
            teacher_info["ref"] = f"{found.name}/{found.version}" if found is not None else f"unregistered (weights sha256 {distilled_from[:16]})"
        student = register_one(registry, registered_name=cfg.model_name, name=name, role="student", model_dir=model_dirs[name],
                               eval_entry=entries[name], split=split, speed=speeds[name], lineage=lineage, teacher=teacher_info,
                               run_id=run_id, model_description=STUDENT_MODEL_DESCRIPTION)
        students.append(student)
        log(f"  {name}: {student.registered_model} v{student.version}{' (same weights: reused)' if student.reused else ''}")

    staging_before = staging_after = None
    moves: list[AliasMove] = []
    if students:
        with registry.locked():  # gate and stage against one consistent @staging holder
            current = registry.holder(cfg.model_name, "staging")
            staging_before = str(current.version) if current is not None else None
            incumbent = Evidence.from_tags(current.version, current.tags) if current is not None else None
            at = now_utc()
            for student in students:
                tags = registry.client.get_model_version(cfg.model_name, student.version).tags
                student.gate = gate(Evidence.from_tags(student.version, tags), incumbent, promote, alias="staging")
                registry.set_version_tags(cfg.model_name, student.version, student.gate.tags(at=at))
                registry.client.update_model_version(cfg.model_name, student.version, description=student.card + "\n" + student.gate.markdown())
            passing = [s for s in students if s.gate is not None and s.gate.passed]
            best = max(passing, key=lambda s: (s.mean_recall, -s.speed.get("encode_ms_p50", 0.0))) if passing else None
            if best is not None and auto and best.version != staging_before:
                reason = f"register stage: gate passed ({best.name}, test mean recall {best.mean_recall:.2f})"
                moves.append(registry._move_unlocked(cfg.model_name, "staging", best.version, action="register", reason=reason, gate_verdict="pass"))
                best.staged = True
            elif best is not None and best.version == staging_before:
                best.staged = True
            for student in passing:
                if student is not best:
                    note = {f"{gate_tag('staging')}.not_staged": f"v{best.version if best else '?'} scored higher"}
                    registry.set_version_tags(cfg.model_name, student.version, note)
            if best is not None and not auto:
                registry.set_version_tags(cfg.model_name, best.version, {f"{gate_tag('staging')}.not_staged": "promote.auto is false"})
                best.staged = False
            holder = registry.holder(cfg.model_name, "staging")
            staging_after = str(holder.version) if holder is not None else None
    aliases = registry.aliases(cfg.model_name) if registry.exists(cfg.model_name) else {}
    report = {
        "model_name": cfg.model_name,
        "split": split,
        "test_set": test_set,
        "test_items": n_test,
        "data_hash": lineage["data_hash"],
        "params_hash": lineage["params_hash"],
        "git_commit": lineage["git_commit"],
        "teacher": teacher.summary(),
        "students": {s.name: s.summary() for s in students},
        "promote": {"auto": auto, **promote.model_dump(mode="json", exclude={"auto"})},
        "staging_before": staging_before,
        "staging_after": staging_after,
        "aliases": aliases,
        "moves": [m.record() for m in moves],
    }
    if run is not None:
        run.log_metrics({f"{s.name}/version": float(s.version) for s in [teacher, *students]})
        run.log_metrics({f"{s.name}/encode_ms_p50": s.speed["encode_ms_p50"] for s in [teacher, *students]})
        run.log_metrics({f"{s.name}/gate_pass": float(s.gate.passed) for s in students if s.gate is not None})
        run.set_tags({f"{TAG_PREFIX}registered.{s.name}": f"{s.registered_model}/{s.version}" for s in [teacher, *students]})
        run.set_tags({f"{TAG_PREFIX}staging": f"{cfg.model_name}/{staging_after}" if staging_after else "none"})
    return report


def _model_extra(model_dir: Path) -> dict[str, Any] | None:
    from lightclip.models.zoo import read_model_info

    return read_model_info(model_dir).get("extra")


# ----------------------------------------------------------------------------------------------
# Presenting (the `lightclip registry` commands)
# ----------------------------------------------------------------------------------------------


def format_versions(registry: ModelRegistry, name: str) -> str:
    """A table of a registered model's versions with aliases, gate verdicts, recall and latency."""
    aliases = registry.aliases(name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(f"@{alias}")
    rows = [f"{name}  (aliases: {', '.join(f'@{a}=v{v}' for a, v in sorted(aliases.items())) or 'none'})",
            f"{'version':>7}  {'aliases':<22} {'gate@staging':<12} {'gate@production':<15} {'mean_recall':>11} {'encode_ms':>9}  "
            f"{'candidate':<12} {'created (UTC)':<19}  test_set"]
    for v in registry.versions(name):
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        recall = v.tags.get(TAG_MEAN_RECALL)
        speed = v.tags.get(TAG_ENCODE_MS)
        rows.append(
            f"{v.version:>7}  {' '.join(sorted(by_version.get(str(v.version), []))) or '-':<22} "
            f"{v.tags.get(gate_tag('staging'), '-'):<12} {v.tags.get(gate_tag('production'), '-'):<15} "
            f"{float(recall) if recall else float('nan'):>11.2f} {float(speed) if speed else float('nan'):>9.2f}  "
            f"{v.tags.get(TAG_CANDIDATE, '-'):<12} {created:<19}  {v.tags.get(TAG_TEST_SET, '-')}"
        )
    return "\n".join(rows)


def format_version(registry: ModelRegistry, name: str, ref: str) -> str:
    """One version: aliases, tags (sorted) and the model card."""
    v = registry.version(name, ref)
    aliases = [f"@{a}" for a, n in registry.aliases(name).items() if n == str(v.version)]
    lines = [f"{name} v{v.version}  aliases: {' '.join(sorted(aliases)) or 'none'}  source: {v.source}", "", "tags:"]
    lines += [f"  {k} = {val}" for k, val in sorted(v.tags.items())]
    lines += ["", v.description or "(no description)"]
    return "\n".join(lines)
