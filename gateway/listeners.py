"""``uvicorn.run`` with an optional second listening socket: the admin port (``UNLEARN_ADMIN_PORT``).

Both sockets are bound once, in the supervisor, and every worker process serves both with the same app; the auth
middleware then routes by the port a connection arrived on (``gateway.auth``). One app rather than a second
server keeps one target reloader, one metrics registry and one lifecycle per worker.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)

STARTUP_FAILURE = 3  # uvicorn's exit status when a server does not start


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` that worker processes inherit (as uvicorn binds its own)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_server(app: str, *, admin_host: str | None, admin_port: int | None, **options: Any) -> None:
    """``uvicorn.run(app, **options)``; with ``admin_port``, also listen on ``admin_host`` (default: the main
    host) at that port."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if admin_port is None:
        uvicorn.run(app, **options)
        return
    config = uvicorn.Config(app, **options)
    host = admin_host or config.host
    try:
        admin_socket = bind(host, admin_port)
    except OSError as exc:
        log.error("cannot listen on the admin port %s:%d: %s", host, admin_port, exc)
        sys.exit(STARTUP_FAILURE)
    sockets = [config.bind_socket(), admin_socket]
    log.info("admin routes (/admin) on http://%s:%d only", host, admin_port)
    if config.workers > 1:
        Multiprocess(config, sockets=sockets).run()
        return
    server = uvicorn.Server(config)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
