"""Micro-batching: text queries that arrive close together are answered by one call.

On a 2-core machine a text query's cost is its encoder pass and its index search, and one pass
and one search over 16 queries cost far less than 16 of each: under load, batching is what lets
throughput grow with concurrency. One batch runs at a time, on the executor given (one worker
thread: the model's threads do the parallel work), so the event loop keeps accepting requests
meanwhile. While it runs, new queries gather; they go as the next batch the moment it ends (they
have waited already), so batches grow with the load instead of queueing behind each other. When
the worker is idle, the first query of a batch waits at most ``window_s`` for company, and a full
batch (``max_batch``) goes at once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Collects concurrent ``submit`` calls into batches of ``process`` (one batcher per served model).

    ``process`` answers a batch with one result per item, in order; a result that is an exception
    fails that item alone, an exception raised by ``process`` fails the whole batch. ``on_batch``
    is told each batch's size and the seconds ``process`` took."""

    def __init__(self, process: Callable[[Sequence[Item]], Sequence[Result | BaseException]], *, window_s: float, max_batch: int,
                 executor: Executor, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.process = process
        self.window_s = window_s
        self.max_batch = max_batch
        self.executor = executor
        self.on_batch = on_batch
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    async def submit(self, item: Item) -> Result:
        """The result of ``item``, computed in a batch with whatever else arrived meanwhile."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if not self._running:  # else the running batch's end sends this one
            if len(self._pending) >= self.max_batch or self.window_s <= 0:
                self._flush(loop)
            elif self._timer is None:
                self._timer = loop.call_later(self.window_s, self._flush, loop)
        return await future

    def _timed(self, items: list[Item]) -> tuple[Sequence[Result | BaseException], float]:
        started = time.perf_counter()
        results = self.process(items)
        return results, time.perf_counter() - started

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running:
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        if not batch:
            return
        self._running = True
        work = loop.run_in_executor(self.executor, self._timed, [item for item, _ in batch])

        def deliver(done: asyncio.Future[tuple[Sequence[Result | BaseException], float]]) -> None:
            self._running = False
            error = done.exception() if not done.cancelled() else asyncio.CancelledError()
            results = None
            if error is None:
                results, seconds = done.result()
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds)
                if len(results) != len(batch):
                    error, results = RuntimeError(f"a batch of {len(batch)} got {len(results)} results"), None
            for i, (_, future) in enumerate(batch):
                if future.done():  # the client went away
                    continue
                outcome = error if results is None else results[i]
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            if self._pending:  # they waited through this batch: no window for them
                self._flush(loop)

        work.add_done_callback(deliver)
