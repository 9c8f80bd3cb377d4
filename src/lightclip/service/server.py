"""``lightclip serve``: the service state from params, and uvicorn around the app.

The model and the index of its weights are loaded before the port opens: a reference that does
not resolve, weights that do not match their registered sha256 or an index that does not match
the model stop the command with one line, so a half-ready service is never served.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import uvicorn

from lightclip.config import IndexConfig, ServeConfig
from lightclip.data.catalogue import Catalogue
from lightclip.io import default_threads, torch_threads
from lightclip.registry.aliases import ModelRegistry
from lightclip.service.app import create_app
from lightclip.service.engine import ServedModel, load_served
from lightclip.service.models import ModelRef, ModelResolver, ResolvedModel
from lightclip.service.state import ServiceState
from lightclip.stage import StageContext

log = logging.getLogger(__name__)


def build_state(config: ServeConfig, index_config: IndexConfig, project_dir: Path | str, *, tracking_uri: str | None = None) -> ServiceState:
    """The state ``config`` describes (nothing loaded yet): resolver, catalogue, how to load a version."""
    context = StageContext(Path(project_dir).resolve(), progress=False)
    ref = ModelRef.parse(config.model, context.project_dir)
    registry = None if ref.path is not None else ModelRegistry(context.project_dir, tracking_uri)
    cache = context.cache_dir / "serve"
    resolver = ModelResolver(ref, cache / "models", registry)
    catalogue = Catalogue.load(context.resolve(config.catalogue))
    reuse = context.resolve(config.index)

    def load(resolved: ResolvedModel) -> ServedModel:
        return load_served(resolved, catalogue, index_config, reuse=reuse if reuse.is_dir() else None, cache_dir=cache / "index",
                           image_cache_dir=context.image_cache_dir, runtime=config.runtime)

    return ServiceState(config, resolver, load)


def model_threads(config: ServeConfig) -> int:
    """The model's torch and FAISS threads: ``serve.threads``, else the usable CPUs less the one
    the event loop needs (at least one). Under load every request's parsing, JSON and routing runs
    on the event loop; threads of the model that take its core only spin against it."""
    return config.threads or max(1, default_threads() - 1)


def freeze_heap() -> None:
    """Move every object alive now (the libraries, the model, the catalogue rows: ~0.5 M) out of the
    garbage collector's sight. A full collection otherwise walks them all, a pause of 100-300 ms
    that every request in flight waits out (the p99 at concurrency 32). Freed by reference counts
    as usual; a cycle among them (an old model after a swap) stays: swaps are rare."""
    gc.collect()
    gc.freeze()


def run_serve(config: ServeConfig, index_config: IndexConfig, project_dir: Path | str, *, tracking_uri: str | None = None) -> None:
    """Load the model and its index, then serve until interrupted (Ctrl-C or SIGTERM)."""
    with torch_threads(model_threads(config), faiss_too=True):
        state = build_state(config, index_config, project_dir, tracking_uri=tracking_uri)
        app = create_app(state)
        state.on_install.append(lambda served, swap: freeze_heap())
        served = state.load_initial()
        log.warning("lightclip serve: %s, %d items; http://%s:%d/ (API docs at /docs)", served.label, len(served.index), config.host, config.port)
        state.start_polling()
        try:
            uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False)).run()
        finally:
            state.stop()
