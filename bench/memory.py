"""Hub memory: a real pytun-server with 10,000 registered peers, 1,000 of them with sessions.

    sudo python3 bench/memory.py --server [--rows 10000] [--sessions 1000] [--json]
    python3 bench/memory.py                  # the in-process hub Device only; no root

`server_rss` (root; also `bench/run.py --only memory`) measures a running pytun-server's VmRSS
(/proc/PID/status) three times, in namespaces it makes and always removes:

    +------------- bmem (hub) -------------+         +----------- blap (laptops) -----------+
    | veth 192.0.2.1/24                    |---------| veth 192.0.2.2/24                    |
    | pytun-server, UDP 51820              |         | python3 bench/memory.py --laptops F  |
    | 10.64.0.1/18 on its TUN device       |         |   1,000 sans-IO Devices, one socket  |
    +--------------------------------------+         +--------------------------------------+

    empty      the server started with no registry rows
    rows       restarted on `rows` registry rows (`fill_registry`)
    sessions   after `sessions` laptops, each a real initiator Device with its own registry
               row, have each sent an ICMP echo request through the tunnel: the Device stages
               it, handshakes with the hub over UDP, sends it as its first transport packet,
               and the laptop counts the echo reply the hub's kernel sent back through the
               hub. The hub's `get` must then report `sessions` peers with a handshake newer
               than the run's start, or the measurement fails.

The laptops start handshakes at a paced rate (token bucket, LAPTOP_RATE a second) below the
hub's under-load threshold (1,000 a second), so the hub answers with responses, not cookie
replies; a cookie reply still goes to its Device, which retries after REKEY_TIMEOUT. Datagrams
from the hub reach the right Device by the receiver index they carry.

`device_rss` is the engine alone: a hub Device in a fresh child process
(`python3 bench/memory.py --child`), so its RSS delta counts the hub's own allocations only;
the laptops (real initiator Devices) stay in the parent, which sends the child pre-made
initiations, reads back the responses and sends the laptops' confirming keepalives.

    child RSS  after imports and decoding its input                  rss0
               after building the Device with every peer             rss1
               after `sessions` full handshakes (keypairs current)   rss2

`fill_registry` writes registry rows straight into a hub's SQLite file in one transaction (the
registry's own `add` checks every row against all others, which is right for an admin and far
too slow for 10,000 rows).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import itertools
import json
import os
import pathlib
import select
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HUB_EP = ("192.0.2.1", 51820)
LAPTOPS_UNDERLAY = "192.0.2.2"
MEMORY_SUBNET = "10.64.0.0/18"  # room for 16,381 peers
HUB_INNER = "10.64.0.1"
LAPTOP_RATE = 400.0  # handshakes the laptops start per second; the hub's threshold is 1,000
LAPTOP_BURST = 40
TICK_EVERY = 0.25


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def _addresses(n: int):
    net = ipaddress.ip_network(MEMORY_SUBNET)
    first = int(net.network_address) + 2  # .1 is the hub
    return [ipaddress.IPv4Address(first + i) for i in range(n)]


def _send(stream, obj) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def _receive(stream) -> dict:
    line = stream.readline()
    if not line:
        raise RuntimeError("the memory child exited early")
    return json.loads(line)


def device_rss(peers: int = 10_000, sessions: int = 1_000, timeout: float = 120.0) -> dict:
    """RSS deltas (KiB) of a hub Device with `peers` peers, `sessions` of them with a session."""
    from pytun.common.crypto import DH_pubkey, clamp
    from pytun.common.device import Device

    if not 0 <= sessions <= peers:
        raise ValueError("sessions must be between 0 and peers")
    hub_private = clamp(os.urandom(32))
    hub_public = DH_pubkey(hub_private)
    laptops = []
    for _ in range(sessions):
        dev = Device(clamp(os.urandom(32)))
        laptops.append((dev, dev.add_peer(hub_public, allowed_ips=[MEMORY_SUBNET],
                                          endpoint=HUB_EP)))
    publics = [dev.public_key for dev, _ in laptops]
    publics += [DH_pubkey(clamp(os.urandom(32))) for _ in range(peers - sessions)]
    initiations = []
    for dev, peer in laptops:
        dev.initiate(peer, 1.0)
        (datagram, _), = dev.net_out
        dev.net_out.clear()
        initiations.append(datagram.hex())

    deadline = time.monotonic() + timeout
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _send(child.stdin, {"private": hub_private.hex(), "peers": [p.hex() for p in publics],
                            "initiations": initiations})
        first = _receive(child.stdout)
        keepalives = []
        for (dev, _), response in zip(laptops, first["responses"]):
            dev.receive(bytes.fromhex(response), HUB_EP, 1.0)
            (datagram, _), = dev.net_out
            dev.net_out.clear()
            keepalives.append(datagram.hex())
        _send(child.stdin, {"keepalives": keepalives})
        second = _receive(child.stdout)
        child.stdin.close()
        child.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if second["sessions"] != sessions:
        raise RuntimeError(f"{second['sessions']} of {sessions} sessions completed")
    rss0, rss1, rss2 = first["rss0"], first["rss1"], second["rss2"]
    return {"peers": peers, "sessions": sessions, "baseline_kib": rss0,
            "peers_kib": rss1 - rss0, "sessions_kib": rss2 - rss1, "total_kib": rss2 - rss0,
            "build_s": first["build_s"]}


def _child() -> int:
    from pytun.common.device import Device

    request = _receive(sys.stdin)
    private = bytes.fromhex(request["private"])
    publics = [bytes.fromhex(p) for p in request["peers"]]
    initiations = [bytes.fromhex(i) for i in request["initiations"]]
    networks = [ipaddress.ip_network(f"{a}/32") for a in _addresses(len(publics))]
    del request
    gc.collect()
    rss0 = rss_kib()
    t0 = time.perf_counter()
    hub = Device(private, under_load_threshold=1 << 62)
    peers = [hub.add_peer(pub, allowed_ips=[net]) for pub, net in zip(publics, networks)]
    build_s = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_kib()
    responses = []
    for i, datagram in enumerate(initiations):
        hub.receive(datagram, ("198.51.100.2", 1024 + i), 1.0)
        (response, _), = hub.net_out
        hub.net_out.clear()
        responses.append(response.hex())
    _send(sys.stdout, {"rss0": rss0, "rss1": rss1, "build_s": build_s, "responses": responses})
    keepalives = [bytes.fromhex(k) for k in _receive(sys.stdin)["keepalives"]]
    for i, datagram in enumerate(keepalives):
        hub.receive(datagram, ("198.51.100.2", 1024 + i), 1.0)
    del keepalives, responses
    gc.collect()
    rss2 = rss_kib()
    sessions = sum(1 for p in peers if p.current is not None)
    _send(sys.stdout, {"rss2": rss2, "sessions": sessions})
    return 0


def fill_registry(db_path: str, rows: int, keepalive: int = 25, publics=()) -> None:
    """Insert `rows` peers (consecutive addresses of MEMORY_SUBNET) in one commit: the first
    ones with the given public keys, the others with fresh keys."""
    from pytun.common import keys

    publics = list(publics)
    if len(publics) > rows:
        raise ValueError("more public keys than rows")
    now = int(time.time())
    values = []
    for i, address in enumerate(_addresses(rows)):
        raw = publics[i] if i < len(publics) else keys.public_from_private(keys.generate_private())
        values.append((f"bench-{i}", keys.encode_key(raw), f"{address}/32", keepalive, now))
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10.0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO peers (name, public_key, address, keepalive, created) "
                       "VALUES (?, ?, ?, ?, ?)", values)
        db.execute("COMMIT")
    finally:
        db.close()


# -------------------------------------------------------------------------------- laptops


def icmp_echo(src: str, dst: str, ident: int) -> bytes:
    """An IPv4 ICMP echo request from `src` to `dst`."""
    from tests.enginenet import checksum, ipv4

    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"pytun bench"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ipv4(src, dst, icmp, proto=1)


def is_echo_reply(packet: bytes, src: str) -> bool:
    ihl = (packet[0] & 15) * 4 if packet else 0
    return (len(packet) >= ihl + 8 and packet[0] >> 4 == 4 and packet[9] == 1
            and packet[12:16] == ipaddress.IPv4Address(src).packed and packet[ihl] == 0)


def _receiver_index(data: bytes) -> int | None:
    """The receiver index of a response (bytes 8..12), cookie reply or transport (4..8)."""
    if len(data) >= 12 and data[0] == 2:
        return int.from_bytes(data[8:12], "little")
    if len(data) >= 8 and data[0] in (3, 4):
        return int.from_bytes(data[4:8], "little")
    return None


def _laptops(job_path: str) -> int:
    """Many laptops in one process: one initiator Device per key, one UDP socket.

    Each laptop sends one ICMP echo request to the hub's inner address; its Device stages it
    and starts the handshake, paced by a token bucket. Prints a JSON summary; exit status 0
    when every laptop got its echo reply before the job's deadline.
    """
    from pytun.common.device import Device

    with open(job_path) as f:
        job = json.load(f)
    deadline = time.monotonic() + job["timeout"]
    hub_public, hub_ep = bytes.fromhex(job["hub_public"]), tuple(job["hub_endpoint"])
    t0 = time.monotonic()
    laptops = []
    for i, (private, address) in enumerate(zip(job["privates"], job["addresses"])):
        dev = Device(bytes.fromhex(private))
        peer = dev.add_peer(hub_public, allowed_ips=[MEMORY_SUBNET], endpoint=hub_ep)
        laptops.append((dev, peer, icmp_echo(address, HUB_INNER, i & 0xFFFF)))
    setup_s = time.monotonic() - t0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    sock.bind((job["bind"], 0))
    sock.setblocking(False)
    by_index: dict[int, int] = {}
    replied: set[int] = set()
    counts: Counter = Counter()

    def flush(n: int) -> None:
        dev = laptops[n][0]
        for datagram, endpoint in dev.net_out:
            try:
                sock.sendto(datagram, endpoint)
                counts[f"sent_type{datagram[0]}"] += 1
            except OSError:  # a full buffer: the Device's retry timer sends again
                counts["send_failed"] += 1
        dev.net_out.clear()
        for index in itertools.chain(dev.handshakes, dev.keypairs):
            by_index[index] = n
        for packet in dev.tun_out:
            if is_echo_reply(packet, HUB_INNER):
                replied.add(n)
        dev.tun_out.clear()

    t1 = last = last_tick = time.monotonic()
    tokens, started = float(LAPTOP_BURST), 0
    while len(replied) < len(laptops) and time.monotonic() < deadline:
        now = time.monotonic()
        tokens = min(LAPTOP_BURST, tokens + (now - last) * LAPTOP_RATE)
        last = now
        while started < len(laptops) and tokens >= 1:
            dev, _, echo = laptops[started]
            dev.send(echo, now)
            flush(started)
            started, tokens = started + 1, tokens - 1
        select.select([sock], [], [], 0.005)
        for _ in range(512):
            try:
                data, src = sock.recvfrom(2048)
            except BlockingIOError:
                break
            n = by_index.get(_receiver_index(data))
            if n is None:
                counts["unknown_index"] += 1
                continue
            counts[f"received_type{data[0]}"] += 1
            laptops[n][0].receive(data, src, time.monotonic())
            flush(n)
        if now - last_tick >= TICK_EVERY:  # retransmissions (after a lost datagram or cookie)
            last_tick = now
            for n in range(started):
                if n not in replied:
                    laptops[n][0].tick(now)
                    flush(n)
    drops: Counter = Counter()
    for dev, _, _ in laptops:
        drops.update(dev.drops)
    print(json.dumps({"laptops": len(laptops), "replied": len(replied), "setup_s": setup_s,
                      "handshakes_s": time.monotonic() - t1, "counts": dict(counts),
                      "drops": dict(drops)}))
    return 0 if len(replied) == len(laptops) else 1


# -------------------------------------------------------------------------------- the server


def server_rss(rows: int = 10_000, sessions: int = 1_000, timeout: float = 55.0) -> dict:
    """A real pytun-server's RSS (KiB): no rows, `rows` rows, then `sessions` live sessions.

    Root only. Raises when a step fails or the hub reports fewer than `sessions` peers with a
    handshake in this run; the namespaces, processes and temporary files are removed always.
    """
    from bench.rig import BenchError, PytunHub
    from pytun.common import keys
    from pytun.common import control
    from pytun.server import state
    from tests.netns import Topology

    if not 0 <= sessions <= rows:
        raise ValueError("sessions must be between 0 and rows")
    t0 = time.monotonic()
    end = t0 + timeout

    def left(margin: float = 0.0) -> float:
        remaining = end - time.monotonic() - margin
        if remaining <= 0:
            raise BenchError(f"the memory measurement took over {timeout:g} s")
        return remaining

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pytun-memory-"))
    try:
        with Topology() as topo:
            hub_ns, lap_ns = topo.netns("bmem"), topo.netns("blap")
            topo.veth(hub_ns, f"{HUB_EP[0]}/24", lap_ns, f"{LAPTOPS_UNDERLAY}/24", mtu=1500)
            hub = PytunHub(hub_ns, tmp, subnet=MEMORY_SUBNET, port=HUB_EP[1], start=False)
            hub.start(timeout=left())
            empty = rss_kib(hub.pid)
            hub.stop()
            privates = [keys.generate_private() for _ in range(sessions)]
            fill_registry(hub.registry_path, rows,
                          publics=[keys.public_from_private(p) for p in privates])
            start_s = hub.start(timeout=left())
            with_rows = rss_kib(hub.pid)
            hub_public = keys.public_from_private(state.load_private_key(hub.state_dir))
            job_path = tmp / "laptops.json"
            fd = os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"hub_public": hub_public.hex(), "hub_endpoint": list(HUB_EP),
                           "bind": LAPTOPS_UNDERLAY, "privates": [p.hex() for p in privates],
                           "addresses": [str(a) for a in _addresses(sessions)],
                           "timeout": left(8.0)}, f)
            wall0 = int(time.time())
            t_laptops = time.monotonic()
            laptops = lap_ns.popen([sys.executable, os.path.abspath(__file__), "--laptops",
                                    str(job_path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            try:
                out, err = laptops.communicate(timeout=left(3.0))
            except subprocess.TimeoutExpired:
                raise BenchError("the laptops did not finish in time") from None
            laptops_s = time.monotonic() - t_laptops
            try:
                report = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise BenchError(f"the laptops exited {laptops.returncode}: "
                                 f"{err.strip()[-600:]}") from None
            with_sessions = rss_kib(hub.pid)
            sock = state.socket_path(hub.state_dir)
            peers = control.peers_from_get(control.request(sock, [("get", "1")],
                                                           timeout=left()))
            stats = dict(control.request(sock, [("stats", "1")], timeout=left()))
            after_get = rss_kib(hub.pid)
            hub.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    live = sum(1 for p in peers if (p["latest_handshake"] or 0) >= wall0 and p["rx_bytes"])
    if report["replied"] != sessions or live < sessions:
        raise BenchError(f"{report['replied']} of {sessions} laptops got an echo reply and "
                         f"the hub reports {live} sessions; laptops: {report}, hub: {stats}")
    return {"rows": rows, "sessions": sessions, "registered": len(peers), "live": live,
            "empty_kib": empty, "rows_kib": with_rows, "sessions_kib": with_sessions,
            "after_get_kib": after_get, "start_s": start_s, "laptops_s": laptops_s,
            "laptops": report, "hub_stats": stats, "total_s": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--server", action="store_true", help="measure a real pytun-server (root)")
    p.add_argument("--rows", type=int, default=10_000, help="registry rows (default 10000)")
    p.add_argument("--sessions", type=int, default=1_000,
                   help="laptops that handshake (default 1000)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    args = p.parse_args(argv)
    if not args.server:
        print(json.dumps(device_rss(args.rows, args.sessions), indent=2))
        return 0
    if os.geteuid() != 0:
        print("bench/memory.py --server: needs root (network namespaces)", file=sys.stderr)
        return 2
    r = server_rss(args.rows, args.sessions)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    for label, value in (("pytun-server RSS MiB, no peers", r["empty_kib"] / 1024),
                         (f"pytun-server RSS MiB, {args.rows} rows", r["rows_kib"] / 1024),
                         (f"pytun-server RSS MiB, {args.rows} rows, {args.sessions} sessions",
                          r["sessions_kib"] / 1024),
                         ("  the same after `get` of every peer", r["after_get_kib"] / 1024),
                         (f"pytun-server start s, {args.rows} rows", r["start_s"]),
                         (f"{args.sessions} laptops' handshakes and echoes s", r["laptops_s"]),
                         ("whole measurement s", r["total_s"])):
        print(f"{label:<52}{value:>10.1f}")
    print(f"hub reports {r['live']} of {r['registered']} peers with a handshake in this run")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child())
    if sys.argv[1:2] == ["--laptops"]:
        sys.exit(_laptops(sys.argv[2]))
    sys.exit(main())
