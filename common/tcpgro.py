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

VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
PLAIN = bytes(VNET_HDR_LEN)  # no GSO, checksum complete
MAX_LENGTH = 65535
MAX_SEGMENTS = 64
SMALL = 128  # a packet this short is written alone without a look at its headers

_VNET = struct.Struct("<BBHHHH")
_TCP_ACK, _TCP_PSH = 0x10, 0x08


def _mergeable(p) -> int:
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
    return n - 20 - doff


def _same_flow(a, b, doff: int) -> bool:
    # TOS, TTL, protocol, addresses, ports, ACK number, data offset, window, options.
    return (a[1] == b[1] and a[8] == b[8] and a[12:24] == b[12:24] and a[28:33] == b[28:33]
            and a[34:36] == b[34:36] and a[40:20 + doff] == b[40:20 + doff])


def _checksum(data) -> int:
    """Folded 16-bit one's complement sum (not complemented)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _merged_header(first, last, doff: int, total: int) -> bytes:
    hdr = bytearray(first[:20 + doff])
    hdr[2:4] = total.to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = (~_checksum(hdr[:20]) & 0xFFFF).to_bytes(2, "big")
    hdr[33] |= last[33] & _TCP_PSH
    # Checksum partial: the pseudo-header sum, which the kernel completes over the segment.
    pseudo = _checksum(bytes(hdr[12:20]) + struct.pack("!HH", 6, total - 20))
    hdr[36:38] = pseudo.to_bytes(2, "big")
    return bytes(hdr)


def plan(packets: list) -> list:
    """What to write for `packets`, in order: a list of iovecs (lists of buffers), each one
    TUN write: [PLAIN, packet] alone, or [vnet GSO header, IP+TCP header, payloads...]."""
    out = []
    i, n = 0, len(packets)
    while i < n:
        p = packets[i]
        if len(p) <= SMALL:  # ACKs and the like: nothing worth merging
            out.append([PLAIN, p])
            i += 1
            continue
        size = _mergeable(p)
        j = i + 1
        if size > 0:
            doff = (p[32] >> 4) * 4
            seq = int.from_bytes(p[24:28], "big") + size
            total = len(p)
            while j < n and j - i < MAX_SEGMENTS:
                q = packets[j]
                qsize = _mergeable(q)
                if (qsize <= 0 or qsize > size or total + qsize > MAX_LENGTH
                        or int.from_bytes(q[24:28], "big") != seq & 0xFFFFFFFF
                        or not _same_flow(p, q, doff) or p[33] & _TCP_PSH):
                    break
                seq += qsize
                total += qsize
                j += 1
                if qsize < size or q[33] & _TCP_PSH:
                    break
        if j - i == 1:
            out.append([PLAIN, p])
            i = j
            continue
        hlen = 20 + doff
        vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hlen, size,
                          20, 16)
        iov = [vnet, _merged_header(p, packets[j - 1], doff, total)]
        iov.extend(memoryview(q)[hlen:] for q in packets[i:j])
        out.append(iov)
        i = j
    return out
