"""The reference team deployment: PostgreSQL, SeaweedFS (S3), an MLflow server, a Prefect server
and a process work pool with two workers, all on 127.0.0.1, started and stopped by the project.

:class:`TeamServices` is the one entry point (``lightclip services up|down|status`` and the
``team_services`` pytest fixture call it). Each service is a small :class:`_Service` that knows
how to launch itself detached, when it is ready and how to stop without losing data; ``up``
launches them in dependency order and overlaps their start-up waits, which keeps a cold start of
the whole stack within a minute on a busy 2-core machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping

import boto3
import botocore.config
import botocore.exceptions
import httpx
import psycopg

from lightclip.env import TELEMETRY_OFF
from lightclip.services.processes import (
    ProcessRecord,
    ServicesError,
    is_alive,
    kill_orphans,
    log_tail,
    port_is_free,
    process_record,
    read_pid_file,
    start_detached,
    stop_group,
    wait_until,
    write_pid_file,
)
from lightclip.services.state import (
    DVC_BUCKET,
    MLFLOW_BUCKET,
    POSTGRES_USER,
    PREFECT_POOL,
    S3_REGION,
    Credentials,
    TeamState,
    client_env,
    format_env_file,
    postgres_dsn,
    s3_endpoint,
    write_private,
)
from lightclip.tracking import PARENT_RUN_ENV

#: Where Debian's PostgreSQL 15 server binaries live (``LIGHTCLIP_PG_BIN`` overrides).
DEFAULT_PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: The system user PostgreSQL runs as when we are root (it refuses to run as root).
POSTGRES_SYSTEM_USER = "postgres"
#: Service names, in start order (stopped in the reverse order).
SERVICE_NAMES = ("postgres", "objectstore", "mlflow", "prefect", "worker-1", "worker-2")
WORKER_NAMES = ("worker-1", "worker-2")
#: Bounds of the readiness waits and graceful stops, seconds.
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
#: How long a port of a just-stopped process may take to come free before it counts as taken.
PORT_GRACE_S = 3.0
#: The object store's volume ceiling (1 GB each, sparse): room for many buckets on any disk.
OBJECTSTORE_MAX_VOLUMES = 100


def pg_bin() -> Path:
    return Path(os.environ.get("LIGHTCLIP_PG_BIN", DEFAULT_PG_BIN))


def postgres_available() -> bool:
    """True when PostgreSQL's server binaries are installed (the team tests skip without them)."""
    return (pg_bin() / "initdb").is_file() and (pg_bin() / "pg_ctl").is_file()


