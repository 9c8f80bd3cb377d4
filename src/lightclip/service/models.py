"""Which weights the service serves: a model reference resolved to a local model directory.

A reference is a registered model at an alias (``lightclip-student@production``), a registered
version (``lightclip-student/3``; a ``models:/`` prefix is accepted) or a saved model directory.
A registered version is downloaded once into ``.cache/serve/models/<name>/v<version>`` and its
``model.safetensors`` must hash to the version's ``lightclip.weights_sha256`` tag: a download that
does not is refused, never served. ``@production`` falls back to ``@staging`` (with a warning)
while production is unset, and the watcher keeps preferring production, so the first promotion
to production is picked up by the hot swap.

MLflow is reached here (artifact download) and through :class:`lightclip.registry.ModelRegistry`
(aliases, versions), nowhere else in the service.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts

from lightclip.errors import LightclipError
from lightclip.models.zoo import INFO_FILE, WEIGHTS_FILE, weights_sha256
from lightclip.registry.aliases import TAG_WEIGHTS, ModelRegistry, RegistryError
from lightclip.serving import MODEL_ARTIFACT

log = logging.getLogger(__name__)

#: An alias that falls back to another while it is unset.
FALLBACK_ALIASES: dict[str, str] = {"production": "staging"}
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


class ModelRefError(LightclipError, ValueError):
    """A model reference that cannot be parsed, resolved or downloaded; the message says which."""


@dataclass(frozen=True)
class ModelRef:
    """What ``serve.model`` / ``--model`` names: a directory, or a registered name with an alias or a version."""

    text: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str, project_dir: Path) -> "ModelRef":
        raw = str(text).strip()
        candidate = Path(raw) if Path(raw).is_absolute() else Path(project_dir) / raw
        if (candidate / WEIGHTS_FILE).is_file():
            return cls(text=raw, path=candidate.resolve())
        body = raw.removeprefix("models:/")
        if m := re.fullmatch(rf"({_NAME})@([A-Za-z0-9_-]+)", body):
            return cls(text=raw, name=m.group(1), alias=m.group(2))
        if m := re.fullmatch(rf"({_NAME})/([0-9]+)", body):
            return cls(text=raw, name=m.group(1), version=m.group(2))
        raise ModelRefError(
            f"model {raw!r}: not a model directory (no {WEIGHTS_FILE} in {candidate}) nor a registered model reference; "
            "use NAME@ALIAS (lightclip-student@production), NAME/VERSION (lightclip-student/3) or a directory"
        )

    @property
    def watched(self) -> bool:
        """Whether the reference can move (an alias), so the service polls it."""
        return self.alias is not None


@dataclass(frozen=True)
class ResolvedModel:
    """One concrete model: a local directory whose weights hash to ``weights_sha256``."""

    label: str  # what the page and /metrics show: "lightclip-student v3 (@production)" or the directory
    version: str  # the registry version, or "local"
    model_dir: Path
    weights_sha256: str
    alias: str | None = None


class ModelResolver:
    """Turns a :class:`ModelRef` into the version it names now, and downloads versions once."""

    def __init__(self, ref: ModelRef, cache_dir: Path, registry: ModelRegistry | None = None) -> None:
        self.ref = ref
        self.cache_dir = Path(cache_dir)
        self.registry = registry
        self._warned: str | None = None
        if ref.path is None and registry is None:
            raise ModelRefError(f"model {ref.text!r} is a registered model but no registry was given")

    def current_version(self) -> tuple[str, str | None]:
        """(version, alias it was found at) the reference names now; warns on the production -> staging fallback."""
        ref, registry = self.ref, self.registry
        if ref.path is not None:
            return "local", None
        assert registry is not None and ref.name is not None
        if ref.version is not None:
            return ref.version, None
        try:
            aliases = registry.aliases(ref.name)
        except RegistryError as exc:
            raise ModelRefError(str(exc)) from None
        alias = ref.alias or ""
        if alias in aliases:
            return aliases[alias], alias
        fallback = FALLBACK_ALIASES.get(alias)
        if fallback is not None and fallback in aliases:
            if self._warned != aliases[fallback]:  # once per fallback version, not at every poll
                log.warning("%s: @%s is not set; serving @%s (v%s) until it is", ref.name, alias, fallback, aliases[fallback])
                self._warned = aliases[fallback]
            return aliases[fallback], fallback
        listed = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        raise ModelRefError(f"{ref.name}: alias @{alias} is not set" + (f" and neither is @{fallback}" if fallback else "") + f" (aliases: {listed})")

    def resolve(self, version: str | None = None, alias: str | None = None) -> ResolvedModel:
        """The model at ``version`` (default: what the reference names now), local and verified."""
        ref = self.ref
        if ref.path is not None:
            return ResolvedModel(label=str(ref.path), version="local", model_dir=ref.path, weights_sha256=weights_sha256(ref.path))
        if version is None:
            version, alias = self.current_version()
        assert self.registry is not None and ref.name is not None
        try:
            mv = self.registry.version(ref.name, version)
        except RegistryError as exc:
            raise ModelRefError(str(exc)) from None
        expected = (mv.tags or {}).get(TAG_WEIGHTS)
        if not expected:
            raise ModelRefError(f"{ref.name} v{version}: no {TAG_WEIGHTS} tag, so its weights cannot be checked; re-register it (lightclip register)")
        try:  # the artifact store's own URI: a models:/ source would be looked up in the default registry, not ours
            source = str(self.registry.client.get_model_version_download_uri(ref.name, str(version)))
        except Exception:  # noqa: BLE001 - MLflow raises several types; the source is the fallback
            source = str(mv.source)
        model_dir = self._download(ref.name, str(version), source, expected)
        label = f"{ref.name} v{version}" + (f" (@{alias})" if alias else "")
        return ResolvedModel(label=label, version=str(version), model_dir=model_dir, weights_sha256=expected, alias=alias)

    def _download(self, name: str, version: str, source: str, expected: str) -> Path:
        target = self.cache_dir / name / f"v{version}"
        model_dir = target / "artifacts" / MODEL_ARTIFACT
        if (model_dir / WEIGHTS_FILE).is_file() and _sha_or_none(model_dir) == expected:
            return model_dir
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        assert self.registry is not None
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=self.registry.uri)
        except Exception as exc:  # MLflow raises several types for a missing or unreadable artifact
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelRefError(f"{name} v{version}: cannot download {source}: {str(exc).splitlines()[0]}") from None
        downloaded = next((p.parent for p in staging.rglob(INFO_FILE) if p.parent.name == MODEL_ARTIFACT), None)
        if downloaded is None:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelRefError(f"{name} v{version}: {source} holds no '{MODEL_ARTIFACT}' artifact with {INFO_FILE} (not a lightclip model)")
        got = _sha_or_none(downloaded)
        if got != expected:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelRefError(f"{name} v{version}: the downloaded weights hash to {str(got)[:12]}... but the version records "
                                f"{expected[:12]}...; refusing to serve them")
        shutil.rmtree(target, ignore_errors=True)
        if downloaded.parent.parent != staging:  # normalise the layout to <target>/artifacts/model
            final = staging / "artifacts" / MODEL_ARTIFACT
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(downloaded), str(final))
        staging.rename(target)
        return model_dir


def _sha_or_none(model_dir: Path) -> str | None:
    try:
        return weights_sha256(model_dir)
    except LightclipError:
        return None
