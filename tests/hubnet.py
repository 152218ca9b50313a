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

from .netns import Netns, Topology, unique, wait_until

HUB_ENDPOINT = "192.0.2.1"
INET_HOST = "203.0.113.2"
HUB_INET = "203.0.113.1"
SUBNET = "10.77.0.0/24"
HUB_INNER = "10.77.0.1"
PY = sys.executable


class Hub:
    def __init__(self, topo: Topology, tmp_path, *, init_args=(), name: str = "hub"):
        self.topo = topo
        self.ns = topo.netns("hub")
        self.inet = topo.netns("inet")
        self.state_dir = str(tmp_path / f"{name}-state")
        self.log_path = tmp_path / f"{name}.log"
        self.ifname = unique("pt")
        self.ns.run("ip", "addr", "add", f"{HUB_ENDPOINT}/32", "dev", "lo")
        topo.veth(self.ns, f"{HUB_INET}/24", self.inet, f"{INET_HOST}/24")
        self.ns.run("ip", "route", "add", "default", "via", INET_HOST)
        self.proc: subprocess.Popen | None = None
        self.laptops = 0
        self.admin("init", "--subnet", SUBNET, "--endpoint", f"{HUB_ENDPOINT}:51820",
                   "--interface", self.ifname, *init_args)

    def admin(self, *args, check=True) -> subprocess.CompletedProcess:
        return self.ns.run([PY, "-m", "pytun.server.admin", "--state-dir", self.state_dir,
                            *map(str, args)], check=check)

    def add_peer(self, name: str, *args) -> str:
        """Register a laptop and return the wg-quick config add-peer printed."""
        return self.admin("add-peer", name, *args).stdout

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = self.ns.popen([PY, "-m", "pytun.server.main", "--state-dir", self.state_dir],
                                  stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self.running, timeout=15, what=f"the hub to answer (log: {self.log_path})")

    def running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"hub exited {self.proc.returncode}:\n{self.log()}")
        done = self.ns.run([PY, "-c", _REQUEST, self.control_path, "get"], check=False)
        return done.returncode == 0

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.ns.procs.remove(self.proc)
        self.proc = None
        return code

    @property
    def control_path(self) -> str:
        return os.path.join(self.state_dir, "control.sock")

    def show(self) -> dict[str, dict]:
        rows = json.loads(self.admin("show", "--json").stdout)
        return {row["name"]: row for row in rows}

    def drops(self) -> dict[str, int]:
        done = self.ns.run([PY, "-c", _REQUEST, self.control_path, "stats"])
        return {k[5:]: int(v) for k, v in json.loads(done.stdout) if k.startswith("drop_")}

    def offload(self) -> dict[str, int]:
        """The data thread's TUN offload counters (gso_reads, gso_segments), from `stats`."""
        done = self.ns.run([PY, "-c", _REQUEST, self.control_path, "stats"])
        return {k[4:]: int(v) for k, v in json.loads(done.stdout) if k.startswith("tun_")}

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def connect_laptop(self, prefix: str = "lap") -> tuple[Netns, str]:
        """A laptop namespace with an underlay path to the hub endpoint; returns (ns, address)."""
        i = self.laptops = self.laptops + 1
        lap = self.topo.netns(prefix)
        hub_side, lap_side = f"198.51.100.{16 * i + 1}", f"198.51.100.{16 * i + 2}"
        _, dev = self.topo.veth(self.ns, f"{hub_side}/28", lap, f"{lap_side}/28")
        lap.run("ip", "route", "add", f"{HUB_ENDPOINT}/32", "via", hub_side)
        return lap, lap_side


# Prints the source address of the one datagram it receives, and echoes it: who NAT made us.
UDP_SOURCE_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
s.settimeout(30)
data, addr = s.recvfrom(100)
print(addr[0], flush=True)
s.sendto(data, addr)
"""


_REQUEST = """
import json, sys
from pytun.common import control
print(json.dumps(control.request(sys.argv[1], [(sys.argv[2], "1")])))
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


class WgGoLaptop:
    """Stock wireguard-go + wg(8), configured with the file pytun-admin printed."""

    def __init__(self, ns: Netns, tmp_path, config_text: str, routes=None, *, ipv6=True):
        from pytun.common import config as wgconfig
        self.ns = ns
        self.ifname = unique("wg")
        parsed = wgconfig.parse(config_text)
        stripped = write_config(tmp_path, f"{self.ifname}-setconf", wgconfig.strip(config_text))
        self.proc = ns.popen(["wireguard-go", "-f", self.ifname], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "LOG_LEVEL": "error"})
        wait_until(lambda: os.path.exists(f"/run/wireguard/{self.ifname}.sock"), timeout=10,
                   what="wireguard-go's UAPI socket")
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
