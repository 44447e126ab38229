"""A micro-batcher: concurrent requests queue up and are processed together, off the event loop.

While the model works on one batch, new requests wait in the queue; when it is free it takes
everything queued (up to ``max_batch``) at once. At low load a request never waits for company
(no added latency); under load the audio branch encodes several queries in one forward pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from search.errors import Overloaded, ShuttingDown

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future
    queued_at: float


class MicroBatcher(Generic[Item, Result]):
    """Run ``process(items, queue_seconds)`` on batches of submitted items in ``executor``.

    ``process`` gets the batch's items and how long each waited in the queue, and returns one entry
    per item: its result, or the exception that item alone should raise (one bad query must not
    fail its batch-mates). Items whose caller gave up (cancelled, deadline passed) before their
    batch started are dropped unprocessed.
    """

    def __init__(
        self,
        process: Callable[[Sequence[Item], Sequence[float]], Sequence[Result | BaseException]],
        executor: Executor,
        *,
        max_batch: int = 8,
        max_queue: int = 256,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self._process = process
        self._executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Pending[Item] | None] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.batches = 0  # processed so far, for logs and tests
        self.items = 0
        self._running = 0  # batches in the executor now

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch being processed: an item submitted now starts at once."""
        return self._running == 0 and self._queue.empty()

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its result (or its exception). Raises Overloaded when full."""
        if self._closing:
            raise ShuttingDown("the server is shutting down; retry against another replica")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} queries are already queued; retry in a moment")
        self.start()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            batch: list[_Pending[Item]] = []
            pending = await self._queue.get()
            while pending is not None:
                batch.append(pending)
                if len(batch) >= self.max_batch or self._queue.empty():
                    break
                pending = self._queue.get_nowait()
            stopping = pending is None  # close() queued the end marker: everything before it is done
            batch = [p for p in batch if not p.future.done()]  # callers that gave up
            if batch:
                await self._process_batch(loop, batch)

    async def _process_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[Item]]) -> None:
        started = time.perf_counter()
        waits = [started - p.queued_at for p in batch]
        self._running += 1
        try:
            results = await loop.run_in_executor(self._executor, self._process, [p.item for p in batch], waits)
        except Exception as error:  # a bug in process: fail this batch, keep serving
            results = [error] * len(batch)
        finally:
            self._running -= 1
        self.batches += 1
        self.items += len(batch)
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    async def close(self) -> None:
        """Refuse new items, finish the queued and running ones, then stop the worker."""
        self._closing = True
        if self._worker is not None:
            await self._queue.put(None)
            await self._worker
            self._worker = None
