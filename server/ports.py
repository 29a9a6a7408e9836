"""TCP port checks, done before starting Triton so a busy port fails fast with its name."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping

from server.errors import LaunchError


def port_in_use(port: int, host: str) -> bool:
    """True if a server socket could not be bound to ``host:port`` right now.

    SO_REUSEADDR mirrors what tritonserver does, so a port held only by TIME_WAIT connections of a
    previous run counts as free, while one with a listener (on this address or a wildcard) does not.
    """
    try:
        with _bound_socket(host, port):
            return False
    except OSError:
        return True


def ensure_ports_free(ports: Mapping[str, int], host: str) -> None:
    """Raise LaunchError naming every port of ``ports`` (name -> port) that is already in use."""
    busy = [f"{name} port {port}" for name, port in ports.items() if port_in_use(port, host)]
    if busy:
        raise LaunchError(
            f"{' and '.join(busy)} already in use on {host}; stop the other server or choose other ports"
        )


def pick_free_ports(count: int, host: str) -> list[int]:
    """``count`` distinct ports that are free on ``host`` now (the OS may reuse them later)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(_bound_socket(host, 0)) for _ in range(count)]
        return [sock.getsockname()[1] for sock in sockets]


@contextlib.contextmanager
def _bound_socket(host: str, port: int) -> Iterator[socket.socket]:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        yield sock
