"""Shared by the service tests: a tiny synthetic catalogue and two tiny models (made once per
session), a registry store holding both as versions 1 and 2 of ``lightclip-student`` (copied per
test: the swap tests move its aliases), a served model built in-process, and a uvicorn server on a
free loopback port in a thread of the test process (stopped through uvicorn's own exit flag)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import mlflow
import pytest
import uvicorn
from fastapi import FastAPI

from lightclip.config import IndexConfig, ServeConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.synth import generate_catalogue
from lightclip.models.zoo import ModelSpec, create_model, save_model, weights_sha256
from lightclip.registry.aliases import TAG_WEIGHTS, ModelRegistry
from lightclip.registry.packaging import log_pyfunc
from lightclip.service import ModelRef, ModelResolver, ServiceState, create_app, load_served
from lightclip.service.models import ResolvedModel

STUDENT = "lightclip-student"
N_ITEMS = 24
INDEX = IndexConfig(kind="flat", batch_size=16, eval_queries=0, threads=1)


@pytest.fixture(scope="session")
def svc_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """catalogue/ (24 synthetic items at 32 px), models/a and models/b (random lc-test-tiny), store/ (v1 = a, v2 = b)."""
    root = tmp_path_factory.mktemp("service")
    generate_catalogue(root / "catalogue", SynthConfig(seed=3, n_items=N_ITEMS, image_size=32), progress=False)
    spec = ModelSpec(arch="lc-test-tiny")
    for seed, name in enumerate(["a", "b"]):
        model, _ = create_model(spec, seed=seed)
        save_model(model, spec, root / "models" / name, extra={"stage": "test", "seed": seed})
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serve-test", artifact_location=(root / "store" / "artifacts").as_uri())
        registry = ModelRegistry(root, uri)
        registry.ensure_model(STUDENT, "service tests")
        for name in ("a", "b"):
            with mlflow.start_run(experiment_id=experiment) as run:
                logged = log_pyfunc(root / "models" / name, artifact_name=name, embed_dim=32, image_size=32)
            registry.client.create_model_version(STUDENT, source=logged.model_uri, run_id=run.info.run_id, model_id=logged.model_id,
                                                 tags={TAG_WEIGHTS: weights_sha256(root / "models" / name)})
    finally:
        mlflow.set_tracking_uri(previous)
    return root


@dataclass(frozen=True)
class ServeProject:
    """A project directory with its own copy of the store (aliases free to move)."""

    root: Path
    assets: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'store' / 'mlflow.db'}"

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.root, self.uri)

    def set_alias(self, alias: str, version: str) -> None:
        self.registry().client.set_registered_model_alias(STUDENT, alias, version)

    def config(self, **overrides) -> ServeConfig:
        base = dict(model=f"{STUDENT}@production", catalogue=str(self.assets / "catalogue"), index=str(self.root / "no-index"),
                    poll_seconds=0.2, batch_window_ms=2.0, k_default=5, k_max=20, max_upload_bytes=200_000, threads=1)
        return ServeConfig(**{**base, **overrides})

    def state(self, **overrides) -> ServiceState:
        from lightclip.service import build_state

        return build_state(self.config(**overrides), INDEX, self.root, tracking_uri=self.uri)


@pytest.fixture
def serve_project(svc_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ServeProject:
    """A project with its own copy of the store, as the working directory (nothing lands in the repository)."""
    root = tmp_path / "proj"
    (root / "store").mkdir(parents=True)
    shutil.copy(svc_assets / "store" / "mlflow.db", root / "store" / "mlflow.db")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'store' / 'mlflow.db'}")
    return ServeProject(root, svc_assets)


@pytest.fixture(scope="session")
def served_a(svc_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    """Model ``a`` and the index of its weights, loaded once (a local directory, no registry)."""
    cache = tmp_path_factory.mktemp("served-a")
    model_dir = svc_assets / "models" / "a"
    resolved = ResolvedModel(label=str(model_dir), version="local", model_dir=model_dir, weights_sha256=weights_sha256(model_dir))
    return load_served(resolved, Catalogue.load(svc_assets / "catalogue"), INDEX, reuse=None, cache_dir=cache / "index",
                       image_cache_dir=cache / "images")


@pytest.fixture
def local_state(served_a, svc_assets: Path) -> Iterator[ServiceState]:
    """A service state serving ``served_a`` (k_max 20, uploads up to 200 kB)."""
    config = ServeConfig(model=str(svc_assets / "models" / "a"), catalogue=str(svc_assets / "catalogue"), k_default=5, k_max=20,
                         max_upload_bytes=200_000, max_query_chars=100, threads=1)
    state = ServiceState(config, ModelResolver(ModelRef.parse(config.model, svc_assets), svc_assets / "unused"), lambda resolved: served_a)
    state.install(served_a)
    yield state
    state.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port in a daemon thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server on {self.url} did not answer /healthz within 30 s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def serve_app():
    """``serve_app(state)`` -> a running :class:`ServerThread` over ``create_app(state)`` (stopped after the test)."""
    servers: list[ServerThread] = []

    def start(state: ServiceState) -> ServerThread:
        server = ServerThread(create_app(state)).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
