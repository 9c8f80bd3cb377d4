"""Tracking under faults: a store that does not answer or is locked fails the stage in seconds with
one line naming it, and no run is ever left RUNNING (exceptions, SIGINT, SIGTERM, SIGKILL).

Every fault is real: a closed port and a silent listening socket on 127.0.0.1, a SQLite file
locked by another process with ``BEGIN EXCLUSIVE``, signals sent to real stage processes."""

from __future__ import annotations

import http.server
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import mlflow
import pytest

from conftest import sigint_as_default
import requests

from lightclip.cli import main
from lightclip.config import TrackingConfig
from lightclip.orchestration import stage_env
from lightclip.tracking import (
    TAG_CLOSED_STALE,
    TAG_HOST,
    TAG_PID,
    TAG_STALE_CLOSED_COUNT,
    StageInterrupted,
    StageRun,
    TrackingUnavailable,
    default_tracking_uri,
    outage_window_seconds,
    pipeline_run,
    process_alive,
    process_start,
    process_tags,
    stage_run,
    sqlite_write_lock_free,
)

EXPERIMENT = "faults"
FAST = TrackingConfig(experiment=EXPERIMENT, timeout_seconds=1, retries=1)
PARAMS = f"tracking:\n  experiment: {EXPERIMENT}\n  timeout_seconds: 1\n  retries: 1\n"

#: A stage run through the real CLI wrapper that says it is ready, then waits (at most 60 s) for a signal.
SLEEPER = """\
import argparse, time
import mlflow
from lightclip.cli.common import _stage
from lightclip.env import configure_environment

configure_environment()

def call(context):
    print("ready", mlflow.active_run().info.run_id, flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {}

_stage(argparse.Namespace(params="params.yaml", project=None, quiet=True, command="sleeper"), "sleeper", {}, call)
"""

#: A one-stage DVC pipeline whose stage is the sleeper above.
SLEEPER_PIPELINE = "stages:\n  sleep:\n    cmd: python sleeper.py\n    outs: [out.txt]\n"

#: Holds SQLite's exclusive lock on argv[1] until its stdin closes (another process, as in real life).
LOCK_HOLDER = """\
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, projects) -> Path:
    return projects.enter(projects.create(tmp_path / "proj", PARAMS), monkeypatch)


def client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=default_tracking_uri(project))


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of ``process``, waiting at most ``timeout`` s."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            raise AssertionError(f"no output within {timeout} s; stderr: {process.stderr.read()}")
    return process.stdout.readline().strip()


def start_sleeper(project: Path) -> tuple[subprocess.Popen, str]:
    """A stage process in ``project`` and its run id, once its run is open."""
    process = subprocess.Popen([sys.executable, "-c", SLEEPER], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=sigint_as_default)
    line = read_line(process, timeout=60)
    assert line.startswith("ready "), line
    return process, line.split()[1]


@pytest.fixture
def locked(project: Path) -> Iterator[callable]:
    """``locked()`` starts a process holding the store's exclusive lock and returns its release function."""
    holders: list[subprocess.Popen] = []

    def lock() -> callable:
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(project / "mlflow" / "mlflow.db")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        holders.append(holder)
        assert read_line(holder, timeout=30) == "locked"

        def release() -> None:
            holder.stdin.close()
            holder.wait(timeout=10)

        return release

    yield lock
    for holder in holders:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- a store that does not answer --------------------------------------------------------------


