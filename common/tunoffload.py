"""Cut the TUN device's large packets back into tunnel-sized ones (TUN offload on read).

With offload on (linux.set_tun_offload: TUNSETOFFLOAD with checksum, TSO and, on Linux 6.2+,
USO), the kernel's TCP and UDP stacks hand the TUN device packets of up to 64 KB and leave the
checksum to "the device". Every read then starts with a virtio_net_hdr:

    flags        NEEDS_CSUM: the checksum field at csum_start + csum_offset holds only the
                 pseudo-header sum; the device sums from csum_start to the end and stores it
    gso_type     NONE, TCPV4, TCPV6 or UDP_L4 (USO), maybe with the ECN bit
    hdr_len      not to be trusted: on the forwarding path it can be the whole first packet
                 (so the IP and TCP/UDP header length is worked out from csum_start)
    gso_size     the payload of each segment (the MSS, or the UDP segment size)

`split` does what the NIC would: one IP packet per gso_size of payload, each with its own IPv4
total length, header checksum and id (incremented), or IPv6 payload length; TCP sequence numbers
advanced, FIN and PSH on the last segment only, CWR on the first only; UDP length; and the full
TCP/UDP checksum. The segments are built in place in the read buffer: segment i's headers are
written over the tail of segment i-1's payload, which has already been handed over (the Device
seals or copies what it is given before `send` returns), so no payload is copied.

Checksums: the one's complement sum of 16-bit words equals the buffer read as one big integer
modulo 0xFFFF (2**16 = 1 mod 0xFFFF), and `int.from_bytes` is the cheapest way to turn bytes into
numbers in pure Python. The `%` of that 11,000-bit integer costs more than reading it (1.8 us
for 1,400 bytes against 1.0 us: a hardware division per 30-bit digit), so `_fold` first adds
its upper half to its lower half a few times (2**16k = 1 mod 0xFFFF too; shifts and adds are
cheap): about 1.8 us per 1,400 bytes in all, against 2.7 us for one `%`, 8-9 us for struct or
a memoryview cast to 16-bit words and 45 us for array('H'). The IPv4 header checksum is
worked out once per packet and adjusted per segment for its length and id.
0xFFFF - (sum % 0xFFFF) is never 0, which UDP needs (0 means "no checksum") and TCP and IPv4
accept (0xFFFF and 0 are both one's complement zero).

Pure: no I/O. A malformed header raises BadOffload before anything was handed over.
"""

from __future__ import annotations

import struct
from typing import Callable

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5
GSO_ECN = 0x80

_VNET = struct.Struct("<BBHHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
_NOT_LAST = 0xFF & ~(_TCP_FIN | _TCP_PSH)
_NOT_FIRST = 0xFF & ~_TCP_CWR

Send = Callable[[memoryview, float], None]


class BadOffload(ValueError):
    """A virtio_net_hdr (or the packet behind it) that cannot be segmented; `reason` names it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_SCHEDULES: dict[int, list[tuple[int, int]]] = {}


def _schedule(nbits: int) -> list[tuple[int, int]]:
    """(shift, mask) steps that add the upper half of an `nbits`-bit number to its lower half
    (at a multiple of 16 bits) until about 128 bits are left."""
    steps = _SCHEDULES.get(nbits)
    if steps is None:
        steps = []
        n = nbits
        while n > 128:
            half = (n >> 5) << 4
            steps.append((half, (1 << half) - 1))
            n = (n - half + 16) & ~15
        if len(_SCHEDULES) >= 256:  # bounded: segment lengths repeat, odd ones do not
            _SCHEDULES.clear()
        _SCHEDULES[nbits] = steps
    return steps


def _fold(data: bytes | bytearray | memoryview) -> int:
    """A number congruent to the sum of `data`'s 16-bit words (big-endian, an odd length padded
    with a zero byte) modulo 0xFFFF, of about 128 bits."""
    n = len(data)
    total = int.from_bytes(data, "big")
    if n & 1:
        total <<= 8
        n += 1
    for half, mask in _schedule(n << 3):
        total = (total >> half) + (total & mask)
    return total


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of `data` plus `initial` (a sum of 16-bit words), as
    stored in a header: never 0."""
    return 0xFFFF - (_fold(data) + initial) % 0xFFFF


