"""Devices in memory: a hand-stepped clock, a network that can lose, copy and delay, IP builders.

In the manner of wireguard-go's bindtest/tuntest and trio's DTLS test: nothing sleeps, time is a
number the test moves, and a bad network is a `random.Random(seed)`, so a failure replays exactly.

    net = Net()
    a = net.node("a", "192.0.2.1", "10.0.0.1")
    b = net.node("b", "192.0.2.2", "10.0.0.2")
    net.link(a, b)                        # each a peer of the other, allowed IPs the inner /32
    a.device.send(ipv4("10.0.0.1", "10.0.0.2", b"hi"), net.now)
    net.deliver()                         # move datagrams until nothing more is due
    assert b.received == [ipv4(...)]

Every datagram put on the wire is logged in `net.sent` as a `Sent` record, so tests count
initiations, keepalives or bytes exactly.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import struct
from dataclasses import dataclass

from pytun.common.crypto import DH_pubkey, clamp
from pytun.common.device import Device

WALL0 = 1_700_000_000.0  # the wall clock at now == 0 (TAI64N timestamps come from it)
PORT = 51820


class Clock:
    """Monotonic seconds, moved by hand."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def seeded_rng(seed) -> callable:
    """An `rng(n) -> bytes` for a Device that repeats for the same seed."""
    return random.Random(seed).randbytes


def static_key(seed) -> tuple[bytes, bytes]:
    """A (private, public) X25519 key pair derived from `seed`."""
    private = clamp(random.Random(f"static-{seed}").randbytes(32))
    return private, DH_pubkey(private)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, as IPv4, ICMP and UDP headers carry it."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    """An IPv4 packet (20-byte header, correct total length and checksum) around `payload`."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv6(src: str, dst: str, payload: bytes = b"", next_header: int = 17) -> bytes:
    """An IPv6 packet (40-byte header, correct payload length) around `payload`."""
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


@dataclass
class Sent:
    """One datagram a device put on the wire."""

    time: float
    sender: str
    datagram: bytes
    dst: object  # the endpoint it was addressed to

    @property
    def type(self) -> int:
        return self.datagram[0]

    @property
    def is_keepalive(self) -> bool:
        return self.datagram[0] == 4 and len(self.datagram) == 32


class Node:
    """A device with its own UDP endpoint (which may move) and inner address."""

    def __init__(self, name: str, device: Device, endpoint, inner: str, wall: list):
        self.name = name
        self.device = device
        self.endpoint = endpoint
        self.inner = inner
        self.received: list[bytes] = []  # inner packets written to its TUN, in order
        self._wall = wall  # [offset]: the wall clock is WALL0 + now + offset

    @property
    def wall_offset(self) -> float:
        return self._wall[0]

    @wall_offset.setter
    def wall_offset(self, value: float) -> None:
        self._wall[0] = value

    @property
    def public_key(self) -> bytes:
        return self.device.public_key

    def peer(self, other: "Node"):
        return self.device.peers[other.public_key]

    def packet_to(self, other: "Node", payload: bytes = b"") -> bytes:
        return ipv4(self.inner, other.inner, payload)

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.endpoint})"


