"""Hot standby with real keepalived: two hubs share a key file, one PostgreSQL registry (in a
namespace of its own, pg 203.0.113.3) and the service address 192.0.2.1 that VRRP moves
between them; laptops dial only that address.

                      +--------------- switch: bridge ---------------+
                      |                                              |
    hub A 192.0.2.2/24, 203.0.113.11/24        hub B 192.0.2.3/24, 203.0.113.12/24
    keepalived priority 150                    keepalived priority 100
    (+ 192.0.2.1 while master)                 (+ 192.0.2.1 while master)
                      |                                              |
    laptop W 192.0.2.21 (wireguard-go)   laptop P 192.0.2.22 (pytun-client)   inet 203.0.113.2

Each hub runs keepalived in its namespace (`keepalived -s NETNS`) with deploy/keepalived's
notify hook, which sets the hub's role through pytun-admin ha. The laptops change nothing.

1. Host A dies (its link goes down, the hub is killed -9, keepalived stops): hub B takes the
   address, calls both laptops back from it, and both ping and move a transfer again within
   5 s; `show` on B lists them with fresh handshakes.
2. Host A comes back (link, hub as standby, then keepalived): it takes the address back
   (preemption), both laptops are back within 5 s, and a capture in each laptop's namespace
   shows that no datagram came from B's MAC address after the first one from A's: never both
   hubs at once.
3. Hub A's process alone restarts on the master: no hook comes, but it finds the service
   address on its host, starts active and calls the laptops back; back within 5 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from . import pgserver
from .conftest import require_tools, skip_or_fail
from pytun.server.registry import open_registry

from .hubnet import HubProcess, OurLaptop, WgGoLaptop, start_wireguard_go, write_config
from .netns import Netns, ping, topology, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.netns

PY = sys.executable
SERVICE = "192.0.2.1"
HUB_INNER = "10.77.0.1"
NOTIFY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy",
                      "keepalived", "pytun-notify")
BACK_WITHIN = 5.0

# Records (wall time, source MAC) of every UDP datagram from port 51820 seen on one interface.
SNIFFER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], 0))
out = open(sys.argv[2], "w")
print("ready", file=out, flush=True)
end = time.monotonic() + float(sys.argv[3])
s.settimeout(1.0)
while time.monotonic() < end:
    try:
        frame, (_, _, kind, *_) = s.recvfrom(128)
    except socket.timeout:
        continue
    if kind == socket.PACKET_OUTGOING or len(frame) < 42 or frame[23] != 17:
        continue
    ihl = (frame[14] & 15) * 4
    if struct.unpack_from("!H", frame, 14 + ihl)[0] == 51820:
        print(f"{time.time():.4f} {frame[6:12].hex()}", file=out, flush=True)
"""

KEEPALIVED_CONF = """
global_defs {{
    router_id {name}
    script_user root
}}
vrrp_instance pytun {{
    state BACKUP
    interface {dev}
    virtual_router_id 51
    priority {priority}
    advert_int 1
    virtual_ipaddress {{
        {service}/24 dev {dev}
    }}
    notify "{notify} --state-dir {state_dir} --admin {admin}"
}}
"""


class HaHub(HubProcess):
    """A hub host on the switch: its namespace, one veth on the bridge, pytun-server
    initialised for the shared key, registry and service address, and keepalived."""

    def __init__(self, topo, switch: Netns, tmp_path, name: str, last: int, key_file: str,
                 registry: str, priority: int):
        self.tmp_path, self.priority = tmp_path, priority
        ns = topo.netns(f"ha{name}")
        self.dev, port = topo.veth(ns, [f"192.0.2.{last}/24", f"203.0.113.{9 + last}/24"],
                                   switch, None)
        switch.run("ip", "link", "set", port, "master", "br0")
        ns.run("ip", "route", "add", "default", "via", "203.0.113.2")
        self.mac = json.loads(ns.run("ip", "-j", "link", "show", self.dev).stdout)[0][
            "address"].replace(":", "")
        self.keepalived = None
        super().__init__(ns, tmp_path, name=name, init_args=(
            "--subnet", "10.77.0.0/24", "--endpoint", f"{SERVICE}:51820", "--egress", self.dev,
            "--key-file", key_file, "--service-address", SERVICE, "--registry", registry))

    def start(self, timeout: float = 20.0) -> float:
        took = super().start(timeout)
        assert self.role() is not None
        return took

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def role(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"hub {self.name} exited:\n{self.log()}")
        done = self.admin("ha", check=False)
        return done.stdout.split(",")[0].removeprefix("role: ") if done.returncode == 0 else None

    def start_keepalived(self, admin: str) -> None:
        conf = self.tmp_path / f"keepalived-{self.name}.conf"
        conf.write_text(KEEPALIVED_CONF.format(
            name=f"hub-{self.name}", dev=self.dev, priority=self.priority, service=SERVICE,
            notify=NOTIFY, state_dir=self.state_dir, admin=admin))
        with open(self.tmp_path / f"keepalived-{self.name}.log", "a") as log:
            # keepalived joins the namespace itself; its pid files go to /run/keepalived/NS/.
            self.keepalived = subprocess.Popen(
                ["keepalived", "-s", self.ns.name, "-n", "-l", "-D", "-G", "-P", "-f",
                 str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        self.ns.procs.append(self.keepalived)  # stopped by PID with the namespace

    def stop_keepalived(self) -> None:
        """As at a host's shutdown: keepalived resigns and removes the service address."""
        self.keepalived.terminate()
        self.keepalived.wait(15)
        self.ns.procs.remove(self.keepalived)
        self.keepalived = None

    def link(self, up: bool) -> None:
        self.ns.run("ip", "link", "set", self.dev, "up" if up else "down")


class Pinger:
    """ping every 50 ms through the tunnel, with the wall time of every answer (-D)."""

    def __init__(self, ns: Netns, path):
        self.path = path
        with open(path, "w") as out:
            ns.popen(["ping", "-n", "-D", "-i", "0.05", "-W", "1", "-w", "240", HUB_INNER],
                     stdout=out, stderr=subprocess.STDOUT)

    def times(self) -> list[float]:
        return [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from",
                                             self.path.read_text(), re.M)]

    def replies(self, after: float) -> list[float]:
        return [t for t in self.times() if t > after]

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.times() if start <= t <= end]
        return max((b - a for a, b in zip(times, times[1:])), default=end - start)


def _peers(url: str) -> list:
    """The shared registry's peers, read the test's own way (the unix socket)."""
    with open_registry(url, create=False) as registry:
        return registry.list()


def _transfer(ns: Netns) -> None:
    done = ns.run("iperf3", "-c", HUB_INNER, "-n", "2M", "-J", "--connect-timeout", "3000",
                  timeout=30)
    end = json.loads(done.stdout)["end"]
    # -n: the client stops once it has written 2 MiB; the server's count at that moment lags
    assert end["sum_sent"]["bytes"] >= 2 << 20 and end["sum_received"]["bytes"] > 0, end


def _captured(path) -> list[tuple[float, str]]:
    lines = path.read_text().splitlines()[1:]
    return [(float(t), mac) for t, mac in (line.split() for line in lines)]


