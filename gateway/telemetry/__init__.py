"""Observability of the gateway: per-request telemetry, Prometheus instruments, JSON logs, optional tracing.

Why a package of small modules: the request path must stay cheap, so the hot parts (``context``, ``middleware``,
``engine``) import nothing heavy, while logging setup and OpenTelemetry (``logs``, ``tracing``) load only when a
process asks for them.

The API for the request path (the OpenAI handler, once the classifier and the policies are wired in):

    from gateway.telemetry import current_request

    telemetry = current_request()          # or request.state.telemetry; None outside a request
    if telemetry is not None:
        telemetry.record_decision(flagged=True, targets=["matthew-perry"], policy="guard",
                                  classifier_seconds=0.0021)

The middleware then labels the request's metrics and its log line with that decision; until something calls
``record_decision``, every request is counted with ``decision="none"`` and ``policy="none"``.
"""

from gateway.telemetry.context import RequestTelemetry, current_request

__all__ = ["RequestTelemetry", "current_request"]
