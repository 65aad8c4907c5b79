"""Settings: environment variables with the UNLEARN_ prefix, a config file beneath them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import Settings


def test_defaults_are_the_embedded_setup(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("UNLEARN_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert (settings.host, settings.port, settings.engine, settings.model) == ("127.0.0.1", 8000, "local", "demo")
    assert settings.api_keys == [] and settings.worker_urls == [] and settings.store_url == ""


def test_environment_wins_over_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 9000\nengine: vllm\nworker_urls: http://a:1, http://b:2/\napi_keys: [k1, k2]\n")
    monkeypatch.setenv("UNLEARN_CONFIG", str(config))
    monkeypatch.setenv("UNLEARN_PORT", "9100")
    settings = Settings()
    assert settings.port == 9100
    assert settings.engine == "vllm"
    assert settings.worker_urls == ["http://a:1", "http://b:2"]
    assert settings.api_keys == ["k1", "k2"]


def test_toml_config_and_comma_lists(tmp_path, monkeypatch):
    config = tmp_path / "gateway.toml"
    config.write_text('UNLEARN_MODEL = "demo-retain"\nworkers = 3\n')
    monkeypatch.setenv("UNLEARN_CONFIG", str(config))
    monkeypatch.setenv("UNLEARN_API_KEYS", " a , b,,c ")
    settings = Settings()
    assert settings.model == "demo-retain" and settings.workers == 3
    assert settings.api_keys == ["a", "b", "c"]


def test_invalid_values_are_rejected(monkeypatch):
    monkeypatch.setenv("UNLEARN_ENGINE", "tensorrt")
    with pytest.raises(ValidationError):
        Settings()


def test_target_store_and_key_file_settings(tmp_path, monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("UNLEARN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("UNLEARN_API_KEYS_FILE", "")
    monkeypatch.setenv("UNLEARN_ADMIN_KEYS_FILE", "~/admin-keys")
    settings = Settings()
    assert settings.store_path == tmp_path / "data" / "unlearn-gateway" / "targets.db"
    assert settings.api_keys_file is None and settings.admin_keys_file is not None
    assert "~" not in str(settings.admin_keys_file)
    assert (settings.store_prefix, settings.resync_interval_s, settings.store_grace_s) == ("unlearn:", 30.0, 10.0)
    monkeypatch.setenv("UNLEARN_RESYNC_INTERVAL_S", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_a_misspelt_key_in_the_config_file_is_an_error_not_a_silent_default(tmp_path, monkeypatch):
    config = tmp_path / "gateway.yaml"
    config.write_text("prot: 9000\nworkers: 2\n")
    monkeypatch.setenv("UNLEARN_CONFIG", str(config))
    with pytest.raises(ValueError, match="unknown setting.*prot"):
        Settings()
