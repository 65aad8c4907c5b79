"""The admin API contract over real HTTP: a gateway (uvicorn on loopback, the demo model) on a real Redis.

Each test gets its own gateway under its own Redis key prefix, so every test starts from an empty target set.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import Server, serve, unique_prefix
from tests.fault_servers import wait_until

ADMIN_KEY = "admin-key-for-tests"
USER_KEY = "user-key-for-tests"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
JSONL = {"content-type": "application/x-ndjson"}


def make_gateway(engine, redis_url: str, prefix: str | None = None, **settings) -> Server:
    config = Settings(admin_keys=[ADMIN_KEY], api_keys=[USER_KEY], store_url=redis_url,
                      store_prefix=prefix or unique_prefix(), **settings)
    return serve(create_app(config, engine=engine), ready_path="/ready")


@pytest.fixture
def gw(demo_engine, redis_url) -> Iterator[Server]:
    server = make_gateway(demo_engine, redis_url)
    yield server
    server.stop()


@pytest.fixture
def admin(gw) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, headers=ADMIN, timeout=30) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["message"]
    return body["error"]


def jsonl(*items) -> bytes:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items).encode()


# -- create / get / conflict ---------------------------------------------------------------------------------------

def test_create_then_get_and_conflict(admin):
    created = admin.post("/admin/targets", json={"name": "Matthew Perry", "aliases": ["Matthew Langford Perry"],
                                                  "policy": {"method": "guard", "mode": "soft"}})
    assert created.status_code == 201
    body = created.json()
    assert body["version"] == 1 and body["target"]["id"] == "matthew-perry"
    assert created.headers["x-unlearn-targets-version"] == "1"
    assert created.headers["location"] == "/admin/targets/matthew-perry"
    assert body["target"]["policy"] == {"method": "guard", "mode": "soft", "penalty": 10.0, "top_facts": 3,
                                        "semantic_threshold": 0.75, "ngram": 3, "ngram_facts": "all"}

    got = admin.get("/admin/targets/matthew-perry")
    assert got.status_code == 200 and got.json() == body["target"]

    error = error_of(admin.post("/admin/targets", json={"name": "Matthew Perry"}), 409)
    assert error["code"] == "target_exists" and error["param"] == "id"
    assert admin.get("/admin/version").json()["version"] == 1  # the conflict wrote nothing


def test_validation_errors_are_422_with_field_paths(admin):
    error = error_of(admin.post("/admin/targets", json={"name": "X", "policy": {"method": "guard", "penalty": -1},
                                                        "enabeld": False}), 422)
    assert error["param"] == "policy.guard.penalty" and error["code"] == "validation_error"
    assert {d["field"] for d in error["details"]} == {"policy.guard.penalty", "enabeld"}

    error = error_of(admin.post("/admin/targets", json={"name": "X", "policy": {"method": "magic"}}), 422)
    assert error["param"] == "policy"
    error = error_of(admin.post("/admin/targets", json={"id": "Not A Slug", "name": "X"}), 422)
    assert error["param"] == "id"
    error_of(admin.post("/admin/targets", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert error_of(admin.get("/admin/targets", params={"limit": 0}), 422)["param"] == "query.limit"

    admin.post("/admin/targets", json={"name": "Jane Doe"})
    error = error_of(admin.put("/admin/targets/jane-doe", json={"id": "john-doe", "name": "John"}), 422)
    assert error["param"] == "id"
    error = error_of(admin.patch("/admin/targets/jane-doe", json={"name": None}), 422)
    assert error["param"] == "name"
    error = error_of(admin.patch("/admin/targets/jane-doe", json={"id": "other"}), 422)
    assert error["param"] == "id"
    error = error_of(admin.patch("/admin/targets/jane-doe", json={"policy": {"method": "uld", "weight": 0.5}}), 422)
    assert error["param"] == "policy.uld.weight"
    assert admin.get("/admin/version").json()["version"] == 1


@pytest.mark.parametrize("method, path", [("GET", "/admin/targets/nobody"), ("PUT", "/admin/targets/nobody"),
                                          ("PATCH", "/admin/targets/nobody"), ("DELETE", "/admin/targets/nobody"),
                                          ("GET", "/admin/targets/nobody/history")])
def test_unknown_target_is_404(admin, method, path):
    payload = {"name": "Nobody"} if method in ("PUT", "PATCH") else None
    error = error_of(admin.request(method, path, json=payload), 404)
    assert error["code"] == "target_not_found"


ADMIN_ROUTES = [("POST", "/admin/targets"), ("GET", "/admin/targets"), ("GET", "/admin/targets/x"),
                ("PUT", "/admin/targets/x"), ("PATCH", "/admin/targets/x"), ("DELETE", "/admin/targets/x"),
                ("POST", "/admin/targets/import"), ("GET", "/admin/targets/export"),
                ("GET", "/admin/targets/x/history"), ("GET", "/admin/version"), ("POST", "/admin/classify"),
                ("GET", "/admin/not-a-route")]


def test_admin_routes_need_an_admin_key(gw):
    for method, path in ADMIN_ROUTES:
        assert error_of(httpx.request(method, gw.url + path, json={}), 401)["type"] == "authentication_error"
        wrong = httpx.request(method, gw.url + path, json={}, headers={"authorization": "Bearer wrong"})
        assert error_of(wrong, 401)["code"] == "invalid_api_key"
        user = httpx.request(method, gw.url + path, json={}, headers={"authorization": f"Bearer {USER_KEY}"})
        assert error_of(user, 403)["type"] == "permission_error"
    # and the admin key is refused on the OpenAI routes
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
        refused = httpx.request(method, gw.url + path, json={}, headers=ADMIN)
        assert "Admin keys" in error_of(refused, 401)["message"]
    assert httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {USER_KEY}"}).status_code == 200


# -- list ------------------------------------------------------------------------------------------------------------

def test_list_pages_and_filters(admin):
    people = [{"name": f"Person {i:02d}", "enabled": i % 3 != 0,
               "policy": {"method": "refuse" if i % 2 else "eco"}} for i in range(12)]
    people.append({"name": "Zed Quux", "aliases": ["The Falcon"], "description": "A pilot."})
    assert admin.post("/admin/targets/import", json=people).json()["version"] == 1

    page = admin.get("/admin/targets", params={"limit": 5}).json()
    assert page["total"] == 13 and len(page["items"]) == 5 and page["offset"] == 0
    assert [t["id"] for t in page["items"]] == [f"person-{i:02d}" for i in range(5)]
    assert page["next_cursor"] == "person-04" and page["version"] == 1

    seen, cursor = [], None
    while True:
        params = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        page = admin.get("/admin/targets", params=params).json()
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == 13 == len(set(seen))

    by_offset = admin.get("/admin/targets", params={"limit": 4, "offset": 10}).json()
    assert [t["id"] for t in by_offset["items"]] == ["person-10", "person-11", "zed-quux"]
    assert by_offset["next_cursor"] is None

    disabled = admin.get("/admin/targets", params={"enabled": "false"}).json()
    assert [t["id"] for t in disabled["items"]] == ["person-00", "person-03", "person-06", "person-09"]
    refuse_enabled = admin.get("/admin/targets", params={"enabled": "true", "method": "refuse"}).json()
    assert [t["id"] for t in refuse_enabled["items"]] == ["person-01", "person-05", "person-07", "person-11"]
    for text in ("falcon", "PILOT", "zed"):
        assert [t["id"] for t in admin.get("/admin/targets", params={"text": text}).json()["items"]] == ["zed-quux"]
    assert admin.get("/admin/targets", params={"text": "nothing-like-this"}).json()["total"] == 0

    error = error_of(admin.get("/admin/targets", params={"cursor": "person-01", "offset": 3}), 422)
    assert error["param"] == "offset"
    assert error_of(admin.get("/admin/targets", params={"method": "magic"}), 422)["param"] == "query.method"


# -- replace, patch, delete, history --------------------------------------------------------------------------------

def test_put_patch_delete_and_history_with_actor(admin):
    original = admin.post("/admin/targets", json={"name": "Jane Doe", "facts": ["She wrote a novel."]}).json()
    replaced = admin.put("/admin/targets/jane-doe", json={"name": "Jane Q. Doe", "policy": {"method": "refuse"}})
    assert replaced.status_code == 200 and replaced.headers["x-unlearn-targets-version"] == "2"
    assert replaced.json()["target"]["id"] == "jane-doe"  # PUT keeps the id; the name may change
    assert replaced.json()["target"]["facts"] == []  # PUT replaces the whole target

    patched = admin.patch("/admin/targets/jane-doe", json={"enabled": False, "aliases": ["JQD"]}).json()
    assert patched["version"] == 3 and patched["target"]["enabled"] is False
    assert patched["target"]["name"] == "Jane Q. Doe" and patched["target"]["policy"]["method"] == "refuse"
    merged = admin.patch("/admin/targets/jane-doe", json={"policy": {"method": "eco", "sigma": 3}}).json()
    assert merged["target"]["policy"]["sigma"] == 3.0 and merged["target"]["policy"]["corruption"] == "gaussian"

    deleted = admin.delete("/admin/targets/jane-doe")
    assert deleted.status_code == 200 and deleted.json() == {"version": 5, "id": "jane-doe"}
    error_of(admin.get("/admin/targets/jane-doe"), 404)

    history = admin.get("/admin/targets/jane-doe/history").json()
    entries = history["entries"]
    assert [(e["version"], e["action"]) for e in entries] == [(1, "create"), (2, "replace"), (3, "patch"),
                                                              (4, "patch"), (5, "delete")]
    actor = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:8]
    assert {e["actor"] for e in entries} == {actor}  # the key's id, never the key
    assert ADMIN_KEY not in json.dumps(history)
    assert entries[0]["before"] is None and entries[0]["after"] == original["target"]
    for previous, entry in pairwise(entries):
        assert entry["before"] == previous["after"]
    assert entries[-1]["after"] is None


# -- import ------------------------------------------------------------------------------------------------------------

def test_import_jsonl_array_and_modes(admin):
    document = jsonl({"name": "Alpha"}, "", {"name": "Beta", "policy": {"method": "refuse"}}, "   ")
    result = admin.post("/admin/targets/import", content=document, headers=JSONL)
    assert result.status_code == 200, result.text
    assert result.json() == {"version": 1, "mode": "upsert", "received": 2}
    assert result.headers["x-unlearn-targets-version"] == "1"
    also_jsonl = admin.post("/admin/targets/import", content=jsonl({"name": "Gamma"}),
                            headers={"content-type": "application/jsonl"})
    assert also_jsonl.json()["version"] == 2

    array = admin.post("/admin/targets/import", json=[{"name": "Alpha", "description": "v2"}, {"name": "Delta"}])
    assert array.json() == {"version": 3, "mode": "upsert", "received": 2}
    ids = [t["id"] for t in admin.get("/admin/targets").json()["items"]]
    assert ids == ["alpha", "beta", "delta", "gamma"]

    replaced = admin.post("/admin/targets/import", params={"mode": "replace"},
                          content=jsonl({"name": "Alpha", "description": "v2"}, {"name": "Epsilon"}), headers=JSONL)
    assert replaced.json() == {"version": 4, "mode": "replace", "received": 2}
    assert [t["id"] for t in admin.get("/admin/targets").json()["items"]] == ["alpha", "epsilon"]
    assert admin.get("/admin/targets/beta/history").json()["entries"][-1]["after"] is None
    assert error_of(admin.post("/admin/targets/import", params={"mode": "merge"}, json=[{"name": "A"}]),
                    422)["param"] == "query.mode"


def test_import_is_atomic_with_a_per_line_report(admin, gw):
    admin.post("/admin/targets/import", json=[{"name": "Keep Me"}, {"name": "Old", "description": "v1"}])
    before = admin.get("/admin/targets/export").content
    document = jsonl(
        {"name": "New One"},                                           # line 1
        {"name": "Old", "description": "v2"},                          # line 2
        '{"name": "Broken"',                                           # line 3: not JSON
        "",                                                            # line 4: blank, skipped
        {"name": "Bad Policy", "policy": {"method": "guard", "penalty": -1}},  # line 5
        {"name": "Fine"},                                              # line 6
        {"id": "new-one", "name": "Again"},                            # line 7: duplicate id
        '["not", "an", "object"]',                                     # line 8
        {"name": "Typo", "enabeld": False},                            # line 9
    )
    error = error_of(admin.post("/admin/targets/import", content=document, headers=JSONL), 422)
    assert error["code"] == "import_rejected" and "nothing written" in error["message"]
    assert [(d["line"], d["field"]) for d in error["details"]] == [
        (3, ""), (5, "policy.guard.penalty"), (7, "id"), (8, ""), (9, "enabeld")]
    assert "first at line 1" in error["details"][2]["message"]
    assert "invalid JSON" in error["details"][0]["message"]

    # nothing changed: same version, same set, no history for the new ids, the worker still serves version 1
    assert admin.get("/admin/version").json()["version"] == 1
    assert admin.get("/admin/targets/export").content == before
    error_of(admin.get("/admin/targets/new-one/history"), 404)
    # The worker loads version 1 in the background (an index build); once it has, it serves exactly that.
    wait_until(lambda: httpx.get(gw.url + "/ready").json()["targets_version"] >= 1, 60, "version 1 loaded")
    ready = httpx.get(gw.url + "/ready").json()
    assert ready["targets_version"] == 1 and ready["targets"]["count"] == 2

    error = error_of(admin.post("/admin/targets/import", json=[{"name": "A"}, 7, {"name": "B", "facts": [""]}]), 422)
    assert [(d["line"], d["field"]) for d in error["details"]] == [(2, ""), (3, "facts.0")]
    error = error_of(admin.post("/admin/targets/import", content=b'[{"name": "A"},\n {"name": }]',
                                headers={"content-type": "application/json"}), 422)
    assert error["details"][0]["line"] == 2


def test_import_limits_and_formats(admin):
    error = error_of(admin.post("/admin/targets/import", content=b"<xml/>", headers={"content-type": "text/xml"}),
                     415)
    assert error["code"] == "unsupported_media"
    assert error_of(admin.post("/admin/targets/import", content=b"\n\n", headers=JSONL), 422)["code"] == \
        "import_rejected"
    too_many = b"".join(b'{"name": "P%d"}\n' % i for i in range(100_001))
    error = error_of(admin.post("/admin/targets/import", content=too_many, headers=JSONL), 413)
    assert error["code"] == "too_many_targets" and "100,000" in error["message"]
    assert admin.get("/admin/version").json()["version"] == 0


# -- export and point-in-time -------------------------------------------------------------------------------------

def test_export_round_trip(admin, demo_engine, redis_url):
    targets = [{"name": f"Author {i}", "aliases": [f"A{i}"], "facts": [f"Fact {i}."],
                "policy": {"method": ("eco", "guard", "uld", "refuse")[i % 4]}, "enabled": i % 5 != 0}
               for i in range(2_500)]
    admin.post("/admin/targets/import", json=targets)
    exported = admin.get("/admin/targets/export")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-ndjson"
    assert exported.headers["x-unlearn-targets-version"] == "1"
    lines = exported.content.decode().splitlines()
    assert len(lines) == 2_500
    as_array = admin.get("/admin/targets/export", params={"format": "json"})
    assert as_array.headers["content-type"] == "application/json"
    assert as_array.json() == [json.loads(line) for line in lines]

    other = make_gateway(demo_engine, redis_url)
    try:
        with httpx.Client(base_url=other.url, headers=ADMIN, timeout=30) as second:
            imported = second.post("/admin/targets/import", content=exported.content, headers=JSONL)
            assert imported.json()["received"] == 2_500
            assert second.get("/admin/targets/export").content == exported.content
    finally:
        other.stop()


def test_as_of_reads_the_past(admin):
    admin.post("/admin/targets", json={"name": "Alpha", "description": "first"})
    time.sleep(0.01)
    middle = datetime.now(UTC)
    time.sleep(0.01)
    admin.patch("/admin/targets/alpha", json={"description": "second"})
    admin.post("/admin/targets", json={"name": "Beta"})
    time.sleep(0.01)
    admin.delete("/admin/targets/alpha")

    at = {"as_of": middle.isoformat()}
    past = admin.get("/admin/targets", params=at).json()
    assert past["version"] == 1 and [t["description"] for t in past["items"]] == ["first"]
    assert admin.get("/admin/targets/alpha", params=at).json()["description"] == "first"
    error_of(admin.get("/admin/targets/beta", params=at), 404)
    error_of(admin.get("/admin/targets/alpha"), 404)  # gone now
    exported = admin.get("/admin/targets/export", params=at)
    assert exported.headers["x-unlearn-targets-version"] == "1" and exported.content.count(b"\n") == 1
    before_all = admin.get("/admin/targets", params={"as_of": (middle - timedelta(days=1)).isoformat()}).json()
    assert before_all == {"version": 0, "total": 0, "limit": 100, "offset": 0, "next_cursor": None, "items": []}
    assert [t["id"] for t in admin.get("/admin/targets").json()["items"]] == ["beta"]
    error = error_of(admin.get("/admin/targets", params={"as_of": "2026-01-01T00:00:00"}), 422)
    assert error["param"] == "query.as_of"


# -- version, classify, docs ---------------------------------------------------------------------------------------

def test_version_classify_and_docs(admin, gw):
    admin.post("/admin/targets", json={"name": "Alpha"})
    deadline = time.monotonic() + 2
    while (info := admin.get("/admin/version").json())["active_version"] < 1:  # the worker reloads in the background
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    pid = httpx.get(gw.url + "/ready").json()["pid"]
    assert info == {"version": 1, "active_version": 1, "store": "redis", "pid": pid}

    # The active version is swapped in only once the classifier index is built, so the dry run sees "Alpha".
    hit = admin.post("/admin/classify", json={"text": "Tell me about Alpha."})
    assert hit.status_code == 200, hit.text
    assert hit.json()["flagged"] and hit.json()["targets"] == ["alpha"]
    assert hit.json()["spans"] == [{"message": 0, "start": 14, "end": 19, "target": "alpha"}]
    miss = admin.post("/admin/classify", json={"messages": [{"role": "user", "content": "How do tides work?"}]})
    assert miss.json()["flagged"] is False and miss.json()["stage"] == "none"
    assert error_of(admin.post("/admin/classify", json={}), 422)["code"] == "validation_error"

    spec = httpx.get(gw.url + "/openapi.json").json()
    for path in ("/admin/targets", "/admin/targets/{target_id}", "/admin/targets/import", "/admin/targets/export",
                 "/admin/targets/{target_id}/history", "/admin/version", "/admin/classify"):
        assert path in spec["paths"], path
    create = spec["paths"]["/admin/targets"]["post"]
    assert "full" in create["requestBody"]["content"]["application/json"]["examples"]
    assert "422" in create["responses"] and "409" in create["responses"]


def test_embedded_store_is_the_default(demo_engine, tmp_path):
    settings = Settings(admin_keys=[ADMIN_KEY], store_url="", store_path=tmp_path / "data" / "targets.db")
    server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    try:
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as client:
            assert client.post("/admin/targets", json={"name": "Local"}).status_code == 201
            assert client.get("/admin/version").json()["store"] == "sqlite"
            assert [t["id"] for t in client.get("/admin/targets").json()["items"]] == ["local"]
    finally:
        server.stop()
    assert (tmp_path / "data" / "targets.db").is_file()
