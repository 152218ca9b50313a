"""What a Prometheus scrape costs a busy hub, and whether it disturbs the data plane.

    sudo .venv/bin/python bench/scrape.py [--rows 10000] [--sessions 1000] [--scrapes 20]
                                          [--seconds 6] [--rounds 3] [--json] [--max-time 240]

In namespaces it makes and always removes (the rig of bench/memory.py, plus one wireguard-go
laptop for iperf3):

    +------------- bscr (hub) -------------+         +----------- blap (laptops) -----------+
    | veth 192.0.2.1/24                    |---------| veth 192.0.2.2/24                    |
    | pytun-server, UDP 51820              |         | `sessions` sans-IO laptops (memory.py)|
    | metrics 127.0.0.1:9586               |         | wireguard-go laptop: iperf3 -c       |
    | iperf3 -s -B 10.64.0.1               |         |                                      |
    +--------------------------------------+         +--------------------------------------+

1. pytun-server starts on `rows` registry rows with metrics on; `sessions` laptops complete
   real handshakes (bench/memory.py's laptops), and a wireguard-go laptop connects.
2. `scrapes` scrapes one after the other from inside the hub's namespace: the time of each
   (median, max), the size of the answer, the number of series, and the pytun_sessions it
   reports (the run fails unless it is at least `sessions`).
3. TCP laptop->hub throughput (iperf3, `seconds` each), `rounds` times without and with a
   scraper that scrapes every second, alternating in one run, and the hub's CPU seconds in
   each. "Noise" is the spread of the runs without scraping.

Bounds: every command has a timeout, the run stops measuring at `--max-time`, and the
namespaces and processes go with tests/netns.py's Topology also when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METRICS = "127.0.0.1:9586"

# Scrapes the hub `n` times (or every `interval` seconds until killed when n is 0).
SCRAPER = r"""
import json, sys, time, urllib.request
url, n, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
times, size, body = [], 0, ""
i = 0
while n == 0 or i < n:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        body = r.read().decode()
    times.append(time.perf_counter() - t0)
    i += 1
    if interval:
        time.sleep(max(0.0, interval - times[-1]))
series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
sessions = next((float(l.split()[1]) for l in body.splitlines()
                 if l.startswith("pytun_sessions ")), None)
