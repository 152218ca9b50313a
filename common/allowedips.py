"""Allowed IPs: the longest-prefix table prefix -> peer, for IPv4 and IPv6 (whitepaper section 2).

It is consulted twice per packet: on the way out, the destination of a packet read from the TUN
picks the peer to encrypt it for; on the way in, the source of a decrypted packet must map back
to the peer whose key decrypted it (the cryptokey routing filter).

Design, per family: a dict {prefix length: {network as int: peer}} and the prefix lengths
present, longest first, each with its mask. A lookup turns the 4 or 16 address bytes into one
int and tries each present length: a hub with 10,000 /32 clients and a few routed prefixes does
a handful of dict lookups, whatever the number of peers. Semantics follow WireGuard: host bits
of an inserted prefix are masked off, and inserting a prefix that exists moves it to the new
peer. Peers are any hashable objects other than None; they are compared by identity.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Hashable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_MIN_HEADER = 20
_V6_HEADER = 40

# struct is several times faster than int.from_bytes on a slice, and needs no slice.
_U32 = struct.Struct("!I").unpack
_U32_FROM = struct.Struct("!I").unpack_from
_U64X2 = struct.Struct("!QQ").unpack
_U64X2_FROM = struct.Struct("!QQ").unpack_from


class _Family:
    """The table of one address family."""

    __slots__ = ("bits", "by_length", "order")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, Any]] = {}
        # (mask, table) for each prefix length present, longest first: the lookup's loop.
        self.order: tuple[tuple[int, dict[int, Any]], ...] = ()

    def reorder(self) -> None:
        all_ones = (1 << self.bits) - 1
        self.order = tuple(
            ((all_ones << (self.bits - length)) & all_ones, self.by_length[length])
            for length in sorted(self.by_length, reverse=True)
        )

    def lookup(self, value: int) -> Any:
        for mask, table in self.order:
            peer = table.get(value & mask)
            if peer is not None:
                return peer
        return None


class AllowedIPs:
    """Longest-prefix match from IP address to peer."""

    __slots__ = ("_v4", "_v6", "_by_peer")

    def __init__(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._by_peer: dict[Hashable, set[Network]] = {}

    # -- changes (rare: configuration) --------------------------------------------------------

    def insert(self, network: Network | str, peer: Hashable) -> None:
        """Route `network` to `peer`. Host bits are dropped; an existing identical prefix moves."""
        if peer is None:
            raise ValueError("peer must not be None")
        net = _normalize(network)
        family = self._v4 if net.version == 4 else self._v6
        length = net.prefixlen
        table = family.by_length.get(length)
        if table is None:
            table = family.by_length[length] = {}
            family.reorder()
        key = int(net.network_address)
        old = table.get(key)
        if old is not None and old is not peer:
            self._forget(old, net)
        table[key] = peer
        self._by_peer.setdefault(peer, set()).add(net)

    def remove(self, network: Network | str) -> Any:
        """Remove exactly this prefix (host bits dropped). Returns its peer, or None if absent."""
        net = _normalize(network)
        family = self._v4 if net.version == 4 else self._v6
        table = family.by_length.get(net.prefixlen)
        if table is None:
            return None
        peer = table.pop(int(net.network_address), None)
        if peer is None:
            return None
        if not table:
            del family.by_length[net.prefixlen]
            family.reorder()
        self._forget(peer, net)
        return peer

    def remove_by_peer(self, peer: Hashable) -> None:
        """Remove every prefix of `peer` (the peer was removed or its allowed IPs replaced)."""
        for net in list(self._by_peer.get(peer, ())):
            self.remove(net)

    def clear(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._by_peer = {}

    def _forget(self, peer: Hashable, net: Network) -> None:
        nets = self._by_peer.get(peer)
        if nets is not None:
            nets.discard(net)
            if not nets:
                del self._by_peer[peer]

    # -- questions -----------------------------------------------------------------------------

    def entries_for(self, peer: Hashable) -> list[Network]:
        """The prefixes routed to `peer`, IPv4 first, then by address and length."""
        return sorted(self._by_peer.get(peer, ()), key=_sort_key)

    def __len__(self) -> int:
        return sum(len(nets) for nets in self._by_peer.values())

    def __repr__(self) -> str:
        return f"AllowedIPs({len(self)} prefixes, {len(self._by_peer)} peers)"

    # -- lookups (hot path: every packet) ------------------------------------------------------

    # Each loop below is _Family.lookup written out: a method call costs as much as a dict probe.

    def lookup_v4(self, addr: bytes | bytearray | memoryview) -> Any:
        """Peer for a 4-byte IPv4 address in network order, or None."""
        value = _U32(addr)[0]
        for mask, table in self._v4.order:
            peer = table.get(value & mask)
            if peer is not None:
                return peer
        return None

    def lookup_v6(self, addr: bytes | bytearray | memoryview) -> Any:
        """Peer for a 16-byte IPv6 address in network order, or None."""
        hi, lo = _U64X2(addr)
        value = hi << 64 | lo
        for mask, table in self._v6.order:
            peer = table.get(value & mask)
            if peer is not None:
                return peer
        return None

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> Any:
        """Peer for an address object (or its text form), or None."""
        if isinstance(address, str):
            address = ipaddress.ip_address(address)
        family = self._v4 if address.version == 4 else self._v6
        return family.lookup(int(address))

    def lookup_packet_dst(self, packet: bytes | bytearray | memoryview) -> Any:
        """Peer for the destination of a raw IP packet; None if no route or not an IP packet."""
        n = len(packet)
        if n < _V4_MIN_HEADER:
            return None
        version = packet[0] >> 4
        if version == 4:
            value = _U32_FROM(packet, 16)[0]
            order = self._v4.order
        elif version == 6 and n >= _V6_HEADER:
            hi, lo = _U64X2_FROM(packet, 24)
            value = hi << 64 | lo
            order = self._v6.order
        else:
            return None
        for mask, table in order:
            peer = table.get(value & mask)
            if peer is not None:
                return peer
        return None

    def contains_src(self, packet: bytes | bytearray | memoryview, peer: Hashable) -> bool:
        """Is the source of this (decrypted) packet routed to `peer`? False if not an IP packet."""
        n = len(packet)
        if n < _V4_MIN_HEADER:
            return False
        version = packet[0] >> 4
        if version == 4:
            value = _U32_FROM(packet, 12)[0]
            order = self._v4.order
        elif version == 6 and n >= _V6_HEADER:
            hi, lo = _U64X2_FROM(packet, 8)
            value = hi << 64 | lo
            order = self._v6.order
        else:
            return False
        for mask, table in order:
            found = table.get(value & mask)
            if found is not None:
                return found is peer
        return False


def _normalize(network: Network | str) -> Network:
    # Network objects always have their host bits clear (strict=False masks, strict=True refuses).
    if isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return network
    return ipaddress.ip_network(network, strict=False)


def _sort_key(net: Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen
