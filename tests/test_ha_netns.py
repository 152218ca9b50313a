"""Hot standby with real keepalived: two hubs share a key file, one SQLite registry and the
service address 192.0.2.1 that VRRP moves between them; laptops dial only that address.

                      +--------------- switch: bridge ---------------+
                      |                                              |
    hub A 192.0.2.2/24, 203.0.113.11/24        hub B 192.0.2.3/24, 203.0.113.12/24
    keepalived priority 150                    keepalived priority 100
    (+ 192.0.2.1 while master)                 (+ 192.0.2.1 while master)
                      |                                              |
    laptop W 192.0.2.21 (wireguard-go)   laptop P 192.0.2.22 (pytun-client)   inet 203.0.113.2

Each hub runs keepalived in its namespace (`keepalived -s NETNS`) with deploy/keepalived's
notify hook, which sets the hub's role through pytun-admin ha. The laptops change nothing.

1. Hub A dies (its link goes down and the hub is killed -9): hub B takes the address, calls
   both laptops back from it, and both ping and move a transfer again within 5 s; `show` on B
   lists them with fresh handshakes.
2. Hub A comes back (started as standby, link up): it takes the address back (preemption),
   both laptops are back within 5 s, and a capture in each laptop's namespace shows that no
   datagram came from B's MAC address after the first one from A's: never both hubs at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from .conftest import require_tools
from .hubnet import OurLaptop, WgGoLaptop
from .netns import Netns, ping, topology, unique, wait_until  # noqa: F401 (fixture)

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


class HaHub:
    def __init__(self, topo, switch: Netns, tmp_path, name: str, last: int, key_file: str,
                 priority: int):
        self.name, self.tmp_path, self.priority = name, tmp_path, priority
        self.ns = topo.netns(f"ha{name}")
        self.dev, port = topo.veth(self.ns, [f"192.0.2.{last}/24", f"203.0.113.{9 + last}/24"],
                                   switch, None)
        switch.run("ip", "link", "set", port, "master", "br0")
        self.ns.run("ip", "route", "add", "default", "via", "203.0.113.2")
        self.mac = json.loads(self.ns.run("ip", "-j", "link", "show", self.dev).stdout)[0][
            "address"].replace(":", "")
        self.state_dir = str(tmp_path / f"{name}-state")
        self.log_path = tmp_path / f"{name}.log"
        self.proc = None
        self.keepalived = None
        self.admin("init", "--subnet", "10.77.0.0/24", "--endpoint", f"{SERVICE}:51820",
                   "--interface", unique("pt"), "--egress", self.dev, "--key-file", key_file,
                   "--service-address", SERVICE)

    def admin(self, *args, check=True):
        return self.ns.run([PY, "-m", "pytun.server.admin", "--state-dir", self.state_dir,
                            *map(str, args)], check=check)

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = self.ns.popen([PY, "-m", "pytun.server.main", "--state-dir",
                                       self.state_dir], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.role() is not None, timeout=20,
                   what=f"hub {self.name} to answer ({self.log_path})")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.ns.procs.remove(self.proc)
        self.proc = None

    def role(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"hub {self.name} exited:\n{self.log_path.read_text()}")
        done = self.admin("ha", check=False)
        return done.stdout.split(",")[0].removeprefix("role: ") if done.returncode == 0 else None

    def show(self) -> dict:
        return {r["name"]: r for r in json.loads(self.admin("show", "--json").stdout)}

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


def _rows(hub) -> list[tuple]:
    db = sqlite3.connect(f"file:{os.path.join(hub.state_dir, 'registry.db')}?mode=ro", uri=True,
                         timeout=10)
    try:
        return db.execute("SELECT name, endpoint, last_handshake FROM peers").fetchall()
    finally:
        db.close()


def _transfer(ns: Netns) -> None:
    done = ns.run("iperf3", "-c", HUB_INNER, "-n", "2M", "-J", "--connect-timeout", "3000",
                  timeout=30)
    end = json.loads(done.stdout)["end"]
    # -n: the client stops once it has written 2 MiB; the server's count at that moment lags
    assert end["sum_sent"]["bytes"] >= 2 << 20 and end["sum_received"]["bytes"] > 0, end


def _captured(path) -> list[tuple[float, str]]:
    lines = path.read_text().splitlines()[1:]
    return [(float(t), mac) for t, mac in (line.split() for line in lines)]


def test_laptops_follow_the_service_address_to_the_standby_and_back(topology, tmp_path,
                                                                     netns_ok, request):
    require_tools("keepalived", "wireguard-go", "wg", "iperf3", "ping")
    switch = topology.netns("sw")
    switch.run("ip", "link", "add", "br0", "type", "bridge")
    switch.run("ip", "link", "set", "br0", "up")
    inet = topology.netns("inet")
    _, port = topology.veth(inet, "203.0.113.2/24", switch, None)
    switch.run("ip", "link", "set", port, "master", "br0")

    # One key file both hosts hold (0600), one registry file both hubs open.
    from pytun.common import keys
    key_file = str(tmp_path / "hub.key")
    keys.write_secret_file(key_file, keys.encode_key(keys.generate_private()) + "\n")
    a = HaHub(topology, switch, tmp_path, "a", 2, key_file, priority=150)
    b = HaHub(topology, switch, tmp_path, "b", 3, key_file, priority=100)
    for hub in (a, b):  # after the namespaces (and keepalived with them) are gone
        request.addfinalizer(lambda ns=hub.ns.name: shutil.rmtree(f"/run/keepalived/{ns}",
                                                                  ignore_errors=True))
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(b.state_dir, "registry.db" + suffix)
        if os.path.exists(path):
            os.unlink(path)
    os.symlink(os.path.join(a.state_dir, "registry.db"), os.path.join(b.state_dir,
                                                                      "registry.db"))
    alice = a.admin("add-peer", "alice", "--keepalive", "0").stdout
    bob = a.admin("add-peer", "bob").stdout
    a.admin("access", "add", "everyone", "hub", "tcp/5201")

    laptops = {}
    captures = {}
    for name, last in (("alice", 21), ("bob", 22)):
        ns = topology.netns("lap")
        dev, port = topology.veth(ns, f"192.0.2.{last}/24", switch, None)
        switch.run("ip", "link", "set", port, "master", "br0")
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
    wait_until(lambda: all(e for _, e, _ in _rows(a)), timeout=10,
               what="both endpoints in the registry")
    pingers = {name: Pinger(ns, tmp_path / f"ping-{name}.txt") for name, ns in laptops.items()}

    # 1. Hub A dies: its link goes down and the process is killed; nothing changes on laptops.
    wall_fail = time.time()
    a.link(False)
    a.kill()
    dead = time.time()  # no answer from hub A after this
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

    # 2. Hub A comes back as standby; keepalived gives it the address back.
    a.start()
    wall_back = time.time()
    a.link(True)
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
    for name, back in (("failover", failover), ("failback", failback)):
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
