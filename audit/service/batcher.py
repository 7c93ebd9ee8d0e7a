"""Dynamic batching of checks: a bounded queue with two knobs, the largest batch and the longest wait.

Requests that arrive together are scored in one ``Auditor.score_rows`` call (one per auditor among them). A
row's generated images and noise come from content-derived seeds (``audit.seeding``), so its verdict does not
depend on which requests shared its batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Callable

import numpy as np



class QueueFull(Exception):
    """The batching queue is full: the service answers 503 with Retry-After."""


@dataclasses.dataclass
class _Item:
    auditor: object
    row: object
    pixels: np.ndarray
    future: asyncio.Future


class Batcher:
    """``await submit(auditor, row, pixels)`` -> Verdict. ``max_batch_size=1`` turns batching off."""

    def __init__(self, max_batch_size: int, max_wait_ms: float, queue_size: int, lock,
                 on_batch: Callable[[int], None] | None = None):
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.queue: asyncio.Queue | None = None
        self.queue_size = queue_size
        self.lock = lock
        self.on_batch = on_batch
        self._task: asyncio.Task | None = None
        # One scoring thread: the models run one batch at a time (their own threads parallelise inside it).
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit-batch")

    def start(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return 0 if self.queue is None else self.queue.qsize()

    async def submit(self, auditor, row, pixels: np.ndarray):
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Item(auditor, row, pixels, future))
        except asyncio.QueueFull:
            raise QueueFull(f"the check queue is full ({self.queue_size} waiting); retry shortly") from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(items) < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    items.append(self.queue.get_nowait() if left <= 0 else
                                 await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            items = [i for i in items if not i.future.cancelled()]
            groups: dict[int, list[_Item]] = {}
            for item in items:
                groups.setdefault(id(item.auditor), []).append(item)
            for group in groups.values():
                try:
                    verdicts = await loop.run_in_executor(self._executor, self._score, group)
                except Exception as exc:  # noqa: BLE001 (each waiting request answers with the error)
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, verdict in zip(group, verdicts):
                    if not item.future.done():
                        item.future.set_result(verdict)

    def _score(self, group: list[_Item]):
        if self.on_batch:
            self.on_batch(len(group))
        with self.lock:
            return group[0].auditor.score_rows([i.row for i in group], {k: i.pixels for k, i in enumerate(group)})
