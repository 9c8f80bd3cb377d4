"""The alias store: the project's MLflow model registry, with alias moves serialised by a lock,
and the views behind ``lightclip registry list/show``.

Aliases (``@staging``, ``@production``; never the deprecated stages) move only inside
:meth:`ModelRegistry.locked`: the registry lock (:mod:`lightclip.registry.lock`, kept in the
registry, so every client of one tracking store shares it), under which the current holder is
read, the gate checked, the alias moved, both versions tagged, the alias's history kept on the
registered model (what ``rollback`` pops) and one record appended to the audit log
(:mod:`lightclip.registry.audit`, also in the registry: who, when, action, from, to, why). Two
promotions at once, from one machine or two, are serialised, so the aliases always match the end
of the audit log.

A version's model card (its description) ends in a status section regenerated from the version's
tags whenever they change here (a gate check, a move to or away from it): the gate verdicts
through :meth:`GateResult.from_tags`, the aliases through :class:`AliasState`, the same objects
that render those tags. The card and the tags cannot disagree after a promote or a rollback.

MLflow is reached only here, in :mod:`~lightclip.registry.lock` and :mod:`~lightclip.registry.audit`
(through the client this module passes them), in :mod:`lightclip.registry.packaging` (logging a
model) and in :mod:`lightclip.tracking` (runs).
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lightclip.config import PromoteConfig
from lightclip.errors import LightclipError
from lightclip.registry.audit import AUDIT_MODEL, LEGACY_FILE, AuditLog, summary
from lightclip.registry.gate import TAG_ENCODE_MS, TAG_MEAN_RECALL, TAG_TEST_SET, Evidence, GateResult, gate, gate_tag
from lightclip.registry.lock import DEFAULT_LEASE_S, LOCK_MODEL, RegistryLock, RegistryLockError
from lightclip.tracking import TAG_PREFIX, TrackingTarget

#: Registered models that hold lightclip's own bookkeeping, not models: left out of listings.
INTERNAL_MODELS = (LOCK_MODEL, AUDIT_MODEL)
ALIASES: tuple[str, ...] = ("staging", "production")
HISTORY_LIMIT = 100
ACTOR_ENV = "LIGHTCLIP_ACTOR"

TAG_WEIGHTS = f"{TAG_PREFIX}weights_sha256"  # a version's identity: registering the same weights reuses it
TAG_CANDIDATE = f"{TAG_PREFIX}candidate"  # the model's name in evaluate.models
ALIAS_TAG_PREFIX = f"{TAG_PREFIX}alias."
#: Where the status section of a model card starts: everything after it is regenerated from the tags.
CARD_STATUS_MARKER = "<!-- lightclip: registry status, regenerated from this version's tags at every gate check, promote and rollback -->"
#: A note the register stage tags on a passing student that did not get ``@staging``.
NOT_STAGED_SUFFIX = "not_staged"


class RegistryError(LightclipError, ValueError):
    """A registration or alias move that cannot be done; the message says what and why."""


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


def legacy_audit_file(tracking_uri: str) -> Path | None:
    """The audit file an older lightclip kept beside a SQLite store (imported into the registry's log once)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).parent / LEGACY_FILE
    return None


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

    def holder_tags(self) -> dict[str, str]:
        """The tags of the version that gets the alias."""
        prefix = alias_tag(self.alias)
        return {f"{prefix}.holds": "true", f"{prefix}.moved_at": self.at, f"{prefix}.moved_by": self.actor,
                f"{prefix}.moved_from": self.from_version or "none", f"{prefix}.action": self.action, f"{prefix}.reason": self.reason}

    def replaced_tags(self) -> dict[str, str]:
        """The tags of the version that loses the alias."""
        prefix = alias_tag(self.alias)
        return {f"{prefix}.holds": "false", f"{prefix}.replaced_at": self.at,
                f"{prefix}.replaced_by": f"v{self.to_version} ({self.action} by {self.actor})"}


def alias_tag(alias: str) -> str:
    """The prefix of a version's tags about ``@alias`` (``<prefix>.holds``, ``.moved_at``, ...)."""
    return f"{ALIAS_TAG_PREFIX}{alias}"


@dataclass(frozen=True)
class AliasState:
    """What a version's tags say about one alias (read back from :meth:`AliasMove.holder_tags` and
    :meth:`AliasMove.replaced_tags`), rendered as a line of the model card."""

    alias: str
    holds: bool
    moved_at: str
    moved_by: str
    moved_from: str
    action: str
    reason: str
    replaced_at: str | None
    replaced_by: str | None

    @classmethod
    def from_tags(cls, alias: str, tags: Mapping[str, str]) -> "AliasState | None":
        prefix = alias_tag(alias)
        if f"{prefix}.moved_at" not in tags:
            return None
        replaced_at = tags.get(f"{prefix}.replaced_at")
        holds = tags.get(f"{prefix}.holds", "false" if replaced_at and replaced_at >= tags[f"{prefix}.moved_at"] else "true")
        return cls(alias=alias, holds=holds == "true", moved_at=tags[f"{prefix}.moved_at"],
                   moved_by=tags.get(f"{prefix}.moved_by", "?"), moved_from=tags.get(f"{prefix}.moved_from", "none"),
                   action=tags.get(f"{prefix}.action", "?"), reason=tags.get(f"{prefix}.reason", ""),
                   replaced_at=replaced_at, replaced_by=tags.get(f"{prefix}.replaced_by"))

    def markdown(self) -> str:
        got = f"{self.moved_at} ({self.action} by {self.moved_by}, from {_as_version(self.moved_from)}: {self.reason})"
        if self.holds:
            return f"- @{self.alias}: held since {got}"
        return f"- @{self.alias}: not held since {self.replaced_at}, replaced by {self.replaced_by}; held from {got}"


def _as_version(text: str) -> str:
    return f"v{text}" if text.isdigit() else text


def card_aliases(tags: Mapping[str, str]) -> list[str]:
    """Every alias a version's tags mention (``@staging``, ``@production`` first)."""
    found = {key[len(ALIAS_TAG_PREFIX) :].split(".", 1)[0] for key in tags if key.startswith(ALIAS_TAG_PREFIX)}
    found |= {key[len(gate_tag("")) :].split(".", 1)[0] for key in tags if key.startswith(gate_tag(""))}
    return [a for a in ALIASES if a in found] + sorted(found - set(ALIASES))


def card_status(tags: Mapping[str, str]) -> str:
    """The model card's status section, from the version's tags only: aliases, then gate verdicts."""
    aliases = card_aliases(tags)
    states = [s for s in (AliasState.from_tags(a, tags) for a in aliases) if s is not None]
    lines = ["## Aliases"] + ([s.markdown() for s in states] or ["- none: this version never held an alias"])
    for alias in aliases:
        result = GateResult.from_tags(alias, tags)
        if result is not None:
            lines += ["", result.markdown().rstrip("\n")]
            note = tags.get(f"{gate_tag(alias)}.{NOT_STAGED_SUFFIX}")
            if note:
                lines.append(f"- not given @{alias}: {note}")
    return "\n".join(lines) + "\n"


def card_with_status(description: str | None, tags: Mapping[str, str]) -> str:
    """``description`` with its status section replaced by the one ``tags`` give."""
    base = (description or "").split(CARD_STATUS_MARKER, 1)[0]
    if CARD_STATUS_MARKER not in (description or "") and "\n## Promotion gate (@" in base:  # a card written before the marker
        base = base.split("\n## Promotion gate (@", 1)[0]
    return f"{base.rstrip()}\n\n{CARD_STATUS_MARKER}\n{card_status(tags)}"


def history_tag(alias: str) -> str:
    """The registered-model tag holding ``@alias``'s past holders, oldest first (comma-separated)."""
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
    """The project's MLflow model registry, with alias moves serialised by the registry lock."""

    def __init__(self, project_dir: Path | str, tracking_uri: str | None = None, *, lock_timeout: float = 120.0,
                 lock_lease: float = DEFAULT_LEASE_S) -> None:
        self.project_dir = Path(project_dir).resolve()
        self.uri = tracking_uri or TrackingTarget.for_project(self.project_dir, "lightclip").uri
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.audit_log = AuditLog(self.client, legacy_file=legacy_audit_file(self.uri))
        self.lock = RegistryLock(self.client, where=self.uri, actor=actor(), lease_s=lock_lease, timeout_s=lock_timeout)
        self._lock_guard = threading.RLock()
        self._lock_depth = 0

    @property
    def audit_location(self) -> str:
        """Where the audit log is, for a message: the registered model and the store (or, before
        the first move of this version, the old file it is read from)."""
        legacy = self.audit_log.legacy_file
        if legacy is not None and legacy.is_file() and not self.audit_log.exists():
            return f"{legacy} (imported into registered model {AUDIT_MODEL} at the next move)"
        return f"registered model {AUDIT_MODEL} in {self.uri} (`lightclip registry audit`)"

    # -- reading -----------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def model(self, name: str) -> RegisteredModel:
        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            known = [m.name for m in self.client.search_registered_models() if m.name not in INTERNAL_MODELS]
            raise RegistryError(f"no registered model {name!r} in {self.uri} (registered: {', '.join(known) or 'none'}; run `lightclip register`)") from None

    def versions(self, name: str) -> list[ModelVersion]:
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted(found, key=lambda v: int(v.version))

    def aliases(self, name: str) -> dict[str, str]:
        return {alias: str(version) for alias, version in (self.model(name).aliases or {}).items()}

    def holder(self, name: str, alias: str) -> ModelVersion | None:
        """The version at ``@alias``, or None when the alias is not set."""
        version = self.aliases(name).get(alias)
        return self.client.get_model_version(name, version) if version is not None else None

    def version(self, name: str, ref: str) -> ModelVersion:
        """A version by number (``3``) or alias (``@staging``); errors name what exists."""
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

    def find_by_weights(self, name: str, sha256: str) -> ModelVersion | None:
        if not self.exists(name):
            return None
        for version in self.versions(name):
            if version.tags.get(TAG_WEIGHTS) == sha256:
                return version
        return None

    def history(self, name: str, alias: str) -> list[str]:
        return _parse_history(self.model(name).tags.get(history_tag(alias)))

    def audit(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every alias move recorded in the audit log (of model ``name`` when given), oldest first,
        each with its number in the log (``seq``)."""
        return self.audit_log.records(name)

    # -- writing -----------------------------------------------------------------------------

    def ensure_model(self, name: str, description: str) -> None:
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
        """Hold the registry lock: alias moves (read holder, check, move, log) happen inside it.

        Re-entrant within one thread, so a caller can hold it around several :meth:`check` calls
        and a :meth:`promote` that must all see the same alias holders.
        """
        with self._lock_guard:  # other threads of this process wait here; this thread re-enters
            outermost = self._lock_depth == 0
            with self._hold() if outermost else nullcontext():
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1

    @contextmanager
    def _hold(self) -> Iterator[None]:
        try:
            self.lock.acquire()
        except RegistryLockError as exc:
            raise RegistryError(str(exc)) from None
        try:
            yield
        finally:
            self.lock.release()

    def refresh_card(self, name: str, version: str) -> str:
        """Regenerate the status section of ``version``'s model card from its tags; returns the card."""
        with self.locked():
            current = self.client.get_model_version(name, str(version))
            card = card_with_status(current.description, current.tags)
            if card != current.description:
                self.client.update_model_version(name, str(version), description=card)
        return card

    def tag_version(self, name: str, version: str, tags: Mapping[str, Any], *, drop: tuple[str, ...] = ()) -> None:
        """Set ``tags`` on ``version`` (deleting those in ``drop`` it has) and regenerate its card's status section."""
        with self.locked():
            current = self.client.get_model_version(name, str(version)).tags
            for key in drop:
                if key in current:
                    self.client.delete_model_version_tag(name, str(version), key)
            self.set_version_tags(name, version, tags, current=current)
            self.refresh_card(name, version)

    def check(self, name: str, version: str, *, to: str, config: PromoteConfig, at: str | None = None) -> GateResult:
        """Gate ``version`` for ``@to`` against the alias's current holder; tag the verdict on it
        and regenerate its card's status section.

        The evidence is what is recorded on both versions. Checked under the lock; hold
        :meth:`locked` around a check and the move that relies on it.
        """
        with self.locked():
            candidate = self.version(name, str(version))
            current = self.holder(name, to)
            incumbent = Evidence.from_tags(current.version, current.tags) if current is not None else None
            result = gate(Evidence.from_tags(candidate.version, candidate.tags), incumbent, config, alias=to)
            # a new verdict supersedes the register stage's note on the last one
            self.tag_version(name, candidate.version, result.tags(at=at or now_utc()), drop=(f"{gate_tag(to)}.{NOT_STAGED_SUFFIX}",))
        return result

    def promote(self, name: str, *, to: str, config: PromoteConfig, version: str | None = None, source: str = "staging",
                reason: str = "", action: str = "promote") -> tuple[AliasMove | None, GateResult, ModelVersion]:
        """Move ``@to`` to ``version`` (default: the holder of ``@source``) if it passes the gate.

        The gate is re-checked inside the lock against the current holder of ``@to``, with the
        evidence recorded on the versions; its verdict is tagged on the candidate either way.
        ``action`` names the move in the audit log (``promote``; the register stage: ``register``).
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
            result = self.check(name, candidate.version, to=to, config=config)
            if not result.passed or self.aliases(name).get(to) == str(candidate.version):
                return None, result, candidate
            why = reason or f"gate passed for @{to}"
            move = self._move(name, to, str(candidate.version), action=action, reason=why, gate_verdict=result.verdict)
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
            return self._move(name, alias, target, action="rollback", reason=reason or f"rollback of v{current}", history=history)

    def _record_outside_move(self, name: str, alias: str, current: str | None) -> None:
        """When ``@alias`` is not where the audit log last put it (moved in the UI, or by a process
        killed between its alias write and its record), log what is found first, as ``observed``:
        the log stays complete and each move still starts where the one before ended. Under the lock."""
        last = self.audit_log.last(name, alias)
        logged = last.get("to") if last is not None else None
        if logged == current or (last is None and current is None):
            return
        found = AliasMove(model=name, alias=alias, from_version=logged, to_version=current or "none", action="observed",
                          reason=f"@{alias} found at {'v' + current if current else 'no version'} when moving it: set outside lightclip",
                          actor="unknown (outside lightclip)", at=now_utc())
        self.audit_log.append({**found.record(), "to": current})  # None: the alias was found unset

    def _move(self, name: str, alias: str, version: str, *, action: str, reason: str, gate_verdict: str | None = None,
              history: list[str] | None = None) -> AliasMove:
        """Move ``@alias`` to ``version``: alias, history, both versions' tags and cards, audit line. Under the lock."""
        with self.locked():
            try:
                self.lock.ensure_held()  # a holder whose lease ran out writes nothing
            except RegistryLockError as exc:
                raise RegistryError(str(exc)) from None
            current = self.aliases(name).get(alias)
            self._record_outside_move(name, alias, current)
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
            self.client.set_registered_model_tag(name, history_tag(alias), ",".join(history))
            self.tag_version(name, str(version), move.holder_tags(), drop=(f"{gate_tag(alias)}.{NOT_STAGED_SUFFIX}",))
            if current is not None and current != str(version):
                self.tag_version(name, current, move.replaced_tags())
            self.audit_log.append(move.record())
        return move


# ----------------------------------------------------------------------------------------------
# The views behind `lightclip registry list/show` (beside the store: they need nothing else, so
# those commands never import torch)
# ----------------------------------------------------------------------------------------------


def format_versions(registry: ModelRegistry, name: str) -> str:
    """A table of a registered model's versions with aliases, gate verdicts, recall and latency."""
    aliases = registry.aliases(name)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(f"@{alias}")
    rows = [f"{name}  (aliases: {', '.join(f'@{a}=v{v}' for a, v in sorted(aliases.items())) or 'none'})",
            f"{'version':>7}  {'aliases':<22} {'gate@staging':<12} {'gate@production':<15} {'mean_recall':>11} {'of teacher [interval]':<22} {'encode_ms':>9}  "
            f"{'candidate':<12} {'created (UTC)':<19}  test_set"]
    for v in registry.versions(name):
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        recall = v.tags.get(TAG_MEAN_RECALL)
        speed = v.tags.get(TAG_ENCODE_MS)
        rows.append(
            f"{v.version:>7}  {' '.join(sorted(by_version.get(str(v.version), []))) or '-':<22} "
            f"{v.tags.get(gate_tag('staging'), '-'):<12} {v.tags.get(gate_tag('production'), '-'):<15} "
            f"{float(recall) if recall else float('nan'):>11.2f} {_of_teacher(v.tags):<22} {float(speed) if speed else float('nan'):>9.2f}  "
            f"{v.tags.get(TAG_CANDIDATE, '-'):<12} {created:<19}  {v.tags.get(TAG_TEST_SET, '-')}"
        )
    return "\n".join(rows)


def _of_teacher(tags: Mapping[str, str]) -> str:
    """A student's mean recall as a fraction of its teacher's, with the gate's interval when recorded."""
    evidence = Evidence.from_tags("?", tags)
    if evidence.mean_recall is None or not evidence.teacher_mean_recall:
        return "-"
    text = f"{evidence.mean_recall / evidence.teacher_mean_recall:.1%}"
    if evidence.fraction_low is not None and evidence.fraction_high is not None:
        text += f" [{100 * evidence.fraction_low:.1f}, {100 * evidence.fraction_high:.1f}]"
    return text


def format_version(registry: ModelRegistry, name: str, ref: str) -> str:
    """One version: aliases, tags (sorted) and the model card."""
    v = registry.version(name, ref)
    aliases = [f"@{a}" for a, n in registry.aliases(name).items() if n == str(v.version)]
    lines = [f"{name} v{v.version}  aliases: {' '.join(sorted(aliases)) or 'none'}  source: {v.source}", "", "tags:"]
    lines += [f"  {k} = {val}" for k, val in sorted(v.tags.items())]
    lines += ["", v.description or "(no description)"]
    return "\n".join(lines)


def format_audit(registry: ModelRegistry, name: str | None = None, last: int | None = None) -> str:
    """The audit log, one move a line, oldest first (of model ``name`` only, the ``last`` N only, when given)."""
    records = registry.audit(name)
    shown = records[-last:] if last else records
    rows = [f"audit log: {registry.audit_location}; {len(shown)} of {len(records)} move(s)"]
    rows += [f"{r['seq']:>5}  {summary(r)}" for r in shown]
    return "\n".join(rows)