class Pair:
    """The switch (a bridge in a namespace of its own), the inet host, PostgreSQL in a
    namespace on the switch with a fresh database, one key file, and hubs A and B (not yet
    started) initialised for the shared key, registry and service address."""

    def __init__(self, topology, tmp_path, request):
        if pgserver.missing():
            skip_or_fail(pgserver.missing())
        self.topology, self.tmp_path = topology, tmp_path
        self.switch = topology.netns("sw")
        self.switch.run("ip", "link", "add", "br0", "type", "bridge")
        self.switch.run("ip", "link", "set", "br0", "up")
        self.inet = topology.netns("inet")
        self.plug(self.inet, "203.0.113.2/24")
        # PostgreSQL in a namespace of its own on the same switch: the registry both share.
        pg_ns = topology.netns("pg")
        self.plug(pg_ns, "203.0.113.3/24")
        self.pg = pgserver.PgServer(netns=pg_ns, listen="203.0.113.3")
        request.addfinalizer(self.pg.close)
        self.pg.setup()
        self.local_url = self.pg.create_database()  # the test's own way in: the unix socket
        from pytun.common import keys
        key_file = str(tmp_path / "hub.key")  # one key file both hosts hold (0600)
        keys.write_secret_file(key_file, keys.encode_key(keys.generate_private()) + "\n")
        url = self.pg.tcp_url(self.local_url)
        self.a = HaHub(topology, self.switch, tmp_path, "a", 2, key_file, url, priority=150)
        self.b = HaHub(topology, self.switch, tmp_path, "b", 3, key_file, url, priority=100)
        for hub in (self.a, self.b):  # after the namespaces (and keepalived with them) go
            request.addfinalizer(lambda ns=hub.ns.name: shutil.rmtree(
                f"/run/keepalived/{ns}", ignore_errors=True))

    def plug(self, ns: Netns, address: str) -> str:
        """A veth from `ns` to the bridge; the device's name in `ns`."""
        dev, port = self.topology.veth(ns, address, self.switch, None)
        self.switch.run("ip", "link", "set", port, "master", "br0")
        return dev


