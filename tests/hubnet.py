"""A hub, laptops and an "internet" host in namespaces, for the end-to-end tests.

                 +-------------------------- hub ---------------------------+
    laptop i ----| veth 198.51.100.(16i+1)/28   lo 192.0.2.1 (UDP endpoint)  |---- inet
  .(16i+2)/28    | pytun0 10.77.0.1/24          veth 203.0.113.1/24 (egress) |  203.0.113.2
                 +-----------------------------------------------------------+

Each laptop reaches the hub's public endpoint 192.0.2.1 over its own veth; the hub's default
route points at the internet namespace, which is the end of the world: nothing leaves it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from pytun.common import control

from .netns import Netns, Topology, unique, wait_until

HUB_ENDPOINT = "192.0.2.1"
INET_HOST = "203.0.113.2"
HUB_INET = "203.0.113.1"
SUBNET = "10.77.0.0/24"
HUB_INNER = "10.77.0.1"
PY = sys.executable


class HubProcess:
    """pytun-server in a namespace, set up with pytun-admin as an operator would (init,
    add-peer, access rules) and started, stopped and asked for `show` like a service."""

    def __init__(self, ns: Netns, tmp_path, *, init_args=(), name: str = "hub",
                 ifname: str | None = None):
        self.ns, self.name = ns, name
        self.state_dir = str(tmp_path / f"{name}-state")
        self.log_path = tmp_path / f"{name}.log"
        self.ifname = ifname or unique("pt")
        self.proc: subprocess.Popen | None = None
        self.admin("init", "--interface", self.ifname, *init_args)

    def admin(self, *args, check=True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.ns.run([PY, "-m", "pytun.server.admin", "--state-dir", self.state_dir,
                            *map(str, args)], check=check, timeout=timeout)

    def add_peer(self, name: str, *args) -> str:
        """Register a laptop and return the wg-quick config add-peer printed."""
        return self.admin("add-peer", name, *args).stdout

    def start(self, timeout: float = 15.0, args=()) -> float:
        """Start pytun-server; returns the seconds until its control socket answered."""
        t0 = time.monotonic()
        with open(self.log_path, "a") as log:
            self.proc = self.ns.popen([PY, "-m", "pytun.server.main", "--state-dir",
                                       self.state_dir, *args], stdout=log,
                                      stderr=subprocess.STDOUT)
        wait_until(self.running, timeout=timeout, interval=0.02,
                   what=f"the hub to answer (log: {self.log_path})")
        return time.monotonic() - t0

    def running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"hub exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            self._request("get")
        except control.ControlError:
            return False
        return True

    def _request(self, what: str) -> list:
        """One control request. The socket is a path, reachable from any network namespace;
        from this process, unless the state directory lives in a mount namespace of the hub's
        own (tests/test_disk_netns.py), where a process started in its namespace asks."""
        if os.path.isdir(self.state_dir):
            return control.request(self.control_path, [(what, "1")], timeout=10)
        done = self.ns.run([PY, "-c", _REQUEST, self.control_path, what], check=False)
        if done.returncode != 0:
            raise control.ControlError(done.stderr.strip()[-300:])
        return json.loads(done.stdout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the hub and wait for it (SIGKILL after `timeout`); its exit status."""
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self.ns.procs.remove(self.proc)
        self.proc = None
        return code

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the hub is not running"
        return self.proc.pid

    @property
    def control_path(self) -> str:
        return os.path.join(self.state_dir, "control.sock")

    @property
    def registry_path(self) -> str:
        return os.path.join(self.state_dir, "registry.db")

    def show(self) -> dict[str, dict]:
        rows = json.loads(self.admin("show", "--json").stdout)
        return {row["name"]: row for row in rows}

    def stats(self) -> dict[str, str]:
        """The control socket's `stats` answer: counters by name."""
        return dict(self._request("stats"))

    def drops(self) -> dict[str, int]:
        return {k[5:]: int(v) for k, v in self.stats().items() if k.startswith("drop_")}

    def offload(self) -> dict[str, int]:
        """The data thread's TUN offload counters (gso_reads, gso_segments), from `stats`."""
        return {k[4:]: int(v) for k, v in self.stats().items() if k.startswith("tun_")}

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


class Hub(HubProcess):
    """The hub of the picture above: its namespace, the internet namespace, and pytun-server
    initialised for the subnet 10.77.0.0/24 at 192.0.2.1:51820 (not yet started)."""

    def __init__(self, topo: Topology, tmp_path, *, init_args=(), name: str = "hub"):
        self.topo = topo
        ns = topo.netns("hub")
        self.inet = topo.netns("inet")
        ns.run("ip", "addr", "add", f"{HUB_ENDPOINT}/32", "dev", "lo")
        topo.veth(ns, f"{HUB_INET}/24", self.inet, f"{INET_HOST}/24")
        ns.run("ip", "route", "add", "default", "via", INET_HOST)
        self.laptops = 0
        super().__init__(ns, tmp_path, name=name, init_args=(
            "--subnet", SUBNET, "--endpoint", f"{HUB_ENDPOINT}:51820", *init_args))

    def connect_laptop(self, prefix: str = "lap") -> tuple[Netns, str]:
        """A laptop namespace with an underlay path to the hub endpoint; returns (ns, address)."""
        i = self.laptops = self.laptops + 1
        lap = self.topo.netns(prefix)
        hub_side, lap_side = f"198.51.100.{16 * i + 1}", f"198.51.100.{16 * i + 2}"
        _, dev = self.topo.veth(self.ns, f"{hub_side}/28", lap, f"{lap_side}/28")
        lap.run("ip", "route", "add", f"{HUB_ENDPOINT}/32", "via", hub_side)
        return lap, lap_side