def venv_tool(name: str) -> Path:
    """A console script of this interpreter's environment (mlflow, prefect, weed), by absolute path."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        found = shutil.which(name)
        if found is None:
            raise ServicesError(f"{name}: not found beside {sys.executable} nor on PATH; install the project (make install)")
        return Path(found)
    return path


@dataclass(frozen=True)
class ServiceStatus:
    """One service as ``status()`` reports it."""

    name: str
    url: str | None
    pid: int | None
    running: bool


class _Service:
    """A detached service process: launch, readiness, stop; subclasses fill in the specifics."""

    name: str = ""
    port_names: tuple[str, ...] = ()
    stop_signal = signal.SIGTERM
    stop_timeout_s = STOP_TIMEOUT_S
    #: Whether a SIGKILL after ``stop_timeout_s`` is the normal end (logged as such), not a fault.
    expected_kill = False

    def __init__(self, team: "TeamServices") -> None:
        self.team = team
        self.state = team.state
        self.log_file = self.state.log_file(self.name)
        self.pid_file = self.state.pid_file(self.name)
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at = 0.0

    # -- what each service defines ---------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return self.team.base_env()

    def url(self) -> str | None:
        raise NotImplementedError

    def ready(self) -> bool:
        """One readiness probe (exceptions count as "not yet")."""
        raise NotImplementedError

    # -- shared behaviour ------------------------------------------------------------------------
    @property
    def ports(self) -> dict[str, int]:
        return self.team.ports

    def record(self) -> ProcessRecord | None:
        return read_pid_file(self.pid_file)

    def running(self) -> bool:
        return is_alive(self.record())

    def check_ports(self, grace_s: float = PORT_GRACE_S) -> None:
        """Fail before launching when another process holds one of this service's ports.

        A process that was just killed or stopped may hold its listening socket a moment longer
        (its last threads are still exiting): each port gets ``grace_s`` to come free.
        """
        deadline = time.monotonic() + grace_s
        for port_name in self.port_names:
            port = self.ports[port_name]
            while not port_is_free(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not port_is_free(port):
                raise ServicesError(
                    f"{self.name}: port {port} ({port_name}) on 127.0.0.1 is in use by another process; stop it, or remove "
                    f"{self.state.ports_file} (with every service down) to pick new ports"
                )

    def clear_leftovers(self) -> None:
        """Kill what is left of this service's last process group when its leader was killed (a
        server's worker processes would still hold the port)."""
        if self.process is not None and self.process.poll() is not None:
            self.process = None  # reaped: the zombie of a leader this process started is gone
        previous = self.record()
        if previous is not None and not is_alive(previous):
            kill_orphans(previous)

    def launch(self) -> None:
        self.launched_at = time.time()
        self.process = start_detached(self.command(), log_file=self.log_file, env=self.environment(), cwd=self.workdir())
        record = process_record(self.process.pid)
        if record is None:
            raise ServicesError(f"{self.name}: exited at once{self._tail()}")
        write_pid_file(self.pid_file, record)

    def workdir(self) -> Path:
        return self.state.dir / "run"

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.running()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        wait_until(self.ready, what=f"{self.name} ({self.url()})", timeout_s=timeout_s, alive=self.alive, log_file=self.log_file)

    def stop(self) -> None:
        record = self.record()
        if record is not None:  # a dead leader: stop_group only clears what is left of its group
            graceful = stop_group(record, name=self.name, timeout_s=self.stop_timeout_s, sig=self.stop_signal)
            if not graceful:
                why = "its graceful exit only waits; killed" if self.expected_kill else "killed"
                with open(self.log_file, "ab") as log:
                    log.write(f"==== {self.name} did not stop within {self.stop_timeout_s:.0f} s: {why}\n".encode())
        if self.process is not None:
            self.process.wait(timeout=5)
            self.process = None
        self.pid_file.unlink(missing_ok=True)

    def _tail(self) -> str:
        return log_tail(self.log_file)