def test_laptops_follow_the_service_address_to_the_standby_and_back(topology, tmp_path,
                                                                     netns_ok, request):
    require_tools("keepalived", "wireguard-go", "wg", "iperf3", "ping")
    pair = Pair(topology, tmp_path, request)
    a, b, local_url = pair.a, pair.b, pair.local_url
    alice = a.admin("add-peer", "alice", "--keepalive", "0").stdout
    bob = a.admin("add-peer", "bob").stdout
    a.admin("access", "add", "everyone", "hub", "tcp/5201")

    laptops = {}
    captures = {}
    for name, last in (("alice", 21), ("bob", 22)):
        ns = topology.netns("lap")
        dev = pair.plug(ns, f"192.0.2.{last}/24")
        captures[name] = tmp_path / f"capture-{name}.txt"
        ns.popen([PY, "-c", SNIFFER, dev, str(captures[name]), "240"])
        laptops[name] = ns
    for name, path in captures.items():
        wait_until(lambda: path.exists() and path.read_text().startswith("ready"), timeout=10,
                   what=f"the capture in {name}'s namespace")

    admin = tmp_path / "pytun-admin"
    admin.write_text(f"#!/bin/sh\nexec {PY} -m pytun.server.admin \"$@\"\n")
    admin.chmod(0o755)
    for hub in (a, b):
        hub.start()
        assert hub.role() == "standby"  # until keepalived says otherwise
        hub.start_keepalived(str(admin))
    wait_until(lambda: a.role() == "active", timeout=20, what="hub A to become master")
    assert b.role() == "standby"
    for hub in (a, b):
        hub.ns.popen(["iperf3", "-s", "-B", HUB_INNER], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)

    WgGoLaptop(laptops["alice"], tmp_path, alice, routes=["10.77.0.0/24"], ipv6=False)
    OurLaptop(laptops["bob"], tmp_path, bob, "bob")
    for name, ns in laptops.items():
        wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=15,
                   what=f"{name} through hub A")
    for ns in laptops.values():
        wait_until(lambda: _try(_transfer, ns), timeout=15, what="a first transfer")
    # The active hub writes endpoints behind, at most once a second: wait until it has.
    wait_until(lambda: all(p.endpoint for p in _peers(local_url)), timeout=10,
               what="both endpoints in the registry")
    pingers = {name: Pinger(ns, tmp_path / f"ping-{name}.txt") for name, ns in laptops.items()}

    # 1. Host A dies: its link goes down, the hub is killed; nothing changes on laptops.
    wall_fail = time.time()
    a.link(False)
    a.kill()
    dead = time.time()  # no answer from hub A after this
    a.stop_keepalived()  # the rest of the host goes too (its link is down: nothing is sent)
    wait_until(lambda: all(p.replies(after=dead) for p in pingers.values()), timeout=30,
               what="both laptops through hub B")
    failover = {name: p.replies(after=dead)[0] - wall_fail for name, p in pingers.items()}
    assert b.role() == "active"
    rows = b.show()
    for name in laptops:
        assert rows[name]["latest_handshake"] >= int(wall_fail), rows[name]
        assert rows[name]["endpoint"].startswith("192.0.2.2"), rows[name]
    for ns in laptops.values():
        _transfer(ns)

    # 2. Host A comes back: its link, then the hub (standby: it does not hold the address),
    # then keepalived, which takes the address back (preemption) and makes the hub active.
    a.link(True)
    a.start()
    assert a.role() == "standby"
    wall_back = time.time()
    a.start_keepalived(str(admin))
    wait_until(lambda: a.role() == "active" and b.role() == "standby", timeout=10,
               what="hub A master, hub B standby")
    wait_until(lambda: all(any(t > wall_back and mac == a.mac for t, mac in _captured(p))
                           for p in captures.values()), timeout=10, what="hub A to call back")
    resumed = time.time()
    wait_until(lambda: all(p.replies(after=resumed) for p in pingers.values()), timeout=10,
               what="both laptops through hub A again")
    # The interruption: the longest time without an answer around the failback.
    failback = {name: p.longest_gap(wall_back - 1, time.time()) for name, p in pingers.items()}
    for ns in laptops.values():
        _transfer(ns)
    rows = a.show()
    for name in laptops:
        assert rows[name]["latest_handshake"] >= int(wall_back), rows[name]
    print(f"\nback after hub A died: {_fmt(failover)}; after it returned: {_fmt(failback)}")

    # 3. The hub alone restarts on the master (keepalived holds the address meanwhile, so no
    # hook comes): it sees the service address is here and starts active, calling laptops back.
    wall_restart = time.time()
    a.kill()
    a.start()
    assert a.role() == "active" and b.role() == "standby"
    restarted = time.time()
    wait_until(lambda: all(p.replies(after=restarted) for p in pingers.values()), timeout=10,
               what="both laptops through the restarted hub A")
    restart = {name: p.longest_gap(wall_restart - 1, time.time()) for name, p in pingers.items()}
    print(f"back after hub A's process alone restarted: {_fmt(restart)}")

    # Never both: per laptop, B's last datagram came before A's first after A returned.
    for name, path in captures.items():
        seen = _captured(path)
        from_a = [t for t, mac in seen if mac == a.mac]
        from_b = [t for t, mac in seen if mac == b.mac]
        assert from_a and from_b, (name, len(from_a), len(from_b))
        assert not [t for t in from_a if dead < t < wall_back], "hub A was down"
        first_a = min(t for t in from_a if t > wall_back)
        assert max(from_b) < first_a, (
            f"{name}: hub B sent {sum(t >= first_a for t in from_b)} datagrams after hub A's"
            f" first ({max(from_b) - first_a:.3f} s later)")
        assert not [t for t in from_b if t < wall_fail], "hub B sent while standby"
    for name, back in (("failover", failover), ("failback", failback), ("restart", restart)):
        worst = max(back.values())
        assert worst < BACK_WITHIN, f"{name}: laptops back after {_fmt(back)}"


def _try(fn, *args) -> bool:
    try:
        fn(*args)
    except AssertionError:
        return False
    return True


def _fmt(back: dict[str, float]) -> str:
    return ", ".join(f"{name} {t:.1f} s" for name, t in sorted(back.items()))


def _wg_join(ns: Netns, tmp_path, ifname: str, text: str) -> None:
    """Configure a running wireguard-go interface with a config add-peer printed."""
    from pytun.common import config as wgconfig
    ns.run("wg", "setconf", ifname, write_config(tmp_path, f"{ifname}-setconf",
                                                 wgconfig.strip(text)))
    ns.run("sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1")
    for address in wgconfig.parse(text).interface.addresses:
        ns.run("ip", "addr", "add", str(address), "dev", ifname)
    ns.run("ip", "link", "set", ifname, "mtu", "1420", "up")
    ns.run("ip", "route", "add", "10.77.0.0/24", "dev", ifname)


