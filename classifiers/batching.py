"""Batched classification, and the async micro-batching front the gateway awaits.

Why batch: one encoder call costs a fixed overhead plus a per-window cost; on two cores a batch of 32 short
windows costs far less than 32 single calls (see README "Classifier"). Under load, concurrent requests are
therefore collected for at most ``max_wait_ms`` (or until ``max_batch`` requests are waiting), their windows are
encoded in one call on a worker thread, and each caller gets its own ``Decision``. Requests that arrive while a
batch is being encoded queue up and form the next batch by themselves; the short wait is only spent when the
previous batch had company too, so a lone caller on a quiet gateway never waits for requests that are not
coming.

The index in use can be swapped at any time (hot reload); each batch uses the index it started with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from classifiers.index import Conversation, Decision, TargetIndex


def classify_batch(index: TargetIndex, conversations: Sequence[Conversation]) -> list[Decision]:
    """Classify several conversations with one encoder call for all their windows."""
    prepared = [index.prepare(c) for c in conversations]
    texts = [w.text for p in prepared for w in p.windows]
    started = time.perf_counter()
    vectors = index.encoder.encode(texts) if texts else np.zeros((0, index.encoder.dim), np.float32)
    encode_ms = (time.perf_counter() - started) * 1000
    out: list[Decision] = []
    offset = 0
    for p in prepared:
        n = len(p.windows)
        share = encode_ms * n / max(len(texts), 1)
        out.append(index.decide(p, vectors[offset:offset + n], encode_ms=share))
        offset += n
    return out


class Classifier:
    """``await classifier.classify(messages)`` from any number of concurrent tasks."""

    def __init__(self, index: TargetIndex, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        self._index = index
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self._queue: asyncio.Queue[tuple[Conversation, asyncio.Future[Decision]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier")
        self.batches = 0
        self.classified = 0
        self._last_size = 0

    @property
    def index(self) -> TargetIndex:
        return self._index

    def swap(self, index: TargetIndex) -> None:
        """Use ``index`` from the next batch on (atomic: a reference assignment)."""
        self._index = index

    async def classify(self, conversation: Conversation) -> Decision:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue))
        future: asyncio.Future[Decision] = loop.create_future()
        await self._queue.put((conversation, future))
        return await future

    async def _run(self, queue: asyncio.Queue[tuple[Conversation, asyncio.Future[Decision]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or self._last_size <= 1:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(c, f) for c, f in batch if not f.cancelled()]
            if not live:
                continue
            index = self._index
            try:
                decisions = await loop.run_in_executor(self._executor, classify_batch, index, [c for c, _ in live])
            except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting caller
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.classified += len(live)
            self._last_size = len(live)
            for (_, f), d in zip(live, decisions, strict=True):
                if not f.done():
                    f.set_result(d)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)
