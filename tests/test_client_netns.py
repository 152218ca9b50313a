"""pytun-client against a real hub (pytun-server), in namespaces.

    [lap] 198.51.100.2/25 --- 198.51.100.1/25 [isp] 198.51.100.129/25 --- 198.51.100.130/25 [hub]
          default via isp                     (a router)                  UDP endpoint :51820
                                                                          pytun 10.77.0.1/24
          [inet] 203.0.113.2/25 --- 203.0.113.1/25 [hub]     the hub's default route: NAT egress
        [office] 203.0.113.130/25 --- 203.0.113.129/25 [hub] routed to laptops (--route)

The laptop reaches the hub only through its default route, so a full tunnel that forgot the
fwmark would cut its own underlay. The inet host answers a UDP probe with the source address it
saw: the laptop's own (198.51.100.2) when it goes direct, the hub's (203.0.113.1) through the
tunnel and the hub's NAT. DNS goes to a stand-in `resolvconf` that logs its calls. Every client
runs with its own PYTUN_RUN_DIR under tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from pytun.common import config as wgconfig
from tests.badnet import io_errors
from tests.conftest import require_tools
from tests.hubnet import HubProcess, WgGoLaptop, who_am_i
from tests.netns import ping, topology, unique, wait_until

__all__ = ["topology"]  # the fixture
pytestmark = pytest.mark.netns

PY = sys.executable
HUB = "198.51.100.130"
HUB_INNER = "10.77.0.1"
INET = "203.0.113.2"
HUB_INET = "203.0.113.1"
OFFICE = "203.0.113.130"
HUB6 = "2001:db8:3::2"  # the hub's underlay IPv6 address, with a narrow hop only
LAPTOP = "198.51.100.2"

FAKE_RESOLVCONF = """#!/bin/sh
{ echo "resolvconf $*"; if [ "$1" = "-a" ]; then cat; fi; } >> "$RESOLVCONF_LOG"
"""


class Net:
    """The namespaces above, a hub state directory and a running hub."""

    def __init__(self, topo, tmp_path, hop_mtu: int | None = None):
        self.topo, self.tmp = topo, tmp_path
        self.lap, self.isp, self.hub = topo.netns("lap"), topo.netns("isp"), topo.netns("hub")
        self.inet, self.office = topo.netns("inet"), topo.netns("off")
        self.lap_dev, self.isp_lap_dev = topo.veth(self.lap, f"{LAPTOP}/25", self.isp, "198.51.100.1/25")
        self.isp.run("sysctl -qw net.ipv4.ip_forward=1")
        if hop_mtu is None:
            topo.veth(self.isp, "198.51.100.129/25", self.hub, f"{HUB}/25")
            self.isp.run(f"ip route add 203.0.113.0/24 via {HUB}")
        else:
            # isp --(hop_mtu)-- mid --- hub: a narrow hop that neither end is attached to,
            # so only ICMP "fragmentation needed" tells them about it.
            self.mid = topo.netns("mid")
            topo.veth(self.isp, "192.0.2.1/30", self.mid, "192.0.2.2/30", mtu=hop_mtu)
            topo.veth(self.mid, "198.51.100.129/25", self.hub, f"{HUB}/25")
            self.mid.run("sysctl -qw net.ipv4.ip_forward=1")
            for net in ("198.51.100.128/25", "203.0.113.0/24"):
                self.isp.run(f"ip route add {net} via 192.0.2.2")
            self.mid.run("ip route add 198.51.100.0/25 via 192.0.2.1")
            self.mid.run(f"ip route add 203.0.113.0/24 via {HUB}")
            # The same path over IPv6: lap 2001:db8:1::/64 isp 2001:db8:2::/64 mid 2001:db8:3::/64
            for ns, dev, addr in ((self.isp, self.isp_lap_dev, "2001:db8:1::1/64"),
                                  (self.lap, self.lap_dev, "2001:db8:1::2/64")):
                ns.run("ip", "addr", "add", addr, "dev", dev, "nodad")
            topo.veth(self.isp, "2001:db8:2::1/64", self.mid, "2001:db8:2::2/64", mtu=hop_mtu)
            topo.veth(self.mid, "2001:db8:3::1/64", self.hub, f"{HUB6}/64")
            for ns in (self.isp, self.mid):
                ns.run("sysctl -qw net.ipv6.conf.all.forwarding=1")
            self.lap.run("ip -6 route add default via 2001:db8:1::1")
            self.isp.run("ip -6 route add 2001:db8:3::/64 via 2001:db8:2::2")
            self.mid.run("ip -6 route add 2001:db8:1::/64 via 2001:db8:2::1")
            self.hub.run("ip -6 route add 2001:db8:1::/64 via 2001:db8:3::1")
        topo.veth(self.hub, f"{HUB_INET}/25", self.inet, f"{INET}/25")
        topo.veth(self.hub, "203.0.113.129/25", self.office, f"{OFFICE}/25")
        self.lap.run("ip route add default via 198.51.100.1")
        self.hub.run(f"ip route add default via {INET}")
        self.hub.run("ip route add 198.51.100.0/25 via 198.51.100.129")
        # The hub host is also the laptop's way to the internet outside the tunnel: a router
        # that forwarded before pytun ran, so the hub leaves that forwarding alone.
        self.hub.run("sysctl -qw net.ipv4.ip_forward=1")
        self.inet.run(f"ip route add default via {HUB_INET}")
        self.office.run("ip route add default via 203.0.113.129")
        # Let IPv6 link-local addresses settle, so route dumps taken later compare equal.
        wait_until(lambda: not self.lap.run("ip -6 addr show tentative").stdout.strip(),
                   what="IPv6 duplicate address detection in the laptop")
        self.server = HubProcess(self.hub, tmp_path, init_args=(
            "--subnet", "10.77.0.0/24", "--endpoint", f"{HUB}:51820",
            "--route", "203.0.113.128/25", "--dns", HUB_INNER))
        # Default deny: the tests' TCP servers on the hub (iperf3, the transfers) need rules.
        self.admin("access", "add", "everyone", "hub", "tcp/5211")
        self.admin("access", "add", "everyone", "hub", "tcp/5213")
        self.server.start()

    def admin(self, *args) -> subprocess.CompletedProcess:
        return self.server.admin(*args)

    def show(self) -> dict:
        return {row["name"]: row for row in json.loads(self.admin("show", "--json").stdout)}

    def add_peer(self, name: str, *args) -> str:
        """Register a laptop; returns the path of its config, named for a unique interface."""
        path = str(self.tmp / f"{unique('pc')}.conf")
        self.admin("add-peer", name, "-o", path, *args)
        return path

    def source_seen_by_inet(self, port: int = 9999) -> str:
        """The source address the inet host sees for a UDP probe from the laptop."""
        return who_am_i(self.lap, self.inet, INET, port)


class Client:
    """`pytun-client up CONFIG` in the laptop namespace, with its own run directory."""

    def __init__(self, net: Net, config: str):
        self.net, self.ns, self.config = net, net.lap, config
        self.ifname = os.path.basename(config)[:-5]
        self.run_dir = str(net.tmp / f"run-{self.ifname}")
        bin_dir = net.tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "resolvconf").write_text(FAKE_RESOLVCONF)
        os.chmod(bin_dir / "resolvconf", 0o755)
        self.resolvconf_log = net.tmp / f"resolvconf-{self.ifname}.log"
        self.env = {**os.environ, "PYTUN_RUN_DIR": self.run_dir,
                    "PATH": f"{bin_dir}:{os.environ['PATH']}",
                    "RESOLVCONF_LOG": str(self.resolvconf_log)}
        self.log = net.tmp / f"client-{self.ifname}.log"
        self.proc: subprocess.Popen | None = None

    def command(self, *args) -> list[str]:
        return [PY, "-m", "pytun.client.main", *args]

    def cli(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.run(self.command(*args), env=self.env, check=check)

    def up(self) -> None:
        """Start the client; return after its first handshake (it logs one line for it)."""
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "a") as log:
            self.proc = self.ns.popen(self.command("up", self.config),
                                      stdout=log, stderr=subprocess.STDOUT, env=self.env)

        def handshake() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"client exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            return "handshake with hub" in self.log.read_text()[start:]

        wait_until(handshake, timeout=15, what=f"the client's first handshake ({self.log})")
        wait_until(lambda: os.path.exists(os.path.join(self.run_dir, self.ifname + ".json"))
                   and "is up:" in self.log.read_text()[start:], what="routes and DNS")

    def status(self) -> dict:
        if self.proc.poll() is not None:
            raise AssertionError(f"client exited {self.proc.returncode}:\n{self.log.read_text()}")
        done = self.cli("status", self.ifname, "--json", check=False)
        return json.loads(done.stdout)[0] if done.returncode == 0 else {}

    def down(self) -> subprocess.CompletedProcess:
        done = self.cli("down", self.config)
        if self.proc is not None:
            assert self.proc.wait(15) == 0, self.log.read_text()
        return done

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def routing(ns) -> dict:
    """Everything the client may change in the laptop: routes, rules, nft, src_valid_mark."""
    return {
        "routes4": ns.run("ip -4 route show table all").stdout,
        "routes6": ns.run("ip -6 route show table all").stdout,
        "rules4": ns.run("ip -4 rule show").stdout,
        "rules6": ns.run("ip -6 rule show").stdout,
        "nft": ns.run("nft list ruleset").stdout,
        "src_valid_mark": ns.sysctl("net.ipv4.conf.all.src_valid_mark"),
        "links": sorted(link["ifname"] for link in ns.ip_json("link show")),
    }


def _net(topology, tmp_path, **kw):
    require_tools("ping", "nft", "iptables-legacy-save")
    n = Net(topology, tmp_path, **kw)
    yield n
    if n.server.proc is not None and n.server.proc.poll() is None:
        n.server.stop()


@pytest.fixture
def net(topology, tmp_path):
    yield from _net(topology, tmp_path)


@pytest.fixture
def narrow_net(topology, tmp_path):
    """The same, with a 1300-byte hop between the laptop and the hub."""
    yield from _net(topology, tmp_path, hop_mtu=1300)


def test_split_tunnel_routes_dns_and_a_clean_down(net):
    before = routing(net.lap)
    client = Client(net, net.add_peer("alice"))
    client.up()
    assert ping(net.lap, HUB_INNER, count=3)
    assert ping(net.lap, OFFICE, count=3)  # a network behind the hub, through the tunnel
    assert net.source_seen_by_inet() == LAPTOP  # everything else goes direct
    assert f"dev {net.lap_dev}" in net.lap.run(f"ip route get {INET}").stdout
    assert net.lap.run(f"ip route get {OFFICE}").stdout.split()[2] == client.ifname
    assert client.resolvconf_log.read_text() == (
        f"resolvconf -a {client.ifname} -m 0 -x\nnameserver {HUB_INNER}\n")

    s = client.status()
    assert s["endpoint"] == f"{HUB}:51820" and s["hub"] == f"{HUB}:51820"
    assert s["rx_bytes"] > 0 and s["tx_bytes"] > 0 and s["state"] == "up"
    human = client.cli("status").stdout
    assert f"interface: {client.ifname}" in human and "latest handshake:" in human
    assert net.show()["alice"]["endpoint"].startswith(f"{LAPTOP}:")

    client.down()
    assert routing(net.lap) == before
    assert client.resolvconf_log.read_text().endswith(f"resolvconf -d {client.ifname} -f\n")
    assert os.listdir(client.run_dir) == []
    log = client.log.read_text()
    assert "handshake with hub" in log and "warning" not in log, log


def test_full_tunnel_goes_through_the_hub_nat_and_keeps_the_underlay(net):
    for key in ("all", "default", net.lap_dev):  # strict reverse-path filtering, as on RHEL
        net.lap.run("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=1")
    before = routing(net.lap)
    client = Client(net, net.add_peer("bob", "--full-tunnel"))
    client.up()
    assert net.source_seen_by_inet() == HUB_INET  # through the tunnel and the hub's NAT
    assert ping(net.lap, HUB_INNER, count=3) and ping(net.lap, OFFICE)
    rules = net.lap.run("ip -4 rule").stdout
    assert "not from all fwmark 0xca6c lookup 51820" in rules
    assert "from all lookup main suppress_prefixlength 0" in rules
    # The hub's endpoint stays on the underlay for the marked socket, and handshakes go on.
    assert f"dev {net.lap_dev}" in net.lap.run(f"ip route get {HUB} mark 51820").stdout
    assert client.status()["endpoint"] == f"{HUB}:51820"
    assert client.status()["full_tunnel"] == 1

    client.down()
    assert routing(net.lap) == before


def test_down_cleans_up_after_sigkill_and_up_replaces_leftovers(net):
    before = routing(net.lap)
    client = Client(net, net.add_peer("carol", "--full-tunnel"))
    client.up()
    client.kill()
    assert routing(net.lap) != before  # rules, nft table and DNS were left behind
    done = client.cli("status", client.ifname, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"pytun-client: error: {client.ifname} is not running")
    assert f"pytun-client down {client.ifname}" in done.stderr
    client.proc = None
    client.down()
    assert routing(net.lap) == before
    assert client.resolvconf_log.read_text().endswith(f"resolvconf -d {client.ifname} -f\n")

    client.up()  # killed again: the next `up` removes the leftovers before it starts
    client.kill()
    client.up()
    assert "did not stop cleanly" in client.log.read_text()
    assert len([r for r in net.lap.run("ip -4 rule").stdout.splitlines() if "fwmark" in r]) == 1
    client.down()
    assert routing(net.lap) == before
    done = client.cli("down", client.ifname, check=False)
    assert (done.returncode, done.stderr.count("\n")) == (1, 1)
    assert done.stderr.startswith(f"pytun-client: error: {client.ifname} is not up")


def add_hooks(path: str, hooks: dict[str, str]) -> None:
    """Put PreUp/PostUp/PreDown/PostDown lines into the [Interface] section of a config."""
    lines = [f"{key} = {command}" for key, command in hooks.items()]
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("[Interface]\n", "[Interface]\n" + "\n".join(lines) + "\n", 1))


def test_up_and_down_hooks_run_in_order_with_the_interface_name(net):
    trace = net.tmp / "hooks.log"
    seen = "ip -o link show %i >/dev/null 2>&1 && echo link || echo no-link"
    path = net.add_peer("ivan")
    add_hooks(path, {
        "PreUp": f"echo PreUp %i $({seen}) >> {trace}",
        "PostUp": f"echo PostUp %i $({seen}) $(ip -4 route show 10.77.0.0/24 | wc -l) >> {trace}",
        "PreDown": f"echo PreDown %i $({seen}) >> {trace}",
        "PostDown": f"echo PostDown %i $({seen}) >> {trace}",
    })
    client = Client(net, path)
    client.up()
    ifname = client.ifname
    # PreUp before the interface exists, PostUp after it and its routes.
    assert trace.read_text() == f"PreUp {ifname} no-link\nPostUp {ifname} link 1\n"
    client.down()
    assert trace.read_text().splitlines()[2:] == [f"PreDown {ifname} link",
                                                   f"PostDown {ifname} no-link"]

    # After a SIGKILL, `down` still runs the down hooks, from what the client recorded (the
    # TUN device went with the killed process).
    trace.write_text("")
    client.up()
    client.kill()
    client.proc = None
    client.down()
    assert trace.read_text().splitlines()[1:] == [f"PostUp {ifname} link 1",
                                                   f"PreDown {ifname} no-link",
                                                   f"PostDown {ifname} no-link"]


def test_a_failing_post_up_stops_the_client_and_undoes_what_it_did(net):
    before = routing(net.lap)
    path = net.add_peer("judy")
    add_hooks(path, {"PostUp": "echo adding; false"})
    client = Client(net, path)
    done = client.cli("up", path, check=False)
    assert done.returncode == 1
    assert done.stderr.endswith("pytun-client: error: PostUp command failed (exit 1): "
                                "echo adding; false\n")
    assert routing(net.lap) == before
    assert not os.path.exists(os.path.join(client.run_dir, client.ifname + ".json"))


def test_idle_laptop_is_back_within_20s_after_the_hub_restarts(net):
    client = Client(net, net.add_peer("dave"))  # PersistentKeepalive 25
    client.up()
    assert ping(net.lap, HUB_INNER)
    net.server.stop(signal.SIGKILL)
    earlier_log = len(net.server.log())
    net.server.start()
    # No traffic from the laptop: the handshake must come without it. The restarted hub logs
    # each handshake it completes, so this one is with the new hub process.
    wait_until(lambda: "handshake with peer dave " in net.server.log()[earlier_log:],
               timeout=20, what="a handshake with the restarted hub")
    assert ping(net.lap, HUB_INNER)
    client.down()


def test_underlay_address_change_during_a_transfer(net):
    require_tools("iperf3")
    client = Client(net, net.add_peer("erin"))
    client.up()
    server = net.hub.popen(["iperf3", "-s", "-1", "-B", HUB_INNER, "-p", "5211"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: ":5211" in net.hub.run("ss -Hltn").stdout, what="iperf3 to listen")
    transfer = net.lap.popen(["iperf3", "-c", HUB_INNER, "-p", "5211", "-t", "8", "-b", "40M",
                              "-J"], stdout=subprocess.PIPE, text=True)
    start = client.status()["tx_bytes"]
    wait_until(lambda: client.status()["tx_bytes"] > start + (2 << 20), timeout=10,
               what="the transfer to be under way")
    new = "198.51.100.3"
    net.lap.run("sh", "-c", f"ip addr del {LAPTOP}/25 dev {net.lap_dev} && "
                f"ip addr add {new}/25 dev {net.lap_dev} && "
                f"ip route replace default via 198.51.100.1")
    out, _ = transfer.communicate(timeout=30)
    assert transfer.returncode == 0, out[-2000:]
    result = json.loads(out)
    assert result["end"]["sum_received"]["bytes"] > 4 << 20
    assert server.wait(10) == 0
    wait_until(lambda: net.show()["erin"]["endpoint"].startswith(new + ":"), timeout=5,
               what="the hub to follow the laptop to its new address")
    errors = io_errors(net.server)
    assert errors == dict.fromkeys(errors, 0), errors
    client.down()


def test_same_config_works_with_stock_wireguard_go(net):
    require_tools("wireguard-go", "wg")
    path = net.add_peer("frank")
    WgGoLaptop(net.lap, net.tmp, open(path).read())  # the routes of its AllowedIPs
    assert wait_until(lambda: ping(net.lap, HUB_INNER, timeout=1), timeout=10,
                      what="wireguard-go to reach the hub")
    assert ping(net.lap, OFFICE)
    assert net.show()["frank"]["latest_handshake"]


def test_start_errors_are_one_line(net):
    path = net.add_peer("gina")
    client = Client(net, path)
    client.up()
    again = client.cli("up", path, check=False)
    assert again.returncode == 1
    assert again.stderr == (f"pytun-client: error: {client.ifname} is already up "
                            f"(pid {client.proc.pid}); run `pytun-client down {client.ifname}` "
                            "first\n")
    other = client.cli("up", path, "--interface", net.lap_dev, check=False)
    assert other.returncode == 1 and other.stderr.count("\n") == 1
    assert "already exists" in other.stderr
    client.down()


def test_full_tunnel_on_a_laptop_with_ipv6_off(net):
    for key in ("all", "default"):
        net.lap.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
    before = routing(net.lap)
    client = Client(net, net.add_peer("hank", "--full-tunnel"))
    client.up()
    assert net.source_seen_by_inet() == HUB_INET
    assert "IPv6 is off on this host: AllowedIPs ::/0 not routed" in client.log.read_text()
    assert "51820" not in net.lap.run("ip -6 rule").stdout
    client.down()
    assert routing(net.lap) == before


def test_unresolvable_hub_is_retried_in_the_foreground_until_down(topology, tmp_path):
    from pytun.common import keys
    ns = topology.netns("lap")  # no route anywhere: every lookup fails at once
    ifname = unique("pc")
    path = tmp_path / f"{ifname}.conf"
    hub_key = keys.encode_key(keys.public_from_private(keys.generate_private()))
    path.write_text(f"[Interface]\nPrivateKey = {keys.encode_key(keys.generate_private())}\n"
                    f"Address = 10.77.0.2/32\n\n[Peer]\nPublicKey = {hub_key}\n"
                    "Endpoint = hub.invalid:51820\nAllowedIPs = 10.77.0.0/24\n")
    path.chmod(0o600)  # as add-peer writes it: no warning about others reading it
    env = {**os.environ, "PYTUN_RUN_DIR": str(tmp_path / "run")}
    log = tmp_path / "client.log"
    with open(log, "w") as out:
        proc = ns.popen([PY, "-m", "pytun.client.main", "up", str(path)], stdout=out,
                        stderr=subprocess.STDOUT, env=env)
    wait_until(lambda: log.read_text().count("cannot resolve hub.invalid:") >= 2, timeout=15,
               what="two tries to resolve the hub's name")
    assert proc.poll() is None  # still in the foreground, still trying
    lines = log.read_text().splitlines()
    assert lines[0].startswith("pytun-client: warning: cannot resolve hub.invalid: ")
    assert lines[0].endswith("; trying again in 5 s") and lines[1] == lines[0]
    status = json.loads(ns.run([PY, "-m", "pytun.client.main", "status", "--json"],
                               env=env).stdout)
    assert [(s["interface"], s["state"], s["endpoint"]) for s in status] == [
        (ifname, "resolving", "")]
    ns.run([PY, "-m", "pytun.client.main", "down", ifname], env=env)
    assert proc.wait(10) == 0
    assert ifname not in ns.run("ip -o link").stdout
    assert os.listdir(tmp_path / "run") == []


# A datagram to an "internet" address: "sent" when the kernel routed it out somewhere, else the
# errno's name (EHOSTUNREACH from an unreachable route).
UDP_SEND = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"leak?", (sys.argv[1], 9))
    print("sent")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""
INET6 = "2001:db8:ff::2"  # beyond the laptop's IPv6 default route; nothing answers there
LAN6, LAPTOP6 = "2001:db8:1::1", "2001:db8:1::2"


def leak_counters(ns, dev: str) -> tuple[int, int]:
    """Packets for INET and INET6 that left on the underlay `dev` in clear (nft counters)."""
    out = ns.run("nft", "-j", "list", "table", "inet", "leakcount").stdout
    found = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule:
            found[rule["comment"]] = next(e["counter"]["packets"] for e in rule["expr"]
                                          if "counter" in e)
    return found["v4"], found["v6"]


@pytest.mark.parametrize("allowed", ["0.0.0.0/0, ::/0", "0.0.0.0/0"], ids=["dual", "ipv4-only"])
def test_a_killed_full_tunnel_fails_closed_until_down(net, allowed):
    """kill -9: the TUN device and its routes go, the unreachable defaults in the tunnel's table
    stay, and nothing for the internet leaves on the underlay in clear, IPv4 or IPv6, until
    `down`; the LAN stays reachable. With 0.0.0.0/0 alone, IPv6 is refused even while up."""
    lap = net.lap
    net.isp.run("ip", "addr", "add", f"{LAN6}/64", "dev", net.isp_lap_dev, "nodad")
    lap.run("ip", "addr", "add", f"{LAPTOP6}/64", "dev", net.lap_dev, "nodad")
    lap.run("ip", "-6", "route", "add", "default", "via", LAN6)
    before = routing(lap)
    lap.run("nft", "-f", "-", input=(
        "add table inet leakcount\n"
        "add chain inet leakcount out { type filter hook postrouting priority 0; }\n"
        f'add rule inet leakcount out oifname "{net.lap_dev}" ip daddr {INET} counter '
        'comment "v4"\n'
        f'add rule inet leakcount out oifname "{net.lap_dev}" ip6 daddr {INET6} counter '
        'comment "v6"\n'))
    send = lambda dst: lap.run([PY, "-c", UDP_SEND, dst]).stdout.strip()  # noqa: E731

    # Without a tunnel both go out in clear, and the counters see them.
    assert (send(INET), send(INET6)) == ("sent", "sent")
    assert leak_counters(lap, net.lap_dev) == (1, 1)

    path = net.add_peer("kate", "--full-tunnel")
    text = open(path).read()
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in text
    if allowed != "0.0.0.0/0, ::/0":
        text = text.replace("AllowedIPs = 0.0.0.0/0, ::/0", f"AllowedIPs = {allowed}")
        text = "".join(line + "\n" for line in text.splitlines() if not line.startswith("DNS"))
        open(path, "w").write(text)
    client = Client(net, path)
    client.up()
    assert net.source_seen_by_inet() == HUB_INET
    assert send(INET) == "sent"  # into the tunnel, not onto the underlay
    assert send(INET6) == ("sent" if "::/0" in allowed else "EHOSTUNREACH")  # refused
    assert leak_counters(lap, net.lap_dev) == (1, 1)
    log = client.log.read_text()
    if "::/0" in allowed:
        assert "warning" not in log, log
    else:
        assert "IPv6 beyond the local network is refused" in log
        assert "full tunnel without DNS in the config" in log

    client.kill()
    wait_until(lambda: client.ifname not in lap.run("ip -o link").stdout,
               what="the TUN device to go with the killed client")
    for dst in (INET, INET6):
        lookup = lap.run("ip", "route", "get", dst, check=False)
        assert lookup.returncode != 0 and lookup.stdout == "", lookup.stdout
        assert lookup.stderr.strip() == "RTNETLINK answers: No route to host", lookup.stderr
        assert send(dst) == "EHOSTUNREACH"  # what an unreachable route answers
        assert not ping(lap, dst, timeout=1)
    assert leak_counters(lap, net.lap_dev) == (1, 1)  # nothing left in clear
    assert ping(lap, "198.51.100.1") and ping(lap, LAN6)  # the local network still works
    table = lap.run("ip", "-4", "route", "show", "table", "51820").stdout
    assert table.split() == ["unreachable", "default", "proto", "static", "metric",
                             "4294967295"], table

    client.proc = None
    client.down()
    assert (send(INET), send(INET6)) == ("sent", "sent")  # normal routing is back
    assert leak_counters(lap, net.lap_dev) == (2, 2)
    assert net.source_seen_by_inet() == LAPTOP
    lap.run("nft", "delete", "table", "inet", "leakcount")
    assert routing(lap) == before


def test_the_client_works_inside_its_units_sandbox(net):
    """pytun-client@.service's sandbox, emulated: CAP_NET_ADMIN only, a read-only system,
    src_valid_mark the one writable sysctl, the unit's system call filter. A full tunnel comes
    up, its hooks cannot write to the system, and after a kill -9 `down` (ExecStopPost=, in the
    same sandbox) keeps it closed until the unit restarts it."""
    require_tools("unshare", "setpriv")
    from tests import sandbox
    from tests.test_deploy import CLIENT_UNIT, parse_unit, values, words

    unit = parse_unit(CLIENT_UNIT)
    caps = sandbox.unit_caps(words(unit, "Service", "CapabilityBoundingSet"))
    rw = sorted(p.lstrip("-") for p in words(unit, "Service", "ReadWritePaths"))
    syscalls = sandbox.syscall_filter(values(unit, "Service", "SystemCallFilter"))
    assert value_of(unit, "ProtectSystem") == "strict"
    assert value_of(unit, "RestrictSUIDSGID") == "yes" and value_of(unit, "LimitCORE") == "0"

    class SandboxedClient(Client):
        def command(self, *args) -> list[str]:
            return sandbox.command(net.tmp, caps, rw, None,
                                   [PY, "-m", "pytun.client.main", *args], syscalls=syscalls)

    before = routing(net.lap)
    path = net.add_peer("lena", "--full-tunnel")
    hook_log = net.tmp / "hook.log"
    add_hooks(path, {"PostUp": f"touch /etc/pytun-sandbox-%i 2>> {hook_log}; true"})
    client = SandboxedClient(net, path)
    client.env = sandbox.sandbox_env(**{k: v for k, v in client.env.items()
                                        if k in ("PYTUN_RUN_DIR", "PATH", "RESOLVCONF_LOG")})
    client.up()
    status = open(f"/proc/{client.proc.pid}/status").read()
    assert "CapEff:\t0000000000001000" in status, status  # CAP_NET_ADMIN only
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
    assert net.source_seen_by_inet() == HUB_INET
    assert net.lap.sysctl("net.ipv4.conf.all.src_valid_mark") == "1"
    assert "Read-only file system" in hook_log.read_text()
    assert not os.path.exists(f"/etc/pytun-sandbox-{client.ifname}")
    assert client.status()["full_tunnel"] == 1

    client.kill()
    wait_until(lambda: client.ifname not in net.lap.run("ip -o link").stdout,
               what="the TUN device to go with the killed client")
    assert net.lap.run("ip", "route", "get", INET, check=False).returncode != 0  # fails closed
    # ExecStopPost=-pytun-client down %i, as systemd runs it after that kill: the tunnel stays
    # closed until Restart= brings it back (or a `down` from a shell).
    kept = net.lap.run(client.command("down", client.ifname),
                       env={**client.env, "SERVICE_RESULT": "signal"})
    assert "stays closed" in kept.stderr
    assert net.lap.run("ip", "route", "get", INET, check=False).returncode != 0
    client.up()  # Restart=on-failure: the leftovers go, the tunnel is back
    assert "did not stop cleanly" in client.log.read_text()
    assert net.source_seen_by_inet() == HUB_INET
    client.down()
    assert routing(net.lap) == before


def value_of(unit: dict, key: str) -> str | None:
    found = [v for k, v in unit["Service"] if k == key]
    return found[-1] if found else None


def ping_text(ns, dst: str, size: int) -> str:
    """One don't-fragment echo request of `size` bytes in all (IPv4); ping's output."""
    done = ns.run("ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", size - 28, dst,
                  check=False, timeout=10)
    return done.stdout + done.stderr


@pytest.mark.parametrize("underlay", ["ipv4", "ipv6"])
def test_path_mtu_through_a_1300_byte_hop(narrow_net, underlay):
    """A 1300-byte hop between laptop and hub, tunnel MTU 1420, the tunnel over IPv4 or IPv6:
    DF packets of MTU-1 and MTU pass both ways (the encrypted datagrams are fragmented for the
    hop), MTU+1 is refused with "fragmentation needed" naming the tunnel MTU, and TCP
    completes both ways."""
    net, mtu = narrow_net, 1420
    # The underlay: 1300 bytes fit, 1301 get "fragmentation needed" / "packet too big" from the
    # hop's router.
    if underlay == "ipv4":
        hub, header, icmp_counter = HUB, 28, "IcmpOutDestUnreachs"
        assert "Frag needed and DF set (mtu = 1300)" in ping_text(net.lap, HUB, 1301)
    else:
        hub, header, icmp_counter = HUB6, 48, "Icmp6OutPktTooBigs"
        done = net.lap.run("ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", 1301 - 48,
                           HUB6, check=False, timeout=10)
        assert "From 2001:db8:1::1 icmp_seq=1 Packet too big: mtu=1300" in done.stdout
    assert ping(net.lap, hub, size=1300 - header, dont_fragment=True)

    path = net.add_peer("nina", "--full-tunnel")
    text = open(path).read()
    open(path, "w").write(text.replace(f"Endpoint = {HUB}:", f"Endpoint = [{hub}]:")
                          if underlay == "ipv6" else text)
    inner = str(wgconfig.load(path).interface.addresses[0].ip)
    client = Client(net, path)
    client.up()
    assert client.status()["endpoint"].startswith("[2001:db8:3::2]" if underlay == "ipv6"
                                                   else HUB)
    # The first datagram too big for the hop, each way, carries DF (the UDP socket's default,
    # IP_PMTUDISC_WANT; IPv6 routers never fragment): the hop's router drops it and answers
    # with ICMP, after which the sending kernel fragments the datagrams for the hop. So at
    # most one echo is lost each way, once; never more.
    done = net.lap.run("ping", "-n", "-q", "-c", "5", "-i", "0.1", "-W", "2", "-M", "do", "-s",
                       mtu - 1 - 28, HUB_INNER, check=False, timeout=20)
    assert int(re.search(r"(\d+) received", done.stdout)[1]) >= 3, done.stdout
    icmp = [int(ns.run("nstat", "-az", icmp_counter).stdout.split()[-2])
            for ns in (net.isp, net.mid)]
    assert all(n <= 1 for n in icmp), icmp  # measured: [1, 1], one echo of five lost
    # Laptop -> hub, and laptop -> inet, whose replies of the same size come back into the
    # tunnel (the hub's policy lets nothing from outside start a connection to a laptop):
    # every packet answered.
    for size in (mtu - 1, mtu):
        assert ping(net.lap, HUB_INNER, count=5, size=size - 28, dont_fragment=True), size
        assert ping(net.lap, INET, count=5, size=size - 28, dont_fragment=True), size
    # MTU+1: the laptop's kernel refuses its own; a forwarded one gets ICMP from the hub (its
    # MTU check comes before the forward hook, so before the policy).
    assert "message too long, mtu=1420" in ping_text(net.lap, HUB_INNER, mtu + 1)
    assert (f"From {HUB_INET} icmp_seq=1 Frag needed and DF set (mtu = {mtu})"
            in ping_text(net.inet, inner, mtu + 1))

    # TCP, full-size segments both ways (8 MiB each, bounded in time): every byte arrives.
    for direction in ("to-hub", "from-hub"):
        sent, received = tcp_transfer(net, 8 << 20, to_hub=direction == "to-hub")
        assert received == sent, direction
    errors = io_errors(net.server)
    assert errors == dict.fromkeys(errors, 0), errors
    # The datagrams were cut for the hop somewhere on the path (by a sender or a router).
    counter = "IpFragCreates" if underlay == "ipv4" else "Ip6FragCreates"
    made = [int(ns.run("nstat", "-az", counter).stdout.split()[-2])
            for ns in (net.lap, net.isp, net.mid, net.hub)]
    assert sum(made) > 1000, made
    client.down()


TCP_END = r"""
import hashlib, socket, sys
role, mode, host, port, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if role == "server":
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1)
    print("listening", flush=True)
    listener.settimeout(30)
    conn, _ = listener.accept()
