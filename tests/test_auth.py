"""API keys protect every OpenAI route; health stays public."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.auth import KeyRing
from gateway.settings import Settings
from tests.conftest import serve


@pytest.fixture(scope="module")
def keyed_gateway(demo_engine):
    server = serve(create_app(Settings(api_keys=["key-one", "key-two"]), engine=demo_engine))
    yield server
    server.stop()


@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                          ("/v1/completions", "POST"), ("/v1/not-a-route", "GET")])
def test_routes_need_a_key(keyed_gateway, path, method):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic key-one"}):
        response = httpx.request(method, keyed_gateway.url + path, headers=headers, json={})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_any_configured_key_works_with_the_openai_client(keyed_gateway):
    for key in ("key-one", "key-two"):
        c = openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in c.models.list()] == ["demo"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_gateway.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_health_is_public(keyed_gateway):
    assert httpx.get(keyed_gateway.url + "/health").status_code == 200


def test_keyring_keeps_hashes_only():
    ring = KeyRing(["secret"])
    assert ring.check("secret") and not ring.check("secret ") and not ring.check("")
    assert "secret" not in repr(vars(ring))
    assert not KeyRing([])
