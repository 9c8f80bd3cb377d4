"""The retrieval service: ``lightclip serve`` (HTTP API, storefront page, metrics, hot swap).

``models`` resolves what to serve (alias, version, directory), ``engine`` pairs a model with the
index of its own weights and searches it (filters included), ``batching`` groups concurrent text
queries, ``state`` holds the served model and swaps it when the alias moves, ``app`` is the
FastAPI app and ``server`` runs it. See docs/service.md.
"""

from __future__ import annotations

from lightclip.service.app import create_app, safe_image_path
from lightclip.service.engine import Filters, ServedModel, ServiceError, load_served
from lightclip.service.models import ModelRef, ModelRefError, ModelResolver, ResolvedModel
from lightclip.service.server import build_state, run_serve
from lightclip.service.state import ServiceState

__all__ = ["Filters", "ModelRef", "ModelRefError", "ModelResolver", "ResolvedModel", "ServedModel", "ServiceError", "ServiceState",
           "build_state", "create_app", "load_served", "run_serve", "safe_image_path"]
