"""The HTTP API and the storefront page (FastAPI).

Every answer is JSON; every refusal is a 4xx JSON ``{"error": {"field": ..., "message": ...}}``
naming the input at fault; an unexpected failure is a 500 with a generic message (the traceback
goes to the log, never to the client). Each request takes the served model once
(``state.current``) and uses it to the end (see :mod:`lightclip.service.state`).

An upload whose ``Content-Length`` exceeds ``serve.max_upload_bytes`` (plus the multipart
envelope) is refused before its body is read; one sent without a length (chunked) is parsed by
the multipart parser (which spools large parts to disk) and refused after.

Product images are served by product id only: the path comes from the catalogue, and it must
resolve (symlinks followed) inside the directory that holds the catalogue's images; anything
else is a 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightclip.service.engine import PRICE_COLUMN, Filters, Outcome, ServedModel, ServiceError, TextQuery
from lightclip.service.state import ServiceState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
#: Room for the multipart envelope (boundaries, headers) around an upload of the maximum size.
MULTIPART_SLACK_BYTES = 16 * 1024
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lightclip_requests", "HTTP requests by endpoint and status", ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("lightclip_request_seconds", "request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("lightclip_text_batch_size", "text queries embedded per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_seconds = Histogram("lightclip_text_batch_seconds", "model work per text batch (encoder pass and index search)",
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=self.registry)
        self.model = Gauge("lightclip_model_info", "the served model (1 for the current one)", ["version", "label", "weights_sha256"], registry=self.registry)
        self.index_items = Gauge("lightclip_index_items", "items in the served index", registry=self.registry)
        self.swaps = Counter("lightclip_model_swaps", "hot swaps to a new version", registry=self.registry)
        self.swap_failures = Gauge("lightclip_swap_failures", "failed swap attempts so far", registry=self.registry)

    def text_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.batch_seconds.observe(seconds)

    def served(self, served: ServedModel) -> None:
        self.model.clear()
        self.model.labels(served.version, served.label, served.weights_sha256).set(1)
        self.index_items.set(len(served.index))


def error_response(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status)


def safe_image_path(path: Path, allowed_root: Path) -> Path | None:
    """``path`` resolved, if it is an image file inside ``allowed_root``; else None (never follow a way out)."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    root = Path(allowed_root).resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file() or resolved.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return resolved


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request by route, and refuses an upload whose
    ``Content-Length`` is over ``max_upload_bytes`` (plus the multipart envelope) before its body is read.

    Plain ASGI, not Starlette's ``@app.middleware("http")``: that wraps every request in a task and
    a memory stream, a cost each search paid again on top of its own work. The route comes from
    the router (``scope["route"]``); a request refused here never reaches it, so its route is
    matched here, on that rare path only."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_upload_bytes: int, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.max_upload_bytes, self.routes = app, metrics, max_upload_bytes, routes

    def too_large(self, scope: Scope) -> bool:
        if scope["method"] != "POST":
            return False
        length = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        return length.isdigit() and int(length) > self.max_upload_bytes + MULTIPART_SLACK_BYTES

    def matched_route(self, scope: Scope) -> BaseRoute | None:
        return next((route for route in self.routes if route.matches(scope)[0] == Match.FULL), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception on its way to the 500 handler

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.too_large(scope):
                scope["route"] = self.matched_route(scope)
                await error_response(413, "image", f"upload is larger than {self.max_upload_bytes} bytes")(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router on a match
            endpoint = getattr(route, "path", "other") if route is not None else "unmatched"
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def create_app(state: ServiceState, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over ``state`` (its model already installed, or installed later)."""
    config = state.config
    metrics = metrics or Metrics()
    state.on_batch = metrics.text_batch

    def installed(served: ServedModel, swap: bool) -> None:
        metrics.served(served)
        if swap:
            metrics.swaps.inc()

    state.on_install.append(installed)
    if state.current is not None:
        metrics.served(state.current)

    app = FastAPI(title="lightclip retrieval service", summary="Text and image search over the catalogue with the promoted student",
                  version="1")
    app.state.service = state
    app.state.metrics = metrics

    # -- errors -------------------------------------------------------------------------------

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.field, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
        field = loc[-1] if loc else None
        return error_response(422, field, str(first.get("msg", "invalid request")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, None, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, None, "internal error (logged on the server)")

    app.add_middleware(RequestMetrics, metrics=metrics, max_upload_bytes=config.max_upload_bytes, routes=app.router.routes)

    # -- helpers --------------------------------------------------------------------------------

    def served_or_503() -> ServedModel:
        served = state.current
        if served is None:
            raise ServiceError("model", "no model loaded yet", status=503)
        return served

    def check_k(k: int) -> int:
        if not 1 <= k <= config.k_max:
            raise ServiceError("k", f"must be between 1 and {config.k_max}, got {k}")
        return k

    def filters_of(served: ServedModel, request: Request, price_min: float | None, price_max: float | None) -> Filters:
        values = {}
        for name, value in request.query_params.items():
            if name in ("q", "k", "price_min", "price_max"):
                continue
            if name not in served.rows.filterable:
                raise ServiceError(name, f"unknown parameter; filters of this catalogue: {served.rows.filterable}"
                                   + (f" and {PRICE_COLUMN}_min/_max" if served.rows.prices is not None else ""))
            if value.strip():
                values[name] = value.strip()
        filters = Filters(values, price_min, price_max)
        if price_min is not None and price_max is not None and price_min > price_max:
            raise ServiceError("price_min", f"{price_min} is above price_max {price_max}")
        served.rows.check(filters)
        return filters

    def answer(served: ServedModel, outcome: Outcome, k: int, filters: Filters, started: float, **extra: Any) -> JSONResponse:
        results = [{"rank": h.rank, "id": h.id, "title": h.title, "score": round(h.score, 6), "image": f"/images/{h.id}", **h.attributes}
                   for h in outcome.hits]
        note = None
        if len(results) < k:
            note = (f"only {outcome.matching} product(s) match these filters" if filters else f"the catalogue holds only {outcome.matching} product(s)")
        body = {**extra, "k": k, "filters": filters.describe(), "results": results, "count": len(results), "matching": outcome.matching,
                "note": note, "model": served.describe(), "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
        return JSONResponse(body, headers={"X-Model-Version": served.version})

    async def run_search(served: ServedModel, vector: np.ndarray, k: int, filters: Filters, exclude: int | None = None) -> Outcome:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: served.search(vector, k, filters, exclude))

    # -- the API --------------------------------------------------------------------------------

    @app.get("/search", summary="text -> products", description="Extra query parameters filter by catalogue attribute (see /facets).")
    async def search_text(request: Request, q: str = "", k: int = config.k_default, price_min: float | None = None,
                          price_max: float | None = None) -> JSONResponse:
        started = time.perf_counter()
        served = served_or_503()
        text = q.strip()
        if not text:
            raise ServiceError("q", "empty query: give some words to search for")
        if len(text) > config.max_query_chars:
            raise ServiceError("q", f"query is {len(text)} characters, at most {config.max_query_chars} are accepted")
        check_k(k)
        filters = filters_of(served, request, price_min, price_max)
        outcome = await served.batcher.submit(TextQuery(text, k, filters))
        return answer(served, outcome, k, filters, started, query=text)

    @app.post("/search/image", summary="image upload -> products")
    async def search_image(request: Request, image: UploadFile = File(..., description="an image file (JPEG, PNG, WebP ...)"),
                           k: int = config.k_default, price_min: float | None = None, price_max: float | None = None) -> JSONResponse:
        started = time.perf_counter()
        served = served_or_503()
        check_k(k)
        filters = filters_of(served, request, price_min, price_max)
        data = await image.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise ServiceError("image", f"upload is larger than {config.max_upload_bytes} bytes", status=413)
        if not data:
            raise ServiceError("image", "empty upload")
        vector = await asyncio.get_running_loop().run_in_executor(state.executor, served.embed_image, data)
        outcome = await run_search(served, vector, k, filters)
        return answer(served, outcome, k, filters, started, query=image.filename or "upload")

    @app.get("/similar/{item_id}", summary="more like this product")
    async def similar(request: Request, item_id: str, k: int = config.k_default, price_min: float | None = None,
                      price_max: float | None = None) -> JSONResponse:
        started = time.perf_counter()
        served = served_or_503()
        check_k(k)
        filters = filters_of(served, request, price_min, price_max)
        row, vector = served.vector_of(item_id)
        outcome = await run_search(served, vector, k, filters, exclude=row)
        return answer(served, outcome, k, filters, started, query=item_id, title=served.index.titles[row])

    @app.get("/facets", summary="the values each filter takes")
    async def facets() -> JSONResponse:
        served = served_or_503()
        return JSONResponse({"filters": served.rows.facets(), "model": served.describe()})

    @app.get("/images/{item_id}", summary="a product's image, by product id", include_in_schema=True)
    async def product_image(item_id: str) -> FileResponse:
        served = served_or_503()
        row = served.rows.row_of.get(item_id)
        if row is None:
            raise ServiceError("id", f"unknown product id {item_id!r}", status=404)
        root = served.rows.image_root
        path = None if root is None else safe_image_path(served.rows.image_paths[row], root)
        if path is None:
            raise ServiceError("id", f"no servable image for product {item_id!r}", status=404)
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    # -- operations -----------------------------------------------------------------------------

    @app.get("/healthz", summary="the process is up")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="a model and the index of its weights are loaded")
    async def readyz() -> JSONResponse:
        served = state.current
        if served is None:
            return JSONResponse({"ready": False, "reason": "no model loaded yet"}, status_code=503)
        if not served.agree():
            return JSONResponse({"ready": False, "reason": "the index does not record the model's weights", "model": served.describe()}, status_code=503)
        last = state.swaps[-1] if state.swaps else None
        return JSONResponse({"ready": True, "model": served.describe(), "index_sha_matches": True,
                             "last_swap": None if last is None else {"to": last.to_version, "from": last.from_version, "ok": last.ok, "error": last.error}})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        metrics.swap_failures.set(sum(1 for s in state.swaps if not s.ok))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- the page -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
