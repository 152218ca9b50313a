"""Laptops behind a NAT whose UDP mappings expire after 3 s, in namespaces:

    keep (wireguard-go, keepalive 1 s) 192.0.2.66 --+
                                                    +-- nat 198.51.100.18 --- hub 192.0.2.1
    idle (wireguard-go, no keepalive)  192.0.2.82 --+   MASQUERADE --random-fully,
                                                        nf_conntrack_udp_timeout(_stream) = 3

With keepalive the mapping stays and the hub reaches the laptop whenever it wants. Without,
once the mapping has expired the hub cannot reach the laptop (its datagrams end at the NAT),
until the laptop sends something: that comes from a new mapping, the hub moves the laptop's
endpoint to it, and reaches it again (README, `--keepalive`).
"""

from __future__ import annotations

import time

import pytest

from .conftest import require_tools
from .hubnet import HUB_ENDPOINT, HUB_INNER, Hub, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.netns

TIMEOUT = 3


def test_a_nat_mapping_expires_with_and_without_keepalive(topology, tmp_path):
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy", "conntrack")
    hub = Hub(topology, tmp_path)
    hub.start()
    nat, public = hub.connect_laptop("nat")
    out_dev = [link["ifname"] for link in nat.ip_json("link show")
               if link["ifname"].startswith("vb")][0]
    nat.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    nat.run("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", out_dev, "-j",
            "MASQUERADE", "--random-fully")
    nat.run("conntrack", "-F")  # make conntrack load here, then shorten its UDP timeouts
    nat.run("sysctl", "-qw", f"net.netfilter.nf_conntrack_udp_timeout={TIMEOUT}",
            f"net.netfilter.nf_conntrack_udp_timeout_stream={TIMEOUT}")
    laptops = {}
    for i, (name, keepalive) in enumerate((("keep", "1"), ("idle", "0"))):
        lap = topology.netns("lap")
        base = 64 + 16 * i
        topology.veth(nat, f"192.0.2.{base + 1}/28", lap, f"192.0.2.{base + 2}/28")
        lap.run("ip", "route", "add", f"{HUB_ENDPOINT}/32", "via", f"192.0.2.{base + 1}")
        config = hub.add_peer(name, "--keepalive", keepalive)
        assert ("PersistentKeepalive" in config) == (keepalive != "0")
        WgGoLaptop(lap, tmp_path, config, ipv6=False)
        wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=15, what=f"{name} to connect")
        laptops[name] = (lap, f"192.0.2.{base + 2}",
                         hub.show()[name]["address"].split("/")[0])
    seen = {name: hub.show()[name]["endpoint"] for name in laptops}
    assert all(ep.startswith(public + ":") for ep in seen.values()), seen

    def mapped(source: str) -> bool:
        done = nat.run("conntrack", "-L", "-p", "udp", "-s", source, check=False)
        return "dport=51820" in done.stdout

    t0 = time.monotonic()
    wait_until(lambda: not mapped(laptops["idle"][1]), timeout=30, interval=0.2,
               what="the idle laptop's NAT mapping to expire")
    expired_s = time.monotonic() - t0
    assert mapped(laptops["keep"][1])
    # The hub calls both: the one with keepalive answers, the idle one cannot be reached.
    keep_ok = ping(hub.ns, laptops["keep"][2], count=3, timeout=1)
    idle_ok = ping(hub.ns, laptops["idle"][2], count=3, timeout=1)
    stale = hub.show()["idle"]["endpoint"]
    errors = {k: v for k, v in hub.drops().items() if k.endswith("_error")}
    assert hub.show()["keep"]["endpoint"] == seen["keep"]  # the same mapping all along
    # The idle laptop speaks first: a new mapping, which the hub follows.
    lap, _, _ = laptops["idle"]
    assert ping(lap, HUB_INNER, timeout=2)
    moved = wait_until(lambda: hub.show()["idle"]["endpoint"] != seen["idle"]
                       and hub.show()["idle"]["endpoint"], timeout=5,
                       what="the hub to follow the idle laptop's new mapping")
    back_ok = ping(hub.ns, laptops["idle"][2], count=3, timeout=1)
    print(f"\nidle mapping gone {expired_s:.1f} s after the last ping; hub -> keep (keepalive "
          f"1 s, endpoint {seen['keep']} all along): {keep_ok}; hub -> idle at {seen['idle']}: "
          f"{idle_ok} (hub I/O error counters then {errors}); idle laptop sends, hub follows "
          f"it to {moved}, hub -> idle: {back_ok}")
    assert keep_ok and not idle_ok and back_ok
    assert stale == seen["idle"]  # refused because the hub still knew only the old mapping
