"""``unlearn-gateway targets ...`` against a real gateway (embedded store, the demo model) over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app as cli
from gateway.settings import Settings
from tests.conftest import Server, serve

ADMIN_KEY = "cli-admin-key"


@pytest.fixture
def gw(demo_engine, tmp_path) -> Iterator[Server]:
    settings = Settings(admin_keys=[ADMIN_KEY], api_keys=["cli-user"], store_path=tmp_path / "targets.db")
    server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    yield server
    server.stop()


@pytest.fixture
def run(gw):
    runner = CliRunner()

    def invoke(*args: str, key: str | None = ADMIN_KEY):
        env = {"UNLEARN_ADMIN_KEY": key} if key else {"UNLEARN_ADMIN_KEY": ""}
        return runner.invoke(cli, ["targets", *args, "--url", gw.url], env=env)

    return invoke


def test_add_list_get_rm(run, tmp_path):
    added = run("add", "--name", "Jane Doe", "--alias", "JD", "--alias", "J. Doe", "--fact", "She wrote a novel.",
                "--method", "guard", "--param", "mode=soft", "--param", "penalty=4.5")
    assert added.exit_code == 0, added.output
    assert "created jane-doe (targets version 1)" in added.stdout
    spec = tmp_path / "target.json"
    spec.write_text(json.dumps({"name": "John Roe", "policy": {"method": "refuse"}, "enabled": False}))
    assert run("add", "--file", str(spec)).exit_code == 0

    conflict = run("add", "--name", "Jane Doe")
    assert conflict.exit_code == 1 and "HTTP 409" in conflict.stderr and "already exists" in conflict.stderr
    invalid = run("add", "--name", "Bad", "--method", "uld", "--param", "weight=0.5")
    assert invalid.exit_code == 1 and "policy.uld.weight" in invalid.stderr

    table = run("list")
    assert table.exit_code == 0 and "jane-doe" in table.stdout and "john-roe" in table.stdout
    assert "targets version 2" in table.stdout
    lines = run("list", "--json", "--disabled").stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["john-roe"]
    paged = run("list", "--json", "--all", "--limit", "1").stdout.splitlines()
    assert [json.loads(line)["id"] for line in paged] == ["jane-doe", "john-roe"]

    got = json.loads(run("get", "jane-doe").stdout)
    assert got["aliases"] == ["JD", "J. Doe"] and got["policy"]["mode"] == "soft" and got["policy"]["penalty"] == 4.5
    removed = run("rm", "jane-doe")
    assert removed.exit_code == 0 and "deleted jane-doe (targets version 3)" in removed.stdout
    missing = run("get", "jane-doe")
    assert missing.exit_code == 1 and "HTTP 404" in missing.stderr
    history = json.loads(run("get", "jane-doe", "--history").stdout)
    assert [e["action"] for e in history["entries"]] == ["create", "delete"]


def test_import_reports_problems_and_export_round_trips(run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "Alpha"}\n{"name": "Beta", "policy": {"method": "guard", "penalty": -1}}\n'
                   '{"name": oops}\n{"name": "Alpha"}\n')
    checked = run("import", str(bad))
    assert checked.exit_code == 1 and "nothing was sent" in checked.stderr
    assert "line 2 policy.guard.penalty" in checked.stderr and "line 3" in checked.stderr
    assert "line 4 id: duplicate id 'alpha' (first at line 1)" in checked.stderr
    server_side = run("import", str(bad), "--no-check")
    assert server_side.exit_code == 1 and "HTTP 422" in server_side.stderr
    assert "line 2 policy.guard.penalty" in server_side.stderr and "line 4 id" in server_side.stderr
    assert json.loads(run("list", "--json").stdout or "null") is None  # nothing was written

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"name": f"Person {i}", "facts": [f"Fact {i}."]}) + "\n" for i in range(500)))
    imported = run("import", str(good))
    assert imported.exit_code == 0, imported.output
    assert "imported 500 targets (mode upsert, targets version 1)" in imported.stdout

    out = tmp_path / "export.jsonl"
    exported = run("export", "--out", str(out))
    assert exported.exit_code == 0 and "targets version 1" in exported.stderr
    assert [json.loads(line)["name"] for line in out.read_text().splitlines()] == sorted(
        (f"Person {i}" for i in range(500)), key=lambda name: name.lower().replace(" ", "-"))
    as_array = run("export", "--format", "json")
    assert len(json.loads(as_array.stdout)) == 500
    replaced = run("import", str(out), "--mode", "replace")
    assert "targets version 2" in replaced.stdout  # same content again: one write, no per-target change


def test_keys_and_unreachable_gateway(run):
    no_key = run("list", key=None)
    assert no_key.exit_code == 1 and "no admin key" in no_key.stderr
    user = run("list", key="cli-user")
    assert user.exit_code == 1 and "HTTP 403" in user.stderr
    down = CliRunner().invoke(cli, ["targets", "list", "--url", "http://127.0.0.1:9", "--admin-key", "k"])
    assert down.exit_code == 1 and "cannot reach the gateway" in down.stderr