else:
    conn = socket.create_connection((host, port), timeout=30)
conn.settimeout(30)
if mode == "send":
    data = bytes(range(256)) * (size // 256)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
    print(len(data), hashlib.sha256(data).hexdigest())
else:
    digest, total = hashlib.sha256(), 0
    while chunk := conn.recv(65536):
        digest.update(chunk)
        total += len(chunk)
    print(total, digest.hexdigest())
conn.close()
"""

def tcp_transfer(net, size: int, *, to_hub: bool, port: int = 5213) -> tuple[str, str]:
    """`size` bytes over TCP between the laptop and the hub's inner address; (what the sender
    says it sent, what the receiver got): byte count and SHA-256."""
    server = net.hub.popen([PY, "-u", "-c", TCP_END, "server", "recv" if to_hub else "send",
                            HUB_INNER, str(port), str(size)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    client = net.lap.run([PY, "-c", TCP_END, "client", "send" if to_hub else "recv", HUB_INNER,
                          str(port), str(size)], timeout=40).stdout.strip()
    out, _ = server.communicate(timeout=40)
    return (client, out.strip()) if to_hub else (out.strip(), client)


def echo_requests_seen(ns) -> tuple[int, int]:
    """ICMP and ICMPv6 echo requests this namespace's stack received (absolute counters)."""
    out = ns.run("nstat", "-asz", "IcmpInEchos", "Icmp6InEchos").stdout.split()
    return int(out[out.index("IcmpInEchos") + 1]), int(out[out.index("Icmp6InEchos") + 1])


