"""prometheus_client's multiprocess mode for ``serve --workers N``: one folder of metric files per server.

Why: each uvicorn worker is its own process, and a scrape reaches one of them at random; summing counters over
all workers needs their values in shared files (see ``gateway.metrics``). prometheus_client picks its value
storage when it is first imported, from ``PROMETHEUS_MULTIPROC_DIR``, so the folder must be in the environment
before the workers start: ``serve`` calls ``multiprocess_metrics`` around ``uvicorn.run``.

A folder named by the operator is emptied at start (old files would add a previous run's counts); one made here
is a fresh temporary folder, removed when the server stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def multiprocess_metrics(workers: int) -> Iterator[str | None]:
    """With more than one worker: set up the shared folder for the duration of the block; yields its path."""
    if workers <= 1:
        yield None
        return
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield str(folder)
        return
    folder = Path(tempfile.mkdtemp(prefix="unlearn-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    try:
        yield str(folder)
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
