"""A dual-stack hub: laptops get an address of each family, IPv6 is forwarded by the same
policy and masqueraded out of the egress, and a laptop can reach the hub over IPv6.

                 +----------------------------- hub ------------------------------+
  carol ---------| 198.51.100.17/28     lo 192.0.2.1 (UDP 51820)                   |--- inet
  (wireguard-go, | TUN 10.77.0.1/24, fd77::1/64                                    |  203.0.113.2
   full tunnel)  | veth 203.0.113.1/24, 2001:db8:ff::1/64 (egress, default routes) |  2001:db8:ff::2
  dave ----------| 2001:db8:1::1/64 (an IPv6-only underlay)                        |
  (pytun-client) +-----------------------------------------------------------------+
"""

from __future__ import annotations

import re

import pytest

from .conftest import require_tools
from .hubnet import HUB_INNER, Hub, OurLaptop, WgGoLaptop, who_am_i
from .netns import Topology, ping, wait_until

pytestmark = pytest.mark.netns

INET6 = "2001:db8:ff::2"
HUB6_EGRESS = "2001:db8:ff::1"
HUB6_INNER = "fd77::1"



@pytest.fixture(scope="module")
def net(tmp_path_factory, netns_ok):
    require_tools("wireguard-go", "wg", "ping", "ip6tables-legacy-save")
    tmp = tmp_path_factory.mktemp("dual")
    with Topology() as topo:
        hub = Hub(topo, tmp, init_args=("--subnet", "10.77.0.0/24,fd77::/64"))
        egress = [link["ifname"] for link in hub.ns.ip_json("addr show")
                  if any(a["local"] == "203.0.113.1" for a in link["addr_info"])][0]
        inet_dev = hub.inet.ip_json("-o link show type veth")[0]["ifname"]
        hub.ns.run(f"ip addr add {HUB6_EGRESS}/64 dev {egress} nodad")
        hub.inet.run(f"ip addr add {INET6}/64 dev {inet_dev} nodad")
        hub.ns.run(f"ip -6 route add default via {INET6}")
        assert hub.ns.sysctl("net.ipv6.conf.all.forwarding") == "0"
        hub.start()
        yield hub, topo, tmp


def test_a_laptop_gets_both_families_and_reaches_ipv6_through_the_hub(net):
    hub, _, tmp = net
    ns, _ = hub.connect_laptop()
    config = hub.add_peer("carol", "--keepalive", "1", "--full-tunnel")
    assert re.search(r"Address = 10\.77\.0\.2/32, fd77::2/128", config), config
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in config
    WgGoLaptop(ns, tmp, config)
    assert hub.ns.sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert wait_until(lambda: ping(ns, HUB_INNER), timeout=10, what="carol's tunnel")
    assert ping(ns, HUB6_INNER)  # the hub's IPv6 tunnel address, allowed by "everyone -> hub icmp"
    assert hub.show()["carol"]["address"] == "10.77.0.2/32,fd77::2/128"

    assert who_am_i(ns, hub.inet, INET6, 9998) == HUB6_EGRESS  # masqueraded (NAT66)
    assert ping(ns, INET6)
    code = hub.admin("access", "explain", "carol", INET6, "icmp", check=False)
    assert code.returncode == 0 and "full-tunnel -> internet" in code.stdout
    # The same default deny as IPv4: nothing from outside reaches the laptop's IPv6 address.
    hub.inet.run(f"ip -6 route add fd77::/64 via {HUB6_EGRESS}")
    assert not ping(hub.inet, "fd77::2", timeout=0.5)
    saved = hub.ns.run("ip6tables-legacy-save").stdout
    assert f"PYTUN-{hub.ifname}-FWD" in saved and "MASQUERADE" in saved


def test_a_laptop_reaches_the_hub_over_an_ipv6_underlay(net):
    hub, topo, tmp = net
    lap = topo.netns("lap")
    topo.veth(hub.ns, "2001:db8:1::1/64", lap, "2001:db8:1::2/64")
    config = hub.add_peer("dave")
    config = re.sub(r"Endpoint = \S+", "Endpoint = [2001:db8:1::1]:51820", config)
    OurLaptop(lap, tmp, config, "dave")
    assert wait_until(lambda: ping(lap, HUB_INNER), timeout=10, what="dave over IPv6")
    assert ping(lap, HUB6_INNER)
    assert hub.show()["dave"]["endpoint"].startswith("[2001:db8:1::2]:")


def test_the_last_hub_out_switches_ipv6_forwarding_off_again(net):
    hub, _, _ = net
    assert hub.ns.sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert hub.stop() == 0
    assert hub.ns.sysctl("net.ipv6.conf.all.forwarding") == "0"
    assert hub.ns.sysctl("net.ipv4.ip_forward") == "0"
    assert "PYTUN" not in hub.ns.run("ip6tables-legacy-save").stdout
    assert hub.ns.run("ipset list -n").stdout.strip() == ""
