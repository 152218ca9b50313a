"""A laptop that moves from an IPv4 to an IPv6 underlay and back in the middle of a transfer:

    laptop (wireguard-go) 198.51.100.18      --- 198.51.100.17       hub lo 192.0.2.1
                          2001:db8:1::2/64   --- 2001:db8:1::1/64        lo 2001:db8::1

The transfer is paced over about 8 s. One second in, the laptop loses its IPv4 route to the hub
and dials the hub's IPv6 address instead; two seconds later the other way round. The hub
follows each move (its one socket serves both families), the 20 MB arrive with the right hash,
and the hub's I/O error counters stay zero.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from .badnet import io_errors
from .conftest import require_tools
from .hubnet import HUB_ENDPOINT, HUB_INNER, Hub, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)
from .test_hub_netns import RECV_SHA

pytestmark = pytest.mark.netns

HUB6 = "2001:db8::1"
SIZE = 20 << 20
PACE = 8  # seconds: the moves, at about 1 s and 3 s, fall inside it even on a busy machine

# SEND_SHA of test_hub_netns, paced: 64 KiB at a time so the whole takes about `seconds`.
PACED_SEND = r"""
import hashlib, random, socket, sys, time
host, port, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = random.Random(7).randbytes(size)
s = socket.create_connection((host, port), timeout=30)
print("connected", flush=True)
start, step = time.monotonic(), 1 << 16
for i in range(0, size, step):
    delay = start + seconds * i / size - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    s.sendall(data[i:i + step])
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(hashlib.sha256(data).hexdigest(), round(time.monotonic() - start, 2), flush=True)
"""


def test_moving_between_ipv4_and_ipv6_underlays_mid_transfer(topology, tmp_path):
    require_tools("wireguard-go", "wg", "ping")
    hub = Hub(topology, tmp_path)
    hub.admin("access", "add", "everyone", "hub", "tcp/5001")
    hub.ns.run("ip", "addr", "add", f"{HUB6}/128", "dev", "lo")
    hub.start()
    lap, lap4 = hub.connect_laptop()
    hub_dev = [link["ifname"] for link in hub.ns.ip_json("link show")
               if link["ifname"].startswith("va") and "198.51.100.17" in
               hub.ns.ip("addr show dev", link["ifname"])][0]
    lap_dev = [link["ifname"] for link in lap.ip_json("link show")
               if link["ifname"].startswith("vb")][0]
    hub.ns.run("ip", "addr", "add", "2001:db8:1::1/64", "dev", hub_dev, "nodad")
    lap.run("ip", "addr", "add", "2001:db8:1::2/64", "dev", lap_dev, "nodad")
    lap.run("ip", "route", "add", f"{HUB6}/128", "via", "2001:db8:1::1")
    config = hub.add_peer("mover", "--keepalive", "0")
    laptop = WgGoLaptop(lap, tmp_path, config, ipv6=False)
    wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=15, what="the laptop to connect")
    assert hub.show()["mover"]["endpoint"].startswith(lap4 + ":")
    key = lap.run("wg", "show", laptop.ifname, "peers").stdout.split()[0]

    def move(endpoint: str, route_del: str | None, route_add: str | None) -> float:
        t = time.monotonic()
        if route_del:
            lap.run("ip", "route", "del", route_del)
        if route_add:
            lap.run("ip", "route", "add", *route_add.split())
        lap.run("wg", "set", laptop.ifname, "peer", key, "endpoint", endpoint)
        return t

    server = hub.ns.popen(["python3", "-u", "-c", RECV_SHA, HUB_INNER, "5001"],
                          stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    rx_start = hub.show()["mover"]["rx_bytes"]
    sender = lap.popen(["python3", "-u", "-c", PACED_SEND, HUB_INNER, "5001", str(SIZE),
                        str(PACE)], stdout=subprocess.PIPE, text=True)
    assert sender.stdout.readline().strip() == "connected"
    rx_before = wait_until(  # about a second into the transfer
        lambda: (rx := hub.show()["mover"]["rx_bytes"]) > rx_start + SIZE // 8 and rx,
        timeout=10, what="the transfer to be under way over IPv4")
    t6 = move(f"[{HUB6}]:51820", f"{HUB_ENDPOINT}/32", None)
    ep6 = wait_until(lambda: (ep := hub.show()["mover"]["endpoint"]).startswith("[2001:db8:1::2]")
                     and ep, timeout=5, what="the hub to follow the laptop to IPv6")
    to6_s = time.monotonic() - t6
    time.sleep(max(0.0, t6 + 2.0 - time.monotonic()))
    rx_mid = hub.show()["mover"]["rx_bytes"]
    assert sender.poll() is None, "the transfer ended before the move back"
    t4 = move(f"{HUB_ENDPOINT}:51820", None, f"{HUB_ENDPOINT}/32 via 198.51.100.17")
    ep4 = wait_until(lambda: (ep := hub.show()["mover"]["endpoint"]).startswith(lap4 + ":")
                     and ep, timeout=5, what="the hub to follow the laptop back to IPv4")
    to4_s = time.monotonic() - t4
    sent = sender.stdout.readline().split()
    assert sender.wait(60) == 0
    received = server.stdout.readline().strip()
    server.wait(10)
    errors = io_errors(hub)
    print(f"\n{SIZE >> 20} MB in {sent[1]} s; to IPv6 at 1 s: the hub followed to {ep6} in "
          f"{to6_s:.2f} s, {(rx_mid - rx_before) >> 20} MB received over IPv6; back to IPv4: "
          f"followed to {ep4} in {to4_s:.2f} s; hub I/O errors {errors}")
    assert received == sent[0] and len(received) == 64
    assert rx_mid - rx_before > 1 << 20  # the transfer went on over IPv6
    assert errors == dict.fromkeys(errors, 0), errors
