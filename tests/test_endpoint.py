"""common/endpoint.py: the one endpoint value type, parsed, printed and turned into a socket
address as every end needs it."""

import socket

import pytest

from pytun.common.endpoint import Endpoint


@pytest.mark.parametrize("text, default, expected, printed", [
    ("vpn.example.com:51820", None, ("vpn.example.com", 51820), "vpn.example.com:51820"),
    ("192.0.2.1:4000", None, ("192.0.2.1", 4000), "192.0.2.1:4000"),
    ("[2001:db8::1]:51820", None, ("2001:db8::1", 51820), "[2001:db8::1]:51820"),
    (" vpn.example.com ", 51820, ("vpn.example.com", 51820), "vpn.example.com:51820"),
    ("2001:db8::1", 443, ("2001:db8::1", 443), "[2001:db8::1]:443"),
    ("[2001:db8::1]", 443, ("2001:db8::1", 443), "[2001:db8::1]:443"),
    ("h.example:7", 443, ("h.example", 7), "h.example:7"),
])
def test_parse_and_print(text, default, expected, printed):
    e = Endpoint.parse(text, default)
    assert e == expected and str(e) == printed and Endpoint.parse(printed) == e


@pytest.mark.parametrize("text, message", [
    ("vpn.example.com", "must look like host:port"),
    ("[2001:db8::1", "must look like [v6-address]:port"),
    ("[nonsense]:1", "is not an IPv6 address"),
    ("2001:db8::1:51820", "write an IPv6 address in brackets"),
    ("bad_host!:1", "is not a host name or address"),
    ("h.example:0", "port must be a number from 1 to 65535"),
    ("h.example:65536", "port must be a number from 1 to 65535"),
    ("h.example:http", "port must be a number"),
])
def test_bad_text_says_why(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        Endpoint.parse(text)


def test_socket_addresses_both_ways():
    v4, v6 = Endpoint("192.0.2.1", 51820), Endpoint("2001:db8::1", 51820)
    assert v4.sockaddr(socket.AF_INET6) == ("::ffff:192.0.2.1", 51820, 0, 0)
    assert v4.sockaddr(socket.AF_INET) == ("192.0.2.1", 51820)
    assert v6.sockaddr(socket.AF_INET6) == ("2001:db8::1", 51820, 0, 0)
    assert Endpoint("::ffff:192.0.2.1", 1).sockaddr(socket.AF_INET) == ("192.0.2.1", 1)
    with pytest.raises(ValueError, match="IPv6 is off"):
        v6.sockaddr(socket.AF_INET)
    with pytest.raises(ValueError):
        Endpoint("vpn.example.com", 1).sockaddr(socket.AF_INET6)  # a name is looked up first
    assert Endpoint.from_sockaddr(("::ffff:192.0.2.1", 51820, 0, 0)) == v4
    assert Endpoint.from_sockaddr(("2001:db8::1", 51820, 0, 0)) == v6
    assert str(Endpoint.from_sockaddr(("::ffff:192.0.2.1", 4, 0, 0))) == "192.0.2.1:4"
