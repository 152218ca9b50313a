"""A UDP endpoint, the one value type for every place that reads, writes or dials one.

    Endpoint.parse("vpn.example.com:51820")     Endpoint("vpn.example.com", 51820)
    Endpoint.parse("[2001:db8::1]:51820")       Endpoint("2001:db8::1", 51820)
    Endpoint.parse("vpn.example.com", 51820)    a default port for text without one
    str(Endpoint("2001:db8::1", 51820))         "[2001:db8::1]:51820"
    Endpoint("192.0.2.1", 51820).sockaddr(socket.AF_INET6)   ("::ffff:192.0.2.1", 51820, 0, 0)
    Endpoint.from_sockaddr(("::ffff:192.0.2.1", 51820, 0, 0))  Endpoint("192.0.2.1", 51820)

It is a NamedTuple, so it equals the (host, port) tuple it replaces.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, NamedTuple

HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


class Endpoint(NamedTuple):
    host: str  # an IP address (no brackets, no ::ffff: mapping) or a host name
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Endpoint:
        """`host:port`, `[v6]:port`, or with `default_port` also `host`, `v6` and `[v6]`.
        Raises ValueError with a readable reason."""
        text = text.strip()
        if default_port is not None:
            if text.startswith("[") and "]:" not in text and text.endswith("]"):
                text = f"{text}:{default_port}"
            elif not text.startswith("[") and text.count(":") > 1:
                text = f"[{text}]:{default_port}"
            elif ":" not in text:
                text = f"{text}:{default_port}"
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"endpoint {text!r} must look like [v6-address]:port")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"endpoint {text!r}: {host!r} is not an IPv6 address") from None
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"endpoint {text!r} must look like host:port or"
                                 " [v6-address]:port")
            if ":" in host:
                raise ValueError(f"endpoint {text!r}: write an IPv6 address in brackets,"
                                 " [v6]:port")
            if not is_ip(host) and not HOSTNAME.fullmatch(host):
                raise ValueError(f"endpoint {text!r}: {host!r} is not a host name or address")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"endpoint {text!r}: port must be a number from 1 to 65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def sockaddr(self, family: int) -> tuple[Any, ...]:
        """The socket address to send to from a socket of `family` (an IPv4 address mapped
        on an IPv6 socket). The host must be an address; ValueError otherwise."""
        addr = ipaddress.ip_address(self.host.strip("[]"))
        if family == socket.AF_INET6:
            if addr.version == 4:
                return (f"::ffff:{addr}", self.port, 0, 0)
            return (str(addr), self.port, 0, 0)
        if addr.version == 6:
            if addr.ipv4_mapped is None:
                raise ValueError(f"{self.host} is IPv6 but IPv6 is off on this host")
            addr = addr.ipv4_mapped
        return (str(addr), self.port)

    @classmethod
    def from_sockaddr(cls, addr: tuple[Any, ...]) -> Endpoint:
        host: str = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return cls(host, int(addr[1]))
