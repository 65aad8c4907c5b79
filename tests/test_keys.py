"""Keys: user and admin keys never stand in for each other, secrets files rotate without a restart, and a
gateway without admin keys generates one and prints it once."""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest

from gateway.app import create_app
from gateway.auth import KeyFile, KeySource, key_id
from gateway.settings import Settings
from tests.conftest import serve


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def rotate(path, *keys: str) -> None:
    """Replace a secrets file atomically, as an operator (or a secrets manager) would."""
    fresh = path.with_suffix(".new")
    fresh.write_text("# rotated\n" + "\n".join(keys) + "\n")
    os.replace(fresh, path)


def wait_until(check, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_key_files_rotate_without_restart(demo_engine, tmp_path):
    user_file, admin_file = tmp_path / "user-keys", tmp_path / "admin-keys"
    rotate(user_file, "user-old")
    rotate(admin_file, "admin-old")
    settings = Settings(api_keys=["user-static"], api_keys_file=user_file, admin_keys_file=admin_file)
    server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    try:
        def models(key: str) -> int:
            return httpx.get(server.url + "/v1/models", headers=bearer(key)).status_code

        def admin_version(key: str) -> int:
            return httpx.get(server.url + "/admin/version", headers=bearer(key)).status_code

        assert models("user-old") == 200 and models("user-static") == 200 and models("user-new") == 401
        assert admin_version("admin-old") == 200 and admin_version("admin-new") == 401
        assert admin_version("user-old") == 403 and models("admin-old") == 401

        rotate(user_file, "user-new")
        rotate(admin_file, "admin-new", "admin-second")
        wait_until(lambda: models("user-new") == 200)
        assert models("user-old") == 401 and models("user-static") == 200  # settings keys stay
        wait_until(lambda: admin_version("admin-new") == 200)
        assert admin_version("admin-second") == 200 and admin_version("admin-old") == 401
        assert admin_version("user-new") == 403 and models("admin-new") == 401
    finally:
        server.stop()


def test_key_file_rereads_at_most_once_per_interval(tmp_path):
    now = [0.0]
    path = tmp_path / "keys"
    rotate(path, "first", "", "# a comment", "  second  ")
    keys = KeyFile(path, check_interval_s=1.0, clock=lambda: now[0])
    assert keys.ring().match("first") == key_id("first") and keys.ring().check("second")
    assert not keys.ring().check("# a comment") and len(keys.ring()) == 2

    rotate(path, "third")
    now[0] = 0.5
    assert keys.ring().check("first")  # not re-read yet: inside the interval
    now[0] = 1.0
    assert keys.ring().check("third") and not keys.ring().check("first")

    path.unlink()  # an unreadable file revokes its keys (fail closed)
    now[0] = 2.0
    assert not keys.ring()
    rotate(path, "fourth")
    now[0] = 3.0
    assert keys.ring().check("fourth")


def test_key_source_configured_and_ids():
    assert not KeySource().configured
    assert KeySource(["a"]).configured
    source = KeySource(["alpha", "beta"])
    assert source.match("beta") == key_id("beta") != key_id("alpha")
    assert source.match("gamma") is None
    assert re.fullmatch(r"[0-9a-f]{8}", key_id("alpha"))


def test_admin_key_is_generated_and_printed_once_when_none_is_configured(demo_engine, capsys):
    app = create_app(Settings(admin_keys=[], admin_keys_file=None), engine=demo_engine)
    printed = capsys.readouterr().err
    [key] = re.findall(r"ug-admin-[A-Za-z0-9_-]+", printed)
    server = serve(app, ready_path="/ready")
    try:
        assert httpx.get(server.url + "/admin/version", headers=bearer(key)).status_code == 200
        assert httpx.get(server.url + "/admin/version", headers=bearer("ug-admin-guess")).status_code == 401
        assert httpx.get(server.url + "/v1/models", headers=bearer(key)).status_code == 200  # user routes are open
    finally:
        server.stop()
    assert key not in capsys.readouterr().err  # printed once, at startup only


@pytest.mark.parametrize("configured", [{"admin_keys": ["set"]}, {"admin_keys_file": "/nonexistent/keys"}])
def test_no_key_is_generated_when_admin_keys_are_configured(demo_engine, capsys, configured):
    create_app(Settings(**configured), engine=demo_engine)
    assert "ug-admin-" not in capsys.readouterr().err
