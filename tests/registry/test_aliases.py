"""The alias store: promote and rollback with an audit trail, the gate re-checked under the lock,
concurrent promotions (two processes that share only the tracking URI) serialised, the lock of a
killed holder taken over after its lease, clear errors. Versions here carry only the tags the
gate reads (no logged model): the store never looks further."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lightclip.cli import main
from lightclip.config import PromoteConfig
from lightclip.errors import LightclipError
from lightclip.registry.aliases import CARD_STATUS_MARKER, INTERNAL_MODELS, ModelRegistry, RegistryError
from lightclip.registry.audit import AUDIT_MODEL, IMPORTED_FROM_TAG
from lightclip.registry.gate import Evidence, GateResult, gate
from lightclip.registry.lock import LOCK_MODEL

from .conftest import assert_moves_chain, race_promotions

STUDENT = "lightclip-student"  # register.model_name in params.yaml


def test_promote_to_production_and_rollback_with_audit_trail(project, capsys: pytest.CaptureFixture[str]):
    reg = project.registry()
    assert project.fake_version(57.0, "ts") == "1"
    move, result, candidate = reg.promote(STUDENT, to="staging", version="1", config=PromoteConfig(), reason="first candidate")
    assert result.passed and str(candidate.version) == "1" and (move.from_version, move.to_version) == (None, "1")
    assert main(["registry", "promote", "--to", "production", "--reason", "first release"]) == 0
    assert "@production: none -> v1" in capsys.readouterr().out
    assert project.fake_version(56.8, "ts") == "2"  # within 1 point of v1
    assert main(["registry", "promote", "--to", "staging", "--version", "2"]) == 0
    assert reg.aliases(STUDENT) == {"staging": "2", "production": "1"}
    assert main(["registry", "promote", "--to", "production"]) == 0  # v2 to production
    assert main(["registry", "rollback", "--alias", "production", "--reason", "complaints"]) == 0
    assert main(["registry", "rollback", "--alias", "staging"]) == 0
    assert reg.aliases(STUDENT) == {"staging": "1", "production": "1"}
    capsys.readouterr()

    # A candidate that fails the gate is refused and nothing moves.
    assert project.fake_version(40.0, "ts") == "3"  # far below the teacher
    assert main(["registry", "promote", "--to", "production", "--version", "3"]) == 1
    err = capsys.readouterr().err
    assert "fails the gate for @production (nothing moved): teacher_fraction" in err
    assert reg.version(STUDENT, "3").tags["lightclip.gate.production"] == "fail"
    assert reg.aliases(STUDENT) == {"staging": "1", "production": "1"}

    records = reg.audit()
    assert [(r["action"], r["alias"], r["from"], r["to"]) for r in records] == [
        ("promote", "staging", None, "1"),
        ("promote", "production", None, "1"),
        ("promote", "staging", "1", "2"),
        ("promote", "production", "1", "2"),
        ("rollback", "production", "2", "1"),
        ("rollback", "staging", "2", "1"),
    ]
    assert all(r["actor"] == "tester@ci" and r["at"] and r["reason"] for r in records)
    assert records[1]["reason"] == "first release" and records[4]["reason"] == "complaints"
    assert [r["gate"] for r in records] == ["pass"] * 4 + [None] * 2
    v1, v2 = reg.version(STUDENT, "1").tags, reg.version(STUDENT, "2").tags
    assert v1["lightclip.alias.production.action"] == "rollback" and v1["lightclip.alias.production.reason"] == "complaints"
    assert v2["lightclip.alias.production.replaced_by"].startswith("v1 (rollback by tester@ci")
    assert reg.model(STUDENT).tags["lightclip.alias.production.history"] == "1"

    # Nothing left to roll back to; unknown aliases and versions are named.
    assert main(["registry", "rollback", "--alias", "production"]) == 1
    assert "no previous holder recorded" in capsys.readouterr().err
    assert main(["registry", "rollback", "--alias", "canary"]) == 1
    assert "alias @canary is not set" in capsys.readouterr().err
    assert main(["registry", "show", "@canary"]) == 1
    assert "alias @canary is not set (aliases: @production (v1), @staging (v1))" in capsys.readouterr().err
    assert main(["registry", "show", "9"]) == 1
    assert "no version 9 (versions: 1, 2, 3)" in capsys.readouterr().err

    # An alias moved outside lightclip (the UI) is still a holder that rollback can return to.
    reg.client.set_registered_model_alias(STUDENT, "production", "2")
    assert main(["registry", "promote", "--to", "production", "--version", "1"]) == 0
    assert main(["registry", "rollback", "--alias", "production"]) == 0
    assert reg.aliases(STUDENT)["production"] == "2" and reg.history(STUDENT, "production") == ["1", "2"]
    # ... and the audit log records it where it was found, so each move starts where the last ended.
    tail = [(r["action"], r["from"], r["to"], r["actor"]) for r in reg.audit(STUDENT) if r["alias"] == "production"][-3:]
    assert tail == [("observed", "1", "2", "unknown (outside lightclip)"), ("promote", "2", "1", "tester@ci"), ("rollback", "1", "2", "tester@ci")]


def test_promote_errors_name_what_exists(project, capsys: pytest.CaptureFixture[str]):
    def fails(*args: str) -> str:
        assert main(list(args)) == 1
        return capsys.readouterr().err

    assert "no registered model 'lightclip-student'" in fails("registry", "promote", "--to", "production")
    project.fake_version(57.0)  # registered, but nothing at @staging
    assert "nothing to promote: lightclip-student has no version at @staging" in fails("registry", "promote", "--to", "production")
    assert "no registered model 'nope'" in fails("registry", "list", "--name", "nope")
    with pytest.raises(RegistryError, match="the source alias and the target are both @staging"):
        project.registry().promote(STUDENT, to="staging", config=PromoteConfig())


def test_check_tags_the_verdict_and_moves_nothing(project):
    reg = project.registry()
    good, bad = project.fake_version(57.0), project.fake_version(40.0)
    passed = reg.check(STUDENT, good, to="staging", config=PromoteConfig(), at="2030-01-01T00:00:00.000+00:00")
    failed = reg.check(STUDENT, bad, to="staging", config=PromoteConfig())
    assert passed.passed and [c.name for c in failed.checks if c.passed is False] == ["teacher_fraction"]
    assert reg.version(STUDENT, good).tags["lightclip.gate.staging.checked_at"] == "2030-01-01T00:00:00.000+00:00"
    assert reg.version(STUDENT, bad).tags["lightclip.gate.staging"] == "fail"
    assert reg.aliases(STUDENT) == {} and reg.audit() == []


def test_the_lock_is_reentrant_for_its_holder_and_excludes_everyone_else(project):
    reg = project.registry()
    version = project.fake_version(57.0)
    other = ModelRegistry(project.root, lock_timeout=0.2)
    entered: list[float] = []

    def same_object_other_thread() -> None:
        with reg.locked():
            entered.append(time.monotonic())

    with reg.locked():
        # The holder checks and promotes under one hold (what the register stage does).
        result = reg.check(STUDENT, version, to="staging", config=PromoteConfig())
        move, again, _ = reg.promote(STUDENT, to="staging", version=version, config=PromoteConfig(), action="register", reason="stage")
        assert result.passed and again.checks == result.checks and move.action == "register"
        # Another registry object (another process, or another user) waits for the lock.
        with pytest.raises(RegistryError, match=r"registry lock is still held after 0.2s \(by pid \d+ on \S+ \(tester@ci\)"):
            other.promote(STUDENT, to="production", version=version, config=PromoteConfig())
        # Another thread using the same object waits too.
        thread = threading.Thread(target=same_object_other_thread)
        thread.start()
        time.sleep(0.2)
        assert entered == []
        released = time.monotonic()
    thread.join(timeout=10)
    assert len(entered) == 1 and entered[0] >= released
    assert reg.aliases(STUDENT) == {"staging": version} and [r["action"] for r in reg.audit()] == ["register"]


def test_concurrent_promotions_keep_aliases_consistent_with_the_audit_log(project, tmp_path: Path):
    reg = project.registry()
    assert [project.fake_version(57.0), project.fake_version(56.8)] == ["1", "2"]  # each passes the gate against the other
    moves = race_promotions(project.uri, STUDENT, ["1", "2"], tmp_path / "machines")
    assert_moves_chain(reg, STUDENT, moves, ["1", "2"])
    # The machines shared nothing but the store: no lock or log file anywhere.
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".lock", ".jsonl")]
    assert reg.lock.holders() == []  # every ticket released


def test_the_lock_times_out_with_a_clear_error(project):
    holder, waiter = project.registry(), ModelRegistry(project.root, lock_timeout=0.2)
    with holder.locked():
        with pytest.raises(RegistryError, match=rf"{project.uri}: the registry lock is still held after 0.2s \(by pid {os.getpid()} .* ticket 1,"):
            with waiter.locked():
                pass
        assert [t.number for t in holder.lock.holders()] == [1]  # the waiter withdrew its ticket
    with waiter.locked():  # released: free at once
        pass
    assert holder.lock.holders() == []


def _hold_the_lock(uri: str, project: str, lease: float, ready) -> None:
    """A process that takes the registry lock and keeps it (renewing) until it is killed."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["LIGHTCLIP_ACTOR"] = "doomed@ci"
    reg = ModelRegistry(project, lock_lease=lease)
    reg.lock.acquire()
    ready.set()
    time.sleep(600)


