"""Dynamic micro-batching: concurrent requests' items are grouped into one model call.

Each `submit(items)` puts its items on a bounded queue and awaits their results. A worker task
takes the first waiting item, gathers more until `max_batch_size` items or `max_wait_ms` have
passed, runs `fn(batch)` on the model thread (one thread for every batcher, so model calls never
overlap) and hands each caller its own results, in order. Items whose caller gave up (timeout,
disconnect) are dropped before the call. A full queue refuses new work at once (`Overloaded`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mmtune.serve")


class Overloaded(Exception):
    """The queue is full: the caller should answer 429."""


@dataclass
class _Entry:
    item: Any
    future: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher did, for /healthz and the tests."""

    batches: int = 0
    items: int = 0
    max_queue_seen: int = 0
    refused: int = 0
    busy_s: float = 0.0  # time spent inside model calls
    sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
            "max_batch": max(self.sizes, default=0),
            "max_queue_seen": self.max_queue_seen,
            "refused": self.refused,
            "mean_call_ms": round(1000 * self.busy_s / self.batches, 2) if self.batches else 0.0,
        }


class MicroBatcher:
    """Group items from concurrent callers into calls of `fn(list) -> list` (same length, order)."""

    def __init__(
        self,
        fn: Callable[[list], Sequence],
        executor: Executor,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_error: Callable[[BaseException], None] | None = None,
        on_success: Callable[[], None] | None = None,
    ):
        self.fn, self.executor = fn, executor
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_error, self.on_success = on_error, on_success
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Entry] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, items: list) -> list:
        """Results of `fn` for `items`, in order; `Overloaded` when the queue has no room."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self._queue.qsize() + len(items) > self.max_queue:
            self.stats.refused += 1
            raise Overloaded(f"queue full ({self.max_queue} items waiting); retry later")
        loop = asyncio.get_running_loop()
        entries = [_Entry(it, loop.create_future()) for it in items]
        for e in entries:
            self._queue.put_nowait(e)
        self.stats.max_queue_seen = max(self.stats.max_queue_seen, self._queue.qsize())
        try:
            return list(await asyncio.gather(*(e.future for e in entries)))
        finally:
            for e in entries:  # a caller that gave up: its items are skipped by the worker
                e.future.cancel()

    async def _gather_batch(self) -> list[_Entry]:
        queue = self._queue
        batch = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [e for e in batch if not e.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather_batch()
            if not batch:
                continue
            t0 = loop.time()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} for {len(batch)}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the model failed: every caller of this batch hears it
                log.error("model call failed for a batch of %d: %r", len(batch), exc)
                if self.on_error:
                    self.on_error(exc)
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
                continue
            self.stats.busy_s += loop.time() - t0
            if self.on_success:
                self.on_success()
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.sizes[len(batch)] += 1
            for e, r in zip(batch, results, strict=True):
                if not e.future.done():
                    e.future.set_result(r)
