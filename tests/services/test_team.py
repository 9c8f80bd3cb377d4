"""The team deployment for real: every service up on 127.0.0.1, idempotent ``up``, ``down`` that
loses nothing, private credentials, and start-up errors that name the service and the port."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import httpx
import psycopg
import pytest

from lightclip.services import ServicesError, TeamServices
from lightclip.services.processes import group_members, port_is_free
from lightclip.services.state import PORT_NAMES, parse_env_file

pytestmark = pytest.mark.team

REPO_ROOT = Path(__file__).resolve().parents[2]


def s3_client(team: TeamServices):  # noqa: ANN201
    env = team.env()
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def test_every_service_runs_and_answers_at_its_url(team_services: TeamServices):
    statuses = {status.name: status for status in team_services.status()}
    assert list(statuses) == ["postgres", "objectstore", "mlflow", "prefect", "worker-1", "worker-2"]
    assert all(status.running and status.pid for status in statuses.values()), statuses
    assert all("127.0.0.1" in (status.url or "") for status in statuses.values())
    env = team_services.env()
    assert statuses["mlflow"].url == env["MLFLOW_TRACKING_URI"]
    assert statuses["prefect"].url == env["PREFECT_API_URL"]
    assert httpx.get(f"{env['MLFLOW_TRACKING_URI']}/health").text == "OK"
    assert httpx.get(f"{env['PREFECT_API_URL']}/health").json() is True
    pool = env["LIGHTCLIP_PREFECT_POOL"]
    assert httpx.get(f"{env['PREFECT_API_URL']}/work_pools/{pool}").json()["type"] == "process"
    workers = {w["name"] for w in httpx.post(f"{env['PREFECT_API_URL']}/work_pools/{pool}/workers/filter", json={}).json()}
    assert {"worker-1", "worker-2"} <= workers
    buckets = {b["Name"] for b in s3_client(team_services).list_buckets()["Buckets"]}
    assert {env["LIGHTCLIP_S3_MLFLOW_BUCKET"], env["LIGHTCLIP_S3_DVC_BUCKET"]} <= buckets
    with psycopg.connect(team_services.postgres_dsn("postgres")) as connection:
        names = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
    assert {"mlflow", "prefect"} <= names


def test_services_listen_on_loopback_only(team_services: TeamServices):
    """Every socket any process of the deployment listens on is bound to 127.0.0.1."""
    ours = set()
    for status in team_services.status():
        ours.update(group_members(os.getpgid(status.pid)) if status.name != "postgres" else [status.pid])
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    addresses = [line.split()[3] for line in listening if any(f"pid={pid}," in line for pid in ours)]
    assert len(addresses) >= len(PORT_NAMES), addresses
    assert all(address.startswith("127.0.0.1:") for address in addresses), addresses


def test_credentials_are_required(team_services: TeamServices):
    env = team_services.env()
    anonymous = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="nobody",
                             aws_secret_access_key="wrong", region_name="us-east-1")
    with pytest.raises(Exception, match="(?i)denied|invalid|signature"):
        anonymous.list_objects_v2(Bucket=env["LIGHTCLIP_S3_DVC_BUCKET"])
    wrong = team_services.postgres_dsn("mlflow").replace(team_services.credentials.postgres_password, "wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_up_again_leaves_running_services_alone(team_services: TeamServices):
    before = {status.name: status.pid for status in team_services.status()}
    started = time.monotonic()
    team_services.up()
    assert time.monotonic() - started < 5
    assert {status.name: status.pid for status in team_services.status()} == before


def test_env_file_is_private_and_outside_git(team_services: TeamServices):
    env_file = team_services.env_file
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = parse_env_file(env_file)
    assert values["AWS_SECRET_ACCESS_KEY"] == team_services.env()["AWS_SECRET_ACCESS_KEY"]
    # the project's default state dir is git-ignored, and no tracked file holds a generated secret
    ignored = subprocess.run(["git", "check-ignore", "-q", ".services/team.env"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, ".services/ must be in .gitignore"
    for secret in (values["AWS_SECRET_ACCESS_KEY"], values["LIGHTCLIP_POSTGRES_PASSWORD"]):
        found = subprocess.run(["git", "grep", "-q", "-F", "-e", secret], cwd=REPO_ROOT)  # -e: a secret may start with "-"
        assert found.returncode == 1


def test_no_secret_on_a_command_line_or_in_a_file_others_can_read(team_services: TeamServices):
    """`ps` shows every command line to every local user: passwords go through the environment and
    files of mode 0600 only."""
    secrets = [team_services.credentials.postgres_password, team_services.credentials.s3_secret_key]
    pids = set()
    for status in team_services.status():
        pids.update(group_members(os.getpgid(status.pid)) if status.name != "postgres" else [status.pid])
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(secret in cmdline for secret in secrets), cmdline
    for path in team_services.state_dir.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o044:
            text = path.read_bytes().decode(errors="replace")
            assert not any(secret in text for secret in secrets), f"{path} is readable by others and holds a secret"


def test_down_then_up_keeps_rows_objects_and_runs(team_services: TeamServices, tmp_path: Path):
    from mlflow import MlflowClient

    env = team_services.env()
    tag = uuid.uuid4().hex[:8]
    with psycopg.connect(team_services.postgres_dsn("prefect"), autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS lightclip_keep (tag text)")
        connection.execute("INSERT INTO lightclip_keep VALUES (%s)", (tag,))
    s3 = s3_client(team_services)
    s3.put_object(Bucket=env["LIGHTCLIP_S3_DVC_BUCKET"], Key=f"tests/{tag}.txt", Body=tag.encode())
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment(f"keep-{tag}"))
    client.log_param(run.info.run_id, "tag", tag)
    client.log_metric(run.info.run_id, "score", 0.5)
    client.log_text(run.info.run_id, tag, "notes/tag.txt")  # through the server's artifact proxy into the bucket
    client.set_terminated(run.info.run_id)
    stored = s3.list_objects_v2(Bucket=env["LIGHTCLIP_S3_MLFLOW_BUCKET"])
    assert any(item["Key"].endswith(f"{run.info.run_id}/artifacts/notes/tag.txt") for item in stored.get("Contents", []))

    team_services.down()
    assert not any(status.running for status in team_services.status())
    assert all(port_is_free(port) for port in team_services.ports.values())
    team_services.up()

    assert team_services.env() == env  # same URLs, same credentials
    with psycopg.connect(team_services.postgres_dsn("prefect")) as connection:
        assert (tag,) in connection.execute("SELECT tag FROM lightclip_keep").fetchall()
    assert s3_client(team_services).get_object(Bucket=env["LIGHTCLIP_S3_DVC_BUCKET"], Key=f"tests/{tag}.txt")["Body"].read() == tag.encode()
    again = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(run.info.run_id)
    assert again.data.params == {"tag": tag} and again.data.metrics == {"score": 0.5} and again.info.status == "FINISHED"
    local = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).download_artifacts(run.info.run_id, "notes/tag.txt", dst_path=str(tmp_path))
    assert Path(local).read_text() == tag


def test_a_killed_server_comes_back_with_start_service(team_services: TeamServices):
    """SIGKILL of the MLflow server's leader leaves its uvicorn worker holding the port;
    start_service clears that leftover group and starts it again on the same URL."""
    from mlflow import MlflowClient

    uri = team_services.env()["MLFLOW_TRACKING_URI"]
    experiment = MlflowClient(tracking_uri=uri).create_experiment(f"killed-{uuid.uuid4().hex[:8]}")
    leader = team_services.pid("mlflow")
    assert leader is not None and len(group_members(leader)) >= 2
    os.kill(leader, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while team_services.pid("mlflow") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert team_services.pid("mlflow") is None and group_members(leader)  # the worker is orphaned
    team_services.start_service("mlflow")
    assert group_members(leader) == [] and team_services.pid("mlflow") not in (None, leader)
    assert MlflowClient(tracking_uri=uri).get_experiment(experiment).experiment_id == experiment


def test_a_taken_port_is_named_before_anything_starts(tmp_path_factory: pytest.TempPathFactory, team_services: TeamServices):
    """A second deployment whose recorded S3 port is held by another process: the error names the
    service and the port, and nothing of that deployment was started."""
    other = TeamServices(tmp_path_factory.mktemp("taken"))
    ports = other.state.ports(create=True)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["s3"]))
        squatter.listen()
        with pytest.raises(ServicesError, match=rf"objectstore: port {ports['s3']} \(s3\) on 127.0.0.1 is in use"):
            other.up()
    assert not any(status.running for status in other.status())
    assert set(ports) == set(PORT_NAMES)


def test_the_cli_prints_each_service_with_its_url(team_services: TeamServices, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`lightclip services up` on a running deployment starts nothing and, like `status`, lists
    every service with its URL; a project without DVC gets no remote."""
    from lightclip.cli import main

    before = {status.name: status.pid for status in team_services.status()}
    assert main(["--project", str(tmp_path), "services", "up", "--dir", str(team_services.state_dir)]) == 0
    assert main(["--project", str(tmp_path), "services", "status", "--dir", str(team_services.state_dir)]) == 0
    out = capsys.readouterr().out
    assert f"clients: source {team_services.env_file}" in out and "DVC remote" not in out
    for status in team_services.status():
        assert out.count(f"{status.url}") >= 2 and f"{status.name}" in out and f"running  pid {status.pid}" in out
    assert {status.name: status.pid for status in team_services.status()} == before
    assert team_services.credentials.s3_secret_key not in out


def test_unknown_service_names_the_known_ones(team_services: TeamServices):
    with pytest.raises(ServicesError, match="unknown service 'redis'; the services are postgres, objectstore"):
        team_services.stop_service("redis")


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 2 GB tmpfs: a disk with little free space, where SeaweedFS's automatic volume count
    (free space / volume size) left the second bucket without volumes. Needs root."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2G,mode=1777", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_the_object_store_writes_both_buckets_on_a_disk_with_little_free_space(small_disk: Path):
    team = TeamServices(small_disk / "state")
    try:
        team.start_service("objectstore")  # ready only when both buckets take a write
        env = team.env()
        s3 = s3_client(team)
        for bucket in (env["LIGHTCLIP_S3_DVC_BUCKET"], env["LIGHTCLIP_S3_MLFLOW_BUCKET"]):
            for index in range(3):
                s3.put_object(Bucket=bucket, Key=f"tests/{index}.bin", Body=os.urandom(256 * 1024))
            listed = s3.list_objects_v2(Bucket=bucket, Prefix="tests/")
            assert sorted(item["Key"] for item in listed["Contents"]) == [f"tests/{index}.bin" for index in range(3)]
    finally:
        team.down()