def test_a_killed_holders_lock_is_taken_over_after_its_lease_not_before(project):
    lease = 1.0
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_the_lock, args=(project.uri, str(project.root), lease, ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(120)
        # Alive, it renews its ticket: still held well past its lease.
        with pytest.raises(RegistryError, match=rf"still held after 2.5s \(by pid {holder.pid} on \S+ \(doomed@ci\)"):
            with ModelRegistry(project.root, lock_timeout=2.5).locked():
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=10)
        killed = time.monotonic()
        reg = project.registry()
        version = project.fake_version(57.0)
        move, result, _ = reg.promote(STUDENT, to="staging", version=version, config=PromoteConfig())
        waited = time.monotonic() - killed
    finally:
        if holder.is_alive():
            holder.kill()
    assert result.passed and move is not None and reg.aliases(STUDENT) == {"staging": version}
    assert [(t.pid, t.holder) for t in reg.lock.taken_over] == [(str(holder.pid), "doomed@ci")]
    assert waited < lease + 5.0  # the lease, the poll and the calls; the default timeout is 120 s
    assert reg.lock.holders() == []


def test_a_holder_past_its_lease_writes_nothing(project):
    frozen = ModelRegistry(project.root, lock_lease=0.5)
    version = project.fake_version(57.0)
    with frozen.locked():
        frozen.lock._stop.set()  # its renewals stop, as when the process is frozen or cut off from the server
        frozen.lock._renewer.join(timeout=5)
        time.sleep(0.8)
        other = project.registry()
        move, _, _ = other.promote(STUDENT, to="staging", version=version, config=PromoteConfig(), reason="took over")
        assert move is not None and [t.holder for t in other.lock.taken_over] == ["tester@ci"]
        with pytest.raises(RegistryError, match="this process lost the registry lock .* nothing more is written"):
            frozen.promote(STUDENT, to="production", version=version, config=PromoteConfig())
    assert frozen.aliases(STUDENT) == {"staging": version}
    assert [(r["alias"], r["reason"]) for r in frozen.audit()] == [("staging", "took over")]


