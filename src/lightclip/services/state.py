"""The state directory of a team deployment: ports chosen once, credentials generated once.

Ports are picked free at the first start and kept in ``ports.json`` so that every URL handed
out (the env file, a DVC remote, a registered model's source) stays valid across restarts.
Credentials are generated at the first start into ``team.env`` (mode 0600), the one file a user
sources or replaces: it holds only the standard client variables, so pointing it at real cloud
services swaps the deployment without touching code.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from lightclip.services.processes import ServicesError, free_ports

#: Bucket of the MLflow server's proxied artifacts, and of the DVC remote.
MLFLOW_BUCKET = "lightclip-mlflow"
DVC_BUCKET = "lightclip-dvc"
#: The Prefect process work pool the workers poll.
PREFECT_POOL = "lightclip"
#: The PostgreSQL role that owns the databases (a login role, password-protected, scram-sha-256).
POSTGRES_USER = "lightclip"
#: Region the S3 clients send; SeaweedFS ignores it, boto3 wants one.
S3_REGION = "us-east-1"

#: Every port of the deployment, by the name used in ports.json and in error messages.
PORT_NAMES = (
    "postgres", "mlflow", "prefect",
    "s3", "s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc", "weed_filer", "weed_filer_grpc",
)


@dataclass(frozen=True)
class Credentials:
    """The secrets generated at the first start."""

    postgres_password: str
    s3_access_key: str
    s3_secret_key: str

    @classmethod
    def generate(cls) -> "Credentials":
        return cls(
            postgres_password=secrets.token_urlsafe(24),
            s3_access_key="LC" + secrets.token_hex(9).upper(),
            s3_secret_key=secrets.token_urlsafe(30),
        )


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 from the first byte (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def format_env_file(values: Mapping[str, str]) -> str:
    """``export KEY=VALUE`` lines (shell-quoted): ``source team.env`` sets them."""
    header = "# lightclip team deployment: generated credentials and client URLs. Never commit this file.\n"
    return header + "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


def parse_env_file(path: Path) -> dict[str, str]:
    """The variables of an ``export KEY=VALUE`` file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        words = shlex.split(stripped)
        if words and words[0] == "export":
            words = words[1:]
        if len(words) != 1 or "=" not in words[0]:
            raise ServicesError(f"{path}:{number}: expected 'export KEY=VALUE', got {line!r}")
        key, value = words[0].split("=", 1)
        values[key] = value
    return values


class TeamState:
    """Paths, ports and credentials under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir).absolute()
        self.env_file = self.dir / "team.env"
        self.ports_file = self.dir / "ports.json"
        self.logs = self.dir / "logs"
        self.run = self.dir / "run"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def ports(self, *, create: bool = False) -> dict[str, int]:
        """The recorded ports; with ``create``, free ones are picked and recorded at the first call."""
        if self.ports_file.is_file():
            ports = {key: int(value) for key, value in json.loads(self.ports_file.read_text()).items()}
            missing = [name for name in PORT_NAMES if name not in ports]
            if missing:
                raise ServicesError(f"{self.ports_file}: no port recorded for {', '.join(missing)}; remove the file to pick new ports")
            return ports
        if not create:
            raise ServicesError(f"{self.dir}: no team deployment here yet (no {self.ports_file.name}); run `lightclip services up`")
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports_file.write_text(json.dumps(ports, indent=2) + "\n")
        return ports

    def credentials(self, *, create: bool = False) -> Credentials:
        """The credentials in the env file; with ``create``, generated (and the env file written) when absent."""
        if self.env_file.is_file():
            values = parse_env_file(self.env_file)
            try:
                return Credentials(
                    postgres_password=values["LIGHTCLIP_POSTGRES_PASSWORD"],
                    s3_access_key=values["AWS_ACCESS_KEY_ID"],
                    s3_secret_key=values["AWS_SECRET_ACCESS_KEY"],
                )
            except KeyError as exc:
                raise ServicesError(f"{self.env_file}: {exc.args[0]} is missing; restore it or remove the whole state directory") from exc
        if not create:
            raise ServicesError(f"{self.dir}: no team deployment here yet (no {self.env_file.name}); run `lightclip services up`")
        credentials = Credentials.generate()
        write_private(self.env_file, format_env_file(client_env(self.ports(create=True), credentials)))
        return credentials


def postgres_dsn(ports: Mapping[str, int], credentials: Credentials, database: str, *, driver: str = "postgresql") -> str:
    """The connection URL of one database (``driver``: ``postgresql+psycopg``, ``postgresql+asyncpg`` for the servers)."""
    return f"{driver}://{POSTGRES_USER}:{credentials.postgres_password}@127.0.0.1:{ports['postgres']}/{database}"


def s3_endpoint(ports: Mapping[str, int]) -> str:
    return f"http://127.0.0.1:{ports['s3']}"


def client_env(ports: Mapping[str, int], credentials: Credentials) -> dict[str, str]:
    """The standard variables clients read (what team.env exports), plus the database password."""
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
        "AWS_ACCESS_KEY_ID": credentials.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.s3_secret_key,
        "AWS_ENDPOINT_URL": s3_endpoint(ports),
        "AWS_DEFAULT_REGION": S3_REGION,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(ports),
        "LIGHTCLIP_S3_MLFLOW_BUCKET": MLFLOW_BUCKET,
        "LIGHTCLIP_S3_DVC_BUCKET": DVC_BUCKET,
        "LIGHTCLIP_PREFECT_POOL": PREFECT_POOL,
        "LIGHTCLIP_POSTGRES_USER": POSTGRES_USER,
        "LIGHTCLIP_POSTGRES_PASSWORD": credentials.postgres_password,
    }
