"""Schemathesis against the gateway's own OpenAPI spec: every operation, admin included, valid and invalid input.

The gateway is real (uvicorn on loopback, the demo model, the classifier, a Redis store under a fresh key prefix,
so the fuzzer's targets never reach another test). Each operation is fuzzed with schema-conforming cases and with
schema-violating ones, under the right key (admin key under /admin, user key elsewhere). The properties: no 5xx
at all, and every 4xx body is the OpenAI error envelope.

CI form: ``FUZZ_EXAMPLES`` cases per operation and mode, derandomised (the same cases every run). Long form:
``UNLEARN_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`` (random cases; ``UNLEARN_FUZZ_REPORT=fuzz.json`` writes
the tally). Generation lengths are bounded (``_bounded``) so that a case decodes a few tokens, not a whole
context; the 400s for huge ``n`` / ``max_tokens`` are hand-written in test_hostile_input.py.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import Server, serve, unique_prefix

FUZZ_EXAMPLES = int(os.environ.get("UNLEARN_FUZZ_EXAMPLES", "6"))
LONG_FORM = "UNLEARN_FUZZ_EXAMPLES" in os.environ
ADMIN_KEY = "fuzz-admin-key"
USER_KEY = "fuzz-user-key"
MAX_TOKENS = 4  # decoded per fuzzed generation: enough to run the whole path, cheap enough for CI
MAX_CHOICES = 2
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_gateway(demo_engine, redis_url) -> Iterator[Server]:
    """The fuzzer writes junk targets: under a prefix of its own, deleted afterwards (a shared Redis stays clean)."""
    prefix = unique_prefix()
    settings_ = Settings(api_keys=[USER_KEY], admin_keys=[ADMIN_KEY], store_url=redis_url, store_prefix=prefix)
    server = serve(create_app(settings_, engine=demo_engine), ready_path="/ready")
    yield server
    server.stop()
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start:start + 1000])
    client.close()


def _bounded(path: str, body: Any) -> None:
    """Keep a fuzzed generation short: cap its token budget and choices (only values that would generate)."""
    if not path.startswith("/v1/") or not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and MAX_TOKENS < value < 2**31):
            body[name] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and MAX_CHOICES < n <= 16:
        body["n"] = MAX_CHOICES
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > MAX_CHOICES:
        body["prompt"] = prompt[:MAX_CHOICES]


def envelope_problem(response: requests.Response) -> str | None:
    """Why a 4xx body is not the OpenAI error envelope, or None when it is one."""
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return "no 'error' object"
    error = body["error"]
    if not ENVELOPE_FIELDS <= set(error):
        return f"missing {sorted(ENVELOPE_FIELDS - set(error))}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return "message/type not non-empty strings"
    return None


@dataclass
class Tally:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    server_errors: list[dict] = field(default_factory=list)
    bad_envelopes: list[dict] = field(default_factory=list)

    def record(self, label: str, case: schemathesis.Case, response: requests.Response) -> None:
        self.cases += 1
        self.per_operation[label] += 1
        self.statuses[response.status_code] += 1
        self.by_operation[f"{label} {response.status_code}"] += 1
        sample = {"operation": label, "body": repr(getattr(case, "body", None))[:300],
                  "query": repr(case.query)[:200], "status": response.status_code, "response": response.text[:300]}
        if response.status_code >= 500:
            self.server_errors.append(sample)
        elif response.status_code >= 400 and (problem := envelope_problem(response)):
            self.bad_envelopes.append(sample | {"problem": problem})

    def report(self) -> dict:
        return {"cases": self.cases, "server_errors": len(self.server_errors),
                "non_envelope_4xx": len(self.bad_envelopes), "examples_per_operation_and_mode": FUZZ_EXAMPLES,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "per_operation": dict(sorted(self.by_operation.items())),
                "first_server_errors": self.server_errors[:5], "first_bad_envelopes": self.bad_envelopes[:5]}


def test_fuzz_every_operation_no_5xx_and_every_4xx_is_an_envelope(fuzz_gateway):
    schema = schemathesis.openapi.from_url(fuzz_gateway.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path.startswith("/admin/") for op in operations) and any(op.path.startswith("/v1/")
                                                                          for op in operations)
    tally = Tally()
    session = requests.Session()
    for operation in operations:
        key = {"authorization": f"Bearer {ADMIN_KEY if operation.path.startswith('/admin') else USER_KEY}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.method.upper()} {operation.path} [{mode.value}]"

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not LONG_FORM,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            # The key is fixed, not generated: the cases are about what an authenticated caller can send.
            @given(case=operation.as_strategy(generation_mode=mode, headers=key))
            def fuzz(case: schemathesis.Case) -> None:
                _bounded(operation.path, getattr(case, "body", None))  # noqa: B023 - run below, in this iteration
                response = case.call(base_url=fuzz_gateway.url, session=session, timeout=120)
                tally.record(label, case, response)  # noqa: B023

            try:
                fuzz()
            except Unsatisfiable:  # nothing to violate (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE, label
    report = tally.report()
    print("fuzz:", json.dumps({k: report[k] for k in ("cases", "server_errors", "non_envelope_4xx", "statuses")}))
    if out := os.environ.get("UNLEARN_FUZZ_REPORT"):
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    tried = {label.rsplit(" [", 1)[0] for label in tally.per_operation}
    assert len(tried) == len(operations), "every operation is tried"
    assert tally.server_errors == [], json.dumps(tally.server_errors[:5], indent=1)
    assert tally.bad_envelopes == [], json.dumps(tally.bad_envelopes[:5], indent=1)
