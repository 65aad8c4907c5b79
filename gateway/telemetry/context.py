"""What one request has told the telemetry so far: its id, its decision, and how long it waited on the engine.

Why a context variable: the engine wrapper (``gateway.telemetry.engine``) measures upstream time deep inside the
request path without the handler passing anything down, and the handler can record its classification decision
without knowing about metrics. The middleware creates one ``RequestTelemetry`` per request, binds it here and puts
the same object in ``request.state.telemetry``. A context variable holds no shared state: each request's task
(and every task it spawns, which copy the context) sees its own object.

Upstream time is the *union* of the intervals in which the request awaited the engine (connecting, waiting for
the response head, waiting for each chunk), so ``n > 1`` choices decoding concurrently are not counted twice.
Gateway overhead = total time - upstream time.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from time import perf_counter

DECISION_NONE = "none"  # no classification ran for this request (other routes, or the classifier is not wired)
DECISION_FLAGGED = "flagged"
DECISION_UNFLAGGED = "unflagged"
DECISION_FAIL_CLOSED = "fail_closed"  # classification could not run: 503, or the refusal (fail_mode=refuse)
POLICY_NONE = "none"

_current: ContextVar[RequestTelemetry | None] = ContextVar("unlearn_request_telemetry", default=None)


@dataclass(slots=True)
class RequestTelemetry:
    """Mutable per-request record; only the request's own tasks touch it."""

    request_id: str
    started: float = field(default_factory=perf_counter)
    decision: str = DECISION_NONE
    policy: str = POLICY_NONE
    targets: tuple[str, ...] = ()
    classifier_seconds: float | None = None
    upstream_seconds: float = 0.0
    upstream_waits: int = 0  # how many engine awaits were measured; 0 = overhead not measurable
    upstream_error: str | None = None
    fail_closed: str | None = None  # why classification could not run (``ClassificationUnavailable.code``)
    output_guard_hits: list[tuple[str, str]] = field(default_factory=list)  # (target id, action taken)
    _active: int = 0
    _active_since: float = 0.0

    # -- the API for the request path ----------------------------------------------------------------------
    def record_decision(self, flagged: bool, targets: Iterable[str] = (), policy: str | None = None,
                        classifier_seconds: float | None = None) -> None:
        """Called once the classifier has judged the request: ``policy`` is the method applied (``eco``,
        ``guard``, ``uld``, ``refuse``) or None; ``targets`` the ids it matched (only ids: never any text)."""
        self.decision = DECISION_FLAGGED if flagged else DECISION_UNFLAGGED
        self.targets = tuple(targets) if flagged else ()
        self.policy = (policy or POLICY_NONE) if flagged else POLICY_NONE
        if classifier_seconds is not None:
            self.classifier_seconds = classifier_seconds

    def record_fail_closed(self, reason: str, policy: str | None = None) -> None:
        """Called when the request could not be classified and was failed closed: answered 503 (``policy`` None)
        or with the refusal (``policy="refuse"``). Counted apart from intentional interventions."""
        self.decision = DECISION_FAIL_CLOSED
        self.fail_closed = reason
        self.targets = ()
        self.policy = policy or POLICY_NONE

    def record_output_guard_hit(self, target: str, action: str) -> None:
        """Called when the output guard stopped an answer for ``target``: ``action`` is ``error`` (the answer
        ended with an error) or ``refuse`` (the refusal replaced the rest)."""
        self.output_guard_hits.append((target, action))

    def record_classifier_time(self, seconds: float) -> None:
        self.classifier_seconds = (self.classifier_seconds or 0.0) + seconds

    # -- upstream accounting (the engine wrapper) ----------------------------------------------------------
    def upstream_enter(self) -> None:
        if self._active == 0:
            self._active_since = perf_counter()
        self._active += 1
        self.upstream_waits += 1

    def upstream_exit(self) -> None:
        self._active -= 1
        if self._active == 0:
            self.upstream_seconds += perf_counter() - self._active_since

    def upstream_until(self, now: float) -> float:
        """Upstream time up to ``now``, counting a wait still in progress."""
        return self.upstream_seconds + (now - self._active_since if self._active else 0.0)

    def overhead(self, now: float) -> float | None:
        """Seconds spent in the gateway itself up to ``now``; None when no engine call was measured."""
        if not self.upstream_waits:
            return None
        return max(0.0, (now - self.started) - self.upstream_until(now))


def current_request() -> RequestTelemetry | None:
    """The telemetry of the request this code runs for, or None outside a request (or with telemetry off)."""
    return _current.get()


def bind(telemetry: RequestTelemetry) -> Token[RequestTelemetry | None]:
    return _current.set(telemetry)


def unbind(token: Token[RequestTelemetry | None]) -> None:
    _current.reset(token)
