"""Finding the Prefect server a flow or deployment talks to."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from lightclip.orchestration.common import DEFAULT_PREFECT_PORT


def local_api_url(port: int | None = None) -> str:
    """The API of ``make prefect-server`` (``PREFECT_PORT``, default 4200) on the loopback."""
    port = port or int(os.environ.get("PREFECT_PORT", DEFAULT_PREFECT_PORT))
    return f"http://127.0.0.1:{port}/api"


def server_is_up(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect server answers ``GET <api>/health``."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_api_url() -> str | None:
    """``PREFECT_API_URL`` when set, else the local server when it is up, else None (a temporary server)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    local = local_api_url()
    return local if server_is_up(local) else None
