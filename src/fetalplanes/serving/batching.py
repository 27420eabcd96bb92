"""Micro-batching and a bound on concurrent model work, off the event loop.

Requests put their images on a queue; one worker gathers whatever is waiting (for up
to a few milliseconds) into a single model call that runs in a thread. So a burst of
small requests costs one forward pass instead of many, and a slow request never
blocks the event loop or makes later requests wait for it one by one.

Heat maps hook into the network's layers, so they run alone: they take every slot of
the gate, while ordinary batches share it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio.to_thread

T = TypeVar("T")
R = TypeVar("R")


class ModelGate:
    """At most `slots` model jobs at once; `exclusive()` waits until it is the only one."""

    def __init__(self, slots: int):
        self.slots = slots
        self._sem = asyncio.Semaphore(slots)
        self._exclusive = asyncio.Lock()

    async def acquire(self) -> None:
        await self._sem.acquire()

    def release(self) -> None:
        self._sem.release()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._exclusive:  # two exclusive users must not each hold half the slots
            taken = 0
            try:
                for _ in range(self.slots):
                    await self._sem.acquire()
                    taken += 1
                yield
            finally:
                for _ in range(taken):
                    self._sem.release()


class DecodeBudget:
    """Bytes of decoding memory in flight, all requests together.

    Why: pixels are a poor proxy for memory (a lossless WebP costs over twice a PNG of the
    same size per pixel); each upload's cost comes from its header (`images.decode_cost`)
    and decoding waits until it fits, so concurrent requests cannot add up past `total`."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        cost = min(max(cost, 0), self.total)  # over-budget files are refused before this
        with self._cond:
            self._cond.wait_for(lambda: self.used + cost <= self.total)
            self.used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                idle = self.used == 0
                self._cond.notify_all()
            if idle and cost >= TRIM_BYTES:
                release_free_memory()


#: After decoding at least this much, free heap pages go back to the system.
TRIM_BYTES = 64 * 1024 * 1024


@functools.cache
def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """glibc keeps freed blocks of decoder threads in per-thread arenas, so a server that
    decoded a few large images stays hundreds of MB above idle; `malloc_trim(0)` hands
    those pages back. A no-op where there is no glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass
class BatchStats:
    """What the batcher did; tests and the load test read it to see batching happen."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    most_requests: int = 0  # most requests merged into one model call

    def record(self, requests: int, items: int) -> None:
        self.batches += 1
        self.items += items
        self.largest = max(self.largest, items)
        self.most_requests = max(self.most_requests, requests)


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    future: asyncio.Future[list[R]]


@dataclass
class _Runtime:
    """Queue, gate and worker of one event loop (a test client may use several loops)."""

    loop: asyncio.AbstractEventLoop
    gate: ModelGate
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)


class MicroBatcher(Generic[T, R]):
    """Runs `run_batch(items) -> results` (same length, same order) on gathered requests."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        slots: int = 2,
        max_batch: int = 16,
        window_s: float = 0.005,
    ):
        self.run_batch = run_batch
        self.slots = slots
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = BatchStats()
        self._rt: _Runtime | None = None

    def _runtime(self) -> _Runtime:
        loop = asyncio.get_running_loop()
        if self._rt is None or self._rt.loop is not loop or self._rt.loop.is_closed():
            self._rt = _Runtime(loop, ModelGate(self.slots))
        if self._rt.worker is None or self._rt.worker.done():
            self._rt.worker = loop.create_task(self._work(self._rt))
        return self._rt

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for `items`, computed together with whatever else is queued."""
        rt = self._runtime()
        loop = asyncio.get_running_loop()
        jobs = [
            _Job(list(items[i : i + self.max_batch]), loop.create_future())
            for i in range(0, len(items), self.max_batch)
        ]
        for job in jobs:
            rt.queue.put_nowait(job)
        parts = await asyncio.gather(*(job.future for job in jobs))
        return [r for part in parts for r in part]

    async def exclusive(self, fn: Callable[..., R], *args: Any) -> R:
        """Run `fn(*args)` in a thread while no other model job runs (heat maps)."""
        rt = self._runtime()
        async with rt.gate.exclusive():
            return await anyio.to_thread.run_sync(fn, *args)

    async def aclose(self) -> None:
        """Stop the worker of the current loop and wait for running batches."""
        rt, self._rt = self._rt, None
        if rt is None or rt.loop is not asyncio.get_running_loop():
            return
        if rt.worker is not None:
            rt.worker.cancel()
        await asyncio.gather(*rt.running, return_exceptions=True)

    async def _work(self, rt: _Runtime) -> None:
        while True:
            first = await rt.queue.get()
            await rt.gate.acquire()  # requests arriving meanwhile join this batch
            try:
                jobs = await self._gather(rt, first)
            except BaseException:
                rt.gate.release()
                raise
            task = asyncio.create_task(self._run(rt, jobs))
            rt.running.add(task)
            task.add_done_callback(rt.running.discard)

    async def _gather(self, rt: _Runtime, first: _Job[T, R]) -> list[_Job[T, R]]:
        jobs, n = [first], len(first.items)
        deadline = rt.loop.time() + self.window_s
        while n < self.max_batch:
            try:
                job = rt.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - rt.loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(rt.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            n += len(job.items)
        return jobs

    async def _run(self, rt: _Runtime, jobs: list[_Job[T, R]]) -> None:
        live = [j for j in jobs if not j.future.done()]  # skip requests whose client left
        try:
            items = [it for j in live for it in j.items]
            results = await anyio.to_thread.run_sync(self.run_batch, items) if items else []
            self.stats.record(len(live), len(items))
            start = 0
            for job in live:
                if not job.future.done():
                    job.future.set_result(results[start : start + len(job.items)])
                start += len(job.items)
        except Exception as exc:
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            rt.gate.release()
