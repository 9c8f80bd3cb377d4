"""Micro-batching: text queries that arrive within a few milliseconds are embedded in one call.

On a 2-core machine the encoder is the cost of a text query, and one forward pass over 16 titles
costs far less than 16 passes over one: under load, batching is what lets throughput grow with
concurrency. The first query of a batch waits at most ``window_s``; a full batch (``max_batch``)
goes at once. Batches run on the executor given (one worker thread: the model's threads do the
parallel work), so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable, Sequence

import numpy as np


class MicroBatcher:
    """Collects concurrent ``submit`` calls into batches of ``embed`` (one batcher per served model)."""

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], *, window_s: float, max_batch: int, executor: Executor,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.embed = embed
        self.window_s = window_s
        self.max_batch = max_batch
        self.executor = executor
        self.on_batch = on_batch
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, text: str) -> np.ndarray:
        """The ``1 x D`` embedding of ``text``, computed in a batch with whatever else arrived meanwhile."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, future))
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
        work = loop.run_in_executor(self.executor, self.embed, [text for text, _ in batch])

        def deliver(done: asyncio.Future[np.ndarray]) -> None:
            error = done.exception()
            for i, (_, future) in enumerate(batch):
                if future.done():  # the client went away
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(done.result()[i : i + 1])

        work.add_done_callback(deliver)