print(json.dumps({"times": times, "bytes": len(body), "series": series, "sessions": sessions}))
"""


def log(msg: str) -> None:
    print(f"scrape bench: {msg}", file=sys.stderr, flush=True)


def measure(rows: int, sessions: int, scrapes: int, seconds: float, rounds: int,
            max_time: float) -> dict:
    from bench import memory
    from bench.rig import BenchError, PytunHub, cpu_seconds
    from pytun.common import keys
    from pytun.server import state
    from tests.hubnet import WgGoLaptop
    from tests.netns import Topology, ping, wait_until

    t0 = time.monotonic()
    end = t0 + max_time

    def left(margin: float = 0.0) -> float:
        remaining = end - time.monotonic() - margin
        if remaining <= 0:
            raise BenchError(f"the scrape bench took over {max_time:g} s")
        return remaining

    out: dict = {"rows": rows, "sessions": sessions}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pytun-scrape-"))
    try:
        with Topology() as topo:
            hub_ns, lap_ns = topo.netns("bscr"), topo.netns("blap")
            topo.veth(hub_ns, f"{memory.HUB_EP[0]}/24", lap_ns,
                      f"{memory.LAPTOPS_UNDERLAY}/24", mtu=1500)
            hub = PytunHub(hub_ns, tmp, subnet=memory.MEMORY_SUBNET, port=memory.HUB_EP[1],
                           start=False)
            hub.admin("metrics", "--listen", METRICS)
            privates = [keys.generate_private() for _ in range(sessions)]
            memory.fill_registry(hub.registry_path, rows,
                                 publics=[keys.public_from_private(p) for p in privates])
            laptop_conf = hub.add_peer("iperf")
            hub.start(timeout=left())
            log(f"hub up with {rows} rows; {sessions} laptops handshaking")
            hub_public = keys.public_from_private(state.load_private_key(hub.state_dir))
            job = tmp / "laptops.json"
            fd = os.open(job, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"hub_public": hub_public.hex(), "hub_endpoint": list(memory.HUB_EP),
                           "bind": memory.LAPTOPS_UNDERLAY,
                           "privates": [p.hex() for p in privates],
                           "addresses": [str(a) for a in memory._addresses(sessions)],
                           "timeout": min(left(8.0), 60.0)}, f)
            laptops = lap_ns.popen([sys.executable, memory.__file__, "--laptops", str(job)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                lout, lerr = laptops.communicate(timeout=left(3.0))
            except subprocess.TimeoutExpired:
                raise BenchError("the laptops did not finish in time") from None
            report = json.loads(lout.strip().splitlines()[-1]) if lout.strip() else {}
            if report.get("replied") != sessions:
                raise BenchError(f"laptops: {report or lerr.strip()[-400:]}")
            out["sessions_s"] = time.monotonic() - t0

            WgGoLaptop(lap_ns, tmp, laptop_conf, ipv6=False)  # stopped with the namespace
            wait_until(lambda: ping(lap_ns, memory.HUB_INNER, timeout=1), timeout=20,
                       what="the wireguard-go laptop to ping the hub")

            url = f"http://{METRICS}/metrics"
            done = hub_ns.run([sys.executable, "-c", SCRAPER, url, str(scrapes), "0"],
                              timeout=left())
            first = json.loads(done.stdout)
            if first["sessions"] is None or first["sessions"] < sessions:
                raise BenchError(f"the scrape reports {first['sessions']} sessions, not"
                                 f" {sessions}")
            times = first["times"]
            out.update(scrape_median_ms=statistics.median(times) * 1e3,
                       scrape_max_ms=max(times) * 1e3, scrape_bytes=first["bytes"],
                       scrape_series=first["series"], scrape_sessions=first["sessions"],
                       scrapes=len(times))
            log(f"scrape: median {out['scrape_median_ms']:.0f} ms, max"
                f" {out['scrape_max_ms']:.0f} ms, {first['series']} series")

            iperf_server = hub_ns.popen(["iperf3", "-s", "-B", memory.HUB_INNER],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs: dict[str, list] = {"without": [], "with": []}
            cpu: dict[str, list] = {"without": [], "with": []}
            for _ in range(rounds):
                for kind in ("without", "with"):
                    left(seconds + 20)
                    wait_until(lambda: hub_ns.run("ss", "-Hltn", "sport = :5201").stdout.strip(),
                               timeout=10, interval=0.02, what="iperf3 to listen")
                    scraper = None
                    if kind == "with":
                        scraper = hub_ns.popen([sys.executable, "-c", SCRAPER, url, "0", "1"],
                                               stdout=subprocess.PIPE, text=True)
                    c0 = cpu_seconds(hub.pid)
                    done = lap_ns.run(["iperf3", "-c", memory.HUB_INNER, "-t", f"{seconds:g}",
                                       "-J", "--connect-timeout", "5000"],
                                      timeout=seconds + 30, check=False)
                    cpu[kind].append(cpu_seconds(hub.pid) - c0)
                    if scraper is not None:
                        scraper.terminate()
                        scraper.wait(10)
                        hub_ns.procs.remove(scraper)
                    try:
                        data = json.loads(done.stdout)
                        bps = data["end"]["sum_received"]["bits_per_second"]
                    except (ValueError, KeyError):
                        raise BenchError(f"iperf3: {done.stdout[-300:]}{done.stderr[-300:]}")
                    runs[kind].append(bps / 1e6)
                    log(f"TCP {kind} scraping: {bps / 1e6:.0f} Mbit/s")
            iperf_server.terminate()
            hub.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    off, on = runs["without"], runs["with"]
    out.update(tcp_without_mbps=off, tcp_with_mbps=on,
               tcp_without_mean=statistics.mean(off), tcp_with_mean=statistics.mean(on),
               noise_mbps=(max(off) - min(off)) if len(off) > 1 else None,
               cpu_without_s=cpu["without"], cpu_with_s=cpu["with"],
               total_s=time.monotonic() - t0)
    out["difference_pct"] = 100 * (out["tcp_with_mean"] / out["tcp_without_mean"] - 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=1_000)
    p.add_argument("--scrapes", type=int, default=20)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-time", type=float, default=240.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("scrape bench: needs root (namespaces)", file=sys.stderr)
        return 1
    from bench.rig import BenchError
    try:
        r = measure(args.rows, args.sessions, args.scrapes, args.seconds, args.rounds,
                    args.max_time)
    except (BenchError, AssertionError, OSError) as exc:
        print(f"scrape bench: failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"hub: {r['rows']} registered peers, {r['scrape_sessions']:.0f} sessions"
          f" (set up in {r['sessions_s']:.1f} s)")
    print(f"scrape: median {r['scrape_median_ms']:.1f} ms, max {r['scrape_max_ms']:.1f} ms over"
          f" {r['scrapes']} scrapes; {r['scrape_bytes'] / 1024:.0f} KiB, {r['scrape_series']}"
          " series")
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    print(f"TCP laptop->hub without scraping: {fmt(r['tcp_without_mbps'])} Mbit/s"
          f" (mean {r['tcp_without_mean']:.0f}, spread {r['noise_mbps'] or 0:.0f})")
    print(f"TCP laptop->hub scraping every 1 s: {fmt(r['tcp_with_mbps'])} Mbit/s"
          f" (mean {r['tcp_with_mean']:.0f}; {r['difference_pct']:+.1f} %)")
    print(f"hub CPU s per run without: {fmt(x * 1000 for x in r['cpu_without_s'])} ms;"
          f" with: {fmt(x * 1000 for x in r['cpu_with_s'])} ms")
    print(f"total {r['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
