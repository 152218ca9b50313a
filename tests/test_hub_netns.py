"""The hub end to end: real kernel, real TUN, real UDP and NAT, in namespaces (see hubnet.py).

Laptops run pytun-client or stock wireguard-go with the config pytun-admin printed.
"""

from __future__ import annotations

import signal

import pytest

from .badnet import io_errors
from .conftest import require_tools
from .hubnet import HUB_INNER, INET_HOST, Hub, OurLaptop, WgGoLaptop, who_am_i
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.netns

SEND_SHA = r"""
import hashlib, random, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = random.Random(7).randbytes(size)
s = socket.create_connection((host, port), timeout=30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(hashlib.sha256(data).hexdigest())
"""

RECV_SHA = r"""
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(60)
h = hashlib.sha256()
while chunk := conn.recv(1 << 16):
    h.update(chunk)
print(h.hexdigest(), flush=True)
conn.close()
"""


def tcp_transfer(sender, receiver, address: str, size: int, port: int = 5001) -> None:
    """Send `size` bytes over TCP through the tunnel; both ends' SHA-256 must agree."""
    server = receiver.popen(["python3", "-u", "-c", RECV_SHA, address, str(port)],
                            stdout=__import__("subprocess").PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    sent = sender.run(["python3", "-c", SEND_SHA, address, str(port), str(size)], timeout=90)
    received = server.stdout.readline().strip()
    server.wait(10)
    assert received == sent.stdout.strip() and len(received) == 64


@pytest.fixture(scope="module")
def net(tmp_path_factory, netns_ok):
    """A hub with three laptops: two run pytun-client, one stock wireguard-go."""
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy-save")
    from .netns import Topology
    tmp = tmp_path_factory.mktemp("hubnet")
    with Topology() as topo:
        hub = Hub(topo, tmp)
        # Default deny: the transfer test's TCP server on the hub needs a rule.
        hub.admin("access", "add", "everyone", "hub", "tcp/5001")
        hub.start()
        laptops = {}
        for name in ("alice", "bob"):
            ns, _ = hub.connect_laptop()
            laptops[name] = (ns, OurLaptop(ns, tmp, hub.add_peer(name), name))
        ns, _ = hub.connect_laptop()
        # Full tunnel: AllowedIPs 0.0.0.0/0 and ::/0; the host route to the hub's endpoint
        # stays more specific, as wg-quick's policy routing would keep it. IPv6 is off on its
        # interface: its kernel's own link-local packets (router solicitations, MLD) would go
        # to the hub and count as source_not_allowed beside the spoofed ones below.
        carol = WgGoLaptop(ns, tmp, hub.add_peer("carol", "--keepalive", "1", "--full-tunnel"),
                           ipv6=False)
        laptops["carol"] = (ns, carol)
        yield hub, laptops, tmp


def test_every_laptop_reaches_the_hub_and_moves_20_megabytes(net):
    hub, laptops, _ = net
    for name, (ns, _) in laptops.items():
        assert wait_until(lambda: ping(ns, HUB_INNER), timeout=10, what=f"{name} to ping the hub")
    # Replies leave from the address the laptop dialled (the endpoint sits on the hub's lo,
    # not on the link the laptop comes in by), so wireguard-go still sees 192.0.2.1.
    ns, carol = laptops["carol"]
    assert ns.run("wg", "show", carol.ifname, "endpoints").stdout.split()[1] == "192.0.2.1:51820"
    for name, (ns, _) in laptops.items():
        tcp_transfer(ns, hub.ns, HUB_INNER, 20 << 20)
    errors = io_errors(hub)
    assert errors == dict.fromkeys(errors, 0), errors
    rows = hub.show()
    for name in laptops:
        assert rows[name]["latest_handshake"], rows[name]
        assert rows[name]["rx_bytes"] > 20 << 20, rows[name]
        assert rows[name]["endpoint"].startswith("198.51.100."), rows[name]


def test_nat_to_the_internet_shows_the_hub_address(net):
    hub, laptops, _ = net
    ns, _ = laptops["carol"]
    assert who_am_i(ns, hub.inet, INET_HOST, 9999) == "203.0.113.1"
    # Forwarded TCP: the hub hands the kernel coalesced segments (tcpgro.py), which it must
    # cut up again and checksum on the way out to the internet host.
    tcp_transfer(ns, hub.inet, INET_HOST, 8 << 20)
    errors = io_errors(hub)
    assert errors == dict.fromkeys(errors, 0), errors


def test_laptop_to_laptop_refused_by_default(net):
    hub, laptops, _ = net
    alice_ns = laptops["alice"][0]
    bob_addr = hub.show()["bob"]["address"].split("/")[0]
    before = hub.drops().get("peer_to_peer", 0)
    assert not ping(alice_ns, bob_addr, count=2, timeout=1)
    assert hub.drops().get("peer_to_peer", 0) >= before + 2


def test_spoofed_inner_source_is_dropped_and_counted(net):
    hub, laptops, _ = net
    ns, carol = laptops["carol"]
    alice_addr = hub.show()["alice"]["address"].split("/")[0]
    ns.run("ip", "addr", "add", f"{alice_addr}/32", "dev", carol.ifname)
    try:
        before = hub.drops().get("source_not_allowed", 0)
        assert not ping(ns, HUB_INNER, count=3, timeout=1, source=alice_addr)
        assert hub.drops().get("source_not_allowed", 0) == before + 3
        assert ping(ns, HUB_INNER)  # carol's own address still works
    finally:
        ns.run("ip", "addr", "del", f"{alice_addr}/32", "dev", carol.ifname)


def test_random_datagrams_get_no_reply_and_the_hub_keeps_serving(net):
    hub, laptops, _ = net
    ns, _ = laptops["bob"]
    before = sum(hub.drops().values())
    done = ns.run(["python3", "-c", r"""
import random, socket
rng = random.Random(3)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(1501):
    s.sendto(rng.randbytes(n), ("192.0.2.1", 51820))
s.settimeout(1.0)
try:
    print("reply", s.recv(2000))
except socket.timeout:
    print("silence")
"""], timeout=60)
    assert done.stdout.strip() == "silence"
    assert wait_until(lambda: sum(hub.drops().values()) >= before + 1501, timeout=5,
                      what="every random datagram counted as a drop")
    for name, (lap, _) in laptops.items():
        assert ping(lap, HUB_INNER), name


def test_roaming_mid_transfer_moves_the_endpoint(net):
    hub, laptops, _ = net
    ns, laptop = laptops["alice"]
    dev = [x for x in ns.ip_json("addr show") if x["ifname"].startswith("vb")][0]["ifname"]
    old = [a["local"] for a in ns.ip_json("addr show dev", dev)[0]["addr_info"]][0]
    new = old.rsplit(".", 1)[0] + "." + str(int(old.rsplit(".", 1)[1]) + 1)
    hub_side = old.rsplit(".", 1)[0] + "." + str(int(old.rsplit(".", 1)[1]) - 1)
    routes_before = ns.run("ip", "route").stdout
    # Deleting the primary address must leave the new (secondary) one in place.
    ns.run("sysctl", "-qw", f"net.ipv4.conf.{dev}.promote_secondaries=1")
    try:
        rx_before = hub.show()["alice"]["rx_bytes"]
        pinger = ns.popen(["ping", "-n", "-q", "-i", "0.05", "-c", "120", HUB_INNER],
                          stdout=__import__("subprocess").PIPE, text=True)
        wait_until(lambda: hub.show()["alice"]["rx_bytes"] > rx_before + 10 * 84, timeout=5,
                   what="pings to flow before the move")
        ns.run("ip", "addr", "add", f"{new}/28", "dev", dev)
        ns.run("ip", "addr", "del", f"{old}/28", "dev", dev)
        ns.run("ip", "route", "replace", "192.0.2.1/32", "via", hub_side, "src", new)
        out, _ = pinger.communicate(timeout=30)
        received = int(out.split(" received")[0].rsplit(" ", 1)[1])
        assert received >= 100, out  # at most a few lost around the move
        assert wait_until(lambda: hub.show()["alice"]["endpoint"].startswith(new + ":"),
                          timeout=5, what="show to report the new endpoint")
    finally:  # the laptop goes back where it was, for the module's later tests
        ns.run("ip", "addr", "add", f"{old}/28", "dev", dev, check=False)
        ns.run("ip", "addr", "del", f"{new}/28", "dev", dev, check=False)
        ns.run("ip", "route", "replace", "192.0.2.1/32", "via", hub_side, "dev", dev, check=False)
        ns.run("sysctl", "-qw", f"net.ipv4.conf.{dev}.promote_secondaries=0")
    assert ns.run("ip", "route").stdout == routes_before
    assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5)
                      and hub.show()["alice"]["endpoint"].startswith(old + ":"),
                      timeout=15, what="the hub to follow alice back")