class _Postgres(_Service):
    """PostgreSQL 15 via initdb/pg_ctl; as root, as the ``postgres`` system user (it refuses root)."""

    name = "postgres"
    port_names = ("postgres",)

    @property
    def data_dir(self) -> Path:
        return self.state.dir / "postgres" / "data"

    def url(self) -> str:
        return f"postgresql://127.0.0.1:{self.ports['postgres']}"

    def _as_postgres(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", POSTGRES_SYSTEM_USER, "--", *args]
        return list(args)

    def _owner(self) -> tuple[int, int]:
        if os.geteuid() != 0:
            return os.getuid(), os.getgid()
        try:
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError as exc:
            raise ServicesError(f"postgres: no system user {POSTGRES_SYSTEM_USER!r} to run the server as (apt-get install postgresql creates it)") from exc
        return entry.pw_uid, entry.pw_gid

    def _run(self, args: list[str], what: str, timeout_s: float = 120.0) -> None:
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd="/", env=self.team.base_env())
        except subprocess.TimeoutExpired as exc:
            raise ServicesError(f"postgres: {what} did not finish within {timeout_s:.0f} s{self._tail()}") from exc
        if result.returncode != 0:
            raise ServicesError(f"postgres: {what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-800:]}{self._tail()}")

    def _initdb(self) -> None:
        """Create the cluster once: a password-protected login role, TCP on 127.0.0.1 only, no Unix socket."""
        uid, gid = self._owner()
        cluster = self.data_dir.parent
        cluster.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state.dir, 0o711)  # the postgres user must traverse the state dir; it lists nothing
        os.chmod(cluster, 0o711)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made cluster of an interrupted initdb
        self.data_dir.mkdir(mode=0o700)
        os.chown(self.data_dir, uid, gid)
        password_file = cluster / ".initdb-password"
        write_private(password_file, self.team.credentials.postgres_password + "\n")
        os.chown(password_file, uid, gid)
        check = subprocess.run(self._as_postgres("test", "-r", str(password_file)), capture_output=True)
        if check.returncode != 0:
            password_file.unlink()
            raise ServicesError(
                f"postgres: the system user {POSTGRES_SYSTEM_USER!r} cannot reach {cluster}: every parent directory needs "
                "o+x (pytest's own tmp dirs are 0700); put the state directory under the project or /tmp"
            )
        try:
            self._run(self._as_postgres(
                str(pg_bin() / "initdb"), "-D", str(self.data_dir), "-U", POSTGRES_USER, f"--pwfile={password_file}",
                "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--locale=C",
            ), "initdb")
        finally:
            password_file.unlink(missing_ok=True)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# lightclip team deployment\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "password_encryption = 'scram-sha-256'\n"
                "max_connections = 200\n"
                "shared_buffers = '64MB'\n"
            )

    def launch(self) -> None:
        """initdb at the first start, then ``pg_ctl start -w`` (returns once the server accepts connections)."""
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        uid, gid = self._owner()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch(mode=0o600)
        os.chown(self.log_file, uid, gid)
        self.launched_at = time.time()
        self._run(self._as_postgres(
            str(pg_bin() / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", str(int(READY_TIMEOUT_S)),
            "-o", f"-p {self.ports['postgres']}", "start",
        ), "pg_ctl start", timeout_s=READY_TIMEOUT_S + 10)
        pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        record = process_record(pid)
        if record is None:
            raise ServicesError(f"postgres: started but pid {pid} is gone{self._tail()}")
        write_pid_file(self.pid_file, record)

    def alive(self) -> bool:
        return self.running()

    def ready(self) -> bool:
        """Connects, and creates the databases the first time."""
        with psycopg.connect(self.team.postgres_dsn("postgres"), autocommit=True, connect_timeout=5) as connection:
            for database in ("mlflow", "prefect"):
                if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                    connection.execute(f'CREATE DATABASE "{database}"')
        return True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: active sessions rolled back, everything committed kept, a clean checkpoint."""
        if self.running():
            self._run(self._as_postgres(str(pg_bin() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                                        "-t", str(int(STOP_TIMEOUT_S)), "stop"), "pg_ctl stop", timeout_s=STOP_TIMEOUT_S + 10)
        self.pid_file.unlink(missing_ok=True)


class _ObjectStore(_Service):
    """SeaweedFS in one ``weed server`` process: master, volume, filer and the S3 gateway.

    ``-master.resumeState=false``: a single master that resumes its raft state waits ~17 s for an
    election on every restart; the volume ids it would remember come back from the volume
    server's heartbeat. ``-volume.preStopSeconds=0``: no 10 s pause before stopping (no clients
    to drain). Telemetry off; the Iceberg and Lance ports off.

    ``-volume.max`` is explicit: its default (0) sizes the volume count from the free disk space
    divided by the volume size, and every bucket is a collection that grows 7 volumes at its first
    write, so on a disk with a few GB free the first bucket took every volume and writes to the
    second failed with "no free volumes" (HTTP 500 through MLflow's artifact proxy). Volumes are
    sparse files, so the count costs no space; a full disk still turns them read-only.
    """

    name = "objectstore"
    port_names = ("s3", "s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc", "weed_filer", "weed_filer_grpc")
    #: SIGTERM, then SIGKILL after this long. A graceful ``weed server`` exit waits 15 s in the
    #: filer's gRPC shutdown for its own S3 gateway's metadata stream, which never ends by itself.
    #: Nothing is lost by not waiting: the services that write to it are stopped first, and every
    #: write it acknowledged is already in its files (the filer's LevelDB log, the volume's .dat
    #: and .idx are written before the S3 reply); tests restart it and read every object back.
    stop_timeout_s = 2.0
    expected_kill = True

    @property
    def base(self) -> Path:
        return self.state.dir / "objectstore"

    def url(self) -> str:
        return s3_endpoint(self.ports)

    def _identities(self) -> Path:
        path = self.base / "s3-identities.json"
        credentials = self.team.credentials
        write_private(path, json.dumps({"identities": [{
            "name": "lightclip",
            "credentials": [{"accessKey": credentials.s3_access_key, "secretKey": credentials.s3_secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, indent=2))
        return path

    def command(self) -> list[str]:
        (self.base / "data").mkdir(parents=True, exist_ok=True)
        p = self.ports
        return [
            str(venv_tool("weed")), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.base / 'data'}",
            f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
            f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
            "-filer", f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self._identities()}",
            "-master.telemetry=false", "-master.resumeState=false", "-master.volumeSizeLimitMB=1024", f"-volume.max={OBJECTSTORE_MAX_VOLUMES}",
            "-volume.preStopSeconds=0",
        ]

    def workdir(self) -> Path:
        return self.base

    def client(self):  # noqa: ANN201 - boto3's client type is generated at run time
        credentials = self.team.credentials
        return boto3.client(
            "s3", endpoint_url=self.url(), aws_access_key_id=credentials.s3_access_key,
            aws_secret_access_key=credentials.s3_secret_key, region_name=S3_REGION,
            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10),
        )

    def ready(self) -> bool:
        """Both buckets exist and take a write (the volume server has registered, and each bucket's
        collection could grow its volumes: a store that cannot write one bucket is not ready)."""
        s3 = self.client()
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            try:
                s3.create_bucket(Bucket=bucket)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            try:
                s3.put_object(Bucket=bucket, Key=".lightclip-ready", Body=b"ok")
            except botocore.exceptions.ClientError as exc:
                raise ServicesError(f"bucket {bucket!r} refuses a write: {exc}") from exc
            s3.delete_object(Bucket=bucket, Key=".lightclip-ready")
        return True

    def stop(self) -> None:
        super().stop()
        for port_name in ("s3", "s3_grpc", "weed_master_grpc", "weed_volume_grpc", "weed_filer", "weed_filer_grpc"):
            # the Unix sockets weed leaves in /tmp, named after their port
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{self.ports[port_name]}.sock"):
                leftover.unlink(missing_ok=True)


class _Mlflow(_Service):
    """``mlflow server`` on PostgreSQL, proxying artifacts to the S3 bucket (clients need no S3 credentials)."""

    name = "mlflow"
    port_names = ("mlflow",)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def command(self) -> list[str]:
        port = self.ports["mlflow"]
        return [
            str(venv_tool("mlflow")), "server",  # the backend store URI (with its password) comes from the environment
            "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost",
        ]

    def environment(self) -> dict[str, str]:
        credentials = self.team.credentials
        return {
            **self.team.base_env(),
            "MLFLOW_BACKEND_STORE_URI": self.team.postgres_dsn("mlflow", driver="postgresql+psycopg"),
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(self.ports),
            "AWS_ACCESS_KEY_ID": credentials.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": credentials.s3_secret_key,
            "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }

    def ready(self) -> bool:
        response = httpx.get(f"{self.url()}/health", timeout=3)
        return response.status_code == 200


class _Prefect(_Service):
    """``prefect server start`` on PostgreSQL (asyncpg), scheduler on, analytics off."""

    name = "prefect"
    port_names = ("prefect",)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    def command(self) -> list[str]:
        return [str(venv_tool("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(self.ports["prefect"]), "--analytics-off"]

    def environment(self) -> dict[str, str]:
        ui = f"http://127.0.0.1:{self.ports['prefect']}"
        return {
            **self.team.base_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.team.postgres_dsn("prefect", driver="postgresql+asyncpg"),
            "PREFECT_API_URL": self.url(),
            "PREFECT_SERVER_UI_API_URL": self.url(),
            "PREFECT_UI_URL": ui,
        }

    def ready(self) -> bool:
        response = httpx.get(f"{self.url()}/health", timeout=3)
        return response.status_code == 200 and response.json() is True


class _Worker(_Service):
    """A Prefect process worker on the pool, one flow run at a time (two runs at once go to two workers)."""

    port_names = ()

    def __init__(self, team: "TeamServices", name: str) -> None:
        self.name = name
        super().__init__(team)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api/work_pools/{PREFECT_POOL}"

    def command(self) -> list[str]:
        return [str(venv_tool("prefect")), "worker", "start", "--pool", PREFECT_POOL, "--name", self.name, "--type", "process",
                "--limit", "1", "--install-policy", "never"]

    def environment(self) -> dict[str, str]:
        # flow runs inherit this: they log to the tracking server and reach the S3 remote
        return {**self.team.base_env(), **self.team.env()}

    def workdir(self) -> Path:
        return self.state.dir / "workers" / self.name

    def ready(self) -> bool:
        """The server has a heartbeat of this worker from after its launch."""
        response = httpx.post(f"{self.url()}/workers/filter", json={}, timeout=3)
        response.raise_for_status()
        for worker in response.json():
            if worker["name"] == self.name and worker.get("last_heartbeat_time"):
                beat = datetime.fromisoformat(worker["last_heartbeat_time"].replace("Z", "+00:00"))
                if beat.timestamp() >= self.launched_at - 1:
                    return True
        return False

    def pool_exists(self) -> bool:
        return httpx.get(self.url(), timeout=3).status_code == 200


class TeamServices:
    """The team deployment under ``state_dir``: ``up()``, ``down()``, ``status()``, ``env()``.

    ``up`` is idempotent (running services are left alone) and ``down`` stops every service
    gracefully, so nothing committed to the database or the bucket is lost between the two.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state = TeamState(Path(state_dir))
        self._services: dict[str, _Service] = {
            "postgres": _Postgres(self),
            "objectstore": _ObjectStore(self),
            "mlflow": _Mlflow(self),
            "prefect": _Prefect(self),
            **{name: _Worker(self, name) for name in WORKER_NAMES},
        }
        self._credentials: Credentials | None = None
        self._ports: dict[str, int] | None = None

    # -- the state ------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.state.dir

    @property
    def env_file(self) -> Path:
        """``<state_dir>/team.env``: ``export KEY=VALUE`` lines, mode 0600."""
        return self.state.env_file

    @property
    def ports(self) -> dict[str, int]:
        if self._ports is None:
            self._ports = self.state.ports()
        return self._ports

    @property
    def credentials(self) -> Credentials:
        if self._credentials is None:
            self._credentials = self.state.credentials()
        return self._credentials

    def env(self) -> dict[str, str]:
        """The client variables: MLFLOW_TRACKING_URI, PREFECT_API_URL, AWS_*, the buckets, the pool."""
        return client_env(self.ports, self.credentials)

    def postgres_dsn(self, database: str, *, driver: str = "postgresql") -> str:
        """``postgresql://user:password@127.0.0.1:port/<database>`` (databases ``mlflow``, ``prefect``)."""
        return postgres_dsn(self.ports, self.credentials, database, driver=driver)

    def base_env(self) -> dict[str, str]:
        """The environment every service starts with: this one, telemetry off, this venv first on PATH,
        tool homes in the state dir, and no client variables of another deployment."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("MLFLOW_", "PREFECT_", "AWS_")) and key != PARENT_RUN_ENV}
        env.update(TELEMETRY_OFF)
        env["HF_HUB_OFFLINE"] = "1"
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PREFECT_HOME"] = str(self.state.dir / "prefect-home")
        env["DVC_SITE_CACHE_DIR"] = str(self.state.dir / "dvc-site-cache")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def service_names(self) -> tuple[str, ...]:
        return SERVICE_NAMES

    # -- lifecycle ------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One ``up``/``down`` at a time per state directory (two terminals, two test sessions)."""
        self.state.dir.mkdir(parents=True, exist_ok=True)
        with open(self.state.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _prepare(self) -> None:
        """Ports and credentials (created at the first start), the env file, the state dirs."""
        self._ports = self.state.ports(create=True)
        self._credentials = self.state.credentials(create=True)
        write_private(self.env_file, format_env_file(self.env()))
        for directory in (self.state.logs, self.state.run):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o711)  # the postgres user writes its log and pid there; nobody lists them

    def up(self) -> None:
        """Start every service that is not running, in dependency order, and wait until all are ready."""
        with self._locked():
            self._prepare()
            self._start([name for name in SERVICE_NAMES if not self._services[name].running()])

    def _start(self, names: list[str]) -> None:
        to_start = [self._services[name] for name in names]
        for service in to_start:
            service.clear_leftovers()
            service.check_ports()
        waited: set[str] = set()

        def ensure_ready(name: str) -> None:
            if name in waited:
                return
            service = self._services[name]
            if service in to_start:
                service.wait_ready()
            elif not service.running():
                raise ServicesError(f"{name} is not running; start it first (lightclip services up)")
            waited.add(name)

        needs: dict[str, tuple[str, ...]] = {
            "postgres": (), "objectstore": (), "mlflow": ("postgres",), "prefect": ("postgres",),
            "worker-1": ("prefect",), "worker-2": ("prefect",),
        }
        # the object store first: its start-up (~8 s) overlaps PostgreSQL's and the servers'
        order = sorted(to_start, key=lambda service: service.name != "objectstore")
        launched: list[str] = []
        try:
            for service in order:
                for dependency in needs[service.name]:
                    ensure_ready(dependency)
                if service.name == "worker-2" and self._services["worker-1"] in to_start:
                    # worker-1 creates the pool (with the process worker's default job template);
                    # two workers creating it at once race
                    first = self._services["worker-1"]
                    assert isinstance(first, _Worker)
                    wait_until(first.pool_exists, what=f"work pool {PREFECT_POOL!r} ({first.url()})", timeout_s=READY_TIMEOUT_S,
                               alive=first.alive, log_file=first.log_file)
                launched.append(service.name)
                service.launch()
            for service in order:
                ensure_ready(service.name)
        except BaseException:
            # a failed start leaves nothing half-up behind: what this call launched is stopped again
            with suppress(ServicesError):
                self._stop(launched)
            raise

    def down(self) -> None:
        """Stop every service gracefully: workers, then the servers, PostgreSQL last."""
        with self._locked():
            if not self.state.ports_file.is_file():
                return
            self._stop([name for name in SERVICE_NAMES])

    def _stop(self, names: list[str]) -> None:
        errors: list[str] = []

        def stop(name: str) -> None:
            try:
                self._services[name].stop()
            except (ServicesError, OSError) as exc:
                errors.append(f"{name}: {exc}")

        def in_parallel(group: list[str]) -> None:
            threads = [threading.Thread(target=stop, args=(name,)) for name in group if name in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        # the object store takes ~15 s to exit: stop it alongside everything else
        store = threading.Thread(target=stop, args=("objectstore",)) if "objectstore" in names else None
        if store is not None:
            store.start()
        in_parallel(list(WORKER_NAMES))
        in_parallel(["mlflow", "prefect"])
        in_parallel(["postgres"])
        if store is not None:
            store.join()
        if errors:
            raise ServicesError("stopping the team services: " + "; ".join(errors))

    def stop_service(self, name: str) -> None:
        """Stop one service gracefully (fault tests); the others keep running."""
        self._check_name(name)
        with self._locked():
            self._stop([name])

    def start_service(self, name: str) -> None:
        """Start one stopped service and wait until it is ready (its dependencies must be running)."""
        self._check_name(name)
        with self._locked():
            self._prepare()
            if not self._services[name].running():
                self._start([name])

    def _check_name(self, name: str) -> None:
        if name not in self._services:
            raise ServicesError(f"unknown service {name!r}; the services are {', '.join(SERVICE_NAMES)}")

    def status(self) -> list[ServiceStatus]:
        """Each service with its URL (no credentials in it), its pid and whether it runs."""
        known = self.state.ports_file.is_file()
        statuses = []
        for name in SERVICE_NAMES:
            service = self._services[name]
            record = service.record()
            running = is_alive(record)
            statuses.append(ServiceStatus(name=name, url=service.url() if known else None,
                                          pid=record.pid if running and record else None, running=running))
        return statuses

    def pid(self, name: str) -> int | None:
        """The pid of a running service, else None. Fault tests kill it; ``start_service`` then
        also clears what is left of its process group (a killed server's workers)."""
        self._check_name(name)
        record = self._services[name].record()
        return record.pid if is_alive(record) else None
