"""The DVC remote ``team``: written to .dvc/config.local only, and a push / object-store restart /
fresh clone + pull round trip that restores the data bit for bit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import boto3
import pytest

from lightclip.orchestration import dvc_command
from lightclip.services import ServicesError, TeamServices, configure_dvc_remote

FAKE_ENV = {
    "LIGHTCLIP_S3_DVC_BUCKET": "bucket", "AWS_ACCESS_KEY_ID": "AKFAKE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_DEFAULT_REGION": "us-east-1",
}


def tracked_project(projects, root: Path) -> Path:
    """A git + DVC project with a local default remote and a small binary data/raw tracked by DVC."""
    projects.create(root, "split:\n  seed: 0\n", dvc=True, dvc_remote=root.parent / f"{root.name}-local-remote")
    raw = root / "data" / "raw"
    (raw / "images").mkdir(parents=True)
    for index in range(5):
        (raw / "images" / f"{index}.bin").write_bytes(os.urandom(2000 + index))
    (raw / "catalogue.jsonl").write_text('{"id": "1"}\n')
    projects.run(dvc_command("add", "-q", "data/raw"), root)
    projects.commit(root, "data")
    return root


def test_the_remote_goes_to_config_local_only(projects, tmp_path: Path):
    root = tracked_project(projects, tmp_path / "project")
    committed = (root / ".dvc" / "config").read_text()
    local = configure_dvc_remote(root, FAKE_ENV)
    assert local == root / ".dvc" / "config.local" and (local.stat().st_mode & 0o777) == 0o600
    text = local.read_text()
    assert "s3://bucket/lightclip" in text and "http://127.0.0.1:1" in text and "s3cr3t-value" in text
    assert (root / ".dvc" / "config").read_text() == committed  # the default remote is untouched
    assert subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=root).returncode == 0
    remotes = projects.run(dvc_command("remote", "list"), root)
    assert "team" in remotes and "local" in remotes
    assert projects.run(dvc_command("remote", "default"), root).strip() == "local"


def test_a_project_without_dvc_or_credentials_is_a_clear_error(projects, tmp_path: Path):
    with pytest.raises(ServicesError, match="not a DVC project"):
        configure_dvc_remote(tmp_path, FAKE_ENV)
    root = tracked_project(projects, tmp_path / "project")
    with pytest.raises(ServicesError, match="AWS_SECRET_ACCESS_KEY not set"):
        configure_dvc_remote(root, {**FAKE_ENV, "AWS_SECRET_ACCESS_KEY": ""})


@pytest.mark.team
def test_push_restart_the_store_clone_pull_restores_bit_for_bit(team_services: TeamServices, projects, tmp_path: Path):
    env = team_services.env()
    root = tracked_project(projects, tmp_path / "project")
    configure_dvc_remote(root, env, prefix=f"tests/{tmp_path.name}")
    projects.run(dvc_command("push", "-q", "-r", "team"), root)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    pushed = s3.list_objects_v2(Bucket=env["LIGHTCLIP_S3_DVC_BUCKET"], Prefix=f"tests/{tmp_path.name}/")
    assert pushed["KeyCount"] >= 7  # 6 files + the directory manifest

    team_services.stop_service("objectstore")
    assert not next(s for s in team_services.status() if s.name == "objectstore").running
    team_services.start_service("objectstore")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    configure_dvc_remote(clone, env, prefix=f"tests/{tmp_path.name}")
    projects.run(dvc_command("pull", "-q", "-r", "team"), clone)
    originals = sorted(p.relative_to(root) for p in (root / "data" / "raw").rglob("*") if p.is_file())
    assert originals == sorted(p.relative_to(clone) for p in (clone / "data" / "raw").rglob("*") if p.is_file())
    assert all((root / p).read_bytes() == (clone / p).read_bytes() for p in originals)
    assert "up to date" in projects.run(dvc_command("status"), clone).lower()