def _cut_after(pinger: Pinger, ns: Netns, start: float) -> float:
    """Seconds from `start` to the last answer, once the laptop gets none any more."""
    wait_until(lambda: not ping(ns, HUB_INNER, timeout=0.5), timeout=10,
               what="the laptop to be cut off")
    return max(pinger.times()) - start


def test_two_hubs_one_postgresql_registry_changes_on_either_host_and_an_outage(
        topology, tmp_path, netns_ok, request):
    """Without keepalived: B holds the service address and is active, A is standby. A change
    made with pytun-admin on either host reaches B through PostgreSQL's NOTIFY; PostgreSQL
    restarts while both hubs run."""
    require_tools("wireguard-go", "wg", "ping")
    pair = Pair(topology, tmp_path, request)
    a, b = pair.a, pair.b
    dave = b.admin("add-peer", "dave").stdout
    for hub in (a, b):
        hub.start()
    b.ns.run("ip", "addr", "add", f"{SERVICE}/24", "dev", b.dev)
    b.admin("ha", "master")
    assert (a.role(), b.role()) == ("standby", "active")
    laptops = {}
    for name, last in (("dave", 21), ("carol", 22)):
        laptops[name] = topology.netns("lap")
        pair.plug(laptops[name], f"192.0.2.{last}/24")
    WgGoLaptop(laptops["dave"], tmp_path, dave, routes=["10.77.0.0/24"], ipv6=False)
    wait_until(lambda: ping(laptops["dave"], HUB_INNER, timeout=0.5), timeout=15,
               what="dave through hub B")

    # add-peer on host A (standby) while B serves: carol connects through B within 2 s.
    ifname, _ = start_wireguard_go(laptops["carol"], "wgc")
    t0 = time.time()
    carol = a.admin("add-peer", "carol").stdout
    _wg_join(laptops["carol"], tmp_path, ifname, carol)
    pingers = {name: Pinger(ns, tmp_path / f"ping-{name}.txt") for name, ns in laptops.items()}
    wait_until(lambda: pingers["carol"].replies(after=t0), timeout=10,
               what="carol through hub B")
    joined = pingers["carol"].replies(after=t0)[0] - t0
    assert b.show()["carol"]["latest_handshake"] >= int(t0)

    # PostgreSQL goes away: the hubs go on serving, changes fail in one line.
    pair.pg.stop()
    down = time.time()
    for hub in (a, b):
        wait_until(lambda: "registry check failed" in hub.log(), timeout=10,
                   what=f"hub {hub.name} to notice the outage")
    for hub, args in ((a, ("add-peer", "erin")), (b, ("remove-peer", "dave"))):
        done = hub.admin(*args, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, done.stderr
        assert "Traceback" not in done.stderr and "registry" in lines[0], lines
    for name, ns in laptops.items():
        assert ping(ns, HUB_INNER, timeout=1), f"{name} lost hub B during the outage"
    assert a.running() and b.running()
    assert b.log().count("registry check failed") <= 2, "one line, not one per poll"
    pair.pg.start()
    outage = time.time() - down
    wait_until(lambda: "registry reachable again" in b.log(), timeout=10,
               what="hub B to reach the registry again")
    assert "dave" in b.show()  # the refused removal changed nothing

    # Back: remove-peer on B cuts carol (served by B) within 1 s; remove-peer on A cuts dave
    # on B within 1 s of the command, through NOTIFY.
    t1 = time.time()
    b.admin("remove-peer", "carol")
    cut_local = _cut_after(pingers["carol"], laptops["carol"], t1)
    t2 = time.time()
    a.admin("remove-peer", "dave")
    t2_done = time.time()
    cut_remote = _cut_after(pingers["dave"], laptops["dave"], t2)
    print(f"\ncarol added on A, through B after {joined:.2f} s; PostgreSQL down {outage:.1f} s;"
          f" removed on B, cut after {cut_local:.2f} s; dave removed on A, cut on B after"
          f" {cut_remote:.2f} s ({t2_done - t2:.2f} s of it pytun-admin itself)")
    assert joined < 2.0
    assert cut_local < 1.0
    assert cut_remote - (t2_done - t2) < 1.0
    assert "carol" not in b.show() and "dave" not in b.show()
