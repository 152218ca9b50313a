"""Aggregate throughput of a hub with 1 and with N data-plane workers (server/workers.py).

    sudo python3 bench/workers.py [--workers 2] [--seconds 5] [--laptops 2]

One hub namespace and one namespace per laptop, each laptop on a veth of its own, running
wireguard-go (the first on PATH: put upstream's first to measure against it) with a key the
hub's workers own in turn (laptop i -> worker i % N, the best case of ownership by hash). Every
laptop runs iperf3 to a server of its own on the hub at once, up (laptop->hub) and then down;
the figures are the sum of what the servers received, and the CPU seconds per GB of the hub's
processes (the supervisor and every worker). On a machine with fewer cores than laptops plus
workers, the laptops' wireguard-go and iperf3 take cores the workers would use: read the
figures as a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.rig import HUB_INNER, PytunHub, cpu_seconds  # noqa: E402
from pytun.common import keys, steering  # noqa: E402
from tests.hubnet import WgGoLaptop  # noqa: E402
from tests.netns import Topology, ping, wait_until  # noqa: E402


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def key_for(worker: int, workers: int) -> tuple[str, str]:
    while True:
        private = keys.generate_private()
        public = keys.public_from_private(private)
        if steering.owner_of(public, workers) == worker:
            return keys.encode_key(private), keys.encode_key(public)


def hub_cpu(pid: int) -> float:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                              text=True).stdout.split()
    total = cpu_seconds(pid)
    for child in children:
        try:
            total += cpu_seconds(int(child))
        except OSError:
            pass
    return total


def run(workers: int, laptops: int, seconds: float, tmp) -> dict:
    with Topology() as topo:
        hub_ns = topo.netns("bwk")
        hub_ns.run("ip", "addr", "add", "192.0.2.1/32", "dev", "lo")
        hub = PytunHub(hub_ns, tmp, start=False)
        for i in range(laptops):
            hub.admin("access", "add", "everyone", "hub", f"tcp/{5301 + i}")
        hub.start(args=("--workers", str(workers)))
        laps = []
        for i in range(laptops):
            lap = topo.netns("bwl")
            hub_side, lap_side = f"198.51.100.{16 * i + 1}", f"198.51.100.{16 * i + 2}"
            topo.veth(hub_ns, f"{hub_side}/28", lap, f"{lap_side}/28", mtu=1500)
            lap.run("ip", "route", "add", "192.0.2.1/32", "via", hub_side)
            private, public = key_for(i % workers, workers)
            text = hub.add_peer(f"lap{i}", "--public-key", public)
            text = re.sub(r"(?m)^#?\s*PrivateKey\s*=.*$", f"PrivateKey = {private}", text)
            WgGoLaptop(lap, tmp, text)
            laps.append(lap)
        for lap in laps:
            wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=20,
                       what="a laptop to ping the hub")
        servers = [hub_ns.popen(["iperf3", "-s", "-B", HUB_INNER, "-p", str(5301 + i)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i in range(laptops)]
        for i in range(laptops):
            wait_until(lambda: hub_ns.run("ss", "-Hltn", f"sport = :{5301 + i}").stdout.strip(),
                       timeout=10, what="iperf3 to listen")
        out = {}
        for direction, extra in (("up", []), ("down", ["-R"])):
            before = hub_cpu(hub.pid)
            clients = [lap.popen(["iperf3", "-c", HUB_INNER, "-p", str(5301 + i), "-t",
                                  f"{seconds:g}", "-J", *extra], stdout=subprocess.PIPE,
                                 text=True) for i, lap in enumerate(laps)]
            total_bits = total_bytes = 0.0
            for c in clients:
                stdout, _ = c.communicate(timeout=seconds + 30)
                end = json.loads(stdout)["end"]["sum_received"]
                total_bits += end["bits_per_second"]
                total_bytes += end["bytes"]
            cpu = hub_cpu(hub.pid) - before
            out[f"{direction}_mbit"] = total_bits / 1e6
            out[f"{direction}_cpu_s_per_gb"] = cpu / (total_bytes / 1e9)
            time.sleep(0.5)  # the servers open their next listening socket
        stats = dict(hub.stats())
        out["handoffs"] = {k: v for k, v in stats.items() if k.startswith("handoff_")}
        for s in servers:
            s.kill()
        hub.stop()
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--laptops", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5)
    args = p.parse_args(argv)
    import tempfile
    import pathlib
    results = {}
    with tempfile.TemporaryDirectory(prefix="pytun-bench-workers-") as tmp:
        for n in sorted({1, args.workers}):
            log(f"{n} worker(s), {args.laptops} laptops")
            where = pathlib.Path(tmp) / f"w{n}"
            where.mkdir()
            results[n] = run(n, args.laptops, args.seconds, where)
    print(f"{'workers':<10}{'up Mbit/s':>12}{'down Mbit/s':>13}{'up CPU s/GB':>13}"
          f"{'down CPU s/GB':>15}")
    for n, r in results.items():
        print(f"{n:<10}{r['up_mbit']:>12,.0f}{r['down_mbit']:>13,.0f}"
              f"{r['up_cpu_s_per_gb']:>13.2f}{r['down_cpu_s_per_gb']:>15.2f}")
    for n, r in results.items():
        if r["handoffs"]:
            print(f"handoffs with {n} workers: {r['handoffs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
