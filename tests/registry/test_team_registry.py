"""The registry lock and audit log on the team deployment: two machines (separate processes with
their own empty project directories and only ``MLFLOW_TRACKING_URI``) promote against one MLflow
server on PostgreSQL at the same time; no update is lost, and the log is rows of the server's
database that every client reads the same."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from lightclip.config import PromoteConfig
from lightclip.registry import AUDIT_MODEL, LOCK_MODEL, ModelRegistry

from .conftest import assert_moves_chain, fake_versions, machine_env, race_promotions

pytestmark = pytest.mark.team

#: A machine that takes the registry lock (1 s lease), says so, and keeps it until it is killed.
HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from lightclip.registry import ModelRegistry
registry = ModelRegistry(Path(sys.argv[1]), lock_lease=1.0)
registry.lock.acquire()
Path(sys.argv[2]).touch()
time.sleep(600)
"""


def test_two_machines_promote_against_the_server_without_a_lost_update(team_services, tmp_path: Path):
    uri = team_services.env()["MLFLOW_TRACKING_URI"]
    assert uri.startswith("http://127.0.0.1:")
    name = f"lightclip-race-{uuid.uuid4().hex[:8]}"  # the server is shared by the session's tests
    registry = ModelRegistry(tmp_path / "here", tracking_uri=uri)
    versions = fake_versions(registry, name, [57.0, 56.8])  # each passes the gate against the other

    moves = race_promotions(uri, name, versions, tmp_path / "machines")
    assert_moves_chain(registry, name, moves, versions)

    # The log is the server's: rows of PostgreSQL, in the order of their version numbers.
    with psycopg.connect(team_services.postgres_dsn("mlflow")) as db:
        rows = db.execute(
            "SELECT v.version, t.value FROM model_versions v JOIN model_version_tags t ON t.name = v.name AND t.version = v.version"
            " WHERE v.name = %s AND t.key = 'lightclip.audit.record' ORDER BY v.version", (AUDIT_MODEL,)).fetchall()
        live_tickets = db.execute("SELECT count(*) FROM model_versions WHERE name = %s AND current_stage <> 'Deleted_Internal'",
                                  (LOCK_MODEL,)).fetchone()[0]
    in_db = [(version, json.loads(value)) for version, value in rows]
    ours = [(version, record) for version, record in in_db if record["model"] == name and record["alias"] == "production"]
    assert [(version, record["from"], record["to"], record["actor"]) for version, record in ours] == [
        (m["seq"], m["from"], m["to"], m["actor"]) for m in moves]
    assert [version for version, _ in in_db] == list(range(1, len(in_db) + 1))  # numbered without a gap
    assert live_tickets == 0  # every machine released the lock


def test_a_killed_machines_lock_is_taken_over_by_another_after_its_lease(team_services, tmp_path: Path):
    uri = team_services.env()["MLFLOW_TRACKING_URI"]
    name = f"lightclip-killed-{uuid.uuid4().hex[:8]}"
    registry = ModelRegistry(tmp_path / "here", tracking_uri=uri)
    (version,) = fake_versions(registry, name, [57.0])
    held = tmp_path / "held"
    doomed = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "doomed"), str(held)], cwd=tmp_path,
                              env=machine_env(uri, "doomed@machine-c"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert doomed.poll() is None, doomed.communicate()[0]
            assert time.monotonic() < deadline, "the machine did not take the lock within 120 s"
            time.sleep(0.05)
        doomed.kill()  # SIGKILL: no release, its ticket stays on the server
        doomed.wait(timeout=10)
        killed = time.monotonic()
        move, result, _ = registry.promote(name, to="staging", version=version, config=PromoteConfig())
        waited = time.monotonic() - killed
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    assert result.passed and move is not None and registry.aliases(name) == {"staging": version}
    assert [(t.pid, t.holder) for t in registry.lock.taken_over] == [(str(doomed.pid), "doomed@machine-c")]
    assert 0.5 < waited < 6.0  # its 1 s lease (on the server's clock), not the 120 s timeout