# "Who am I": answers every datagram with the source address it saw (what NAT made of the
# sender), for a test, the bench and the demo alike. Stops after 30 s without a datagram.
WHOAMI_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
s.settimeout(30)
while True:
    data, addr = s.recvfrom(100)
    s.sendto(addr[0].encode(), addr)
"""

# Asks a WHOAMI_SERVER (five tries, one second each) and prints its answer.
WHOAMI_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(5):
    s.sendto(b"who am i", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(100).decode())
        break
    except socket.timeout:
        pass
"""


def start_whoami(ns: Netns, host: str, port: int) -> subprocess.Popen:
    """A WHOAMI_SERVER on host:port in `ns`, listening when this returns (stopped with `ns`)."""
    server = ns.popen([PY, "-u", "-c", WHOAMI_SERVER, host, str(port)],
                      stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "listening":
        raise AssertionError(f"the UDP echo on {host}:{port} did not start")
    return server


def source_seen(ns: Netns, host: str, port: int) -> str:
    """The source address a WHOAMI_SERVER at host:port saw for a datagram from `ns` ('' when
    no answer came)."""
    return ns.run([PY, "-c", WHOAMI_CLIENT, host, str(port)], timeout=15).stdout.strip()


def who_am_i(client: Netns, server: Netns, host: str, port: int) -> str:
    """source_seen() with a WHOAMI_SERVER started for the one question, then stopped."""
    proc = start_whoami(server, host, port)
    try:
        return source_seen(client, host, port)
    finally:
        proc.kill()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()
        server.procs.remove(proc)




_REQUEST = """
import json, sys
from pytun.common import control
print(json.dumps(control.request(sys.argv[1], [(sys.argv[2], "1")], timeout=10)))
"""


def write_config(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.conf"
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


class OurLaptop:
    """pytun-client in a laptop namespace."""

    def __init__(self, ns: Netns, tmp_path, config_text: str, name: str):
        self.ns = ns
        self.ifname = unique("pc")
        self.config = write_config(tmp_path, self.ifname, config_text)
        self.run_dir = str(tmp_path / f"run-{self.ifname}")
        self.env = {**os.environ, "PYTUN_RUN_DIR": self.run_dir}
        self.log_path = tmp_path / f"{self.ifname}.log"
        log = open(self.log_path, "a")
        self.proc = ns.popen([PY, "-m", "pytun.client.main", "up", self.config],
                             stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        wait_until(self._up, timeout=15, what=f"{name}'s tunnel interface ({self.log_path})")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"client exited {self.proc.returncode}:\n"
                                 f"{self.log_path.read_text()}")
        return self.ifname in self.ns.run("ip", "-o", "link", "show", "up").stdout


def start_wireguard_go(ns: Netns, prefix: str = "wg") -> tuple[str, subprocess.Popen]:
    """Stock wireguard-go in the foreground (so it stops by PID) on a new interface with a
    machine-wide unique name: /run/wireguard/IFACE.sock is shared by all namespaces."""
    ifname = unique(prefix)
    proc = ns.popen(["wireguard-go", "-f", ifname], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, env={**os.environ, "LOG_LEVEL": "error"})
    wait_until(lambda: os.path.exists(f"/run/wireguard/{ifname}.sock"), timeout=10,
               what=f"wireguard-go's UAPI socket for {ifname}")
    return ifname, proc


class WgGoLaptop:
    """Stock wireguard-go + wg(8), configured with the file pytun-admin printed."""

    def __init__(self, ns: Netns, tmp_path, config_text: str, routes=None, *, ipv6=True):
        from pytun.common import config as wgconfig
        self.ns = ns
        parsed = wgconfig.parse(config_text)
        self.ifname, self.proc = start_wireguard_go(ns)
        stripped = write_config(tmp_path, f"{self.ifname}-setconf", wgconfig.strip(config_text))
        ns.run("wg", "setconf", self.ifname, stripped)
        if not ipv6:  # no link-local chatter (router solicitations, MLD) through the tunnel
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{self.ifname}.disable_ipv6=1")
        for address in parsed.interface.addresses:
            ns.run("ip", "addr", "add", str(address), "dev", self.ifname)
        ns.run("ip", "link", "set", self.ifname, "mtu", "1420", "up")
        if routes is None:  # as wg-quick does: a route for every AllowedIPs entry
            routes = [str(n) for p in parsed.peers for n in p.allowed_ips]
        for route in routes:
            if ipv6 or ":" not in route:
                ns.run("ip", "route", "add", route, "dev", self.ifname)
