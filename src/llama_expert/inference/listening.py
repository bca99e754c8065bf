"""Where ``serve`` listens: the socket, opened before the model loads, and whether other machines reach it.

Loading a model takes seconds to minutes; a port that is already taken should fail before that, not after.
The open socket is then handed to uvicorn.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from ..errors import ConfigError


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, opened before the model loads, so that a busy port fails at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another server?): stop that server, or "
                              f"choose another port with --port.") from None
        reason = exc.strerror or exc
        raise ConfigError(f"cannot listen on {host}:{port} ({reason}); check --host and --port.") from None
    return sock


def open_to_others(host: str) -> bool:
    """Whether other machines can reach ``host`` (anything but a loopback address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return True
