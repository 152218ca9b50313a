"""Test-only traffic makers for the fault tests: a bad-network UDP relay and a handshake flood.

RELAY runs in a namespace of its own between a laptop and the hub:

    laptop --UDP--> relay LISTEN port --(delay, reorder, duplicate)--> hub endpoint
    laptop <------- relay <------------ (the same, the other way) ----- hub

Loss is not the relay's: an nftables `numgen random` rule drops datagrams before they reach it
(`loss_rule`). Everything else comes from one `random.Random(seed)`, so a run can be repeated.
It can also drop the first N handshake messages each way, so a handshake must complete by
retransmission, and keep a capture of every datagram it saw (both directions) for the leak
check. It prints "ready", and when its stdin closes, one JSON line of what it did.

FLOOD sends handshake initiations with a valid mac1 (anyone who has a laptop config knows the
hub's public key) at a fixed rate from many source ports, and counts what comes back.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

RELAY = r"""
import heapq, json, os, random, select, socket, struct, sys, time
listen_host, listen_port, hub_host, hub_port, up_port = (
    sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
opts = json.loads(sys.argv[6])
rng = random.Random(opts["seed"])
down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
down.bind((listen_host, listen_port))
up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
up.bind(("0.0.0.0", up_port))
for s in (down, up):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setblocking(False)
capture = open(opts["capture"], "wb") if opts.get("capture") else None
laptop = None
queue, seq = [], 0
stats = {d: {"in": 0, "bytes_in": 0, "out": 0, "dup": {}, "late": 0, "forced_drop": 0}
         for d in ("up", "down")}
forced = {"up": opts.get("drop_handshakes", 0), "down": opts.get("drop_handshakes", 0)}
print("ready", flush=True)
stdin_open = True
while stdin_open or queue:
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, sock, data, dest, direction = heapq.heappop(queue)
        try:
            sock.sendto(data, dest)
            stats[direction]["out"] += 1
        except OSError:
            pass
    if not stdin_open:
        continue
    timeout = max(0.0, queue[0][0] - now) if queue else 0.5
    ready, _, _ = select.select([down, up, sys.stdin], [], [], timeout)
    if sys.stdin in ready:
        if not os.read(sys.stdin.fileno(), 4096):
            stdin_open = False
    for sock in (down, up):
        if sock not in ready:
            continue
        for _ in range(256):
            try:
                data, src = sock.recvfrom(65535)
            except BlockingIOError:
                break
            if sock is down:
                laptop, direction, out, dest = src, "up", up, (hub_host, hub_port)
            elif laptop is None:
                continue
            else:
                direction, out, dest = "down", down, laptop
            st = stats[direction]
            st["in"] += 1
            st["bytes_in"] += len(data)
            if capture:
                capture.write(struct.pack("!cI", direction[0].encode(), len(data)) + data)
            kind = str(data[0]) if data else "empty"
            if kind in ("1", "2") and forced[direction] > 0:
                forced[direction] -= 1
                st["forced_drop"] += 1
                continue
            now = time.monotonic()
            delay = opts["delay"] + rng.random() * opts["jitter"]
            if rng.random() < opts["reorder"]:
                delay += opts["reorder_delay"]  # overtaken by the next few
                st["late"] += 1
            seq += 1
            heapq.heappush(queue, (now + delay, seq, out, data, dest, direction))
            if rng.random() < opts["duplicate"]:
                st["dup"][kind] = st["dup"].get(kind, 0) + 1
                seq += 1
                heapq.heappush(queue, (now + delay + rng.random() * opts["jitter"], seq, out,
                                       data, dest, direction))
if capture:
    capture.close()
print(json.dumps(stats), flush=True)
"""

DEFAULTS = {"seed": 1, "delay": 0.001, "jitter": 0.002, "reorder": 0.02, "reorder_delay": 0.004,
            "duplicate": 0.02, "drop_handshakes": 1, "capture": None}


class Relay:
    """RELAY in namespace `ns`; `stop()` returns its statistics."""

    def __init__(self, ns, listen: str, port: int, hub: str, hub_port: int, up_port: int,
                 **opts):
        self.opts = {**DEFAULTS, **opts}
        self.proc = ns.popen([sys.executable, "-u", "-c", RELAY, listen, str(port), hub,
                              str(hub_port), str(up_port), json.dumps(self.opts)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "ready", line

    def stop(self) -> dict:
        out, _ = self.proc.communicate("", timeout=30)
        return json.loads(out.strip().splitlines()[-1])


def loss_rule(ns, ports, percent: int) -> None:
    """Drop `percent` % of the UDP packets arriving at each of `ports` in `ns`, at random
    (nftables numgen: this kernel has no netem). A packet is what the kernel hands the hook:
    a run of datagrams sent with UDP segmentation offload (the hub does) is one."""
    rules = "".join(f"    udp dport {port} numgen random mod 100 < {percent} counter drop\n"
                    for port in ports)
    ns.run(["nft", "-f", "-"], input=f"""
table inet badnet {{
  chain input {{ type filter hook input priority -10; policy accept;
{rules}  }}
}}
""")


def loss_counted(ns) -> dict[int, int]:
    """Packets the loss rule dropped so far, by port."""
    out = ns.run("nft", "list", "table", "inet", "badnet").stdout
    return {int(line.split("udp dport ")[1].split()[0]):
            int(line.split("counter packets ")[1].split()[0])
            for line in out.splitlines() if "counter packets" in line}


def read_capture(path) -> list[tuple[str, bytes]]:
    """[(direction 'u' or 'd', datagram)] as the relay saw them."""
    data = open(path, "rb").read()
    out, i = [], 0
    while i < len(data):
        direction, n = struct.unpack_from("!cI", data, i)
        i += 5
        out.append((direction.decode(), data[i:i + n]))
        i += n
    return out


FLOOD = r"""
import json, os, random, select, socket, sys, time
from pytun.common.crypto import HASH, LABEL_MAC1, MAC
hub, rate = (sys.argv[1], 51820), int(sys.argv[2])
seconds, nports = float(sys.argv[3]), int(sys.argv[4])
mac1_key = HASH(LABEL_MAC1 + bytes.fromhex(sys.argv[5]))
rng = random.Random(11)
socks = []
for _ in range(nports):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    s.setblocking(False)
    socks.append(s)
poll = select.epoll()
for s in socks:
    poll.register(s.fileno(), select.EPOLLIN)
by_fd = {s.fileno(): s for s in socks}
sent = sent_bytes = replies = reply_bytes = 0
sizes, kinds = {}, {}
def drain(timeout):
    global replies, reply_bytes
    for fd, _ in poll.poll(timeout):
        s = by_fd[fd]
        while True:
            try:
                data = s.recv(4096)
            except BlockingIOError:
                break
            replies += 1
            reply_bytes += len(data)
            sizes[len(data)] = sizes.get(len(data), 0) + 1
            k = data[0] if data else -1
            kinds[k] = kinds.get(k, 0) + 1
print("start", flush=True)
start = time.monotonic()
n = int(rate * seconds)
for i in range(n):
    due = start + i / rate
    while (left := due - time.monotonic()) > 0:
        drain(left)
    body = bytes([1, 0, 0, 0]) + rng.randbytes(116 - 4)
    datagram = body + MAC(mac1_key, body) + bytes(16)
    try:
        socks[i % nports].sendto(datagram, hub)
        sent += 1
        sent_bytes += len(datagram)
    except OSError:
        pass
elapsed = time.monotonic() - start
end = time.monotonic() + 1.0
while time.monotonic() < end:
    drain(0.1)
print(json.dumps({"sent": sent, "sent_bytes": sent_bytes, "seconds": round(elapsed, 2),
                  "replies": replies, "reply_bytes": reply_bytes,
                  "sizes": {str(k): v for k, v in sizes.items()},
                  "kinds": {str(k): v for k, v in kinds.items()}}), flush=True)
"""


IO_ERRORS = ("udp_recv_error", "udp_send_error", "tun_read_error", "tun_write_error")


def io_errors(hub) -> dict[str, int]:
    """The hub's I/O error counters (they sit beside its drop counters)."""
    drops = hub.drops()
    return {k: drops.get(k, 0) for k in IO_ERRORS}
