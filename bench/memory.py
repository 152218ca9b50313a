"""Hub memory: what 10,000 registered peers and 1,000 sessions cost a hub Device.

The hub Device lives in a fresh child process (`python3 bench/memory.py --child`), so its RSS
delta counts the hub's own allocations only: the laptops (real initiator Devices) stay in the
parent, which sends the child pre-made initiations, reads back the responses and sends the
laptops' confirming keepalives, so every session completes as on the wire.

    child RSS  after imports and decoding its input                  rss0
               after building the Device with every peer             rss1
               after `sessions` full handshakes (keypairs current)   rss2

`fill_registry` writes registry rows straight into a hub's SQLite file in one transaction (the
registry's own `add` checks every row against all others, which is right for an admin and far
too slow for 10,000 rows); run.py starts a real pytun-server on it.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import sqlite3
import subprocess
import sys
import time

HUB_EP = ("192.0.2.1", 51820)
MEMORY_SUBNET = "10.64.0.0/18"  # room for 16,381 peers


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


def fill_registry(db_path: str, rows: int, keepalive: int = 25) -> None:
    """Insert `rows` peers (fresh keys, consecutive addresses of MEMORY_SUBNET) in one commit."""
    from pytun.common import keys

    now = int(time.time())
    values = []
    for i, address in enumerate(_addresses(rows)):
        public = keys.encode_key(keys.public_from_private(keys.generate_private()))
        values.append((f"bench-{i}", public, f"{address}/32", keepalive, now))
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10.0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO peers (name, public_key, address, keepalive, created) "
                       "VALUES (?, ?, ?, ?, ?)", values)
        db.execute("COMMIT")
    finally:
        db.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        sys.exit(_child())
    print(json.dumps(device_rss(), indent=2))
