"""Micro-batching: concurrent text queries share encoder calls and each gets its own row."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lightclip.service.batching import MicroBatcher


def fake_embed(calls: list[list[str]]):
    def embed(texts):
        calls.append(list(texts))
        return [np.array([[float(len(t)), float(i)]], dtype=np.float32) for i, t in enumerate(texts)]

    return embed


def run(texts: list[str], *, window_s: float, max_batch: int) -> tuple[list[np.ndarray], list[list[str]], list[int]]:
    calls: list[list[str]] = []
    sizes: list[int] = []

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fake_embed(calls), window_s=window_s, max_batch=max_batch, executor=pool, on_batch=lambda size, seconds: sizes.append(size))
            return await asyncio.gather(*(batcher.submit(t) for t in texts))

    return asyncio.run(main()), calls, sizes


def test_concurrent_queries_are_embedded_together_each_getting_its_own_row():
    texts = [f"query {'x' * i}" for i in range(10)]
    results, calls, sizes = run(texts, window_s=0.05, max_batch=64)
    assert calls == [texts] and sizes == [10]
    for text, row in zip(texts, results):
        assert row.shape == (1, 2) and row[0, 0] == len(text)


def test_a_full_batch_goes_at_once_and_no_window_means_no_waiting():
    texts = [f"q{i}" for i in range(10)]
    _, calls, sizes = run(texts, window_s=0.3, max_batch=4)  # full batches go before the window ends, the rest after it
    assert sizes == [4, 4, 2] and [len(c) for c in calls] == [4, 4, 2]
    _, calls, sizes = run(texts, window_s=0.0, max_batch=64)  # the first goes at once; the others gather while it runs
    assert sizes == [1, 9]


def test_one_batch_runs_at_a_time_and_what_arrives_meanwhile_goes_next_without_a_window():
    """Under load, batches grow instead of queueing behind each other; the window is never waited twice."""
    running = {"now": 0, "most": 0}
    calls: list[list[str]] = []

    def slow(texts):
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        time.sleep(0.05)
        calls.append(list(texts))
        running["now"] -= 1
        return list(texts)

    async def main():
        with ThreadPoolExecutor(4) as pool:  # even a pool with room for more runs one batch at a time
            batcher = MicroBatcher(slow, window_s=10.0, max_batch=3, executor=pool)
            first = [asyncio.ensure_future(batcher.submit(t)) for t in ("a", "b", "c")]  # full: goes at once
            await asyncio.sleep(0.01)
            started = time.perf_counter()
            later = [asyncio.ensure_future(batcher.submit(t)) for t in ("d", "e")]  # not full, and the window is 10 s
            results = await asyncio.gather(*first, *later)
            return results, time.perf_counter() - started

    results, seconds = asyncio.run(main())
    assert results == ["a", "b", "c", "d", "e"] and calls == [["a", "b", "c"], ["d", "e"]]
    assert running["most"] == 1 and seconds < 1.0  # "d" and "e" went when the first batch ended, not after 10 s


def test_an_encoder_error_reaches_every_query_of_its_batch():
    def broken(texts):
        raise ValueError("encoder failed")

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(broken, window_s=0.01, max_batch=8, executor=pool)
            return await asyncio.gather(*(batcher.submit(t) for t in ("a", "b")), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in results)


def test_a_failed_item_fails_alone_and_a_batch_answered_short_fails_whole():
    def picky(texts):
        return [ValueError(f"bad {t}") if t.startswith("bad") else t.upper() for t in texts]

    def short(texts):
        return [t for t in texts[:-1]]

    async def main(process):
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(process, window_s=0.01, max_batch=8, executor=pool)
            return await asyncio.gather(*(batcher.submit(t) for t in ("a", "bad b", "c")), return_exceptions=True)

    a, b, c = asyncio.run(main(picky))
    assert (a, c) == ("A", "C") and isinstance(b, ValueError) and str(b) == "bad bad b"
    results = asyncio.run(main(short))
    assert all(isinstance(r, RuntimeError) and "a batch of 3 got 2 results" in str(r) for r in results)
