"""Ports chosen once, credentials generated once into a private env file (no servers needed)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from lightclip.services.processes import ServicesError
from lightclip.services.state import PORT_NAMES, TeamState, format_env_file, parse_env_file, write_private

#: The variables the interface promises clients (docs/team.md).
CLIENT_KEYS = {
    "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL", "LIGHTCLIP_S3_MLFLOW_BUCKET", "LIGHTCLIP_S3_DVC_BUCKET", "LIGHTCLIP_PREFECT_POOL",
}


def test_ports_are_picked_once_and_kept(tmp_path: Path):
    state = TeamState(tmp_path / "state")
    first = state.ports(create=True)
    assert set(first) == set(PORT_NAMES) and len(set(first.values())) == len(PORT_NAMES)
    assert TeamState(tmp_path / "state").ports() == first


def test_no_state_yet_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ServicesError, match="no team deployment here yet.*lightclip services up"):
        TeamState(tmp_path).ports()
    with pytest.raises(ServicesError, match="no team deployment here yet"):
        TeamState(tmp_path).credentials()


def test_credentials_are_generated_once_into_a_0600_env_file(tmp_path: Path):
    state = TeamState(tmp_path / "state")
    credentials = state.credentials(create=True)
    assert stat.S_IMODE(state.env_file.stat().st_mode) == 0o600
    values = parse_env_file(state.env_file)
    assert CLIENT_KEYS <= set(values)
    assert values["AWS_SECRET_ACCESS_KEY"] == credentials.s3_secret_key
    assert values["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{state.ports()['mlflow']}"
    assert TeamState(tmp_path / "state").credentials() == credentials  # read back, not regenerated
    assert TeamState(tmp_path / "other").credentials(create=True) != credentials


def test_env_file_round_trips_shell_quoting(tmp_path: Path):
    values = {"A": "plain", "B": "with space and 'quote'", "C": "$HOME;rm -rf /"}
    path = tmp_path / "x.env"
    write_private(path, format_env_file(values))
    assert parse_env_file(path) == values
    assert all(line.startswith(("export ", "#")) for line in path.read_text().splitlines())


def test_a_damaged_env_file_names_the_file_and_line(tmp_path: Path):
    path = tmp_path / "team.env"
    path.write_text("export A=1\nnot an assignment\n")
    with pytest.raises(ServicesError, match=r"team.env:2: expected 'export KEY=VALUE'"):
        parse_env_file(path)
    state = TeamState(tmp_path)
    state.ports(create=True)
    state.env_file.write_text("export AWS_ACCESS_KEY_ID=x\n")
    with pytest.raises(ServicesError, match="team.env: LIGHTCLIP_POSTGRES_PASSWORD is missing"):
        state.credentials()
