"""A flow run's inputs: the catalogue it trains on and ``key=value`` params overrides (``dvc exp run -S`` semantics)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from dvc.utils.hydra import apply_overrides

from lightclip.config import ConfigError, load_params
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.io import staged_dir
from lightclip.orchestration.common import DATA_DVC_FILE, Log, OrchestrationError, PARAMS_FILE, RAW_DATA_DIR
from lightclip.orchestration.stages import run_checked, dvc_command
from lightclip.tracking import data_version


def prepare_data(project: Path, data: str | Path | None, env: Mapping[str, str], log: Log) -> str:
    """Make ``data/raw`` the catalogue to train on and return its DVC hash.

    ``data=None``: the tracked catalogue (``data.dvc``); it is restored from the DVC cache or
    remote when missing, and a ``data/raw`` that differs from ``data.dvc`` is an error (train on
    tracked data only). A directory: that catalogue replaces ``data/raw`` and is tracked
    (``dvc commit data.dvc``), exactly as the README's "your own catalogue" recipe.
    """
    project = Path(project)
    raw = project / RAW_DATA_DIR
    dvc_file = project / DATA_DVC_FILE
    if data is not None:
        source = Path(data).expanduser().resolve()
        _check_catalogue(source)
        if source != raw.resolve():
            with staged_dir(raw) as staging:
                shutil.copytree(source, staging, dirs_exist_ok=True)
            log(f"data: copied the catalogue {source} to {RAW_DATA_DIR}")
        if not dvc_file.is_file():
            dvc_file.write_text(f"outs:\n- path: {RAW_DATA_DIR}\n", encoding="utf-8")
        run_checked(dvc_command("commit", "--force", "--quiet", DATA_DVC_FILE), project, env)
        log(f"data: {DATA_DVC_FILE} now tracks it (md5 {data_version(project)})")
        return data_version(project)
    if not dvc_file.is_file():
        log(f"data: no {DATA_DVC_FILE}; the stages read {RAW_DATA_DIR} as it is")
        return data_version(project)
    if not raw.exists():
        log(f"data: {RAW_DATA_DIR} is missing; restoring it from the DVC cache or remote")
        result = subprocess.run(dvc_command("checkout", "--quiet", DATA_DVC_FILE), cwd=project, env=dict(env), capture_output=True, text=True)
        if result.returncode != 0 or not raw.exists():
            run_checked(dvc_command("pull", "--quiet", DATA_DVC_FILE), project, env)
    status = json.loads(run_checked(dvc_command("status", "--json", DATA_DVC_FILE), project, env).strip() or "{}")
    if status:
        raise OrchestrationError(
            f"{RAW_DATA_DIR} differs from {DATA_DVC_FILE} ({status}): track it with `dvc commit {DATA_DVC_FILE}` "
            f"or restore it with `dvc checkout {DATA_DVC_FILE}`, or pass the catalogue as the flow's `data`"
        )
    return data_version(project)


def _check_catalogue(source: Path) -> None:
    """A catalogue directory whose images all lie inside it (it is copied as a whole)."""
    try:
        catalogue = Catalogue.load(source)
    except (CatalogueError, FileNotFoundError, OSError) as exc:
        raise OrchestrationError(f"data: {source} is not a catalogue directory ({exc}); import it first (`lightclip data import-*`)") from None
    outside = [p for p in catalogue.image_paths() if not p.resolve().is_relative_to(source)]
    if outside:
        raise OrchestrationError(f"data: {source} points at images outside itself (e.g. {outside[0]}); import it as a self-contained catalogue first")


def parse_override_value(text: Any) -> Any:
    """A ``-S key=value`` value as DVC/Hydra reads it: YAML (``0.001``, ``true``, ``null``, ``[1, 2]``)."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def normalise_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``{"a.b": "1"}`` or ``["a.b=1"]`` -> ``{"a.b": 1}`` (values parsed as YAML)."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for entry in overrides:
            if "=" not in entry:
                raise OrchestrationError(f"params override {entry!r}: expected key=value, e.g. pretrain.train.epochs=30")
            key, value = entry.split("=", 1)
            items.append((key, value))
    result: dict[str, Any] = {}
    for key, value in items:
        key = str(key).strip()
        if not re.match(r"^[A-Za-z_][\w-]*(\.[A-Za-z_0-9][\w-]*)*$", key):
            raise OrchestrationError(f"params override key {key!r}: expected a dotted key such as pretrain.train.epochs")
        result[key] = parse_override_value(value)
    return result


