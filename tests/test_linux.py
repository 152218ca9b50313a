"""common/linux.py against the real kernel, each test in fresh namespaces.

    [ns] pt0 (TUN: 10.9.0.1/24, fd00:9::1/64, MTU 1380)
    [ns] veth 192.0.2.2/24, default via 192.0.2.1 --- [gw] 192.0.2.1/24

The code under test always runs inside the namespace (`ns.python`), never in the test process.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.netns import topology, unique, wait_until

__all__ = ["topology"]  # the fixture
pytestmark = pytest.mark.netns

PRELUDE = """
import ipaddress, json, os, socket, sys
from pytun.common import linux
from pytun.common.linux import LinuxError
def out(**kw): print(json.dumps(kw), flush=True)
"""


def run_py(ns, code: str, **kw) -> dict:
    done = ns.python(PRELUDE + textwrap.dedent(code), **kw)
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_open_tun_and_configure(topology):
    ns = topology.netns("tun")
    name = unique("pt")
    code = PRELUDE + textwrap.dedent(f"""
        fd, name = linux.open_tun({name!r})
        linux.configure_link(name, [ipaddress.ip_interface("10.9.0.1/24"),
                                    ipaddress.ip_interface("fd00:9::1/64")], 1380)
        linux.configure_link(name, [ipaddress.ip_interface("10.9.0.1/24")], 1380)  # again: fine
        out(name=name, exists=linux.link_exists(name), other=linux.link_exists("nope0"))
        sys.stdin.read()  # keep the device until the test closes our stdin
        os.close(fd)
    """)
    proc = ns.popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline() or "{}")
    assert first == {"name": name, "exists": True, "other": False}

    [link] = ns.ip_json("addr show dev", name)
    assert link["mtu"] == 1380
    assert "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["scope"] == "global"}
    assert addrs == {("10.9.0.1", 24), ("fd00:9::1", 64)}
    assert ns.ip("-6 addr show dev", name).count("nodad") == 1

    proc.stdin.close()
    assert proc.wait(10) == 0
    wait_until(lambda: name not in ns.ip("link"), what="the TUN device to go with its fd")


def test_tun_errors_are_linux_errors(topology):
    ns = topology.netns("tun")
    name = unique("pt")
    result = run_py(ns, f"""
        errors = {{}}
        for bad in ["", "x" * 16, "a/b", "a b", "a:b"]:
            try:
                linux.open_tun(bad)
            except LinuxError as exc:
                errors[bad] = str(exc)
        fd, _ = linux.open_tun({name!r})
        try:
            linux.open_tun({name!r})
        except LinuxError as exc:
            errors["busy"] = str(exc)
        os.system("ip link add {name}v type veth peer name {name}w")
        try:
            linux.open_tun("{name}v")
        except LinuxError as exc:
            errors["veth"] = str(exc)
        os.setgid(65534); os.setuid(65534)
        try:
            linux.open_tun("nobody0")
        except LinuxError as exc:
            errors["nobody"] = str(exc)
        out(**errors)
    """)
    bad = ["", "x" * 16, "a/b", "a b", "a:b"]
    assert set(result) == {*bad, "busy", "veth", "nobody"}
    assert all(result[k].startswith(f"bad interface name {k!r}") for k in bad)
    assert result["busy"] == (f"cannot create TUN device {name}:"
                              " it is busy (another process has it open)")
    assert "another type" in result["veth"]
    assert "permission denied" in result["nobody"]


def test_routes_and_full_tunnel_rules_leave_no_trace(topology):
    ns, gw = topology.netns("rt"), topology.netns("gw")
    veth, _ = topology.veth(ns, "192.0.2.2/24", gw, "192.0.2.1/24")
    ns.run("ip route add default via 192.0.2.1")
    name = unique("pt")
    result = run_py(ns, f"""
        N = ipaddress.ip_network
        routes0, rules0 = linux.route_dump(), linux.rule_dump()
        fd, name = linux.open_tun({name!r})
        linux.configure_link(name, [ipaddress.ip_interface("10.9.0.2/32")], 1420)
        routes1 = linux.route_dump()  # with the device's own routes
        default = [linux.default_route_interface(4), linux.default_route_interface(6)]

        def up():
            linux.add_route(N("203.0.113.7/32"), {veth!r}, via="192.0.2.1")  # host route to hub
            linux.add_route(N("10.9.0.0/24"), name)
            linux.add_route(N("0.0.0.0/0"), name, table=51820)
            linux.add_route(N("::/0"), name, table=51820)
            for family in (4, 6):
                linux.add_rule(51820, family=family, fwmark=51820, invert=True)
                linux.add_rule(254, family=family, suppress_prefixlength=0)

        def down():
            linux.del_route(N("203.0.113.7/32"), {veth!r}, via="192.0.2.1")
            linux.del_route(N("10.9.0.0/24"), name)
            linux.del_route(N("0.0.0.0/0"), name, table=51820)
            linux.del_route(N("::/0"), name, table=51820)
            for family in (4, 6):
                linux.del_rule(254, family=family, suppress_prefixlength=0)
                linux.del_rule(51820, family=family, fwmark=51820, invert=True)

        up()
        routes2, rules2 = linux.route_dump(), linux.rule_dump()
        try:
            linux.add_route(N("10.9.0.0/24"), name)
        except LinuxError as exc:
            dup = str(exc)
        down()
        down()  # idempotent
        routes3, rules3 = linux.route_dump(), linux.rule_dump()
        os.close(fd)
        linux.del_route(N("10.9.0.0/24"), name)  # the device is gone: still fine
        out(same_routes=routes3 == routes1, same_rules=rules3 == rules0,
            gone=linux.route_dump() == routes0, added=sorted(set(routes2) - set(routes1)),
            rules=rules2, dup=dup, default=default)
    """)
    assert result["same_routes"] and result["same_rules"] and result["gone"]
    assert result["default"] == [veth, None]
    assert result["dup"] == f"cannot add route 10.9.0.0/24 dev {name}: File exists"
    assert result["added"] == sorted([
        f"inet 203.0.113.7 via 192.0.2.1 dev {veth} proto static",
        f"inet 10.9.0.0/24 dev {name} proto static",
        f"inet default dev {name} table 51820 proto static",
        f"inet6 default dev {name} table 51820 proto static metric 1024 pref medium",
    ])
    # wg-quick's order: suppress_prefixlength first, then "not fwmark".
    for family in ("inet", "inet6"):
        assert f"{family} 32764: from all lookup main suppress_prefixlength 0" in result["rules"]
        assert f"{family} 32765: not from all fwmark 0xca6c lookup 51820" in result["rules"]


def test_links_marks_and_netlink_errors(topology):
    ns, peer = topology.netns("ln"), topology.netns("pe")
    veth, _ = topology.veth(ns, None, peer, None)
    result = run_py(ns, f"""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        linux.set_socket_mark(s, 51820)
        mark = s.getsockopt(socket.SOL_SOCKET, linux.SO_MARK)
        errors = []
        for call in (lambda: linux.configure_link("nope0", [], 1420),
                     lambda: linux.configure_link({veth!r}, [], 20),
                     lambda: linux.add_route(ipaddress.ip_network("10.1.0.0/16"),
                                             via="10.50.0.1")):
            try:
                call()
            except LinuxError as exc:
                errors.append(str(exc))
        before = linux.link_exists({veth!r})
        linux.delete_link({veth!r})
        linux.delete_link({veth!r})
        out(mark=mark, errors=errors, before=before, after=linux.link_exists({veth!r}),
            default=linux.default_route_interface())
    """)
    assert result["mark"] == 51820
    assert result["errors"] == [
        "no such interface: nope0",
        f"bad MTU 20 for {veth}: must be 68 to 65535",
        "cannot add route 10.1.0.0/16 via 10.50.0.1: Network is unreachable",
    ]
    assert (result["before"], result["after"], result["default"]) == (True, False, None)


FACTS = """
t, p, i = linux.routing_facts()
out(facts=[sorted(t), {str(k): v for k, v in p.items()}, i])
"""


def test_routing_facts_see_what_ip_sees(topology):
    """The tables and rule priorities a route plan must avoid, read with pyroute2, against the
    same namespace set up with ip(8)."""
    ns = topology.netns("rf")
    before = run_py(ns, FACTS)["facts"]
    assert before == [[255], {"4": 32766, "6": 32766}, False]  # local; main and default rules
    ns.run("ip link add rf0 type veth peer name rf1")
    ns.run("ip link set rf0 up")
    ns.run("ip route add 10.9.9.0/24 dev rf0 table 51820")
    ns.run("ip -6 route add fd00:9::/64 dev rf0 table 7")
    ns.run("ip rule add not fwmark 51820 table 51820 priority 100")
    ns.run("ip -6 rule add from all lookup 7 priority 40")
    after = run_py(ns, FACTS)["facts"]
    assert after == [[7, 255, 51820], {"4": 100, "6": 40}, True]
