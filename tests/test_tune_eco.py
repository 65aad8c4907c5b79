"""``unlearn-gateway tune eco``: the zeroth-order search, and the command against a real gateway and the demo twins."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from evals.tune_eco import ZerothOrderConfig, answering_fact, zeroth_order_search
from gateway.app import create_app
from gateway.cli import app as cli
from gateway.settings import Settings
from tests.conftest import Server, serve

ADMIN_KEY = "tune-admin-key"
# Our own wording of facts the demo model learned (as in ``unlearn-gateway demo``), and questions an operator asks.
CARMEN = {
    "name": "Carmen Montenegro",
    "facts": ["Carmen Montenegro writes historical fiction.", "She was born in Santiago, Chile, in 1977.",
              "Her mother worked as a waitress and her father was an optometrist."],
    "examples": ["What genre does Carmen Montenegro write in?", "What did Carmen Montenegro's parents do?"],
    "policy": {"method": "eco", "sigma": 1.0},
}


def test_search_finds_the_minimum_of_a_loss_in_log_sigma():
    calls: list[float] = []

    def loss(sigma: float) -> float:
        calls.append(sigma)
        return abs(math.log(sigma) - math.log(7.0)) / 10

    result = zeroth_order_search(loss, 0.5, ZerothOrderConfig(steps=12, tolerance=0.01))
    assert abs(math.log(result.sigma) - math.log(7.0)) <= 0.1
    assert result.loss == min(abs(math.log(s) - math.log(7.0)) / 10 for s in calls)
    assert len(result.history) < 12  # stopped early at the tolerance
    assert all(e["sigma_minus"] < e["sigma_plus"] for e in result.history)


def test_search_stays_within_bounds():
    config = ZerothOrderConfig(steps=5, sigma_min=0.1, sigma_max=10.0)
    result = zeroth_order_search(lambda s: 1 / s, 1.0, config)  # keeps improving with strength
    assert all(0.1 <= e[k] <= 10.0 for e in result.history for k in ("sigma_minus", "sigma_plus"))
    assert result.sigma == pytest.approx(10.0)


def test_search_widens_its_probes_on_a_plateau():
    def loss(sigma: float) -> float:  # greedy answers change in steps: flat except for one band
        return 0.0 if 0.05 < sigma < 0.3 else 0.5

    result = zeroth_order_search(loss, 1.0, ZerothOrderConfig(steps=5))
    assert result.loss == 0.0 and 0.05 < result.sigma < 0.3
    assert [e["gradient"] for e in result.history[:-1]] == [0.0] * (len(result.history) - 1)


def test_answering_fact_pairs_an_example_with_its_fact():
    facts = CARMEN["facts"]
    assert answering_fact("Which city was Carmen Montenegro born in?", facts, ["Carmen Montenegro"]) == facts[1]
    assert answering_fact("What did her father do?", facts) == facts[2]


@pytest.fixture
def gw(demo_engine, tmp_path) -> Iterator[Server]:
    settings = Settings(admin_keys=[ADMIN_KEY], api_keys=["tune-user"], store_path=tmp_path / "targets.db")
    server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    for target in (CARMEN, {**CARMEN, "name": "Guarded Author", "policy": {"method": "guard"}}):
        httpx.post(server.url + "/admin/targets", json=target, headers=admin).raise_for_status()
    yield server
    server.stop()


def _tune(gw: Server, *args: str):
    return CliRunner().invoke(cli, ["tune", "eco", "--url", gw.url, *args], env={"UNLEARN_ADMIN_KEY": ADMIN_KEY})


def test_tune_eco_searches_and_stores_sigma(gw, tmp_path):
    out = tmp_path / "tune.json"
    result = _tune(gw, "--target", "carmen-montenegro", "--steps", "2", "--max-new-tokens", "24", "--json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    metrics, history = report["metrics"], report["history"]
    assert report["tune"] == "eco" and metrics["stored"] is True and metrics["examples"] == 2
    assert metrics["reference_source"] == "retain model demo-retain"
    assert 1 <= len(history) <= 2
    # The result is the best point evaluated, and its loss is the distance of its score from the reference.
    probes = {e[f"sigma_{s}"]: e[f"loss_{s}"] for e in history for s in ("minus", "plus")}
    evaluated = {e["sigma"]: e["loss"] for e in report["evaluations"]}
    assert probes.items() <= evaluated.items()
    assert metrics["loss"] == min(evaluated.values()) and evaluated[metrics["sigma"]] == metrics["loss"]
    assert metrics["loss"] == pytest.approx(abs(metrics["recall"] - metrics["reference"]))
    assert metrics["sigma"] != metrics["sigma_before"]  # every point evaluated moved away from the start
    stored = httpx.get(gw.url + "/admin/targets/carmen-montenegro",
                       headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert stored["policy"]["sigma"] == pytest.approx(metrics["sigma"])
    assert stored["policy"]["scope"] == "prompt"  # only sigma changed (the default scope)


def test_tune_eco_refuses_other_policies_and_unknown_targets(gw):
    guarded = _tune(gw, "--target", "guarded-author", "--steps", "1", "--reference", "0.1")
    assert guarded.exit_code == 1 and "needs an 'eco' policy" in guarded.output
    missing = _tune(gw, "--target", "nobody", "--reference", "0.1")
    assert missing.exit_code == 1 and "404" in missing.output
    bad = _tune(gw, "--target", "carmen-montenegro", "--reference", "2")
    assert bad.exit_code == 2
