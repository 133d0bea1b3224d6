"""The server's listening socket, bound before anything slow (torch, the model):
a port that is taken is reported at once, and the "ready on" line names the port
the system picked for ``--port 0``. Imports only the standard library."""

from __future__ import annotations

import errno
import socket
import sys


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (0: a port the system chooses), as
    uvicorn would bind it. Raises OSError when it cannot."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def listen_error(host: str, port: int, exc: OSError) -> str:
    """One line saying why `host`:`port` cannot be listened on, and what to do."""
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = ": another program listens there; choose another --port (0: any free one)"
    elif exc.errno == errno.EACCES:
        hint = ": ports below 1024 need privileges; choose another --port"
    elif isinstance(exc, socket.gaierror):
        hint = ": --host is not an address of this machine"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"


def listen_or_report(host: str, port: int) -> socket.socket | None:
    """`listen`, or None after writing why not to stderr as an ``engine serve``
    error line."""
    try:
        return listen(host, port)
    except OSError as exc:
        print(f"engine serve: error: {listen_error(host, port, exc)}", file=sys.stderr)
        return None