def test_the_tunnel_addresses_are_guarded_from_the_underlay(net):
    """wg-quick's raw-table guard, for IPv4 and IPv6 tunnel addresses: a packet for them that
    arrives on another interface (here from the laptop's LAN router) is dropped before the
    stack sees it; the laptop's own underlay address still answers."""
    isp, lap = net.isp, net.lap
    isp.run("ip", "addr", "add", f"{LAN6}/64", "dev", net.isp_lap_dev, "nodad")
    lap.run("ip", "addr", "add", f"{LAPTOP6}/64", "dev", net.lap_dev, "nodad")
    path = net.add_peer("lisa", "--full-tunnel")
    add_lines = open(path).read().replace("[Interface]\n", "[Interface]\nAddress = fd77::2/128\n")
    open(path, "w").write(add_lines)
    client = Client(net, path)
    client.up()
    inner = next(str(a.ip) for a in wgconfig.load(path).interface.addresses if a.version == 4)
    guards = lap.run("nft", "list", "ruleset").stdout
    for address in (inner, "fd77::2"):
        assert f"daddr {address} fib saddr type != local drop" in guards, guards
    isp.run("ip", "route", "add", inner, "via", LAPTOP)
    isp.run("ip", "-6", "route", "add", "fd77::2", "via", LAPTOP6)

    seen = echo_requests_seen(lap)
    assert ping(isp, LAPTOP) and ping(isp, LAPTOP6)  # the underlay answers: counters count
    assert echo_requests_seen(lap) == (seen[0] + 1, seen[1] + 1)
    seen = echo_requests_seen(lap)
    assert not ping(isp, inner, timeout=1) and not ping(isp, "fd77::2", timeout=1)
    assert echo_requests_seen(lap) == seen  # dropped before the stack saw them
    client.down()
