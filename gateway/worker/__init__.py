"""The reference worker: the local engine behind the vLLM 0.33 OpenAI wire-protocol subset the gateway uses.

It is not a mock: it generates with a real model. CI tests the gateway's vLLM engine against it over
real HTTP, and users without GPUs can run it as a CPU worker (``unlearn-gateway worker``).
"""

from gateway.worker.app import create_worker_app

__all__ = ["create_worker_app"]
