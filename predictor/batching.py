"""Coalesces concurrent scoring calls into one model batch.

The router asks for one prompt per request; encoding 64 prompts together costs a fraction of 64 separate
passes. While a batch runs on the executor, new calls wait in a queue; the next batch takes all of them (up
to `max_prompts`). A lone call starts at once: batching never adds a wait of its own.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable


class MicroBatcher:
    def __init__(self, fn: Callable[[list[str]], list[float]], executor: Executor, max_prompts: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        self.fn = fn
        self.on_batch = on_batch
        self.executor = executor
        self.max_prompts = max_prompts
        self._pending: list[tuple[list[str], asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.batches = 0  # model calls made (for tests and metrics)

    async def score(self, prompts: list[str]) -> list[float]:
        if not prompts:
            return []
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((prompts, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            take, n = [], 0
            while self._pending and (not take or n + len(self._pending[0][0]) <= self.max_prompts):
                prompts, fut = self._pending.pop(0)
                if fut.done():  # the caller gave up (deadline, cancellation)
                    continue
                take.append((prompts, fut))
                n += len(prompts)
            if not take:
                continue
            batch = [p for prompts, _ in take for p in prompts]
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                scores = await loop.run_in_executor(self.executor, self.fn, batch)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            at = 0
            for prompts, fut in take:
                if not fut.done():
                    fut.set_result(scores[at:at + len(prompts)])
                at += len(prompts)