def flow_yaml(value: Any) -> str:
    """``value`` as one line of YAML (flow style): an override as ``params.yaml`` and the report show it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text[: -len("\n...")].strip() if text.endswith("\n...") else text


def set_yaml_value(text: str, key: str, value: Any) -> str | None:
    """Replace the one-line value of dotted ``key`` in a block-style YAML text, keeping the rest.

    Only the value's text changes: comments, quoting and flow-style lists elsewhere stay as
    the user wrote them. Returns None when the key is not a one-line entry (a nested block),
    so the caller can fall back to DVC's own rewrite.
    """
    lines = text.splitlines(keepends=True)
    parts = key.split(".")
    start, end, parent_indent = 0, len(lines), -1
    for depth, part in enumerate(parts):
        pattern = re.compile(r"^(\s*)(['\"]?)" + re.escape(part) + r"\2\s*:(\s|$)")
        found = None
        child_indent = None
        for i in range(start, end):
            line = lines[i]
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            indent = len(line) - len(line.lstrip(" "))
            if indent <= parent_indent:
                end = i
                break
            if child_indent is None:
                child_indent = indent
            if indent != child_indent:
                continue
            if pattern.match(line):
                found = i
                break
        if found is None:
            return None
        if depth < len(parts) - 1:
            parent_indent = child_indent if child_indent is not None else 0
            block_end = len(lines)
            for j in range(found + 1, len(lines)):
                s = lines[j].strip()
                if s and not s.startswith("#") and len(lines[j]) - len(lines[j].lstrip(" ")) <= parent_indent:
                    block_end = j
                    break
            start, end = found + 1, block_end
            continue
        line = lines[found]
        match = re.match(r"^(\s*['\"]?" + re.escape(part) + r"['\"]?\s*:)([ \t]*)(.*?)(\r?\n)?$", line)
        if match is None:
            return None
        head, _, rest, newline = match.group(1), match.group(2), match.group(3), match.group(4) or ""
        old_value, comment = _split_comment(rest)
        if not old_value.strip() or old_value.strip()[0] in "|>&*!":
            return None  # a nested block, a block scalar, an anchor/alias or a tag: not ours to edit
        new_value = flow_yaml(value)
        padding = comment_pad = ""
        if comment:
            width = len(old_value)
            comment_pad = " " * max(1, width - len(new_value)) if len(new_value) < width else " "
            padding = comment_pad + comment
        lines[found] = f"{head} {new_value}{padding}{newline}"
        return "".join(lines)
    return None


def _split_comment(rest: str) -> tuple[str, str]:
    """``'0.1   # note'`` -> ``('0.1   ', '# note')``, quotes respected."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i], rest[i:]
    return rest, ""


def _get(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(key)
        data = data[part]
    return data


def apply_params_overrides(project: Path, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Apply ``key=value`` overrides to ``params.yaml`` as ``dvc exp run -S`` does; returns ``{key: (old, new)}``.

    Semantics are DVC's (in the workspace, not ``--temp``): the file is edited and stays
    edited, the stages then run on it, ``dvc.lock`` records the values, and the saved DVC
    experiment and every stage's MLflow params show them; ``git checkout params.yaml`` reverts.
    Like ``-S`` without ``+``, a key must already exist. Unlike DVC's rewrite, only the value's
    text changes (comments and layout stay), except for nested blocks, which go through DVC's
    own ``apply_overrides``. The result is validated as a whole (:func:`lightclip.config.load_params`)
    and the file is restored when it is not valid, so a bad override fails before any stage runs.
    """
    path = Path(project) / PARAMS_FILE
    original = path.read_text(encoding="utf-8")
    data = yaml.safe_load(original) or {}
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        try:
            changes[key] = (_get(data, key), value)
        except KeyError:
            raise OrchestrationError(f"params override {key!r}: no such key in {PARAMS_FILE} (like `dvc exp run -S`, an override changes an existing key)") from None
    text = original
    fallback: list[str] = []
    for key, value in overrides.items():
        edited = set_yaml_value(text, key, value)
        try:
            exact = edited is not None and _get(yaml.safe_load(edited), key) == value
        except (yaml.YAMLError, KeyError):
            exact = False  # e.g. a flow list wrapped over several lines: let DVC rewrite it
        if exact:
            text = edited
        else:
            fallback.append(f"{key}={flow_yaml(value)}")
    try:
        path.write_text(text, encoding="utf-8")
        if fallback:
            apply_overrides(str(path), fallback)
        load_params(path)
    except ConfigError as exc:
        path.write_text(original, encoding="utf-8")
        raise OrchestrationError(f"params overrides {dict(overrides)} make {PARAMS_FILE} invalid; it was left unchanged:\n{exc}") from None
    except Exception:
        path.write_text(original, encoding="utf-8")
        raise
    return changes
