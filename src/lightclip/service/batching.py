"""Micro-batching: text queries that arrive within a few milliseconds are answered by one call.

On a 2-core machine a text query's cost is its encoder pass and its index search, and one pass
and one search over 16 queries cost far less than 16 of each: under load, batching is what lets
throughput grow with concurrency. The first query of a batch waits at most ``window_s``; a full
batch (``max_batch``) goes at once. Batches run on the executor given (one worker thread: the
model's threads do the parallel work), so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Collects concurrent ``submit`` calls into batches of ``process`` (one batcher per served model).

    ``process`` answers a batch with one result per item, in order; a result that is an exception
    fails that item alone, an exception raised by ``process`` fails the whole batch."""

    def __init__(self, process: Callable[[Sequence[Item]], Sequence[Result | BaseException]], *, window_s: float, max_batch: int,
                 executor: Executor, on_batch: Callable[[int], None] | None = None) -> None:
        self.process = process
        self.window_s = window_s
        self.max_batch = max_batch
        self.executor = executor
        self.on_batch = on_batch
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, item: Item) -> Result:
        """The result of ``item``, computed in a batch with whatever else arrived meanwhile."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.max_batch or self.window_s <= 0:
            self._flush(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        work = loop.run_in_executor(self.executor, self.process, [item for item, _ in batch])

        def deliver(done: asyncio.Future[Sequence[Result | BaseException]]) -> None:
            error = done.exception()
            results = None if error is not None else done.result()
            if results is not None and len(results) != len(batch):
                error, results = RuntimeError(f"a batch of {len(batch)} got {len(results)} results"), None
            for i, (_, future) in enumerate(batch):
                if future.done():  # the client went away
                    continue
                outcome = error if results is None else results[i]
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

        work.add_done_callback(deliver)
