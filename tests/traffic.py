"""Background request loops for fault tests: requests sent back to back from a thread while a test breaks things."""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import httpx


class BackgroundTraffic:
    """Sends one request after another until the ``with`` block ends; ``results`` holds ``(time, *outcome)``.

    Subclasses say what request ``i`` is and what of its outcome to keep (``_send``); transport errors are
    theirs to turn into a recorded status, so the loop never dies mid-test.
    """

    def __init__(self, headers: dict[str, str] | None = None, timeout_s: float = 120):
        self.results: list[tuple[Any, ...]] = []
        self._client_options = {"headers": headers or {}, "timeout": timeout_s}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _send(self, client: httpx.Client, i: int) -> tuple[Any, ...]:
        raise NotImplementedError

    def _run(self) -> None:
        with httpx.Client(**self._client_options) as client:
            i = 0
            while not self._stop.is_set():
                self.results.append((time.monotonic(), *self._send(client, i)))
                i += 1
