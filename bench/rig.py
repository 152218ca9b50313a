"""The namespace rig of bench/run.py: one hub and one laptop joined by one veth.

    +----------------- hub -----------------+         +---------------- laptop ----------------+
    | veth 192.0.2.1/24, MTU 1500           |---------| veth 192.0.2.2/24, MTU 1500            |
    | 10.77.0.1/24 on wireguard-go (wg set) |         | 10.77.0.2/32 on wireguard-go (wg       |
    |   or on pytun-server                  |         |   setconf) or pytun-client             |
    | iperf3 -s -B 10.77.0.1                |         | iperf3 -c 10.77.0.1, ping 10.77.0.1    |
    +---------------------------------------+         +----------------------------------------+

Everything runs in namespaces made by tests/netns.py's Topology, which stops every process it
started (by PID, then whatever is left in the namespace) and deletes the namespaces, also when a
measurement fails. Every wireguard-go interface has a machine-wide unique name, because
/run/wireguard/IFACE.sock is shared by all namespaces. Every command has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from pytun.common import config as wgconfig
from pytun.common import keys
from tests.hubnet import HubProcess, OurLaptop, WgGoLaptop, start_wireguard_go, write_config
from tests.netns import Netns, Topology, ping, unique, wait_until

HUB_UNDERLAY, LAPTOP_UNDERLAY = "192.0.2.1", "192.0.2.2"
SUBNET, HUB_INNER = "10.77.0.0/24", "10.77.0.1"
PORT = 51820
MTU = 1420
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def laptop_config(private: bytes, address: str, hub_public: bytes) -> str:
    return (f"[Interface]\nPrivateKey = {keys.encode_key(private)}\nAddress = {address}/32\n\n"
            f"[Peer]\nPublicKey = {keys.encode_key(hub_public)}\n"
            f"Endpoint = {HUB_UNDERLAY}:{PORT}\nAllowedIPs = {SUBNET}\nPersistentKeepalive = 25\n")


class WgGoHub:
    """Stock wireguard-go as the hub, configured with `wg set`."""

    name = "wireguard-go"

    def __init__(self, ns: Netns, tmp):
        self.ns, self.tmp = ns, tmp
        self.ifname, self.proc = start_wireguard_go(ns, "bwh")
        private = keys.generate_private()
        self.public = keys.public_from_private(private)
        key_file = write_config(tmp, f"{self.ifname}-private", keys.encode_key(private) + "\n")
        ns.run("wg", "set", self.ifname, "private-key", key_file, "listen-port", PORT)
        ns.run("ip", "addr", "add", f"{HUB_INNER}/24", "dev", self.ifname)
        ns.run("ip", "link", "set", self.ifname, "mtu", MTU, "up")
        self.next_host = 2

    @property
    def pid(self) -> int:
        return self.proc.pid

    def add_peer(self, name: str) -> str:
        """Register a new laptop with `wg set`; returns the laptop's wg-quick config."""
        private = keys.generate_private()
        public = keys.public_from_private(private)
        address = f"10.77.0.{self.next_host}"
        self.next_host += 1
        self.ns.run("wg", "set", self.ifname, "peer", keys.encode_key(public),
                    "allowed-ips", f"{address}/32")
        return laptop_config(private, address, self.public)


class PytunHub(HubProcess):
    """pytun-server, set up with pytun-admin init and add-peer as an operator would (the
    tests' hub helper, on this rig's single veth)."""

    name = "pytun"

    def __init__(self, ns: Netns, tmp, *, subnet: str = SUBNET, port: int = PORT,
                 start: bool = True):
        ifname = unique("bph")
        super().__init__(ns, tmp, name=ifname, ifname=ifname, init_args=(
            "--subnet", subnet, "--endpoint", f"{HUB_UNDERLAY}:{port}", "--listen-port", port))
        # The hub drops what no access rule allows: open iperf3's port on the hub itself.
        for service in ("tcp/5201", "udp/5201"):
            self.admin("access", "add", "everyone", "hub", service, "--comment", "iperf3")
        if start:
            self.start()

    def start(self, timeout: float = 60.0, args=()) -> float:
        try:
            return super().start(timeout, args)
        except AssertionError as exc:
            raise BenchError(str(exc)) from None


