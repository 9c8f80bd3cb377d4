"""The audit log of alias moves, kept in the model registry itself so that every client of one
tracking store sees the same log (a file beside a local store is seen by one machine only).

Each move is one version of the registered model :data:`AUDIT_MODEL`. The store numbers
versions one after another inside one transaction, so the version number is the record's place
in the log: ordered and gap-free without any help from the writers (who also hold the registry
lock while they move an alias and append). A version carries the whole record as JSON in the tag
``lightclip.audit.record`` (what :meth:`AuditLog.records` reads back), each field as its own tag
(``lightclip.audit.alias``, ``...to``: searchable, shown in the UI) and a one-line summary as its
description. Nothing in it is ever deleted or rewritten by lightclip.

A project that kept its log in ``registry_audit.jsonl`` beside a SQLite store has those lines
imported, in order, as the first records when the registry log is created (tagged
``lightclip.audit.imported_from``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

AUDIT_MODEL = "lightclip-registry-audit"
#: A model version source the server accepts (absolute, no relative parts) and that points nowhere.
AUDIT_SOURCE = "lightclip:/registry-audit"
AUDIT_DESCRIPTION = ("lightclip's audit log of alias moves (register, promote, rollback): version N is the N-th move. "
                     "Read it with `lightclip registry audit`. Do not edit.")
TAG_PREFIX = "lightclip.audit."
RECORD_TAG = f"{TAG_PREFIX}record"
IMPORTED_FROM_TAG = f"{TAG_PREFIX}imported_from"
#: The legacy file an older lightclip appended to, beside a SQLite store.
LEGACY_FILE = "registry_audit.jsonl"
DESCRIPTION_LIMIT = 5000  # the store's column


def summary(record: Mapping[str, Any]) -> str:
    """One line: when, who, what, from where to where, why."""
    origin, target = (f"v{record[key]}" if record.get(key) not in (None, "none") else "none" for key in ("from", "to"))
    gate = f", gate {record['gate']}" if record.get("gate") else ""
    return (f"{record.get('at', '?')} {record.get('actor', '?')}: {record.get('action', '?')} {record.get('model', '?')} "
            f"@{record.get('alias', '?')} {origin} -> {target}{gate}: {record.get('reason', '')}")


class AuditLog:
    """The append-only log of alias moves in ``client``'s registry."""

    def __init__(self, client: MlflowClient, *, name: str = AUDIT_MODEL, legacy_file: Path | None = None) -> None:
        self.client = client
        self.name = name
        self.legacy_file = legacy_file

    def exists(self) -> bool:
        try:
            self.client.get_registered_model(self.name)
            return True
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _create(self) -> None:
        """Create the log, importing the legacy file's lines first. Call it under the registry lock."""
        try:
            self.client.create_registered_model(self.name, description=AUDIT_DESCRIPTION)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return
        for record in self._legacy_records():
            self._write(record, extra_tags={IMPORTED_FROM_TAG: str(self.legacy_file)})

    def _legacy_records(self) -> list[dict[str, Any]]:
        if self.legacy_file is None or not self.legacy_file.is_file():
            return []
        lines = self.legacy_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _write(self, record: Mapping[str, Any], extra_tags: Mapping[str, str] | None = None) -> int:
        tags = {f"{TAG_PREFIX}{key}": "none" if value is None else str(value) for key, value in record.items()}
        tags[RECORD_TAG] = json.dumps(dict(record), sort_keys=True)
        tags.update(extra_tags or {})
        version = self.client.create_model_version(self.name, source=AUDIT_SOURCE, tags=tags,
                                                   description=summary(record)[:DESCRIPTION_LIMIT], await_creation_for=0)
        return int(version.version)

    def append(self, record: Mapping[str, Any]) -> int:
        """Append one record; returns its number in the log (1, 2, ...)."""
        if not self.exists():
            self._create()
        return self._write(record)

    def last(self, model: str, alias: str) -> dict[str, Any] | None:
        """The latest record of ``model``'s ``@alias`` (one search call), or None when there is none."""
        if not self.exists():
            found = [r for r in self._legacy_records() if r.get("model") == model and r.get("alias") == alias]
            return found[-1] if found else None
        query = (f"name = '{self.name}' AND tags.`{TAG_PREFIX}model` = '{model}' AND tags.`{TAG_PREFIX}alias` = '{alias}'")
        latest = self.client.search_model_versions(query, order_by=["version_number DESC"], max_results=1)
        return {**json.loads(latest[0].tags[RECORD_TAG]), "seq": int(latest[0].version)} if latest else None

    def records(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every record, oldest first (of ``model`` only when given), each with its number ``seq``."""
        if not self.exists():
            found = [{**r, "seq": i} for i, r in enumerate(self._legacy_records(), start=1)]
            return [r for r in found if model is None or r.get("model") == model]
        versions, token = [], None
        while True:
            page = self.client.search_model_versions(f"name = '{self.name}'", page_token=token)
            versions.extend(page)
            token = page.token
            if not token:
                break
        out = []
        for version in sorted(versions, key=lambda v: int(v.version)):
            record = json.loads(version.tags[RECORD_TAG])
            if model is None or record.get("model") == model:
                out.append({**record, "seq": int(version.version)})
        return out