def test_add_and_remove_peer_on_a_running_hub(net):
    hub, laptops, tmp = net
    ns, _ = hub.connect_laptop()
    config = hub.add_peer("dave")
    WgGoLaptop(ns, tmp, config)
    # Both happen within about a second; the bounds are generous for a busy machine.
    wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=15,
               what="the new laptop to connect")
    hub.admin("remove-peer", "dave")
    assert wait_until(lambda: not ping(ns, HUB_INNER, timeout=0.3), timeout=15,
                      what="the removed laptop's traffic to stop")
    for name, (lap, _) in laptops.items():
        assert ping(lap, HUB_INNER), f"{name} lost its tunnel when dave was removed"


def _rules(ns) -> list[str]:
    out = ns.run("iptables-legacy-save").stdout
    return [line for line in out.splitlines() if "PYTUN" in line or "pytun" in line]


def test_stop_removes_everything_and_a_crash_never_duplicates(topology, tmp_path):
    require_tools("iptables-legacy-save")
    hub = Hub(topology, tmp_path)
    assert hub.ns.sysctl("net.ipv4.ip_forward") == "0"
    hub.start()
    running = _rules(hub.ns)
    assert running and hub.ns.sysctl("net.ipv4.ip_forward") == "1"
    hub.stop(signal.SIGKILL)
    hub.start()
    assert sorted(_rules(hub.ns)) == sorted(running), "a restart after a crash duplicated rules"
    assert hub.stop(signal.SIGTERM) == 0
    assert _rules(hub.ns) == []
    assert hub.ns.sysctl("net.ipv4.ip_forward") == "0"
    assert hub.ifname not in hub.ns.run("ip", "-o", "link").stdout
    assert not __import__("os").path.exists(hub.control_path)


def test_laptop_to_laptop_passes_when_allowed(topology, tmp_path):
    require_tools("wireguard-go", "wg")
    hub = Hub(topology, tmp_path, init_args=("--allow-peer-to-peer",))
    hub.start()
    a_ns, _ = hub.connect_laptop()
    b_ns, _ = hub.connect_laptop()
    WgGoLaptop(a_ns, tmp_path, hub.add_peer("a", "--keepalive", "1"))
    WgGoLaptop(b_ns, tmp_path, hub.add_peer("b", "--keepalive", "1"))
    b_addr = hub.show()["b"]["address"].split("/")[0]
    assert wait_until(lambda: ping(b_ns, HUB_INNER), timeout=10, what="b to connect")
    assert wait_until(lambda: ping(a_ns, b_addr), timeout=10, what="a to reach b via the hub")
