"""Ports and addresses for a server about to start: a free port, why one cannot be bound,
whether a host is loopback only::

    python -c "from serving.server.network import bind_problem, find_free_port; \
port = find_free_port(); print(port, bind_problem('127.0.0.1', port))"
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not bind ``host:port`` now, or None if it could (TIME_WAIT
    leftovers do not count)."""
    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"cannot resolve the host name ({exc.strerror})"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use"
            if exc.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine (--host takes a local one)"
            return f"cannot listen ({exc.strerror or exc})"
    return None


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not bind ``host:port`` now (TIME_WAIT leftovers do not count)."""
    return bind_problem(host, port) is not None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; any other name or address counts as public."""
    with contextlib.suppress(ValueError):
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    return False


def url_host(host: str) -> str:
    """The address a local client uses for a server bound to ``host`` (any address: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host