def split(buf: bytearray, start: int, end: int, send: Send, now: float) -> int:
    """Hand the packet read into buf[start:end] (virtio_net_hdr first) to `send(packet, now)`
    as ordinary IP packets with complete checksums; returns how many. BadOffload when the header
    does not describe the packet; nothing was sent then."""
    n = end - start - VNET_HDR_LEN
    if n < 20:
        raise BadOffload("short")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(buf, start)
    p0 = start + VNET_HDR_LEN
    view = memoryview(buf)
    if gso_type == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            at = csum_start + csum_offset
            if csum_start < 20 or at + 2 > n:
                raise BadOffload("csum_start")
            # The field holds the pseudo-header sum: it is part of what is summed.
            _U16.pack_into(buf, p0 + at, checksum(view[p0 + csum_start:end]))
        send(view[p0:end], now)
        return 1
    kind = gso_type & ~GSO_ECN
    version = buf[p0] >> 4
    if kind == GSO_UDP_L4:
        tcp, l4_len, ck = False, 8, 6
    elif kind == GSO_TCPV4 and version == 4 or kind == GSO_TCPV6 and version == 6:
        tcp, l4_len, ck = True, 20, 16
    else:
        raise BadOffload("gso_type")
    if not flags & F_NEEDS_CSUM or csum_offset != ck:
        raise BadOffload("csum_offset")
    if version == 4:
        if csum_start != (buf[p0] & 15) * 4 or csum_start < 20:
            raise BadOffload("csum_start")
    elif version != 6 or csum_start < 40:
        raise BadOffload("csum_start" if version == 6 else "ip_version")
    if csum_start + l4_len > n:
        raise BadOffload("csum_start")
    if tcp:
        l4_len = (buf[p0 + csum_start + 12] >> 4) * 4
        if l4_len < 20:
            raise BadOffload("tcp_header")
    hlen = csum_start + l4_len  # IP and TCP/UDP headers: hdr_len is only a bound
    if hlen > n or hdr_len > n:
        raise BadOffload("hdr_len")
    if gso_size == 0:
        raise BadOffload("gso_size")

    template = bytes(view[p0:p0 + hlen])
    cs = csum_start
    v4 = version == 4
    addresses = int.from_bytes(template[12:20] if v4 else template[8:40], "big")
    pseudo = addresses + (6 if tcp else 17)  # the pseudo-header, but for the length
    ip_id = template[4] << 8 | template[5]
    # The IPv4 header's sum without its length, id and checksum fields: they vary.
    ip_sum = int.from_bytes(template[:cs], "big") - (
        int.from_bytes(template[2:6], "big") << (8 * (cs - 6))) - (
        int.from_bytes(template[10:12], "big") << (8 * (cs - 12))) if v4 else 0
    ip_sum %= 0xFFFF
    seq = int.from_bytes(template[cs + 4:cs + 8], "big")
    tcp_flags = template[cs + 13] if tcp else 0
    pack16, pack32, fold = _U16.pack_into, _U32.pack_into, _fold
    pos = p0 + hlen  # where the current segment's payload starts
    i = 0
    while True:
        size = min(gso_size, end - pos)
        s = pos - hlen
        if i:
            view[s:pos] = template
        length = hlen + size
        l4 = length - cs
        if v4:
            ident = (ip_id + i) & 0xFFFF
            pack32(buf, s + 2, length << 16 | ident)
            pack16(buf, s + 10, 0xFFFF - (ip_sum + length + ident) % 0xFFFF)
        else:
            pack16(buf, s + 4, length - 40)
        last = pos + size >= end
        if tcp:
            pack32(buf, s + cs + 4, (seq + i * gso_size) & 0xFFFFFFFF)
            f = tcp_flags if last else tcp_flags & _NOT_LAST
            buf[s + cs + 13] = f & _NOT_FIRST if i else f
        else:
            pack16(buf, s + cs + 4, l4)
        pack16(buf, s + cs + ck, 0)
        pack16(buf, s + cs + ck, 0xFFFF - (fold(view[s + cs:s + length]) + pseudo + l4) % 0xFFFF)
        send(view[s:s + length], now)
        i += 1
        if last:
            return i
        pos += size