class Net:
    """Nodes and the datagrams between them.

    With `seed` the network is bad: each datagram is lost with probability `loss`, sent twice
    with probability `dup`, and held back by up to `max_delay` seconds with probability
    `reorder` (so later datagrams overtake it). Without a seed it is perfect and instant.
    `drop_if(sent) -> bool` drops chosen datagrams on top of that (a cut cable, a firewall).
    """

    def __init__(self, clock: Clock | None = None, *, seed=None, loss: float = 0.0,
                 dup: float = 0.0, reorder: float = 0.0, max_delay: float = 0.05):
        self.clock = clock or Clock()
        self.nodes: list[Node] = []
        self.sent: list[Sent] = []
        self.lost = 0  # dropped by the bad network, by drop_if, or to an endpoint nobody has
        self.drop_if = None
        self._chance = random.Random(seed) if seed is not None else None
        self.loss, self.dup, self.reorder, self.max_delay = loss, dup, reorder, max_delay
        self._in_flight: list = []  # heap of (due, seq, sender node, Sent)
        self._seq = 0

    @property
    def now(self) -> float:
        return self.clock.now

    def node(self, name: str, address: str, inner: str, *, port: int = PORT, key=None,
             **device_kwargs) -> Node:
        private, _ = static_key(name if key is None else key)
        wall = [0.0]
        clock = self.clock
        device_kwargs.setdefault("rng", seeded_rng(f"rng-{name}"))
        device_kwargs.setdefault("wallclock", lambda: WALL0 + clock.now + wall[0])
        node = Node(name, Device(private, **device_kwargs), (address, port), inner, wall)
        self.nodes.append(node)
        return node

    def link(self, a: Node, b: Node, *, psk: bytes | None = None, a_knows_b: bool = True,
             b_knows_a: bool = True, a_allows=None, b_allows=None, keepalive: int = 0):
        """Make a and b peers. `a_allows` are the prefixes a routes to b (default b's /32)."""
        pa = a.device.add_peer(b.public_key, preshared_key=psk,
                               allowed_ips=a_allows or [f"{b.inner}/32"],
                               endpoint=b.endpoint if a_knows_b else None,
                               persistent_keepalive=keepalive, name=b.name)
        pb = b.device.add_peer(a.public_key, preshared_key=psk,
                               allowed_ips=b_allows or [f"{a.inner}/32"],
                               endpoint=a.endpoint if b_knows_a else None, name=a.name)
        return pa, pb

    def by_endpoint(self, endpoint) -> Node | None:
        for node in self.nodes:
            if node.endpoint == endpoint:
                return node
        return None

    def collect(self) -> list[Sent]:
        """Take every device's net_out onto the wire (the bad network decides their fate)."""
        new = []
        for node in self.nodes:
            out, node.device.net_out = node.device.net_out, []
            for datagram, dst in out:
                sent = Sent(self.now, node.name, bytes(datagram), dst)
                self.sent.append(sent)
                new.append(sent)
                self._launch(node, sent)
            node.received.extend(node.device.tun_out)
            node.device.tun_out.clear()
        return new

    def _launch(self, node: Node, sent: Sent) -> None:
        if self.drop_if is not None and self.drop_if(sent):
            self.lost += 1
            return
        copies = 1
        chance = self._chance
        if chance is not None:
            if chance.random() < self.loss:
                self.lost += 1
                return
            if chance.random() < self.dup:
                copies = 2
        for _ in range(copies):
            delay = 0.0
            if chance is not None and chance.random() < self.reorder:
                delay = chance.uniform(0.0, self.max_delay)
            self._seq += 1
            # The source address is the sender's endpoint when it sends.
            heapq.heappush(self._in_flight, (self.now + delay, self._seq, node.endpoint, sent))

    def deliver(self) -> None:
        """Move datagrams until nothing more is due now (answers to answers included)."""
        self.collect()
        while self._in_flight and self._in_flight[0][0] <= self.now:
            _, _, src, sent = heapq.heappop(self._in_flight)
            target = self.by_endpoint(sent.dst)
            if target is None:
                self.lost += 1
            else:
                target.device.receive(sent.datagram, src, self.now)
            self.collect()

    def inject(self, target: Node, datagram: bytes, src) -> None:
        """Hand `datagram` to `target` as if it came from `src`, then deliver what follows."""
        target.device.receive(datagram, src, self.now)
        self.deliver()

    def tick(self) -> None:
        for node in self.nodes:
            node.device.tick(self.now)
        self.deliver()

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Advance the clock by `seconds` in steps, ticking every device and delivering."""
        start = self.now
        end = round(start + seconds, 9)
        k = 0
        while self.now < end:
            k += 1
            # Computed, not summed, and rounded: a timer due at 10.0 fires at 10.0, not 10.01.
            self.clock.now = min(end, round(start + k * step, 9))
            self.tick()

    def run_until(self, t: float, step: float = 0.05) -> None:
        self.run(t - self.now, step)

    def sent_by(self, name: str, mtype: int | None = None,
                since: float | None = None) -> list[Sent]:
        """What `name` sent, optionally only of one message type and from time `since` on."""
        return [s for s in self.sent
                if s.sender == name and (mtype is None or s.type == mtype)
                and (since is None or s.time >= since)]


def two(**link):
    """Two nodes a (192.0.2.1, inner 10.0.0.1) and b (192.0.2.2, inner 10.0.0.2), linked."""
    net = Net()
    a = net.node("a", "192.0.2.1", "10.0.0.1")
    b = net.node("b", "192.0.2.2", "10.0.0.2")
    net.link(a, b, **link)
    return net, a, b


def up(net, a, b, payload=b"first"):
    """a sends one packet to b: handshake at net.now, then the packet, then quiet."""
    a.device.send(a.packet_to(b, payload), net.now)
    net.deliver()
    assert b.received[-1] == a.packet_to(b, payload)
