"""All configuration in one pydantic-settings model (ARCHITECTURE §8).

Every field is an environment variable ``UNLEARN_<NAME>``; the same names (lower case, without the
prefix) may come from a YAML or TOML file named by ``--config`` / ``UNLEARN_CONFIG``. The environment wins.
List settings take comma-separated values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from models.assistant import AssistantRecipe

CommaList = Annotated[list[str], NoDecode]


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return {str(k).lower().removeprefix("unlearn_"): v for k, v in data.items()}


def default_store_path() -> Path:
    """Where the embedded store lives by default: ``$XDG_DATA_HOME/unlearn-gateway/targets.db``, i.e.
    ``~/.local/share/unlearn-gateway/targets.db`` — per user and outside the working directory, so targets
    survive a fresh checkout and every ``serve`` of one user sees the same set."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "unlearn-gateway" / "targets.db"


class _ConfigFileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls, path: str | None):
        super().__init__(settings_cls)
        self._data = read_config_file(path) if path else {}
        # A misspelt key would otherwise be dropped without a word and its default served instead.
        unknown = sorted(k for k in self._data if k not in settings_cls.model_fields)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)} (the settings are listed in the "
                             "README, 'Configuration'; UNLEARN_CACHE_DIR and UNLEARN_CLASSIFIER_ENCODER are read "
                             "from the environment only)")

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used instead
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARN_", extra="ignore")

    config: str | None = Field(None, description="YAML or TOML file with more settings (environment wins)")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    api_keys: CommaList = Field(default_factory=list, description="keys for the OpenAI routes; empty = open")
    admin_keys: CommaList = Field(default_factory=list, description="keys for /admin; empty (and no keys file) = "
                                  "one is generated at startup and printed once to stderr")
    api_keys_file: Path | None = Field(None, description="secrets file with more OpenAI-route keys, one per line; "
                                       "re-read when it changes (rotation without restart)")
    admin_keys_file: Path | None = Field(None, description="secrets file with more admin keys, one per line")
    # Access and limits (gateway.auth, gateway.limits, gateway.ratelimit; README "Security").
    admin_port: int | None = Field(None, ge=1, le=65535, description="serve /admin only on this port (and the "
                                   "OpenAI routes only on `port`); empty = /admin on `port`")
    admin_host: str | None = Field(None, description="listen address of admin_port; default: host")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="largest request body (413 above); "
                                "/admin/targets/import has its own 512 MiB cap")
    rate_limit_rpm: int = Field(0, ge=0, description="requests per minute per user key (per client address on "
                                "an open gateway) on the OpenAI routes, shared through Redis; 0 = off")
    cors_origins: CommaList = Field(default_factory=list, description="origins allowed by CORS (browser "
                                    "clients); empty = CORS off")
    store_url: str = Field("", description="redis:// or rediss:// URL; empty = embedded file store")
    store_password_file: Path | None = Field(None, description="file holding the Redis password (a Docker or "
                                             "Kubernetes secret); it replaces any password in store_url")
    store_path: Path = Field(default_factory=lambda: default_store_path(),
                             description="SQLite file of the embedded store (used when store_url is empty)")
    store_prefix: str = Field("unlearn:", min_length=1, description="Redis key prefix (several gateways, one Redis)")
    resync_interval_s: float = Field(30.0, gt=0, description="seconds between full target resyncs per worker")
    store_grace_s: float = Field(10.0, ge=0, description="seconds the store may be unreachable before /ready is 503")
    engine: Literal["local", "vllm"] = "local"
    model: str = Field("demo", description="model path, 'demo' or 'demo-retain' for the local engine")
    served_model_name: str | None = Field(None, description="model id shown to clients; default: the model")
    device: str = Field("auto", description="torch device of the local engine: auto, cpu, cuda, cuda:1 ...")
    worker_urls: CommaList = Field(default_factory=list, description="vLLM or reference worker base URLs")
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 600.0
    upstream_first_token_timeout_s: float = Field(60.0, gt=0, description="streamed requests: seconds a worker "
                                                  "may take to send its first token before the request moves to "
                                                  "another worker (non-streamed ones: upstream_read_timeout_s)")
    upstream_retries: int = Field(2, ge=0, description="extra workers tried when one fails before its first token "
                                  "(refused, reset, first-token timeout); never once output has started")
    health_interval_s: float = Field(5.0, gt=0, description="seconds between worker health checks")
    local_max_concurrency: int = Field(8, ge=1, description="requests the local engine decodes at once")
    # Fail closed: what a request gets when it cannot be classified (classifier error or timeout, no index yet).
    fail_mode: Literal["error", "refuse"] = Field("error", description="error: 503; refuse: the target-agnostic "
                                                  "refusal. Never an unguarded answer")
    classify_timeout_s: float = Field(2.0, gt=0, description="seconds a request's classification may take before "
                                      "it fails closed")
    shutdown_grace_s: float = Field(25.0, ge=0, description="on SIGTERM: seconds in-flight requests get to finish; "
                                    "streams still open then end with an error frame and [DONE]")
    # ULD assistants trained in the background for `uld` targets without an adapter (gateway.training).
    uld_auto_train: bool | None = Field(None, description="train ULD assistants on this host; empty = on for the "
                                        "local engine, off for vllm (train elsewhere, register the adapter by path)")
    adapters_dir: Path | None = Field(None, description="where trained assistants are saved (shared storage with "
                                      "several replicas); empty = ~/.local/share/unlearn-gateway/adapters")
    uld_train_epochs: int = Field(AssistantRecipe.epochs, ge=1, description="epochs of a background assistant training")
    uld_assistant_url: str = Field("", description="vllm engine: a worker serving ULD assistants, each under the "
                                   "name its target's policy.adapter gives; ULD targets then decode in lock-step "
                                   "against it; empty = they are enforced with their fallback")
    uld_train_lease_s: float = Field(30.0, gt=0, description="a training's lease: another worker takes a target "
                                     "over when its trainer stopped renewing it this long ago")
    log_level: str = "info"
    # Observability (gateway.telemetry): JSON logs with no prompt/completion text unless log_content is set.
    log_format: Literal["json", "text"] = Field("json", description="access and server logs: JSON lines or text")
    log_content: bool = Field(False, description="also log request and response bodies (prompts!): debugging only")
    otel_endpoint: str = Field("", description="OTLP/HTTP traces URL (http://collector:4318/v1/traces); empty = "
                               "tracing off")
    otel_service_name: str = Field("unlearn-gateway", description="service.name of the exported spans")
    metrics_max_target_labels: int = Field(1000, ge=0, description="distinct target ids per process that get "
                                           "their own flagged-requests series; the rest count as 'other'")

    @field_validator("api_keys", "admin_keys", "worker_urls", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys_file", "admin_keys_file", "store_password_file", "admin_port", "admin_host",
                     "adapters_dir", "uld_auto_train", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("store_path", "api_keys_file", "admin_keys_file", "store_password_file", "adapters_dir")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("worker_urls")
    @classmethod
    def _strip_slash(cls, value: list[str]) -> list[str]:
        return [url.rstrip("/") for url in value]

    def trains_uld(self) -> bool:
        """``uld_auto_train`` with its engine-dependent default applied."""
        return self.uld_auto_train if self.uld_auto_train is not None else self.engine == "local"

    def resolved_adapters_dir(self) -> Path:
        from models.assistant import default_adapters_dir

        return self.adapters_dir or default_adapters_dir()

    @model_validator(mode="after")
    def _admin_port_is_another_port(self) -> Settings:
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError(f"admin_port must differ from port ({self.port}); leave it empty to serve /admin there")
        return self

    def resolved_store_url(self) -> str:
        """``store_url`` with the password from ``store_password_file`` (read at startup), so the secret never has
        to sit in an environment variable or a compose file."""
        if not self.store_url or self.store_password_file is None:
            return self.store_url
        from urllib.parse import quote, urlsplit, urlunsplit

        password = self.store_password_file.read_text().strip()
        parts = urlsplit(self.store_url)
        user = quote(parts.username, safe="") if parts.username else ""
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        import os

        config_path = os.environ.get("UNLEARN_CONFIG")
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, config_path), file_secret_settings)