def test_closed_port_fails_in_seconds_with_one_line_naming_the_uri(project: Path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    assert main(["-q", "data", "synth", "--out", str(project / "out")]) == 1
    elapsed = time.monotonic() - started
    err = one_line_error(capsys)
    assert f"tracking store {uri} does not answer" in err and "2 attempt(s), 1 s timeout each" in err
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (project / "out").exists(), "the stage ran although its run could not be opened"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


def test_a_server_that_accepts_but_never_answers_times_out(project: Path, monkeypatch):
    with socket.socket() as silent:  # the kernel completes the TCP handshake; nobody ever reads or replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=rf"tracking store {uri} does not answer: .*(timed out|no answer within 1 s)"):
            with stage_run("split", {}, project_dir=project, experiment=EXPERIMENT, settings=TrackingConfig(timeout_seconds=1, retries=0)):
                pytest.fail("the stage body ran")
        assert time.monotonic() - started < 8


# -- a locked SQLite store ---------------------------------------------------------------------


def test_a_locked_store_refuses_the_stage_before_it_writes_anything(project: Path, locked, capsys):
    with stage_run("first", {}, project_dir=project, experiment=EXPERIMENT, settings=FAST):
        pass  # creates the store and the experiment
    capsys.readouterr()
    release = locked()
    try:
        assert not sqlite_write_lock_free(project / "mlflow" / "mlflow.db", timeout=0.2)
        started = time.monotonic()
        assert main(["-q", "data", "synth", "--out", str(project / "out")]) == 1
        elapsed = time.monotonic() - started
    finally:
        release()
    err = one_line_error(capsys)
    assert f"tracking store {default_tracking_uri(project)} is locked" in err and "1 s (tracking.timeout_seconds)" in err
    assert elapsed < 8, f"took {elapsed:.1f} s"
    assert not (project / "out").exists()
    runs = client(project).search_runs([client(project).get_experiment_by_name(EXPERIMENT).experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("first", "FINISHED")]


def test_a_lock_taken_mid_stage_fails_fast_and_the_run_still_ends_failed(project: Path, locked):
    started = None
    with pytest.raises(TrackingUnavailable, match=r"is locked: .* while run \w+ was logging metrics"):
        with stage_run("train", {}, project_dir=project, experiment=EXPERIMENT, settings=FAST) as run:
            release = locked()
            try:
                started = time.monotonic()
                run.log_metrics({"loss": 1.0}, step=1)
            finally:
                elapsed = time.monotonic() - started
                release()  # the lock goes away: ending the run can succeed
    assert elapsed < 5, f"the write waited {elapsed:.1f} s"
    assert client(project).get_run(run.run_id).info.status == "FAILED"


def test_a_store_locked_to_the_end_leaves_a_run_the_next_start_closes(project: Path, locked, capsys):
    """The worst case: the store stays locked until the stage process exits; its run stays RUNNING
    (nothing can write), the message says so, and the next start closes it as KILLED."""
    process, run_id = start_sleeper(project)
    release = locked()
    try:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        release()
    assert process.returncode == 128 + signal.SIGTERM
    assert f"run {run_id} could not be ended KILLED (the store stayed locked for 1 s)" in err
    assert "the next stage start on this host closes it as KILLED" in err and "Traceback" not in err
    assert client(project).get_run(run_id).info.status == "RUNNING"
    with stage_run("next", {}, project_dir=project, experiment=EXPERIMENT, settings=FAST):
        pass
    assert client(project).get_run(run_id).info.status == "KILLED"
    assert f"closed 1 stale run(s) of experiment {EXPERIMENT!r} as KILLED" in capsys.readouterr().err


# -- runs never left RUNNING -------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_stage_ends_its_run_killed_and_exits_non_zero(project: Path, signum: int):
    process, run_id = start_sleeper(project)
    process.send_signal(signum)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signum
    assert f"lightclip sleeper: stopped by {signal.Signals(signum).name}; its MLflow run was ended KILLED" in err and "Traceback" not in err
    run = client(project).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[TAG_HOST] == socket.gethostname() and run.data.tags[TAG_PID] == str(process.pid)


def test_in_process_signal_ends_the_run_killed_and_restores_the_previous_handler(project: Path):
    calls: list[int] = []

    def previous(signum, frame):  # e.g. a flow runner that wants to hear of cancellations
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(StageInterrupted) as caught:
            with stage_run("train", {}, project_dir=project, experiment=EXPERIMENT, settings=FAST) as run:
                assert signal.getsignal(signal.SIGTERM) is not previous
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                pytest.fail("SIGTERM did not stop the stage")
        assert caught.value.exit_code == 143 and calls == [signal.SIGTERM]  # chained, then the stage stopped
        assert signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)  # the restored handler gets it again, alone
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
    assert client(project).get_run(run.run_id).info.status == "KILLED"


def test_an_exception_ends_the_run_failed(project: Path):
    with pytest.raises(ZeroDivisionError):
        with stage_run("split", {}, project_dir=project, experiment=EXPERIMENT, settings=FAST) as run:
            1 / 0
    assert client(project).get_run(run.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_a_sigkilled_stage_run_is_closed_killed_when_the_pipeline_starts(project: Path, capsys):
    alive, alive_run = start_sleeper(project)
    killed, killed_run = start_sleeper(project)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    store = client(project)
    experiment_id = store.get_experiment_by_name(EXPERIMENT).experiment_id
    elsewhere = store.create_run(experiment_id, tags={TAG_HOST: "another-host", TAG_PID: "1"}).info.run_id
    try:
        assert store.get_run(killed_run).info.status == "RUNNING"
        with pipeline_run("repro", {}, project_dir=project, experiment=EXPERIMENT, settings=FAST) as parent:
            pass
        err = capsys.readouterr().err
        assert f"closed 1 stale run(s) of experiment {EXPERIMENT!r} as KILLED" in err and f"{killed_run} (sleeper, pid {killed.pid})" in err
        closed = store.get_run(killed_run)
        assert closed.info.status == "KILLED" and f"process {killed.pid} on {socket.gethostname()} no longer runs" in closed.data.tags[TAG_CLOSED_STALE]
        assert store.get_run(parent.run_id).data.tags[TAG_STALE_CLOSED_COUNT] == "1"
        assert store.get_run(alive_run).info.status == "RUNNING", "a live stage's run was closed"
        assert store.get_run(elsewhere).info.status == "RUNNING", "another host's run was closed"
    finally:
        alive.send_signal(signal.SIGTERM)
        alive.communicate(timeout=30)
    assert store.get_run(alive_run).info.status == "KILLED"


@pytest.mark.slow
def test_a_signalled_pipeline_stops_dvc_and_its_stage_and_ends_both_runs_killed(tmp_path: Path, monkeypatch, projects):
    root = projects.create(tmp_path / "pipe", PARAMS, files={"dvc.yaml": SLEEPER_PIPELINE, "sleeper.py": SLEEPER}, dvc=True, commit="a pipeline")
    projects.enter(root, monkeypatch)
    pipeline = subprocess.Popen([sys.executable, "-m", "lightclip.cli", "pipeline"], cwd=root, env=stage_env(), preexec_fn=sigint_as_default, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    line = ""
    deadline = time.monotonic() + 120
    while not line.startswith("ready ") and time.monotonic() < deadline:
        line = read_line(pipeline, timeout=deadline - time.monotonic())
    stage_run_id = line.split()[1]
    pipeline.send_signal(signal.SIGTERM)  # to lightclip only, as a service manager or `kill` does
    _, err = pipeline.communicate(timeout=60)
    assert pipeline.returncode == 143 and "lightclip pipeline: stopped by SIGTERM" in err, err
    store = client(root)
    stage = store.get_run(stage_run_id)
    parent = store.get_run(stage.data.tags["mlflow.parentRunId"])
    assert (parent.data.tags["lightclip.stage"], parent.info.status, stage.info.status) == ("pipeline", "KILLED", "KILLED")
    assert not process_alive(int(stage.data.tags[TAG_PID])), "the stage outlived the pipeline"


def test_process_alive_tells_a_reused_pid_and_another_boot_from_the_running_process():
    tags = process_tags()
    me = os.getpid()
    assert tags[TAG_PID] == str(me) and process_alive(me, process_start(me), tags["lightclip.boot_id"])
    assert not process_alive(me, start="1")  # same pid, another process's start time
    assert not process_alive(me, boot="not-this-boot")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid)


# -- a server that goes away mid-stage (the real thing: tests/test_tracking_server_faults.py) --------


def test_the_outage_a_stage_rides_out_is_the_sum_of_mlflows_retry_waits():
    assert [outage_window_seconds(TrackingConfig(retries=r)) for r in range(6)] == [0.0, 0.0, 2.0, 6.0, 14.0, 30.0]


def test_an_upload_that_cannot_connect_fails_naming_the_uri_and_the_window():
    """Artifact uploads to a server raise the HTTP library's own error, not MLflow's: still an outage."""
    handle = StageRun(SimpleNamespace(info=SimpleNamespace(run_id="r1")), "http://127.0.0.1:9", TrackingConfig(retries=4))

    def upload() -> None:
        raise requests.exceptions.ConnectionError("Connection refused")

    with pytest.raises(TrackingUnavailable, match=r"^tracking store http://127.0.0.1:9 failed while run r1 was logging artifact x "
                                                   r"\(gone longer than the ~14 s that tracking.retries 4 rides out\): Connection refused$"):
        handle._write("logging artifact x", upload)


class _CutShortServer:
    """An MLflow REST endpoint on 127.0.0.1 whose first ``cut`` replies to ``log-batch`` break off
    mid-body (``Content-Length`` 64, 2 bytes sent, connection closed); it knows one run, ``r1``."""

    RUN = {"run": {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "0", "status": "RUNNING",
                            "start_time": 0, "lifecycle_stage": "active", "artifact_uri": "file:///nowhere"}, "data": {}}}

    def __init__(self, cut: int) -> None:
        self.cut, self.batches = cut, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body: bytes, length: int | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's names)
                self._reply(json.dumps(outer.RUN).encode())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not self.path.endswith("/runs/log-batch"):
                    return self._reply(b"{}")
                outer.batches.append(body)
                if len(outer.batches) > outer.cut:
                    return self._reply(b"{}")
                self._reply(b"{}", length=64)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("cut", [1, 2])
def test_a_reply_cut_short_is_sent_again_once_with_the_same_metric_timestamp(cut, monkeypatch, capfd):
    """A server killed while answering leaves the client an ``IncompleteRead``, which MLflow does
    not retry: the write is sent once more, identical (the store deduplicates a metric with the same
    timestamp); cut short twice, the stage fails naming the store."""
    server = _CutShortServer(cut)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(server.uri)
    try:
        handle = StageRun(mlflow.start_run(run_id="r1"), server.uri, TrackingConfig(retries=0))
        if cut == 1:
            handle.log_metrics({"loss": 0.5}, step=3)
            assert len(server.batches) == 2 and server.batches[0] == server.batches[1]
            sent = json.loads(server.batches[0])
            assert sent["run_id"] == "r1" and [(m["key"], float(m["value"]), int(m["step"])) for m in sent["metrics"]] == [("loss", 0.5, 3)]
            assert "cut its reply short while run r1 was logging metrics; sending it again" in capfd.readouterr().err
        else:
            with pytest.raises(TrackingUnavailable, match=rf"^tracking store {server.uri} failed while run r1 was logging metrics.*IncompleteRead"):
                handle.log_metrics({"loss": 0.5}, step=3)
            assert len(server.batches) == 2
    finally:
        mlflow.end_run()
        server.close()
