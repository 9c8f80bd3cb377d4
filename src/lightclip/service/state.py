"""What the service serves now, and the hot swap that replaces it.

``ServiceState.current`` is one :class:`ServedModel` (model + its own index). A request reads it
once and uses that object to the end, so a swap (one reference assignment, under a lock) never
changes the model under a request in flight: requests that started on the old version finish on
it, the next ones see the new one, and nothing is ever answered by a mix.

The poller re-reads the alias every ``serve.poll_seconds``; when it names another version, the
new version is downloaded, verified and indexed on the poller's thread while the old one keeps
serving, then swapped in. A version that fails to load is logged, counted
(``lightclip_swap_failures_total``) and not retried until the alias moves again; the old one
stays.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from lightclip.config import ServeConfig
from lightclip.errors import LightclipError
from lightclip.service.batching import MicroBatcher
from lightclip.service.engine import ServedModel
from lightclip.service.models import ModelResolver, ResolvedModel

log = logging.getLogger(__name__)


@dataclass
class SwapRecord:
    """One swap (or failed attempt), for /readyz and the log."""

    at: float
    from_version: str | None
    to_version: str
    ok: bool
    seconds: float
    error: str | None = None


@dataclass
class ServiceState:
    """The served model, the worker thread that runs it, and the swap history."""

    config: ServeConfig
    resolver: ModelResolver
    load: Callable[[ResolvedModel], ServedModel]
    current: ServedModel | None = None
    swaps: list[SwapRecord] = field(default_factory=list)
    on_batch: Callable[[int, float], None] | None = None  # told each text batch's size and seconds (the /metrics histograms)
    on_install: list[Callable[[ServedModel, bool], None]] = field(default_factory=list)  # told (model, is_swap)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightclip-model")
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._failed_version: str | None = None

    # -- loading and swapping -------------------------------------------------------------------

    def install(self, served: ServedModel, *, swap: bool = False) -> None:
        """Make ``served`` the model new requests get (requests in flight keep theirs)."""
        served.batcher = MicroBatcher(served.answer_texts, window_s=self.config.batch_window_ms / 1000, max_batch=self.config.max_batch,
                                      executor=self.executor, on_batch=self._batch_done)
        with self._swap_lock:
            self.current = served
        for listener in self.on_install:
            listener(served, swap)

    def _batch_done(self, size: int, seconds: float) -> None:
        if self.on_batch is not None:
            self.on_batch(size, seconds)

    def load_initial(self) -> ServedModel:
        """Resolve the reference and load it (errors propagate: the service does not start)."""
        served = self.load(self.resolver.resolve())
        self.install(served)
        return served

    def check_alias(self) -> bool:
        """Re-read the alias once; load and swap in a new version. True when a swap happened."""
        version, alias = self.resolver.current_version()
        current = self.current
        if current is not None and version == current.version:
            self._failed_version = None
            return False
        if version == self._failed_version:
            return False
        started = time.perf_counter()
        old = current.version if current is not None else None
        try:
            served = self.load(self.resolver.resolve(version, alias))
        except LightclipError as exc:
            self._failed_version = version
            self.swaps.append(SwapRecord(time.time(), old, version, False, time.perf_counter() - started, str(exc)))
            log.error("hot swap to v%s failed, still serving v%s: %s", version, old, exc)
            return False
        self.install(served, swap=True)
        self.swaps.append(SwapRecord(time.time(), old, version, True, time.perf_counter() - started))
        log.warning("hot swap: now serving %s (was v%s), loaded in %.1fs", served.label, old, time.perf_counter() - started)
        return True

    # -- the poller -----------------------------------------------------------------------------

    def start_polling(self) -> None:
        if not self.resolver.ref.watched or self._poller is not None:
            return
        self._poller = threading.Thread(target=self._poll, name="lightclip-alias-poller", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.check_alias()
            except Exception as exc:  # a registry outage must not kill the poller: log it, keep serving, retry
                log.error("alias poll failed (still serving v%s): %s", self.current.version if self.current else None, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None
        self.executor.shutdown(wait=False, cancel_futures=True)
