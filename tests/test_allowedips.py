"""Allowed IPs: unit cases, then random tables against a deliberately slow reference.

The reference is wireguard-go's idea in allowedips_rand_test.go (SlowRouter): keep a flat list of
(prefix, peer) and answer a lookup by scanning all of it for the longest prefix that contains the
address. Here `ipaddress` does the containment test, so the two share no code.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.common.allowedips import AllowedIPs

net = ipaddress.ip_network
addr = ipaddress.ip_address


class Peer:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Peer({self.name})"


A, B, C, D = Peer("a"), Peer("b"), Peer("c"), Peer("d")


def ipv4_packet(src: str, dst: str, payload: bytes = b"\x08\x00\x00\x00\x00\x00\x00\x00") -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 1, 0,
        addr(src).packed, addr(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"\x80\x00\x00\x00") -> bytes:
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), 58, 64, addr(src).packed, addr(dst).packed
    )
    return header + payload


# -- unit cases -------------------------------------------------------------------------------


def test_longest_prefix_wins():
    t = AllowedIPs()
    t.insert(net("10.0.0.0/8"), A)
    t.insert(net("10.1.0.0/16"), B)
    t.insert(net("10.1.2.3/32"), C)
    assert t.lookup(addr("10.1.2.3")) is C
    assert t.lookup(addr("10.1.2.4")) is B
    assert t.lookup(addr("10.2.0.1")) is A
    assert t.lookup(addr("11.0.0.1")) is None
    assert t.lookup_v4(bytes([10, 1, 2, 3])) is C
    assert t.lookup("10.1.9.9") is B


def test_insertion_order_does_not_matter():
    t = AllowedIPs()
    t.insert(net("10.1.2.3/32"), C)
    t.insert(net("10.1.0.0/16"), B)
    t.insert(net("10.0.0.0/8"), A)
    assert [t.lookup(addr(a)) for a in ("10.1.2.3", "10.1.2.4", "10.2.0.1")] == [C, B, A]


def test_default_route():
    t = AllowedIPs()
    t.insert(net("0.0.0.0/0"), A)
    t.insert(net("::/0"), B)
    t.insert(net("192.168.1.0/24"), C)
    assert t.lookup(addr("8.8.8.8")) is A
    assert t.lookup(addr("255.255.255.255")) is A
    assert t.lookup(addr("0.0.0.0")) is A
    assert t.lookup(addr("192.168.1.200")) is C
    assert t.lookup(addr("2001:db8::1")) is B
    assert t.lookup(addr("::")) is B


def test_identical_prefix_moves_to_the_new_peer():
    t = AllowedIPs()
    t.insert(net("10.0.0.0/24"), A)
    t.insert(net("10.0.1.0/24"), A)
    t.insert(net("10.0.0.0/24"), B)
    assert t.lookup(addr("10.0.0.7")) is B
    assert t.entries_for(A) == [net("10.0.1.0/24")]
    assert t.entries_for(B) == [net("10.0.0.0/24")]
    assert len(t) == 2
    t.insert(net("10.0.0.0/24"), B)  # again, same owner: no change
    assert len(t) == 2
    t.remove_by_peer(A)
    assert t.lookup(addr("10.0.0.7")) is B  # A no longer owns it, so removing A leaves it


def test_host_bits_are_masked():
    t = AllowedIPs()
    t.insert(net("10.0.0.5/24", strict=False), A)
    t.insert("fd00::1234/64", B)
    assert t.entries_for(A) == [net("10.0.0.0/24")]
    assert t.entries_for(B) == [net("fd00::/64")]
    assert t.lookup(addr("10.0.0.200")) is A
    assert t.lookup(addr("fd00::ffff")) is B
    assert t.remove("10.0.0.77/24") is A
    assert t.lookup(addr("10.0.0.200")) is None


def test_remove_by_peer():
    t = AllowedIPs()
    t.insert(net("10.0.0.0/8"), A)
    t.insert(net("10.1.0.0/16"), B)
    t.insert(net("fd00::/8"), B)
    t.insert(net("10.1.1.0/24"), C)
    t.remove_by_peer(B)
    assert t.entries_for(B) == []
    assert t.lookup(addr("10.1.0.1")) is A
    assert t.lookup(addr("10.1.1.1")) is C
    assert t.lookup(addr("fd00::1")) is None
    assert len(t) == 2
    t.remove_by_peer(B)  # unknown peer: nothing happens
    t.remove_by_peer(D)
    assert len(t) == 2


def test_remove_exact_prefix_only():
    t = AllowedIPs()
    t.insert(net("10.0.0.0/8"), A)
    t.insert(net("10.1.0.0/16"), B)
    assert t.remove(net("10.1.0.0/24")) is None  # not present: a different length
    assert t.remove(net("10.1.0.0/16")) is B
    assert t.remove(net("10.1.0.0/16")) is None
    assert t.lookup(addr("10.1.0.1")) is A
    assert t.entries_for(B) == []
    assert len(t) == 1


def test_v4_and_v6_are_independent():
    t = AllowedIPs()
    t.insert(net("0.0.0.0/0"), A)
    assert t.lookup(addr("::")) is None
    assert t.lookup(addr("::ffff:10.0.0.1")) is None
    t.insert(net("::/0"), B)
    t.insert(net("::/96"), C)  # numerically overlaps every IPv4 address
    assert t.lookup(addr("0.0.0.1")) is A
    assert t.lookup(addr("::1")) is C
    t.remove_by_peer(A)
    assert t.lookup(addr("0.0.0.1")) is None
    assert t.lookup_v6(bytes(15) + b"\x01") is C


def test_entries_for_and_len():
    t = AllowedIPs()
    assert len(t) == 0 and t.entries_for(A) == []
    for n in ("fd00::2/128", "10.0.0.2/32", "10.0.0.0/24", "fd00::/64"):
        t.insert(net(n), A)
    t.insert(net("10.9.0.0/16"), B)
    assert t.entries_for(A) == [
        net("10.0.0.0/24"), net("10.0.0.2/32"), net("fd00::/64"), net("fd00::2/128")
    ]
    assert len(t) == 5
    t.clear()
    assert len(t) == 0 and t.lookup(addr("10.0.0.2")) is None


def test_none_is_not_a_peer():
    with pytest.raises(ValueError):
        AllowedIPs().insert(net("10.0.0.0/8"), None)


def test_packet_lookups_v4():
    t = AllowedIPs()
    t.insert(net("10.0.0.2/32"), A)
    t.insert(net("10.0.0.0/24"), B)
    p = ipv4_packet("10.0.0.2", "10.0.0.9")
    assert t.lookup_packet_dst(p) is B
    assert t.contains_src(p, A)
    assert not t.contains_src(p, B)  # B covers 10.0.0.2 only less specifically
    for view in (bytearray(p), memoryview(p), memoryview(bytearray(p))):
        assert t.lookup_packet_dst(view) is B
        assert t.contains_src(view, A)
    # The addresses sit at fixed offsets whatever the header length (options follow them).
    with_options = bytes([0x46]) + p[1:20] + bytes(4) + p[20:]
    assert t.lookup_packet_dst(with_options) is B


def test_packet_lookups_v6():
    t = AllowedIPs()
    t.insert(net("fd00::2/128"), A)
    t.insert(net("fd00::/64"), B)
    p = ipv6_packet("fd00::2", "fd00::9")
    assert t.lookup_packet_dst(p) is B
    assert t.contains_src(p, A)
    assert not t.contains_src(p, B)
    assert t.lookup_packet_dst(memoryview(p)) is B
    unknown = ipv6_packet("fd01::2", "fd01::9")
    assert t.lookup_packet_dst(unknown) is None
    assert not t.contains_src(unknown, A)


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45",
        ipv4_packet("10.0.0.2", "10.0.0.9")[:19],
        ipv6_packet("fd00::2", "fd00::9")[:39],
        ipv6_packet("fd00::2", "fd00::9")[:20],
        bytes([0x55]) + bytes(60),  # version 5
        bytes([0x05]) + bytes(60),  # version 0
        bytes([0xF6]) + bytes(60),
        bytes(60),
    ],
)
def test_malformed_packets_match_nothing(packet):
    t = AllowedIPs()
    t.insert(net("0.0.0.0/0"), A)
    t.insert(net("::/0"), A)
    assert t.lookup_packet_dst(packet) is None
    assert t.contains_src(packet, A) is False
    assert t.lookup_packet_dst(memoryview(packet)) is None


def test_large_table():
    t = AllowedIPs()
    peers = [Peer(str(i)) for i in range(10_000)]
    for i, p in enumerate(peers):
        t.insert(net(f"10.{i >> 8 & 255}.{i & 255}.1/32"), p)
        t.insert(net(f"fd00::{i:x}/128"), p)
    t.insert(net("0.0.0.0/0"), A)
    assert len(t) == 20_001
    for i in (0, 1, 4242, 9999):
        assert t.lookup(addr(f"10.{i >> 8 & 255}.{i & 255}.1")) is peers[i]
        assert t.lookup(addr(f"fd00::{i:x}")) is peers[i]
        assert t.entries_for(peers[i]) == [
            net(f"10.{i >> 8 & 255}.{i & 255}.1/32"), net(f"fd00::{i:x}/128")
        ]
    assert t.lookup(addr("10.0.0.2")) is A
    t.remove_by_peer(peers[4242])
    assert t.lookup(addr("10.16.146.1")) is A
    assert t.lookup(addr("fd00::1092")) is None


# -- random tables against the slow reference ---------------------------------------------------


class SlowRouter:
    """A flat list of (network, peer); lookups scan it all."""

    def __init__(self) -> None:
        self.routes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Peer]] = []

    def insert(self, network, peer) -> None:
        self.remove(network)
        self.routes.append((network, peer))

    def remove(self, network):
        for i, (n, p) in enumerate(self.routes):
            if n == network:
                del self.routes[i]
                return p
        return None

    def remove_by_peer(self, peer) -> None:
        self.routes = [(n, p) for n, p in self.routes if p is not peer]

    def lookup(self, address):
        best = None
        for n, p in self.routes:
            if n.version == address.version and address in n:
                if best is None or n.prefixlen > best[0].prefixlen:
                    best = (n, p)
        return None if best is None else best[1]

    def entries_for(self, peer):
        return sorted(
            (n for n, p in self.routes if p is peer),
            key=lambda n: (n.version, int(n.network_address), n.prefixlen),
        )


PEERS = [Peer(str(i)) for i in range(6)]


@st.composite
def prefixes(draw, known: list):
    """A random prefix; often a longer or shorter prefix of one already used, so they nest."""
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    same_family = [n for n in known if n.version == version]
    if same_family and draw(st.booleans()):
        base = draw(st.sampled_from(same_family))
        value = int(base.network_address) | draw(st.integers(0, (1 << bits) - 1)) >> base.prefixlen
        length = draw(st.integers(0, bits))
    else:
        value = draw(st.integers(0, (1 << bits) - 1))
        length = draw(st.sampled_from([0, 1, 7, 8, 16, 23, 24, 31, 32, 48, 64, 96, 127, 128]))
        length = min(length, bits)
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return cls((value, length), strict=False)


@st.composite
def addresses(draw, known: list):
    """An address inside a known prefix, at its edges, or anywhere."""
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    same_family = [n for n in known if n.version == version]
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    if same_family and draw(st.integers(0, 3)):
        n = draw(st.sampled_from(same_family))
        last = n.num_addresses - 1
        host = draw(st.one_of(st.just(0), st.just(last), st.integers(0, last)))
        value = int(n.network_address) + host
        value += draw(st.sampled_from([0, 0, 0, -1, 1]))  # sometimes just outside
        return cls(value % (1 << bits))
    return cls(draw(st.integers(0, (1 << bits) - 1)))


def _packet(src, dst) -> bytes:
    make = ipv4_packet if src.version == 4 else ipv6_packet
    return make(str(src), str(dst))


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_matches_slow_router(data):
    fast, slow = AllowedIPs(), SlowRouter()
    known: list = []
    for _ in range(data.draw(st.integers(1, 40), label="operations")):
        op = data.draw(st.sampled_from(["insert"] * 6 + ["remove", "remove_by_peer", "lookups"]))
        if op == "insert":
            n = data.draw(prefixes(known))
            peer = data.draw(st.sampled_from(PEERS))
            known.append(n)
            fast.insert(n, peer)
            slow.insert(n, peer)
        elif op == "remove" and known:
            n = data.draw(st.sampled_from(known))
            assert fast.remove(n) is slow.remove(n)
        elif op == "remove_by_peer":
            peer = data.draw(st.sampled_from(PEERS))
            fast.remove_by_peer(peer)
            slow.remove_by_peer(peer)
        else:
            for _ in range(6):
                a = data.draw(addresses(known))
                want = slow.lookup(a)
                assert fast.lookup(a) is want, a
                lookup_family = fast.lookup_v4 if a.version == 4 else fast.lookup_v6
                assert lookup_family(a.packed) is want, a
                other = type(a)(int(a) ^ 1)
                packet = _packet(a, other)  # src a, dst other
                assert fast.lookup_packet_dst(_packet(other, a)) is want, a
                for peer in PEERS:
                    assert fast.contains_src(packet, peer) is (want is peer), (a, peer)
    assert len(fast) == len(slow.routes)
    for peer in PEERS:
        assert fast.entries_for(peer) == slow.entries_for(peer)
    for a in (data.draw(addresses(known)) for _ in range(20)):
        assert fast.lookup(a) is slow.lookup(a), a