def test_the_lock_and_the_log_live_in_the_registry_not_in_files(project, capsys: pytest.CaptureFixture[str]):
    reg = project.registry()
    v1, v2 = project.fake_version(57.0), project.fake_version(56.8)
    reg.promote(STUDENT, to="staging", version=v1, config=PromoteConfig(), reason="first")
    reg.promote(STUDENT, to="staging", version=v2, config=PromoteConfig(), reason="second")
    assert not [p for p in project.root.rglob("*") if p.suffix in (".lock", ".jsonl")]
    # Another client of the store (another machine, another project directory) reads the same log.
    elsewhere = ModelRegistry(project.root / "elsewhere", tracking_uri=project.uri)
    assert [(r["seq"], r["from"], r["to"], r["reason"]) for r in elsewhere.audit(STUDENT)] == [(1, None, v1, "first"), (2, v1, v2, "second")]
    audit_versions = reg.client.search_model_versions(f"name = '{AUDIT_MODEL}'")
    assert sorted(v.tags["lightclip.audit.to"] for v in audit_versions) == [v1, v2]
    # The bookkeeping models are not offered as models.
    assert set(INTERNAL_MODELS) == {AUDIT_MODEL, LOCK_MODEL}
    assert main(["registry", "show", "@staging", "--name", "nope"]) == 1
    err = capsys.readouterr().err
    assert "registered: lightclip-student;" in err and AUDIT_MODEL not in err
    assert main(["registry", "audit", "--name", STUDENT, "--last", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"audit log: registered model {AUDIT_MODEL} in {project.uri}") and "1 of 2 move(s)" in out[0]
    assert out[1].split() [:1] == ["2"] and f"tester@ci: promote {STUDENT} @staging v{v1} -> v{v2}, gate pass: second" in out[1]


def test_a_legacy_audit_file_is_imported_first_once(project):
    legacy = project.root / "mlflow" / "registry_audit.jsonl"
    old = [{"at": "2026-01-01T00:00:00.000+00:00", "actor": "old@box", "action": "register", "model": STUDENT, "alias": "staging",
            "from": None, "to": "1", "reason": "before the registry log", "gate": "pass"}]
    legacy.write_text("".join(json.dumps(r) + "\n" for r in old))
    reg = project.registry()
    assert reg.audit() == [{**old[0], "seq": 1}]  # read from the file until the registry log exists
    assert reg.audit_location == f"{legacy} (imported into registered model {AUDIT_MODEL} at the next move)"
    version = project.fake_version(57.0)
    reg.promote(STUDENT, to="production", version=version, config=PromoteConfig(), reason="new")
    records = reg.audit()
    assert [(r["seq"], r["actor"], r["reason"]) for r in records] == [(1, "old@box", "before the registry log"), (2, "tester@ci", "new")]
    first = reg.client.get_model_version(AUDIT_MODEL, "1")
    assert first.tags[IMPORTED_FROM_TAG] == str(legacy)
    assert reg.audit_location.startswith(f"registered model {AUDIT_MODEL} in {project.uri}")
    reg.promote(STUDENT, to="staging", version=version, config=PromoteConfig())
    # Imported once; the old log put @staging at v1 but this store has none: recorded as found.
    assert [(r["seq"], r["action"], r["from"], r["to"]) for r in reg.audit()] == [
        (1, "register", None, "1"), (2, "promote", None, version), (3, "observed", "1", None), (4, "promote", None, version)]


def test_registry_error_is_a_lightclip_error_and_a_value_error():
    assert issubclass(RegistryError, LightclipError) and issubclass(RegistryError, ValueError)


# -- the model card follows the tags -----------------------------------------------------------


def assert_card_agrees_with_tags(reg: ModelRegistry, version: str, base: str) -> str:
    """Every gate verdict, check and alias state in ``version``'s tags is stated in its card, the
    card states no other, and the alias tags say what the registry's aliases are; returns the card."""
    v = reg.version(STUDENT, version)
    card, tags = v.description, v.tags
    assert card.startswith(base), "the registration-time card was lost"
    if CARD_STATUS_MARKER not in card:  # never checked nor moved: nothing to state
        assert card == base and not [k for k in tags if k.startswith(("lightclip.gate.", "lightclip.alias."))]
        return ""
    status = card.split(CARD_STATUS_MARKER, 1)[1]
    headings = [line for line in status.splitlines() if line.startswith("## Promotion gate")]
    verdicts = {k.rsplit(".", 1)[1]: val for k, val in tags.items() if k.startswith("lightclip.gate.") and k.count(".") == 2}
    assert len(headings) == len(verdicts)
    for alias, verdict in verdicts.items():
        heading = f"## Promotion gate (@{alias}): {verdict} (checked {tags[f'lightclip.gate.{alias}.checked_at']})"
        assert heading in headings, f"v{version}: {heading!r} not in the card:\n{status}"
        for check in ("teacher_fraction", "latency", "regression"):
            assert f"- {check}: {tags[f'lightclip.gate.{alias}.{check}']}" in status
    held = reg.aliases(STUDENT)
    for alias in ("staging", "production"):
        holds = tags.get(f"lightclip.alias.{alias}.holds")
        if holds is None:
            assert f"- @{alias}:" not in status
            continue
        assert (holds == "true") == (held.get(alias) == str(version)), f"v{version}: tag holds={holds} but aliases are {held}"
        if holds == "true":
            assert f"- @{alias}: held since {tags[f'lightclip.alias.{alias}.moved_at']} ({tags[f'lightclip.alias.{alias}.action']} by tester@ci" in status
        else:
            assert (f"- @{alias}: not held since {tags[f'lightclip.alias.{alias}.replaced_at']}, "
                    f"replaced by {tags[f'lightclip.alias.{alias}.replaced_by']}") in status
    return status


def test_the_card_and_the_tags_agree_after_every_promote_and_rollback(project):
    reg = project.registry()
    v1, v2 = project.fake_version(57.0, "ts"), project.fake_version(56.8, "ts")
    bases = {v: f"# lightclip student v{v}\n\nLineage, metrics and limits written at registration.\n" for v in (v1, v2)}
    for v, base in bases.items():
        reg.client.update_model_version(STUDENT, v, description=base)
    strict = PromoteConfig(max_regression=0.1)

    def agree() -> dict[str, str]:
        return {v: assert_card_agrees_with_tags(reg, v, base) for v, base in bases.items()}

    reg.promote(STUDENT, to="staging", version=v1, config=PromoteConfig(), reason="first candidate")
    assert "- @staging: held since" in agree()[v1]
    # v2 fails a strict check for @staging (56.8 < 57.0 - 0.1) ...
    assert not reg.check(STUDENT, v2, to="staging", config=strict).passed
    assert "## Promotion gate (@staging): fail" in agree()[v2]
    # ... and a later promotion under the params re-tags it pass: the card must follow.
    assert main(["registry", "promote", "--to", "staging", "--version", v2, "--reason", "within a point"]) == 0
    cards = agree()
    assert "## Promotion gate (@staging): pass" in cards[v2] and "@staging): fail" not in cards[v2]
    assert "- @staging: not held since" in cards[v1] and "replaced by v2 (promote by tester@ci)" in cards[v1]
    assert main(["registry", "promote", "--to", "production", "--reason", "release"]) == 0  # v2, from @staging
    cards = agree()
    assert "## Promotion gate (@production): pass" in cards[v2] and "(promote by tester@ci, from none: release)" in cards[v2]
    assert "@production" not in cards[v1]
    assert main(["registry", "rollback", "--alias", "production", "--reason", "complaints"]) == 1  # nothing before v2
    assert main(["registry", "promote", "--to", "production", "--version", v1]) == 0
    assert main(["registry", "rollback", "--alias", "production", "--reason", "complaints"]) == 0
    cards = agree()
    assert "- @production: held since" in cards[v2] and "(rollback by tester@ci, from v1: complaints)" in cards[v2]
    assert "- @production: not held since" in cards[v1] and "replaced by v2 (rollback by tester@ci)" in cards[v1]
    assert main(["registry", "rollback", "--alias", "staging"]) == 0
    cards = agree()
    assert "(rollback by tester@ci, from v2: rollback of v2)" in cards[v1] and "- @staging: not held since" in cards[v2]
    assert reg.aliases(STUDENT) == {"staging": v1, "production": v2}
    # `registry show` prints the card: one status section, whatever the number of moves.
    assert reg.version(STUDENT, v1).description.count(CARD_STATUS_MARKER) == 1


def test_a_gate_result_reads_back_from_its_tags():
    v1 = Evidence(version="1", mean_recall=57.0, teacher_mean_recall=60.0, encode_ms=1.0, test_set="ts")
    v2 = Evidence(version="2", mean_recall=50.0, teacher_mean_recall=60.0, encode_ms=None, test_set="other")
    for result in (gate(v1, None, PromoteConfig(), alias="staging"), gate(v2, v1, PromoteConfig(), alias="production")):
        back = GateResult.from_tags(result.alias, result.tags(at="2030-01-01T00:00:00.000+00:00"))
        assert back == replace(result, checked_at="2030-01-01T00:00:00.000+00:00") and back.verdict == result.verdict
    assert GateResult.from_tags("production", {"lightclip.gate.staging": "pass"}) is None