class Leg:
    """One hub and one laptop, up and pinging, with an iperf3 server on the hub's tunnel address.

    `with Leg("b", "pytun", "wg-go", tmp) as leg:` ... everything is gone after the block.
    """

    def __init__(self, key: str, hub: str, laptop: str, tmp):
        self.key, self.hub_kind, self.laptop_kind, self.tmp = key, hub, laptop, tmp
        self.topo = Topology()

    def __enter__(self) -> "Leg":
        try:
            self._build()
        except BaseException:
            self.topo.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.topo.close()

    def _build(self) -> None:
        topo = self.topo
        self.hub_ns, self.lap_ns = topo.netns("bhub"), topo.netns("blap")
        topo.veth(self.hub_ns, f"{HUB_UNDERLAY}/24", self.lap_ns, f"{LAPTOP_UNDERLAY}/24",
                  mtu=1500)
        self.hub = (WgGoHub if self.hub_kind == "wg-go" else PytunHub)(self.hub_ns, self.tmp)
        text = self.hub.add_peer("laptop")
        if self.laptop_kind == "wg-go":
            self.laptop = WgGoLaptop(self.lap_ns, self.tmp, text)
        else:
            self.laptop = OurLaptop(self.lap_ns, self.tmp, text, f"leg {self.key} laptop")
        wait_until(lambda: ping(self.lap_ns, HUB_INNER, timeout=1), timeout=20,
                   what="the laptop to ping the hub through the tunnel")
        self.iperf_server = self.hub_ns.popen(["iperf3", "-s", "-B", HUB_INNER],
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
        self._wait_iperf_server()

    # -- loads --------------------------------------------------------------------------------

    def iperf(self, seconds: float, *, reverse=False, streams=1, udp_len=None,
              rate=None) -> dict:
        """One iperf3 run from the laptop; returns iperf3's `end.sum_received`."""
        argv = ["iperf3", "-c", HUB_INNER, "-t", f"{seconds:g}", "-J", "--connect-timeout",
                "5000"]
        if reverse:
            argv.append("-R")
        if streams > 1:
            argv += ["-P", str(streams)]
        if udp_len is not None:
            argv += ["-u", "-l", str(udp_len), "-b", rate or "0"]
        elif rate is not None:
            argv += ["-b", rate]
        for attempt in range(3):
            # The iperf3 server opens a new listening socket after each test: wait for it.
            self._wait_iperf_server()
            done = self.lap_ns.run(argv, timeout=seconds + 30, check=False)
            try:
                data = json.loads(done.stdout)
            except ValueError:
                raise BenchError(f"iperf3 gave no JSON (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-300:]}") from None
            if "unable to connect" not in data.get("error", "") or attempt == 2:
                break
        if "error" in data:
            raise BenchError(f"iperf3: {data['error']}")
        return data["end"]["sum_received"]

    def _wait_iperf_server(self) -> None:
        wait_until(lambda: self.hub_ns.run("ss", "-Hltn", "sport = :5201").stdout.strip(),
                   timeout=10, interval=0.02, what="iperf3 to listen")

    def iperf_with_cpu(self, seconds: float, **kw) -> tuple[dict, float]:
        """An iperf3 run and the hub process's CPU seconds during it."""
        before = cpu_seconds(self.hub.pid)
        result = self.iperf(seconds, **kw)
        return result, cpu_seconds(self.hub.pid) - before

    def ping_rtts(self, count: int, interval: float = 0.02) -> list[float]:
        done = self.lap_ns.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1",
                                HUB_INNER], timeout=count * interval + 15, check=False)
        rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", done.stdout)]
        if not rtts:
            raise BenchError(f"no ping replies through the tunnel:\n{done.stdout[-500:]}")
        return rtts

    # -- a new laptop ---------------------------------------------------------------------------

    def add_peer_latency(self, limit: float = 20.0) -> tuple[float, float]:
        """(command ms, first ping reply ms) from adding a new laptop on the hub.

        The first laptop leaves first (its interface is deleted), so that a new wireguard-go
        laptop, started beforehand, takes its place. The clock starts before the hub-side
        command (`pytun-admin add-peer` or `wg set`); the laptop then applies the config it
        printed and pings the hub every 20 ms; the clock stops at the first echo reply.
        """
        if self.laptop_kind != "wg-go":
            raise BenchError("measured with a wireguard-go laptop only")
        self.lap_ns.run("ip", "link", "del", self.laptop.ifname)
        self.laptop.proc.wait(10)
        ifname, _ = start_wireguard_go(self.lap_ns, "bwl")
        t0 = time.time()
        text = self.hub.add_peer("late")
        t_command = time.time()
        parsed = wgconfig.parse(text)
        stripped = write_config(self.tmp, f"{ifname}-setconf", wgconfig.strip(text))
        self.lap_ns.run("wg", "setconf", ifname, stripped)
        for address in parsed.interface.addresses:
            self.lap_ns.run("ip", "addr", "add", str(address), "dev", ifname)
        self.lap_ns.run("ip", "link", "set", ifname, "mtu", MTU, "up")
        self.lap_ns.run("ip", "route", "add", SUBNET, "dev", ifname)
        pinger = self.lap_ns.popen(["ping", "-D", "-n", "-i", "0.02", "-W", "1", "-w",
                                    f"{limit:g}", HUB_INNER], stdout=subprocess.PIPE, text=True)
        try:
            for line in pinger.stdout:
                m = re.match(r"\[([\d.]+)\] \d+ bytes from", line)
                if m:
                    return (t_command - t0) * 1e3, (float(m.group(1)) - t0) * 1e3
        finally:
            pinger.kill()
            pinger.wait(5)
            pinger.stdout.close()
        raise BenchError(f"no ping reply within {limit:g} s of adding the laptop")
