"""TUN offload on read (PYTUN_TUN_OFFLOAD=1), end to end, in hubnet.py's namespaces:

    wireguard-go laptop --- hub (pytun-server) --- pytun-client laptop

- 30 MB over TCP from a sender on the hub (from its tunnel address) to each laptop: the SHA-256
  matches on arrival, the hub's data thread read GSO packets (the kernel handed it large TCP
  packets, `tun_gso_reads` in `stats`), no I/O error, no refused offload header. wireguard-go
  checks every inner checksum before it coalesces, and its kernel checks the rest: a segment
  with a bad TCP checksum is dropped there, so the transfer would stall, not complete;
- UDP sent with UDP_SEGMENT on the hub (USO, Linux 6.2+): every datagram arrives whole;
- pytun-client's own reads: 30 MB laptop->hub, and the client's counters show GSO reads;
- with PYTUN_TUN_OFFLOAD=0 (the default) the restarted hub reads no GSO packet, and the
  transfer still works.
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest

from pytun.common import control

from .badnet import io_errors
from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, OurLaptop, WgGoLaptop
from .netns import Topology, ping, wait_until
from .test_hub_netns import tcp_transfer

pytestmark = pytest.mark.netns

SIZE = 30 << 20

UDP_RECV = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 1 << 22)  # SO_RCVBUFFORCE: a burst must all fit
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
s.settimeout(5)
good = bad = 0
try:
    while good + bad < int(sys.argv[3]):
        data = s.recv(65535)
        if len(data) == 1200 and data == bytes([data[0]]) * 1200:
            good += 1
        else:
            bad += 1
except socket.timeout:
    pass
print(good, bad, flush=True)
"""

UDP_GSO_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 103, 1200)  # UDP_SEGMENT
for i in range(int(sys.argv[3])):  # ten datagrams of 1,200 bytes per send
    s.sendto(b"".join(bytes([i * 10 + k]) * 1200 for k in range(10)),
             (sys.argv[1], int(sys.argv[2])))
"""


def kernel_has_uso() -> bool:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 2)


def snmp(ns) -> dict[str, int]:
    """The namespace's IP/TCP/UDP counters (/proc/net/snmp), e.g. "Tcp.InCsumErrors"."""
    lines = ns.run("cat", "/proc/net/snmp").stdout.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2]):
        proto = names.split(":")[0]
        for k, v in zip(names.split()[1:], values.split()[1:]):
            out[f"{proto}.{k}"] = int(v)
    return out


def client_stats(laptop: OurLaptop) -> dict[str, int]:
    path = os.path.join(laptop.run_dir, f"{laptop.ifname}.sock")
    return {k: int(v) for k, v in control.request(path, [("stats", "1")], timeout=10)}


@pytest.fixture(scope="module")
def net(tmp_path_factory, netns_ok):
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy-save")
    tmp = tmp_path_factory.mktemp("tunoffload")
    with pytest.MonkeyPatch.context() as env, Topology() as topo:
        env.setenv("PYTUN_TUN_OFFLOAD", "1")  # the hub and pytun-client inherit it
        hub = Hub(topo, tmp)
        hub.admin("access", "add", "everyone", "hub", "tcp/5001")
        hub.start()
        ns, _ = hub.connect_laptop("wgl")
        wg = WgGoLaptop(ns, tmp, hub.add_peer("carol", "--keepalive", "1"), ipv6=False)
        ns2, _ = hub.connect_laptop("pcl")
        ours = OurLaptop(ns2, tmp, hub.add_peer("alice", "--keepalive", "1"), "alice")
        addresses = {name: row["address"].split("/")[0] for name, row in hub.show().items()}
        yield hub, {"carol": (wg, addresses["carol"]), "alice": (ours, addresses["alice"])}


def _up(hub, laptop, address) -> None:
    wait_until(lambda: ping(laptop.ns, HUB_INNER, timeout=1), timeout=20,
               what="the laptop to reach the hub")
    wait_until(lambda: ping(hub.ns, address, timeout=1), timeout=10,
               what="the hub to reach the laptop")


