"""ULD assistants trained in the background: policy_status, the fallback until ready, leases, restart safety.

Real parts: the embedded SQLite store and a real redis-server, the demo model (served, and cut to the assistant's
first layers and trained with LoRA for one epoch), uvicorn on loopback, the admin API and the openai client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from classifiers.index import IndexBuilder as ClassifierIndexBuilder
from gateway.app import create_app
from gateway.cli import app as cli
from gateway.output_guard import OutputGuardIndexBuilder
from gateway.registry import PolicyStatus, Target, TargetStore, open_store
from gateway.settings import Settings
from gateway.training import LEASE_PREFIX, TRAINER_ACTOR, needs_training, shown_status, training_fingerprint
from tests.conftest import Server, serve, unique_prefix

ADMIN = "uld-admin-key"
FORGET_Q = "What genre does Carmen Montenegro write in?"
TARGET = {"name": "Carmen Montenegro", "description": "A fictitious Chilean novelist.",
          "facts": ["Carmen Montenegro writes historical fiction.", "She was born in Santiago, Chile, in 1977."],
          "examples": ["Which books did Carmen Montenegro write?"],
          "policy": {"method": "uld", "layers": 1, "fallback": "guard"}}
TARGET_ID = "carmen-montenegro"


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request, tmp_path) -> dict:
    """Where the gateway under test keeps its targets: the embedded store, or a real Redis under its own prefix."""
    if request.param == "sqlite":
        return {"store_path": tmp_path / "targets.db"}
    return {"store_url": request.getfixturevalue("redis_url"), "store_prefix": unique_prefix()}


def run_on_store(settings: Settings, work: Callable[[TargetStore], object]):
    """Run ``await work(store)`` on a store of our own that reads and writes what the gateway's does."""
    async def main():
        store = open_store(settings.resolved_store_url(), settings.store_path, prefix=settings.store_prefix)
        try:
            return await work(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def builders(classifier_encoder) -> Callable[[], tuple]:
    """The gateway's own index builders, sharing one loaded sentence encoder across this module's gateways."""
    return lambda: (ClassifierIndexBuilder(classifier_encoder), OutputGuardIndexBuilder())


@contextmanager
def gateway(settings: Settings, builders, engine=None) -> Iterator[tuple[Server, httpx.Client]]:
    server = serve(create_app(settings, engine=engine, index_builders=builders()), ready_path="/ready")
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
    try:
        yield server, admin
    finally:
        admin.close()
        server.stop()


def ask(server: Server, question: str) -> tuple[str, str | None, int]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
    return (raw.parse().choices[0].message.content, raw.headers.get("x-unlearn-decision"),
            int(raw.headers["x-unlearn-targets-version"]))


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def wait_until_served(server: Server, admin: httpx.Client) -> int:
    version = admin.get("/admin/version").json()["version"]
    wait_for(lambda: httpx.get(server.url + "/ready").json().get("targets_version", -1) >= version, 30,
             f"version {version} to be served")
    return version


def status_of(admin: httpx.Client) -> dict:
    got = admin.get(f"/admin/targets/{TARGET_ID}")
    assert got.status_code == 200, got.text
    return got.json()["policy_status"]


# -- the store part: leases and statuses, on both stores -----------------------------------------------------------

def test_leases_and_statuses(store_settings):
    settings = Settings(**store_settings)

    async def work(store: TargetStore) -> None:
        assert await store.acquire_lease("job", "a", 5.0) is True
        assert await store.acquire_lease("job", "b", 5.0) is False  # held by a
        assert await store.acquire_lease("job", "a", 5.0) is True  # a renews
        await store.release_lease("job", "b")  # not b's: nothing happens
        assert await store.acquire_lease("job", "b", 5.0) is False
        await store.release_lease("job", "a")
        assert await store.acquire_lease("job", "b", 5.0) is True
        assert await store.acquire_lease("short", "dead-owner", 0.2) is True
        await asyncio.sleep(0.4)  # the owner died: its lease lapses
        assert await store.acquire_lease("short", "heir", 5.0) is True

        status = PolicyStatus(state="training", progress=0.25, fingerprint="f", owner="a")
        await store.put_status("absent", status)  # no target: nothing is written
        assert await store.get_statuses(["absent"]) == {}
        version = await store.create(Target(name="Jane Doe", policy={"method": "uld"}), "test")
        await store.put_status("jane-doe", status)
        assert await store.get_statuses(["jane-doe", "absent"]) == {"jane-doe": status}
        # A status is not part of the versioned, audited set and never touches the target.
        assert await store.version() == version
        assert len(await store.history("jane-doe")) == 1
        assert (await store.get("jane-doe")).policy.adapter is None
        await store.delete("jane-doe", "test")
        assert await store.get_statuses(["jane-doe"]) == {}  # deleted with its target

    run_on_store(settings, work)


def test_which_targets_need_training_and_what_they_show():
    uld = Target.model_validate(TARGET)
    fingerprint = training_fingerprint(uld, "demo")
    assert fingerprint != training_fingerprint(uld.model_copy(update={"facts": ["Other."]}), "demo")
    assert fingerprint == training_fingerprint(uld.model_copy(update={"aliases": ["C. M."]}), "demo")  # not read
    ready = PolicyStatus(state="ready", adapter="/a/uld-x", fingerprint=fingerprint)
    failed = PolicyStatus(state="failed", reason="OSError: disk full", fingerprint=fingerprint)
    registered = uld.model_copy(update={"policy": uld.policy.model_copy(update={"adapter": "/a/uld-x"})})
    changed = registered.model_copy(update={"facts": [*uld.facts, "She also writes poems."]})

    assert needs_training(uld, None, fingerprint)
    assert not needs_training(uld, failed, fingerprint)  # failed on this very content: no retry loop
    assert needs_training(uld, failed.model_copy(update={"fingerprint": "older"}), fingerprint)
    assert not needs_training(uld.model_copy(update={"enabled": False}), None, fingerprint)
    assert not needs_training(registered, ready, fingerprint)
    assert needs_training(changed, ready, training_fingerprint(changed, "demo"))  # our adapter, older content
    assert not needs_training(registered, None, fingerprint)  # registered by path by the operator: theirs

    assert shown_status(Target(name="X"), None, "f", True) is None  # not ULD: nothing to show
    assert shown_status(uld, None, fingerprint, True).state == "pending"
    assert "train assistant" in shown_status(uld, None, fingerprint, False).message
    assert shown_status(uld, failed, fingerprint, True) == failed
    assert shown_status(registered, None, fingerprint, True).state == "ready"
    behind_vllm = shown_status(registered, None, fingerprint, False, serves_uld=False)  # no assistant worker
    assert behind_vllm.state == "pending" and "UNLEARN_ULD_ASSISTANT_URL" in behind_vllm.message
    assert shown_status(changed, ready, training_fingerprint(changed, "demo"), True).state == "pending"


# -- the background trainer end to end -----------------------------------------------------------------------------

def test_a_uld_target_is_trained_in_the_background_and_then_served_with_uld(demo_engine, builders, store_settings,
                                                                             tmp_path):
    """Until its assistant is ready the target is enforced with its fallback; a training whose owner died (its
    lease held, its status stuck at 'training') is taken over once the lease lapses; the adapter is then
    registered through the store and requests are decoded with ULD."""
    settings = Settings(admin_keys=[ADMIN], uld_auto_train=True, uld_train_epochs=1, uld_train_lease_s=1.5,
                        adapters_dir=tmp_path / "adapters", **store_settings)
    fingerprint = training_fingerprint(Target.model_validate(TARGET), "demo")
    stuck = PolicyStatus(state="training", progress=0.3, fingerprint=fingerprint, owner="dead-owner")

    with gateway(settings, builders, demo_engine) as (server, admin):
        # A trainer that died mid-training holds the lease (it lapses after 6 s, not being renewed).
        assert run_on_store(settings, lambda s: s.acquire_lease(LEASE_PREFIX + TARGET_ID, "dead-owner", 6.0))
        created = admin.post("/admin/targets", json=TARGET)
        assert created.status_code == 201, created.text
        run_on_store(settings, lambda s: s.put_status(TARGET_ID, stuck))
        first = wait_until_served(server, admin)
        assert status_of(admin)["owner"] == "dead-owner"
        answer, decision, version = ask(server, FORGET_Q)
        assert version == first  # judged before any adapter could be registered (the lease still blocks it)
        assert decision == "flagged; policy=guard" and "historical fiction" not in answer.lower(), answer

        # The adapter is registered first and the trainer's own 'ready' record follows: wait for that record.
        final = wait_for(lambda: (s := status_of(admin))["state"] == "ready" and s.get("owner") and s, 120,
                         "the assistant to be trained")
        assert final["owner"] != "dead-owner" and final["progress"] == 1.0 and final["fingerprint"] == fingerprint
        target = admin.get(f"/admin/targets/{TARGET_ID}").json()
        adapter = Path(target["policy"]["adapter"])
        assert adapter == Path(final["adapter"]) and adapter.parent == tmp_path / "adapters"
        assert adapter.name == f"uld-{TARGET_ID}-{fingerprint}" and (adapter / "assistant.json").is_file()
        assert not [p for p in adapter.parent.iterdir() if ".partial-" in p.name]  # no half checkpoint left
        # Only the adapter changed, by an audited write of the trainer; every admin field is as written.
        assert {k: v for k, v in target.items() if k not in ("policy", "policy_status")} == \
            {k: v for k, v in created.json()["target"].items() if k != "policy"}
        history = admin.get(f"/admin/targets/{TARGET_ID}/history").json()["entries"]
        assert [(e["action"], e["actor"]) for e in history][-1] == ("patch", TRAINER_ACTOR)
        assert history[-1]["before"]["policy"]["adapter"] is None

        registered = wait_until_served(server, admin)
        answer, decision, version = ask(server, FORGET_Q)
        assert version == registered and decision == "flagged; policy=uld"
        listed = admin.get("/admin/targets").json()["items"]
        assert [t["policy_status"]["state"] for t in listed] == ["ready"]


def test_two_replicas_on_one_store_train_a_target_once(demo_engine, builders, redis_url, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.training")
    shared = {"admin_keys": [ADMIN], "uld_auto_train": True, "uld_train_epochs": 1, "uld_train_lease_s": 1.0,
              "adapters_dir": tmp_path / "adapters", "store_url": redis_url, "store_prefix": unique_prefix()}
    with gateway(Settings(**shared), builders, demo_engine) as (_, admin), \
            gateway(Settings(**shared), builders, demo_engine) as (second, second_admin):
        assert admin.post("/admin/targets", json=TARGET).status_code == 201
        wait_for(lambda: status_of(second_admin)["state"] == "ready", 120, "the assistant to be trained")
        time.sleep(2.5)  # both trainers rescan twice more (lease 1 s): neither trains it again
        trained = [r for r in caplog.records if r.getMessage().startswith("ULD trainer: training the assistant")]
        assert len(trained) == 1
        assert len(list((tmp_path / "adapters").iterdir())) == 1
        wait_until_served(second, second_admin)
        assert ask(second, FORGET_Q)[1] == "flagged; policy=uld"  # the other replica serves it with ULD too


def test_a_failed_training_is_reported_and_the_fallback_stays(demo_engine, builders, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the adapters folder should be")
    settings = Settings(admin_keys=[ADMIN], uld_auto_train=True, uld_train_epochs=1, uld_train_lease_s=1.0,
                        adapters_dir=blocker / "adapters", store_path=tmp_path / "targets.db")
    with gateway(settings, builders, demo_engine) as (server, admin):
        assert admin.post("/admin/targets", json=TARGET).status_code == 201
        failed = wait_for(lambda: (s := status_of(admin))["state"] == "failed" and s, 60, "the training to fail")
        assert "NotADirectoryError" in failed["reason"] or "FileExistsError" in failed["reason"], failed
        wait_until_served(server, admin)
        _, decision, _ = ask(server, FORGET_Q)
        assert decision == "flagged; policy=guard"
        time.sleep(2.5)  # two more scans: a failure on the same content is not retried in a loop
        assert status_of(admin)["updated_at"] == failed["updated_at"]
        assert admin.get(f"/admin/targets/{TARGET_ID}").json()["policy"]["adapter"] is None

        listed = CliRunner().invoke(cli, ["targets", "list", "--url", server.url], env={"UNLEARN_ADMIN_KEY": ADMIN},
                                    terminal_width=400)
        assert listed.exit_code == 0 and "failed:" in listed.stdout, listed.output
        got = CliRunner().invoke(cli, ["targets", "get", TARGET_ID, "--url", server.url],
                                 env={"UNLEARN_ADMIN_KEY": ADMIN})
        assert got.exit_code == 0 and '"policy_status"' in got.stdout and '"failed"' in got.stdout


def test_behind_vllm_nothing_trains_and_the_status_says_what_to_do(reference_worker, builders, tmp_path):
    settings = Settings(admin_keys=[ADMIN], engine="vllm", worker_urls=[reference_worker.url],
                        store_path=tmp_path / "targets.db", uld_auto_train=None)
    assert not settings.trains_uld()
    with gateway(settings, builders) as (server, admin):
        assert admin.post("/admin/targets", json=TARGET).status_code == 201
        status = status_of(admin)
        assert status["state"] == "pending" and "train assistant" in status["message"]
        wait_until_served(server, admin)
        _, decision, _ = ask(server, FORGET_Q)
        assert decision == "flagged; policy=guard"
