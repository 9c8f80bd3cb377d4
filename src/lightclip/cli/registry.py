"""``lightclip registry``: list, show, promote through the gate, roll back, read the audit log."""

from __future__ import annotations

import argparse
from typing import Any

from lightclip.cli.common import CliError, _params, _project
from lightclip.config import Params


def _registry(args: argparse.Namespace) -> tuple[Params, Any, str]:
    from lightclip.registry import ModelRegistry

    params = _params(args)
    return params, ModelRegistry(_project(args)), args.name or params.register_.model_name


def cmd_registry_list(args: argparse.Namespace) -> int:
    from lightclip.registry import format_versions

    params, registry, _ = _registry(args)
    for name in [args.name] if args.name else [params.register_.model_name, params.register_.teacher_model_name]:
        if args.name is None and not registry.exists(name):
            print(f"{name}: not registered yet (run `lightclip register`)\n")
            continue
        print(format_versions(registry, name) + "\n")
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    from lightclip.registry import format_version

    _, registry, name = _registry(args)
    print(format_version(registry, name, args.ref))
    return 0


def cmd_registry_promote(args: argparse.Namespace) -> int:
    params, registry, name = _registry(args)
    move, result, candidate = registry.promote(name, to=args.to, config=params.promote, version=args.version, source=args.source, reason=args.reason or "")
    print(f"{name} v{candidate.version}: gate for @{args.to}: {result.verdict}")
    for reason in result.reasons:
        print(f"    {reason}")
    if not result.passed:
        raise CliError(f"{name} v{candidate.version} fails the gate for @{args.to} (nothing moved): " + "; ".join(result.failures))
    if move is None:
        print(f"v{candidate.version} is already at @{args.to}; nothing moved")
        return 0
    print(f"@{args.to}: {'v' + move.from_version if move.from_version else 'none'} -> v{move.to_version} by {move.actor} at {move.at}; audit log: {registry.audit_location}")
    return 0


def cmd_registry_audit(args: argparse.Namespace) -> int:
    from lightclip.registry import format_audit

    _, registry, _ = _registry(args)
    print(format_audit(registry, args.name, args.last))
    return 0


def cmd_registry_rollback(args: argparse.Namespace) -> int:
    _, registry, name = _registry(args)
    move = registry.rollback(name, args.alias.lstrip("@"), reason=args.reason or "")
    print(f"{name} @{move.alias}: v{move.from_version} -> v{move.to_version} (rollback by {move.actor} at {move.at}); audit log: {registry.audit_location}")
    return 0
