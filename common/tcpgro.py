"""Coalesce consecutive IPv4 TCP segments into one GSO packet for a TUN device with IFF_VNET_HDR.

A batch of packets decrypted from one laptop usually holds a run of segments of one TCP flow.
Written one by one, each costs a system call and a trip through the kernel's TCP receive path
(and often an ACK back). Written as one packet with a virtio_net_hdr that says "TCPv4 GSO,
segment size MSS, checksum partial", the kernel takes the run as a single large segment, as GRO
would have made it. The rules are those of the kernel's own tcp_gro_receive: same addresses,
ports, ACK, window, TTL, TOS and TCP options, DF set, consecutive sequence numbers, equal
segment sizes (the last may be shorter), only ACK or PSH flags.

Pure functions: `plan(packets)` says what to write; no I/O here.
"""

from __future__ import annotations

import struct

Packet = bytes | bytearray | memoryview

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
PLAIN = bytes(VNET_HDR_LEN)  # no GSO, checksum complete
MAX_LENGTH = 65535
MAX_SEGMENTS = 64
SMALL = 128  # a packet this short is written alone without a look at its headers

_VNET = struct.Struct("<BBHHHH")
_TCP_ACK, _TCP_PSH = 0x10, 0x08
_ACK_FLAGS = frozenset((_TCP_ACK, _TCP_ACK | _TCP_PSH))


def _mergeable(p: Packet) -> int:
    """TCP payload length if `p` is an IPv4 TCP segment that may be coalesced, else -1."""
    n = len(p)
    if n < 40 or p[0] != 0x45 or p[9] != 6:
        return -1
    if (p[6] & 0xBF) or p[7] or not (p[6] & 0x40):  # fragments or no DF: leave alone
        return -1
    if (p[2] << 8 | p[3]) != n:
        return -1
    doff = (p[32] >> 4) * 4
    if doff < 20 or 20 + doff > n or p[33] & ~(_TCP_ACK | _TCP_PSH) or not p[33] & _TCP_ACK:
        return -1
    return int(n - 20 - doff)


_IP_WORDS = struct.Struct("!10H")  # an IPv4 header without options, as 16-bit words
_ADDR_WORDS = struct.Struct("!4H")  # source and destination addresses


def _fold(total: int) -> int:
    """Folded 16-bit one's complement sum (not complemented)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _merged_header(first: Packet, last: Packet, doff: int, total: int) -> bytes:
    hdr = bytearray(first[:20 + doff])
    hdr[2:4] = total.to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = (~_fold(sum(_IP_WORDS.unpack_from(hdr))) & 0xFFFF).to_bytes(2, "big")
    hdr[33] |= last[33] & _TCP_PSH
    # Checksum partial: the pseudo-header sum, which the kernel completes over the segment.
    pseudo = _fold(sum(_ADDR_WORDS.unpack_from(hdr, 12)) + 6 + total - 20)
    hdr[36:38] = pseudo.to_bytes(2, "big")
    return bytes(hdr)


def plan(packets: list[Packet]) -> list[list[Packet]]:
    """What to write for `packets`, in order: a list of iovecs (lists of buffers), each one
    TUN write: [PLAIN, packet] alone, or [vnet GSO header, IP+TCP header, payloads...]."""
    out: list[list[Packet]] = []
    append = out.append
    i, n = 0, len(packets)
    while i < n:
        p = packets[i]
        j = i + 1
        size = _mergeable(p) if len(p) > SMALL and j < n else -1  # ACKs: nothing to merge
        if size <= 0 or p[33] & _TCP_PSH:
            append([PLAIN, p])
            i = j
            continue
        # The next segments join while they match the first, compared as byte slices: version,
        # TOS; DF and no fragment; TTL and protocol; addresses and ports; ACK and data offset;
        # window; options. Their lengths and flags are checked apart.
        hlen = 20 + (p[32] >> 4) * 4
        head, frag_ttl_proto, flow = p[0:2], p[6:10], p[12:24]
        ack_doff, window, options = p[28:33], p[34:36], p[40:hlen]
        seq = int.from_bytes(p[24:28], "big") + size
        limit = hlen + size  # no segment may be longer than the first
        total = len(p)
        while j < n and j - i < MAX_SEGMENTS:
            q = packets[j]
            qn = len(q)
            if (not hlen < qn <= limit or total + qn - hlen > MAX_LENGTH
                    or (q[2] << 8 | q[3]) != qn or q[33] not in _ACK_FLAGS
                    or q[24:28] != (seq & 0xFFFFFFFF).to_bytes(4, "big")
                    or q[12:24] != flow or q[28:33] != ack_doff or q[0:2] != head
                    or q[6:10] != frag_ttl_proto or q[34:36] != window
                    or q[40:hlen] != options):
                break
            qsize = qn - hlen
            seq += qsize
            total += qsize
            j += 1
            if qn < limit or q[33] & _TCP_PSH:
                break
        if j - i == 1:
            append([PLAIN, p])
            i = j
            continue
        vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hlen, size,
                          20, 16)
        iov: list[Packet] = [vnet, _merged_header(p, packets[j - 1], hlen - 20, total)]
        iov.extend([q[hlen:] for q in packets[i:j]])  # a copy costs less than a view here
        append(iov)
        i = j
    return out
