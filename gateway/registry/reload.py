"""Hot reload: every gateway worker process holds the active target set and follows the store.

Why this shape: a request must see one whole target set (old or new, never half), a change must reach every
worker within milliseconds, and a store outage must never make a worker forget targets it knows. So:

- ``ActiveTargets`` is an immutable snapshot (version, targets, the indexes built from them). The worker keeps
  exactly one reference to the current one and replaces it in a single assignment; a request reads the reference
  once and keeps that snapshot for its whole life.
- ``TargetReloader`` runs background tasks per worker: one follows ``store.watch()`` (pub/sub on Redis, a
  version poll on SQLite), one resyncs every ``resync_interval_s`` in case a notification was lost, one probes
  the store every second to know whether it is reachable. They only *ask* for a load; a single loader task reads
  ``snapshot()``, builds the indexes in a thread (``asyncio.to_thread``: off the event loop, so requests keep
  flowing) and swaps. Requests that arrive during a build are served with the previous snapshot.
- Store down: the last good snapshot stays; after ``grace_s`` of failed contact ``ready()`` turns False (so a
  load balancer can route around) and the outage is logged. When the store answers again, a load is requested
  at once, so the worker catches up without waiting for the next resync.
- A store whose version went *down* (e.g. Redis restarted without persistence) has lost data: the worker keeps
  its larger set rather than drop targets, logs an error on every resync and adopts the store's set once its
  version passes the held one (or the process restarts).

Index builders (``IndexBuilder``) are how the classifier plugs in: each gets the new targets and the index it
built for the previous set (to reuse what did not change) and returns the new index, published under its name
in ``ActiveTargets.indexes``. A builder that fails keeps the previous snapshot in place and is retried on the
next notification or resync.

Reload lag (``swap_listeners``, fed to ``unlearn_targets_reload_lag_seconds``): the time from the moment this
worker learns of a newer version (a notification, i.e. the write's publication, or a resync that finds it) to
the swap that serves it. It leaves out the pub/sub hop itself (sub-millisecond on one network) and uses only this
process's clock, so it needs no clock agreement between hosts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from gateway.registry.store import StoreUnavailable, TargetStore
from gateway.registry.targets import Target

log = logging.getLogger(__name__)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@runtime_checkable
class IndexBuilder(Protocol):
    """Builds one derived structure (e.g. the classifier's alias automaton and embeddings) from a target set.

    ``build`` runs in a worker thread, never on the event loop; ``previous`` is what this builder returned for
    the previous set (None on the first build), so an implementation can rebuild only what changed. It must not
    mutate ``previous``: requests may still be using it.
    """

    name: str

    def build(self, targets: Sequence[Target], previous: Any | None) -> Any: ...


@dataclass(frozen=True, slots=True)
class ActiveTargets:
    """One immutable target set as a worker serves it. ``loaded`` is False only for the placeholder that a
    worker holds before its first successful load."""

    version: int
    targets: tuple[Target, ...]
    by_id: Mapping[str, Target]
    indexes: Mapping[str, Any]
    loaded_at: float  # time.time() of the swap, comparable across processes on one host
    loaded: bool = True
    enabled: tuple[Target, ...] = ()  # the enabled targets, listed once per set (requests must not walk them all)

    @classmethod
    def placeholder(cls) -> ActiveTargets:
        return cls(0, (), _EMPTY, _EMPTY, 0.0, loaded=False)

    @classmethod
    def build(cls, version: int, targets: Sequence[Target], indexes: Mapping[str, Any]) -> ActiveTargets:
        return cls(version, tuple(targets), MappingProxyType({t.id: t for t in targets}),
                   MappingProxyType(dict(indexes)), time.time(), enabled=tuple(t for t in targets if t.enabled))


@dataclass
class ReloadStats:
    """Counters for /metrics and /ready."""

    loads: int = 0
    load_failures: int = 0
    last_load_seconds: float = 0.0
    last_error: str | None = None
    store_version_behind: int | None = None  # the store's version when it is lower than the held one
    last_reload_lag_seconds: float | None = None  # notice of a newer version -> its swap (see module docstring)


class TargetReloader:
    """Keeps ``current`` in step with the store (see the module docstring). ``start`` once, ``aclose`` once."""

    def __init__(self, store: TargetStore, builders: Sequence[IndexBuilder] = (), *,
                 resync_interval_s: float = 30.0, grace_s: float = 10.0, probe_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        names = [b.name for b in builders]
        if len(set(names)) != len(names):
            raise ValueError(f"index builder names must be unique, got {names}")
        self.store = store
        self.builders = tuple(builders)
        self.resync_interval_s = resync_interval_s
        self.grace_s = grace_s
        self.probe_interval_s = min(probe_interval_s, max(grace_s / 2, 0.05)) if grace_s > 0 else probe_interval_s
        self.stats = ReloadStats()
        self._clock = clock
        self._active = ActiveTargets.placeholder()
        self._wanted = asyncio.Event()
        self._down_since: float | None = None
        self._outage_logged = False
        self._tasks: list[asyncio.Task[None]] = []
        self._swapped = asyncio.Condition()
        self._noticed: tuple[int, float] | None = None  # (newer version, perf_counter()) when first noticed
        # Called after each swap that follows a noticed newer version: (version, lag in seconds). Must not block.
        self.swap_listeners: list[Callable[[int, float], None]] = []

    # -- what requests read ---------------------------------------------------------------------------------

    @property
    def current(self) -> ActiveTargets:
        """The active snapshot; read it once per request and keep using that object."""
        return self._active

    def store_ok(self) -> bool:
        """False once the store has been unreachable for longer than the grace period."""
        down = self._down_since
        return down is None or self._clock() - down <= self.grace_s

    def ready(self) -> bool:
        return self._active.loaded and self.store_ok()

    def status(self) -> dict[str, Any]:
        active = self._active
        return {
            "version": active.version,
            "loaded": active.loaded,
            "count": len(active.targets),
            "loaded_at": active.loaded_at or None,
            "store_ok": self.store_ok(),
            "store_down_s": None if self._down_since is None else round(self._clock() - self._down_since, 3),
            "store_version_behind": self.stats.store_version_behind,
            "last_error": self.stats.last_error,
        }

    # -- life cycle -----------------------------------------------------------------------------------------

    async def start(self, initial_timeout_s: float = 5.0) -> None:
        """Load once (bounded by ``initial_timeout_s``), then start the background tasks. A store that is down
        at startup leaves the worker not ready; the tasks keep trying."""
        try:
            await asyncio.wait_for(self._load(), initial_timeout_s)
        except (StoreUnavailable, TimeoutError) as exc:
            self._mark_down(f"initial load failed: {exc}")
        except Exception as exc:  # a builder bug must not keep the process from starting
            log.exception("initial target load failed")
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self._tasks = [asyncio.create_task(loop(), name=f"targets-{loop.__name__.strip('_')}")
                       for loop in (self._loader, self._follow, self._resync, self._probe)]
        if not self._active.loaded:
            self._wanted.set()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def wait_for_version(self, version: int, timeout_s: float) -> bool:
        """Wait until the active version is at least ``version``; True if it got there in time."""
        async def reached() -> None:
            async with self._swapped:
                await self._swapped.wait_for(lambda: self._active.loaded and self._active.version >= version)

        try:
            await asyncio.wait_for(reached(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- loading --------------------------------------------------------------------------------------------

    async def _load(self) -> None:
        started = time.perf_counter()
        version, targets = await self.store.snapshot()
        self._mark_up()
        active = self._active
        if active.loaded and version == active.version:
            self._clear_notice(version)
            return
        if active.loaded and version < active.version:
            self.stats.store_version_behind = version
            log.error("target store version went back from %d to %d (store lost data?): keeping the %d targets "
                      "held at version %d; restore the store or write until its version passes %d",
                      active.version, version, len(active.targets), active.version, active.version)
            return
        self.stats.store_version_behind = None
        indexes: dict[str, Any] = {}
        for builder in self.builders:
            indexes[builder.name] = await asyncio.to_thread(builder.build, targets, active.indexes.get(builder.name))
        new = await asyncio.to_thread(ActiveTargets.build, version, targets, indexes)
        async with self._swapped:
            self._active = replace(new, loaded_at=time.time())  # the swap: one reference assignment
            self._swapped.notify_all()
        self.stats.loads += 1
        self.stats.last_load_seconds = time.perf_counter() - started
        if self._noticed is not None and active.loaded and version >= self._noticed[0]:
            self._swapped_after(version, time.perf_counter() - self._noticed[1])
        self._clear_notice(version)
        self.stats.last_error = None
        log.info("targets version %d active (%d targets, loaded in %.3f s)", version, len(targets),
                 self.stats.last_load_seconds)

    async def _loader(self) -> None:
        backoff = 0.1
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self._load()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.load_failures += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, StoreUnavailable):
                    self._mark_down(str(exc))
                else:
                    log.exception("loading targets failed; keeping version %d", self._active.version)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wanted.set()

    async def _follow(self) -> None:
        """Consume the store's version notifications (the stores reconnect on their own)."""
        while True:
            try:
                async for version in self.store.watch():
                    self._mark_up()
                    if version != self._active.version or not self._active.loaded:
                        self._notice(version)
                        self._wanted.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever broke the subscription, subscribe again
                log.warning("target notifications interrupted (%s); resubscribing", exc)
                await asyncio.sleep(1.0)

    async def _resync(self) -> None:
        """Compare versions periodically: a lost notification costs at most one interval. Every write changes
        the version in the same transaction as the records, so equal versions mean equal sets."""
        while True:
            await asyncio.sleep(self.resync_interval_s)
            try:
                version = await self.store.version()
            except StoreUnavailable as exc:
                self._mark_down(str(exc))
                continue
            self._mark_up()
            if version != self._active.version or not self._active.loaded:
                if version < self._active.version:
                    log.error("target store version %d is behind the held version %d", version,
                              self._active.version)
                self._notice(version)
                self._wanted.set()

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                ok = await asyncio.wait_for(self.store.ping(), max(self.probe_interval_s * 2, 1.0))
            except TimeoutError:
                ok = False
            if ok:
                self._mark_up()
            else:
                self._mark_down("ping failed")
            if self._down_since is not None and not self.store_ok() and not self._outage_logged:
                self._outage_logged = True
                log.error("target store unreachable for %.1f s (grace %.1f s): reporting not ready; still "
                          "serving the last good set (version %d, %d targets)", self._clock() - self._down_since,
                          self.grace_s, self._active.version, len(self._active.targets))

    def _notice(self, version: int) -> None:
        if version > self._active.version and self._noticed is None:
            self._noticed = (version, time.perf_counter())

    def _clear_notice(self, served: int) -> None:
        """Forget the notice once a version at least as new is served (a newer notice during a load stays)."""
        if self._noticed is not None and served >= self._noticed[0]:
            self._noticed = None

    def _swapped_after(self, version: int, lag: float) -> None:
        self.stats.last_reload_lag_seconds = lag
        for listener in self.swap_listeners:
            try:
                listener(version, lag)
            except Exception:  # a metrics bug must not stop reloads
                log.exception("reload listener failed")

    def _mark_down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
            log.warning("target store unreachable (%s); serving the last good set (version %d)", why,
                        self._active.version)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("target store reachable again after %.1f s; catching up",
                        self._clock() - self._down_since)
            self._down_since = None
            self._outage_logged = False
            self._wanted.set()
