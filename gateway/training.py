"""Background training of ULD assistants, and the ``policy_status`` every ULD target shows.

Why on the serving host: with a small model, an operator who adds a ``uld`` target should get it enforced with ULD
minutes later without running anything else. Until then the target is enforced with its fallback policy
(``gateway.unlearning``: a ULD target without ``adapter`` uses ``policy.fallback``), never left unenforced.

How (one ``UldTrainer`` per worker process, at most one training at a time in it):
- After every target-set reload (and every ``lease_s`` in any case) it looks for enabled ``uld`` targets that need
  an assistant: no ``adapter`` and no failure recorded for the target's current content, or an adapter this trainer
  registered for older content (its facts changed: the old adapter is unregistered, so the fallback holds until
  the new one is ready).
- Only one worker among all processes and replicas trains a given target: it must hold the store's lease
  ``uld-train:<id>``, renewed while it trains. An owner that dies stops renewing; after ``lease_s`` another worker
  takes the target over (restart safety), and a restart of the same gateway simply claims it again.
- The status (``pending``, ``training`` with progress, ``ready``, ``failed`` with the reason) is written with
  ``TargetStore.put_status``, beside the target, so no admin field is ever overwritten and no reload is caused.
- On success the assistant is saved to ``<adapters_dir>/uld-<id>-<fingerprint>`` (written to a temporary folder,
  then renamed: never half a checkpoint under the final name) and registered in the target's ``policy.adapter``
  by an ordinary audited write (actor ``uld-trainer``) that checks the target still has the content it was
  trained for; every replica then loads it by hot reload. In a multi-replica deployment the adapters folder must
  therefore be shared storage.

The fingerprint covers what training reads (name, facts, examples, keep, depth, base model): changing any of them
makes the target's status ``pending`` again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from gateway.registry.reload import TargetReloader
from gateway.registry.status import PolicyStatus
from gateway.registry.store import StoreUnavailable, TargetNotFound, TargetStore
from gateway.registry.targets import Target
from models.assistant import AssistantRecipe

log = logging.getLogger(__name__)

LEASE_PREFIX = "uld-train:"
TRAINER_ACTOR = "uld-trainer"
MANUAL_TRAINING = ("automatic training is off on this gateway (UNLEARN_ULD_AUTO_TRAIN): run `unlearn-gateway train "
                   "assistant --target ID` where the model can be trained, then register the result by path "
                   "(PATCH policy.adapter)")


def training_fingerprint(target: Target, base_model: str) -> str:
    """A digest of everything an assistant's training reads; 16 hex characters."""
    layers = getattr(target.policy, "layers", None)
    payload = json.dumps({"model": base_model, "name": target.name, "facts": target.facts,
                          "examples": target.examples, "keep": target.keep, "layers": layers}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def needs_training(target: Target, stored: PolicyStatus | None, fingerprint: str) -> bool:
    """Whether a trainer should (re)train this target's assistant now."""
    policy = target.policy
    if policy.method != "uld" or not target.enabled:
        return False
    if policy.adapter is None:  # unless training already failed on exactly this content
        return not (stored is not None and stored.fingerprint == fingerprint and stored.state == "failed")
    # An adapter we trained and registered for older content of the target: its facts are not all in it.
    return (stored is not None and stored.state == "ready" and stored.adapter == policy.adapter
            and stored.fingerprint != fingerprint)


def shown_status(target: Target, stored: PolicyStatus | None, fingerprint: str, auto_train: bool,
                 serves_uld: bool = True) -> PolicyStatus | None:
    """The ``policy_status`` the admin API shows (None for targets whose policy needs nothing trained).
    ``serves_uld``: this gateway can decode ULD at all (False: the vLLM engine without an assistant worker)."""
    policy = target.policy
    if policy.method != "uld":
        return None
    current = stored if stored is not None and stored.fingerprint == fingerprint else None
    if policy.adapter is not None and not serves_uld:
        return PolicyStatus(state="pending", adapter=policy.adapter, message=(
            "adapter registered, but this gateway has no assistant worker to decode with "
            f"(UNLEARN_ULD_ASSISTANT_URL): enforced with the fallback policy '{policy.fallback}'"))
    if policy.adapter is not None:
        if stored is not None and stored.state == "ready" and stored.adapter == policy.adapter:
            if current is None and auto_train:
                return stored.model_copy(update={"state": "pending", "message": "the target changed since its "
                                                 "assistant was trained: it will be retrained"})
            return stored
        return PolicyStatus(state="ready", adapter=policy.adapter, message="adapter registered by path")
    if current is not None and current.state in ("training", "failed"):
        return current
    if not auto_train:
        message = MANUAL_TRAINING
    elif not target.enabled:
        message = "trains once the target is enabled"
    else:
        message = f"waiting for a trainer; enforced with the fallback policy '{policy.fallback}' until ready"
    return PolicyStatus(state="pending", message=message, fingerprint=fingerprint)


class PolicyStatusView:
    """Statuses as the admin API shows them, read from the store (so a status written by any replica shows)."""

    def __init__(self, store: TargetStore, base_model: str, auto_train: bool, serves_uld: bool = True):
        self.store = store
        self.base_model = base_model
        self.auto_train = auto_train
        self.serves_uld = serves_uld

    async def of(self, targets: Sequence[Target]) -> dict[str, PolicyStatus]:
        uld = [t for t in targets if t.policy.method == "uld"]
        if not uld:
            return {}
        stored = await self.store.get_statuses([t.id for t in uld])
        shown = {t.id: shown_status(t, stored.get(t.id), training_fingerprint(t, self.base_model), self.auto_train,
                                    self.serves_uld) for t in uld}
        return {tid: status for tid, status in shown.items() if status is not None}


@dataclass(frozen=True)
class TrainingConfig:
    base_model: str  # the served model ("demo", a checkpoint folder)
    adapters_dir: Path
    epochs: int = AssistantRecipe.epochs
    lease_s: float = 30.0

    @property
    def heartbeat_s(self) -> float:
        """How often a running training renews its lease and writes its progress."""
        return min(1.0, self.lease_s / 3)


class _LeaseLost(Exception):
    """Another worker owns the target now (our lease expired), or this trainer is shutting down."""


class _Superseded(Exception):
    """The target changed while its assistant trained; the result is not registered."""


@dataclass
class _Progress:
    fraction: float = 0.0
    message: str = "starting"
    stop: bool = False


class UldTrainer:
    """The background trainer of one worker process (see the module docstring). ``start`` once, ``aclose`` once."""

    def __init__(self, store: TargetStore, reloader: TargetReloader, config: TrainingConfig,
                 owner: str | None = None):
        self.store = store
        self.reloader = reloader
        self.config = config
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="uld-trainer")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # -- the loop ---------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            active = self.reloader.current
            try:
                if active.loaded:
                    await self._scan(active.targets)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("ULD trainer: target store unavailable (%s); retrying", exc)
            except Exception:  # a bug here must not stop the loop for every later target
                log.exception("ULD trainer: scan failed")
            # Wake on the next target set version, or after a lease's lifetime to take over a dead owner's work.
            await self.reloader.wait_for_version(active.version + 1, self.config.lease_s)

    async def _scan(self, targets: Sequence[Target]) -> None:
        uld = [t for t in targets if t.policy.method == "uld" and t.enabled]
        if not uld:
            return
        stored = await self.store.get_statuses([t.id for t in uld])
        for target in uld:
            if needs_training(target, stored.get(target.id), self._fingerprint(target)):
                await self._train_one(target.id)

    def _fingerprint(self, target: Target) -> str:
        return training_fingerprint(target, self.config.base_model)

    async def _train_one(self, target_id: str) -> None:
        lease = LEASE_PREFIX + target_id
        if not await self.store.acquire_lease(lease, self.owner, self.config.lease_s):
            return  # another worker trains it
        try:
            target = await self.store.get(target_id)  # fresh: the snapshot may be older than the lease
            if target is None:
                return
            fingerprint = self._fingerprint(target)
            stored = (await self.store.get_statuses([target_id])).get(target_id)
            if not needs_training(target, stored, fingerprint):
                return  # another worker finished it just before we got the lease
            if target.policy.adapter is not None:  # stale: back to the fallback until the new one is ready
                await self._set_adapter(target_id, None, expect=target.policy.adapter)
            await self._put(target_id, "training", fingerprint, progress=0.0, message="starting")
            log.info("ULD trainer: training the assistant of target %s", target_id)
            try:
                path = await self._train(target, fingerprint, lease)
            except _LeaseLost:
                log.warning("ULD trainer: stopped training target %s (lease lost or shutting down)", target_id)
                return
            except Exception as exc:  # noqa: BLE001 - any failure is the status's reason (GET /admin/targets/{id})
                log.warning("ULD trainer: training target %s failed: %s", target_id, exc)
                await self._put(target_id, "failed", fingerprint, reason=f"{type(exc).__name__}: {exc}")
                return
            try:
                await self._set_adapter(target_id, str(path), expect=None, fingerprint=fingerprint)
            except (_Superseded, TargetNotFound):
                log.info("ULD trainer: target %s changed while training; not registering %s", target_id, path)
                return
            await self._put(target_id, "ready", fingerprint, progress=1.0, adapter=str(path), message="registered")
            log.info("ULD trainer: target %s is served with ULD (assistant %s)", target_id, path)
        finally:
            with suppress(StoreUnavailable):
                await self.store.release_lease(lease, self.owner)

    async def _put(self, target_id: str, state: str, fingerprint: str, **fields: object) -> None:
        status = PolicyStatus.model_validate({"state": state, "fingerprint": fingerprint, "owner": self.owner,
                                              **fields})
        await self.store.put_status(target_id, status)

    async def _set_adapter(self, target_id: str, adapter: str | None, *, expect: str | None,
                           fingerprint: str | None = None) -> None:
        """Write ``policy.adapter`` if the target still has ``expect`` there (and, given, the fingerprint)."""

        def change(current: Target) -> Target:  # pure: the store may run it more than once
            if (current.policy.method != "uld" or current.policy.adapter != expect
                    or (fingerprint is not None and self._fingerprint(current) != fingerprint)):
                raise _Superseded
            return current.model_copy(update={"policy": current.policy.model_copy(update={"adapter": adapter})})

        await self.store.update(target_id, change, TRAINER_ACTOR, action="patch")

    # -- one training -----------------------------------------------------------------------------------------

    def _folder(self, target: Target, fingerprint: str) -> Path:
        from models.assistant import assistant_dir

        # The fingerprint in the name: a retrained assistant never replaces files an engine may have loaded.
        folder = assistant_dir(self.config.adapters_dir, [target.id])
        return folder.with_name(f"{folder.name}-{fingerprint}")

    async def _train(self, target: Target, fingerprint: str, lease: str) -> Path:
        """Train in a worker thread; renew the lease and publish progress every heartbeat meanwhile."""
        from models.assistant import train_assistant

        final = self._folder(target, fingerprint)
        partial = final.with_name(f"{final.name}.partial-{self.owner}")
        progress = _Progress()
        recipe = AssistantRecipe(layers=target.policy.layers, epochs=self.config.epochs)  # type: ignore[union-attr]

        def report(fraction: float, message: str) -> None:  # called by train_assistant in the worker thread
            if progress.stop:
                raise _LeaseLost
            progress.fraction, progress.message = fraction, message

        def work() -> Path:
            final.parent.mkdir(parents=True, exist_ok=True)  # an unwritable adapters folder fails here, at once
            shutil.rmtree(partial, ignore_errors=True)
            try:
                train_assistant([target], self.config.base_model, partial, recipe, on_progress=report,
                                progress_bar=False)
                if final.exists():  # left by an owner that died between saving and registering
                    shutil.rmtree(final)
                os.replace(partial, final)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            return final

        job = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=self.config.heartbeat_s)
                if done:
                    return job.result()
                if not await self._renew(lease):
                    progress.stop = True  # the thread stops at its next step
                    await asyncio.wait({job})
                    raise _LeaseLost
                with suppress(StoreUnavailable):  # progress is informative; the lease renewal above decides
                    await self._put(target.id, "training", fingerprint, progress=round(progress.fraction, 4),
                                    message=progress.message)
        except asyncio.CancelledError:
            progress.stop = True
            raise

    async def _renew(self, lease: str) -> bool:
        try:
            return await self.store.acquire_lease(lease, self.owner, self.config.lease_s)
        except StoreUnavailable:
            return True  # keep training through a store blip; the lease may lapse and another worker start


__all__ = ["LEASE_PREFIX", "TRAINER_ACTOR", "PolicyStatusView", "TrainingConfig", "UldTrainer", "needs_training",
           "shown_status", "training_fingerprint"]
