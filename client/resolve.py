"""The hub's name: looked up, and moved on from while handshakes go unanswered."""

from __future__ import annotations

import socket
from typing import Any

from ..common.endpoint import Endpoint, is_ip  # noqa: F401 (is_ip: resolve's API)


def lookup(host: str, port: int, family: int) -> list[str]:
    """The addresses of `host` in getaddrinfo's order (IPv4 only on an IPv4 socket)."""
    infos = socket.getaddrinfo(host, port, socket.AF_INET if family == socket.AF_INET else 0,
                               socket.SOCK_DGRAM)
    out = []
    for fam, _, _, _, sockaddr in infos:
        if fam in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


def next_address(addresses: list, current) -> Any:
    """The address to try: after a failure at `current`, the next one in the list."""
    if current in addresses and len(addresses) > 1:
        return addresses[(addresses.index(current) + 1) % len(addresses)]
    return addresses[0]


def host_of(endpoint) -> str | None:
    """The host of a socket address, unmapped (::ffff:192.0.2.1 -> 192.0.2.1)."""
    return None if endpoint is None else Endpoint.from_sockaddr(endpoint).host
