"""Test servers for the tracking tests: a throwaway PostgreSQL cluster and an ``mlflow server`` on
it, each bound to 127.0.0.1 on a free port, waited for in a bounded loop and stopped by PID
(the server: SIGKILL to its process group, as a crash would)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lightclip.orchestration import stage_env

PG_BIN = Path(os.environ.get("LIGHTCLIP_PG_BIN", "/usr/lib/postgresql/15/bin"))
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
POSTGRES_AVAILABLE = (PG_BIN / "initdb").is_file()
STARTUP_S = 120  # bound on a server start (migrations on a fresh database take ~12 s on 2 busy cores)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres(command: list[str], timeout: float) -> None:
    """Run a PostgreSQL tool (as the ``postgres`` system user when we are root: PostgreSQL refuses
    root); a failure says what it printed."""
    full = ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stdout[-1000:]} {result.stderr[-2000:]}")


class Postgres:
    """A throwaway cluster: trust auth on 127.0.0.1 only; one database per server.

    Its directory is made under the system temp dir, not pytest's: that one is private to root
    (mode 0700), and the cluster runs as ``postgres``. :meth:`stop` removes it.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lightclip-test-pg-"))
        self.port = free_port()
        self.data = self.root / "data"

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "lightclip", "--auth=trust", "-E", "UTF8"], timeout=60)
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "-t", "60", "start"],
                    timeout=90)

    def stop(self) -> None:
        as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"], timeout=90)
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URI (MLflow's backend store)."""
        as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "lightclip", name], timeout=30)
        return f"postgresql+psycopg://lightclip@127.0.0.1:{self.port}/{name}"


class MlflowServer:
    """``mlflow server`` on a backend store, with proxied artifacts; killed with SIGKILL by process group."""

    def __init__(self, backend: str, artifacts: Path, log: Path) -> None:
        self.backend, self.artifacts, self.log_path = backend, artifacts, log
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it and wait (bounded) until ``/health`` answers; returns the seconds it took."""
        env = stage_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        env.pop("MLFLOW_TRACKING_URI", None)
        started = time.monotonic()
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", self.backend, "--artifacts-destination", self.artifacts.as_uri()],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.monotonic() - started < STARTUP_S:
            if self.process.poll() is not None:
                raise AssertionError(f"mlflow server exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise AssertionError(f"mlflow server not up within {STARTUP_S} s: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL to the server and its uvicorn worker (the process group), as a crash or the OOM killer would."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the worker may outlive its parent for a moment
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


