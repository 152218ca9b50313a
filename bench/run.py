"""pytun next to wireguard-go on one rig, in network namespaces: throughput, CPU, latency, memory.

    sudo python3 bench/run.py [--quick] [--only a,b,c,memory] [--seconds N] [--json]

Three legs run one after the other on the same rig (bench/rig.py: a hub and a laptop namespace
joined by one veth, tunnel 10.77.0.0/24):

    a  wireguard-go hub (`wg set`)   + wireguard-go laptop
    b  pytun-server hub              + wireguard-go laptop
    c  pytun-server hub              + pytun-client laptop
    d  as b, e  as c, with TUN offload on read (PYTUN_TUN_OFFLOAD=1): A/B in one run

Each leg measures, with iperf3 (server on the hub's tunnel address, client on the laptop):
TCP both ways with 1 and 4 streams; the hub process's CPU seconds (utime + stime from
/proc/PID/stat) per GB moved, saturated and at a fixed 100 Mbit/s; the median of 50 pings at
20 ms; 64-byte UDP packets per second (iperf3 -u -l 64 -b 0) both ways; the hub's RSS; and the
time from adding a new wireguard-go laptop on the hub (`pytun-admin add-peer`, or `wg set` for
wireguard-go) to its first echo reply. With a pytun leg selected it also measures the engine
in-process (handshakes per second on one core, a hub Device's RSS with 10,000 peers of which
1,000 have sessions; see bench/engine.py and bench/memory.py) and a real pytun-server's RSS
with no peers, with 10,000 registry rows, and after 1,000 of those laptops (sans-IO Devices in
a second namespace) have handshaken over UDP and had an echo answered through the tunnel
(bench/memory.py's server_rss). `--only memory` runs that server measurement alone.

Root only; it touches nothing outside its namespaces and temporary directory, removes both
also on failure, and bounds every load in time. It prints figures and never judges them; a
failed measurement shows as "-" and makes the exit status 1. On a small machine every leg
shares the same CPUs with the laptop's side of the tunnel and iperf3: compare columns, not
machines.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import engine, memory  # noqa: E402
from bench.rig import Leg, rss_kib  # noqa: E402

LEGS = {"a": ("wg-go", "wg-go", "wg-go/wg-go"),
        "b": ("pytun", "wg-go", "pytun/wg-go"),
        "c": ("pytun", "pytun", "pytun/pytun"),
        "d": ("pytun", "wg-go", "pytun-tso/wg-go"),
        "e": ("pytun", "pytun", "pytun-tso/pytun")}
OFFLOAD_ON = {"d", "e"}  # pytun processes of these legs run with PYTUN_TUN_OFFLOAD=1

LEG_ROWS = (
    ("tcp_up_1", "TCP laptop->hub 1 stream Mbit/s"),
    ("tcp_down_1", "TCP hub->laptop 1 stream Mbit/s"),
    ("tcp_up_4", "TCP laptop->hub 4 streams Mbit/s"),
    ("tcp_down_4", "TCP hub->laptop 4 streams Mbit/s"),
    ("cpu_up_sat", "hub CPU s/GB laptop->hub saturated"),
    ("cpu_down_sat", "hub CPU s/GB hub->laptop saturated"),
    ("tcp_up_100m", "TCP laptop->hub at 100M Mbit/s"),
    ("cpu_up_100m", "hub CPU s/GB laptop->hub at 100M"),
    ("ping_median_ms", "ping RTT median ms"),
    ("udp64_up_kpps", "UDP 64 B laptop->hub kpps"),
    ("udp64_down_kpps", "UDP 64 B hub->laptop kpps"),
    ("hub_rss_mib", "hub RSS MiB after the load"),
    ("add_peer_cmd_ms", "add-peer command ms"),
    ("add_peer_first_ms", "add-peer to first reply ms"),
)
ENGINE_ROWS = (
    ("hs_full_per_s", "pytun handshakes/s, full, one core"),
    ("hs_initiator_us", "pytun handshake initiator us"),
    ("hs_responder_us", "pytun handshake responder us"),
    ("hs_responder_only_per_s", "pytun handshakes/s, responder only"),
    ("device_peers_mib", "hub Device RSS MiB, 10k peers"),
    ("device_sessions_mib", "hub Device RSS MiB, +1k sessions"),
    ("server_empty_mib", "pytun-server RSS MiB, no peers"),
    ("server_rows_mib", "pytun-server RSS MiB, 10k rows"),
    ("server_sessions_mib", "pytun-server RSS MiB, +1k sessions"),
    ("server_get_mib", "pytun-server RSS MiB, after `get`"),
    ("server_rows_start_s", "pytun-server start s, 10k rows"),
    ("server_sessions_s", "pytun-server 1k sessions made s"),
)
PEERS, SESSIONS = 10_000, 1_000


class Stopped(BaseException):
    """--max-time passed, or SIGTERM or SIGINT came: clean up and print what was measured."""


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Results:
    def __init__(self):
        self.legs: dict[str, dict] = {}
        self.engine: dict = {}
        self.errors: list[str] = []

    def take(self, where: dict, what: str, fn):
        """Run one measurement; a failure is recorded and the run goes on."""
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - reported, then the next measurement runs
            msg = f"{what}: {type(exc).__name__}: {str(exc).strip()[:600]}"
            self.errors.append(msg)
            log(f"FAILED {msg}")
            return None
        log(f"{what} ({time.monotonic() - t0:.1f} s)")
        if isinstance(value, dict):
            where.update(value)
        return value


def measure_leg(key: str, args, tmp: pathlib.Path, results: Results) -> None:
    _, laptop, title = LEGS[key]
    out = results.legs.setdefault(key, {})
    log(f"leg {key}: {title} hub/laptop")
    saved = os.environ.get("PYTUN_TUN_OFFLOAD")
    # The hub and pytun-client processes of the leg inherit it.
    os.environ["PYTUN_TUN_OFFLOAD"] = "1" if key in OFFLOAD_ON else "0"
    try:
        _measure_leg(key, laptop, args, tmp, results, out)
    finally:
        if saved is None:
            os.environ.pop("PYTUN_TUN_OFFLOAD", None)
        else:
            os.environ["PYTUN_TUN_OFFLOAD"] = saved


def _measure_leg(key: str, laptop: str, args, tmp: pathlib.Path, results: Results,
                 out: dict) -> None:
    s = args.seconds
    try:
        leg = Leg(key, LEGS[key][0], laptop, tmp).__enter__()
    except Exception as exc:  # noqa: BLE001
        results.errors.append(f"leg {key} set-up: {type(exc).__name__}: {str(exc)[:600]}")
        log(f"FAILED leg {key} set-up: {exc}")
        return
    try:
        def tcp(up_key, cpu_key, **kw):
            def run():
                r, cpu = leg.iperf_with_cpu(s, **kw)
                return {up_key: r["bits_per_second"] / 1e6, cpu_key: cpu / (r["bytes"] / 1e9)}
            return run

        def plain(row, **kw):
            return lambda: {row: leg.iperf(s, **kw)["bits_per_second"] / 1e6}

        def udp(row, **kw):
            def run():
                r = leg.iperf(s, udp_len=64, **kw)
                return {row: (r["packets"] - r["lost_packets"]) / r["seconds"] / 1e3}
            return run

        def add_peer():
            cmd, first = leg.add_peer_latency()
            return {"add_peer_cmd_ms": cmd, "add_peer_first_ms": first}

        steps = [
            ("TCP up 1 stream", tcp("tcp_up_1", "cpu_up_sat")),
            ("TCP down 1 stream", tcp("tcp_down_1", "cpu_down_sat", reverse=True)),
            ("TCP up 4 streams", plain("tcp_up_4", streams=4)),
            ("TCP down 4 streams", plain("tcp_down_4", streams=4, reverse=True)),
            ("TCP up at 100M", tcp("tcp_up_100m", "cpu_up_100m", rate="100M")),
            ("ping", lambda: {"ping_median_ms": statistics.median(leg.ping_rtts(args.pings))}),
            ("UDP 64 B up", udp("udp64_up_kpps")),
            ("UDP 64 B down", udp("udp64_down_kpps", reverse=True)),
            ("hub RSS", lambda: {"hub_rss_mib": rss_kib(leg.hub.pid) / 1024}),
        ]
        if laptop == "wg-go":
            steps.append(("add-peer to first reply", add_peer))
        for what, fn in steps:
            results.take(out, f"leg {key} {what}", fn)
    finally:
        leg.__exit__(None, None, None)


def measure_engine(args, tmp: pathlib.Path, results: Results) -> None:
    out = results.engine

    def handshakes():
        r = engine.handshake_costs(args.handshakes)
        return {"hs_full_per_s": r["full_per_s"], "hs_initiator_us": r["initiator_us"],
                "hs_responder_us": r["responder_us"],
                "hs_responder_only_per_s": r["responder_only_per_s"]}

    def device():
        r = memory.device_rss(PEERS, SESSIONS)
        return {"device_peers_mib": r["peers_kib"] / 1024,
                "device_sessions_mib": r["sessions_kib"] / 1024}

    results.take(out, f"engine: {args.handshakes} handshakes in-process", handshakes)
    results.take(out, f"engine: hub Device with {PEERS} peers, {SESSIONS} sessions", device)


def measure_server(results: Results) -> None:
    """A real pytun-server: no peers, 10,000 registry rows, then 1,000 live sessions."""
    def run():
        r = memory.server_rss(PEERS, SESSIONS)
        return {"server_empty_mib": r["empty_kib"] / 1024, "server_rows_mib": r["rows_kib"] / 1024,
                "server_sessions_mib": r["sessions_kib"] / 1024,
                "server_get_mib": r["after_get_kib"] / 1024,
                "server_rows_start_s": r["start_s"], "server_sessions_s": r["laptops_s"]}

    results.take(results.engine, f"pytun-server with {PEERS} registry rows, {SESSIONS} sessions",
                 run)


# -------------------------------------------------------------------------------- report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def ratios(results: Results) -> dict:
    out = {}
    base = results.legs.get("a")
    for key in ("b", "c", "d", "e"):
        if base is None or key not in results.legs:
            continue
        out[f"{key}/a"] = {row: (results.legs[key][row] / base[row]
                                 if results.legs[key].get(row) is not None and base.get(row)
                                 else None) for row, _ in LEG_ROWS}
    return out


def render(results: Results, args) -> str:
    keys = [k for k in "abcde" if k in results.legs]
    rats = ratios(results)
    width = max(len(label) for _, label in LEG_ROWS + ENGINE_ROWS) + 2
    lines = [f"pytun bench on {os.cpu_count()} CPUs, Linux {platform.release()}; iperf3 "
             f"{args.seconds:g} s per run{' (--quick)' if args.quick else ''}"]
    if rats:
        lines.append("b/a, c/a: the figure divided by wg-go/wg-go's (Mbit/s, kpps: higher is "
                     "better; CPU s/GB, ms, MiB: lower is better)")
    if any(k in OFFLOAD_ON for k in keys):
        lines.append("pytun-tso: pytun with TUN offload on read (PYTUN_TUN_OFFLOAD=1)")
    lines.append("")
    if keys:
        head = f"{'metric':<{width}}" + "".join(f"{LEGS[k][2]:>16}" for k in keys)
        head += "".join(f"{r:>8}" for r in rats)
        lines.append(head)
        for row, label in LEG_ROWS:
            line = f"{label:<{width}}" + "".join(f"{_fmt(results.legs[k].get(row)):>16}"
                                                 for k in keys)
            for r in rats.values():
                line += f"{'-' if r[row] is None else f'{r[row]:.2f}':>8}"
            lines.append(line)
    if results.engine or any(LEGS[k][0] == "pytun" for k in keys):
        lines += ["", f"{'pytun engine and hub':<{width}}{'value':>14}"]
        shown = ENGINE_ROWS if keys else [r for r in ENGINE_ROWS if r[0].startswith("server_")]
        for row, label in shown:
            lines.append(f"{label:<{width}}{_fmt(results.engine.get(row)):>14}")
    if results.errors:
        lines += ["", "failed:"] + [f"  {e}" for e in results.errors]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--only", default="a,b,c", metavar="PARTS",
                   help="legs to run, e.g. a,b,d (default a,b,c; d and e: b and c with TUN"
                        " offload on read); `memory` for the server's RSS")
    p.add_argument("--seconds", type=float, help="seconds per iperf3 run (default 8, quick 2)")
    p.add_argument("--max-time", type=float, metavar="S",
                   help="stop measuring after S seconds (default 600, quick 150)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    parts = [k.strip() for k in args.only.split(",") if k.strip()]
    legs = [k for k in parts if k != "memory"]
    if not parts or any(k not in LEGS for k in legs):
        print("bench/run.py: --only takes a comma list of a, b, c, d, e, memory", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench/run.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    tools = ("ip", "iperf3", "ping", "wg", "wireguard-go") if legs else ("ip",)
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print(f"bench/run.py: needs {', '.join(missing)}", file=sys.stderr)
        return 2
    args.seconds = args.seconds or (2.0 if args.quick else 8.0)
    args.max_time = args.max_time or (150.0 if args.quick else 600.0)
    args.pings = 20 if args.quick else 50
    args.handshakes = 200 if args.quick else 2000

    def stop(signum, frame):
        if signum == signal.SIGALRM:
            raise Stopped(f"stopped after --max-time {args.max_time:g} s")
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    results = Results()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pytun-bench-"))
    old = {s: signal.signal(s, stop) for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)}
    signal.setitimer(signal.ITIMER_REAL, args.max_time)
    t0 = time.monotonic()
    try:
        if any(LEGS[k][0] == "pytun" for k in legs):
            measure_engine(args, tmp, results)
        for key in legs:
            measure_leg(key, args, tmp, results)
        if "memory" in parts or any(LEGS[k][0] == "pytun" for k in legs):
            measure_server(results)
    except Stopped as exc:
        results.errors.append(str(exc))
        log(str(exc))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in old.items():
            signal.signal(signum, handler)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.monotonic() - t0:.0f} s")
    if args.json:
        print(json.dumps({"seconds_per_run": args.seconds, "quick": args.quick,
                          "legs": {k: {"hub": LEGS[k][0], "laptop": LEGS[k][1], **v}
                                   for k, v in results.legs.items()},
                          "ratios": ratios(results), "pytun": results.engine,
                          "errors": results.errors}, indent=2))
    else:
        print(render(results, args))
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