@pytest.mark.parametrize("name", ["carol", "alice"])
def test_bulk_tcp_from_the_hub_is_read_as_gso_packets_and_arrives_intact(net, name):
    hub, laptops = net
    laptop, address = laptops[name]
    _up(hub, laptop, address)
    before, lap_before, hub_before = hub.offload(), snmp(laptop.ns), snmp(hub.ns)
    tcp_transfer(hub.ns, laptop.ns, address, SIZE)
    after, lap_after, hub_after = hub.offload(), snmp(laptop.ns), snmp(hub.ns)
    reads = after.get("gso_reads", 0) - before.get("gso_reads", 0)
    segments = after.get("gso_segments", 0) - before.get("gso_segments", 0)
    lap = {k: lap_after[k] - lap_before[k] for k in lap_after}
    retrans = hub_after["Tcp.RetransSegs"] - hub_before["Tcp.RetransSegs"]
    print(f"\n{name}: {reads} GSO reads made {segments} segments for {SIZE >> 20} MB "
          f"({segments / max(reads, 1):.1f} per read); hub retransmitted {retrans}; laptop: "
          f"{lap['Tcp.InSegs']} segments in, Udp.RcvbufErrors {lap['Udp.RcvbufErrors']}")
    assert reads > 0 and segments > 2 * reads, (before, after)
    # The laptop's kernel checked every segment's TCP checksum (and the IPv4 header's).
    assert lap["Tcp.InCsumErrors"] == 0 and lap["Ip.InHdrErrors"] == 0, lap
    errors = io_errors(hub)
    assert errors == dict.fromkeys(errors, 0), errors
    assert hub.drops().get("tun_bad_offload", 0) == 0
    assert "Traceback" not in hub.log()


def test_udp_segmented_on_the_hub_arrives_as_whole_datagrams(net):
    hub, laptops = net
    laptop, address = laptops["carol"]
    _up(hub, laptop, address)
    before = hub.offload()
    count = 10
    receiver = laptop.ns.popen([PY, "-u", "-c", UDP_RECV, address, "5301", str(count * 10)],
                               stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "listening"
    hub.ns.run([PY, "-c", UDP_GSO_SEND, address, "5301", str(count)], timeout=30)
    good, bad = map(int, receiver.stdout.readline().split())
    receiver.wait(10)
    assert (good, bad) == (count * 10, 0), snmp(laptop.ns)
    after = hub.offload()
    if kernel_has_uso():  # the kernel handed the hub each 12,000-byte send as one packet
        assert after.get("gso_reads", 0) - before.get("gso_reads", 0) >= count // 2, after
    errors = io_errors(hub)
    assert errors == dict.fromkeys(errors, 0), errors


def test_pytun_client_reads_gso_packets_too(net):
    hub, laptops = net
    laptop, address = laptops["alice"]
    _up(hub, laptop, address)
    before = client_stats(laptop)
    tcp_transfer(laptop.ns, hub.ns, HUB_INNER, SIZE)
    after = client_stats(laptop)
    assert after.get("tun_gso_reads", 0) > before.get("tun_gso_reads", 0), after
    for key in ("drop_tun_read_error", "drop_udp_send_error", "drop_tun_bad_offload"):
        assert after.get(key, 0) == 0, after


def test_with_offload_off_the_hub_reads_plain_packets(net, monkeypatch):
    hub, laptops = net
    laptop, address = laptops["carol"]
    monkeypatch.setenv("PYTUN_TUN_OFFLOAD", "0")
    hub.stop()
    hub.start()
    try:
        _up(hub, laptop, address)
        tcp_transfer(hub.ns, laptop.ns, address, 4 << 20)
        assert hub.offload() == {}
    finally:
        monkeypatch.setenv("PYTUN_TUN_OFFLOAD", "1")
        hub.stop()
        hub.start()
