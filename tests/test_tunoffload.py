"""Segmenting the TUN device's offloaded packets (common/tunoffload.py), checked against a slow
reference: packets are built as the kernel hands them over (one large TCP or UDP packet, the
checksum field holding only the pseudo-header sum, a virtio_net_hdr in front), and every segment
is checked field by field with a word-by-word RFC 1071 sum."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.common import tunoffload as t

V4_SRC, V4_DST = ipaddress.ip_address("10.77.0.1").packed, ipaddress.ip_address("10.77.0.9").packed
V6_SRC = ipaddress.ip_address("fd00:77::1").packed
V6_DST = ipaddress.ip_address("fd00:77::9").packed
TCP, UDP = 6, 17
FIN, PSH, ACK, CWR, ECE = 0x01, 0x08, 0x10, 0x80, 0x40
TIMESTAMPS = b"\x01\x01\x08\x0a" + bytes(range(8))


# -- a slow, obvious reference ---------------------------------------------------------------

def rfc1071_sum(data: bytes) -> int:
    """The folded 16-bit one's complement sum, one word at a time."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


# -- packets as the kernel hands them over ---------------------------------------------------

def super_packet(version: int, proto: int, payload: bytes, *, seq: int = 1000,
                 flags: int = ACK | PSH, ip_id: int = 0x1234, options: bytes = TIMESTAMPS,
                 ip_options: bytes = b"", addresses: tuple[bytes, bytes] | None = None
                 ) -> tuple[bytes, int]:
    """One large packet with its checksum partial; returns (packet, offset of the L4 header)."""
    if proto == TCP:
        l4 = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 77, ((20 + len(options)) // 4) << 4,
                         flags, 512, 0, 0) + options
    else:
        l4 = struct.pack("!HHHH", 5201, 40000, 8 + len(payload), 0)
    l4_total = len(l4) + len(payload)
    if version == 4:
        src, dst = addresses or (V4_SRC, V4_DST)
        ihl = 20 + len(ip_options)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + l4_total, ip_id,
                                   0x4000, 64, proto, 0, src, dst) + ip_options)
        ip[10:12] = struct.pack("!H", 0xFFFF - rfc1071_sum(bytes(ip)))
    else:
        src, dst = addresses or (V6_SRC, V6_DST)
        ip = bytearray(struct.pack("!IHBB16s16s", 0x60000000, l4_total, proto, 64, src, dst))
    packet = bytearray(ip + l4 + payload)
    at = len(ip) + (16 if proto == TCP else 6)
    # CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum.
    packet[at:at + 2] = struct.pack("!H", rfc1071_sum(pseudo_header(version, src, dst, proto,
                                                                    l4_total)))
    return bytes(packet), len(ip)


def vnet(gso_type: int, gso_size: int, csum_start: int, proto: int, *, hdr_len: int = 0,
         flags: int = t.F_NEEDS_CSUM) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       16 if proto == TCP else 6)


def run_split(header: bytes, packet: bytes, *, lead: int = 3) -> list[bytes]:
    """split() over a buffer with the read at offset `lead` and room behind it, as the driver
    reads it; every segment is copied when it is handed over, as the Device does."""
    buf = bytearray(lead) + bytearray(header + packet) + bytearray(64)
    got: list[bytes] = []
    n = t.split(buf, lead, lead + len(header) + len(packet),
                lambda p, now: got.append(bytes(p)), 0.0)
    assert n == len(got)
    return got


def check_segments(segments: list[bytes], original: bytes, version: int, proto: int,
                   l4_at: int, gso_size: int) -> None:
    """Every field of every segment against what the original says it must be."""
    tcp = proto == TCP
    l4_hlen = (original[l4_at + 12] >> 4) * 4 if tcp else 8
    hlen = l4_at + l4_hlen
    payload = original[hlen:]
    expected = max(1, -(-len(payload) // gso_size))
    assert len(segments) == expected
    src, dst = (original[12:16], original[16:20]) if version == 4 else (original[8:24],
                                                                       original[24:40])
    if tcp:
        seq0 = struct.unpack("!I", original[l4_at + 4:l4_at + 8])[0]
        flags0 = original[l4_at + 13]
    for i, seg in enumerate(segments):
        first, last = i == 0, i == len(segments) - 1
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        assert len(seg) == hlen + len(chunk)
        assert seg[hlen:] == chunk
        l4 = seg[l4_at:]
        if version == 4:
            assert struct.unpack("!H", seg[2:4])[0] == len(seg)
            assert struct.unpack("!H", seg[4:6])[0] == (struct.unpack("!H", original[4:6])[0]
                                                        + i) & 0xFFFF
            assert rfc1071_sum(seg[:l4_at]) == 0xFFFF, "IPv4 header checksum"
            assert seg[:2] == original[:2] and seg[6:10] == original[6:10]
            assert seg[12:l4_at] == original[12:l4_at]
        else:
            assert struct.unpack("!H", seg[4:6])[0] == len(seg) - 40
            assert seg[:4] == original[:4] and seg[6:l4_at] == original[6:l4_at]
        assert rfc1071_sum(pseudo_header(version, src, dst, proto, len(l4)) + l4) == 0xFFFF, \
            f"segment {i}: {'TCP' if tcp else 'UDP'} checksum"
        assert l4[:4] == original[l4_at:l4_at + 4]  # ports
        if tcp:
            assert struct.unpack("!I", l4[4:8])[0] == (seq0 + i * gso_size) & 0xFFFFFFFF
            want = flags0
            if not last:
                want &= ~(FIN | PSH)
            if not first:
                want &= ~CWR
            assert l4[13] == want, (i, hex(l4[13]))
            assert l4[8:13] == original[l4_at + 8:l4_at + 13]  # ACK, data offset
            assert l4[14:16] == original[l4_at + 14:l4_at + 16]  # window
            assert l4[18:l4_hlen] == original[l4_at + 18:hlen]  # urgent pointer, options
        else:
            assert struct.unpack("!H", l4[4:6])[0] == len(l4)
            assert l4[6:8] != b"\0\0"  # zero would mean "no checksum"
    assert b"".join(seg[hlen:] for seg in segments) == payload


CASES = [(4, TCP, t.GSO_TCPV4), (6, TCP, t.GSO_TCPV6), (4, UDP, t.GSO_UDP_L4),
         (6, UDP, t.GSO_UDP_L4)]


@pytest.mark.parametrize("version,proto,gso_type", CASES)
@pytest.mark.parametrize("length,gso_size", [
    (1380 * 47 + 11, 1380),  # a 64 KB packet, the last segment shorter
    (1380 * 5, 1380),        # the last segment full
    (700, 1380),             # one segment only
    (1381, 1380),            # a one-byte last segment (odd length)
    (4001, 999),             # odd segment sizes
])
def test_a_large_packet_becomes_segments_with_complete_headers(version, proto, gso_type,
                                                               length, gso_size):
    payload = random.Random(length).randbytes(length)
    packet, l4_at = super_packet(version, proto, payload, flags=ACK | PSH | FIN)
    segments = run_split(vnet(gso_type, gso_size, l4_at, proto, hdr_len=l4_at + 32), packet)
    check_segments(segments, packet, version, proto, l4_at, gso_size)


def test_cwr_stays_on_the_first_segment_fin_and_psh_on_the_last():
    packet, l4_at = super_packet(4, TCP, bytes(5000), flags=ACK | PSH | FIN | CWR | ECE)
    segments = run_split(vnet(t.GSO_TCPV4 | t.GSO_ECN, 1400, l4_at, TCP), packet)
    assert [s[l4_at + 13] for s in segments] == [ACK | CWR | ECE, ACK | ECE, ACK | ECE,
                                                 ACK | PSH | FIN | ECE]
    check_segments(segments, packet, 4, TCP, l4_at, 1400)


def test_the_kernels_hdr_len_is_a_bound_not_the_header_length():
    """On the forwarding path hdr_len can be the length of the whole first segment: the headers
    are taken from csum_start and the TCP data offset, with IPv4 options too."""
    payload = random.Random(1).randbytes(3000)
    packet, l4_at = super_packet(4, TCP, payload, ip_options=b"\x01\x01\x01\x00")
    assert l4_at == 24
    for hdr_len in (0, l4_at + 32, l4_at + 32 + 1400, len(packet)):
        segments = run_split(vnet(t.GSO_TCPV4, 1400, l4_at, TCP, hdr_len=hdr_len), packet)
        check_segments(segments, packet, 4, TCP, l4_at, 1400)


def test_sequence_numbers_wrap_and_the_ipv4_id_too():
    packet, l4_at = super_packet(4, TCP, bytes(4200), seq=0xFFFFFF00, ip_id=0xFFFF)
    segments = run_split(vnet(t.GSO_TCPV4, 1400, l4_at, TCP), packet)
    assert [struct.unpack("!I", s[l4_at + 4:l4_at + 8])[0] for s in segments] == \
        [0xFFFFFF00, (0xFFFFFF00 + 1400) & 0xFFFFFFFF, (0xFFFFFF00 + 2800) & 0xFFFFFFFF]
    assert [s[4:6] for s in segments] == [b"\xff\xff", b"\0\0", b"\0\1"]
    check_segments(segments, packet, 4, TCP, l4_at, 1400)


@pytest.mark.parametrize("version,proto", [(4, TCP), (6, TCP), (4, UDP), (6, UDP)])
@pytest.mark.parametrize("length", [0, 1, 999, 1000])
def test_a_packet_without_gso_gets_its_checksum_completed(version, proto, length):
    packet, l4_at = super_packet(version, proto, random.Random(length).randbytes(length))
    [seg] = run_split(vnet(t.GSO_NONE, 0, l4_at, proto), packet)
    at = l4_at + (16 if proto == TCP else 6)
    assert seg[:at] == packet[:at] and seg[at + 2:] == packet[at + 2:]
    src, dst = (packet[12:16], packet[16:20]) if version == 4 else (packet[8:24], packet[24:40])
    l4 = seg[l4_at:]
    assert rfc1071_sum(pseudo_header(version, src, dst, proto, len(l4)) + l4) == 0xFFFF


def test_a_packet_without_flags_is_handed_over_as_it_is():
    packet, l4_at = super_packet(4, TCP, b"hello")
    for flags in (0, 2):  # nothing, or DATA_VALID
        assert run_split(vnet(t.GSO_NONE, 0, 0, TCP, flags=flags), packet) == [packet]


def test_a_udp_checksum_of_zero_is_sent_as_all_ones():
    """0 means "no checksum" in UDP; a sum that comes to 0 must be sent as 0xFFFF."""
    payload = bytearray(100)
    packet, l4_at = super_packet(4, UDP, bytes(payload))
    # Choose the last two payload bytes so the complete sum is 0xFFFF, the checksum 0.
    l4 = bytearray(packet[l4_at:])
    l4[6:8] = b"\0\0"
    rest = rfc1071_sum(pseudo_header(4, V4_SRC, V4_DST, UDP, len(l4)) + bytes(l4))
    payload[-2:] = struct.pack("!H", 0xFFFF - rest)
    packet, l4_at = super_packet(4, UDP, bytes(payload))
    for gso_type, size in ((t.GSO_NONE, 0), (t.GSO_UDP_L4, 1000)):
        [seg] = run_split(vnet(gso_type, size, l4_at, UDP), packet)
        assert seg[l4_at + 6:l4_at + 8] == b"\xff\xff"


def test_checksum_matches_the_word_by_word_reference():
    rng = random.Random(5)
    for n in list(range(0, 40)) + [1399, 1400, 1401, 65535]:
        data = rng.randbytes(n)
        assert t.checksum(data) == (0xFFFF - rfc1071_sum(data)) or (
            t.checksum(data) == 0xFFFF and rfc1071_sum(data) == 0xFFFF)
        assert rfc1071_sum(data + struct.pack("!H", t.checksum(data)) if n % 2 == 0
                           else data + b"\0" + struct.pack("!H", t.checksum(data))) == 0xFFFF


def _bad(header: bytes, packet: bytes) -> str:
    sent: list[bytes] = []
    buf = bytearray(header + packet)
    with pytest.raises(t.BadOffload) as info:
        t.split(buf, 0, len(buf), lambda p, now: sent.append(bytes(p)), 0.0)
    assert sent == []  # nothing half-way
    return info.value.reason


def test_malformed_headers_are_refused_before_anything_is_sent():
    v4, at4 = super_packet(4, TCP, bytes(3000))
    v6, at6 = super_packet(6, TCP, bytes(3000))
    assert _bad(vnet(t.GSO_TCPV4, 1400, at4, TCP, hdr_len=len(v4) + 1), v4) == "hdr_len"
    assert _bad(vnet(3, 1400, at4, TCP), v4) == "gso_type"  # UFO: never negotiated
    assert _bad(vnet(0x42, 1400, at4, TCP), v4) == "gso_type"
    assert _bad(vnet(t.GSO_TCPV6, 1400, at4, TCP), v4) == "gso_type"  # IPv4 packet, TCPv6
    assert _bad(vnet(t.GSO_TCPV4, 1400, at6, TCP), v6) == "gso_type"
    assert _bad(vnet(t.GSO_TCPV4, 1400, 24, TCP), v4) == "csum_start"  # not the IPv4 header
    assert _bad(vnet(t.GSO_TCPV6, 1400, 20, TCP), v6) == "csum_start"
    assert _bad(vnet(t.GSO_TCPV6, 1400, len(v6) - 10, TCP), v6) == "csum_start"
    assert _bad(vnet(t.GSO_NONE, 0, len(v4) - 1, TCP), v4) == "csum_start"
    assert _bad(vnet(t.GSO_NONE, 0, 5, TCP), v4) == "csum_start"
    assert _bad(vnet(t.GSO_TCPV4, 0, at4, TCP), v4) == "gso_size"
    assert _bad(vnet(t.GSO_TCPV4, 1400, at4, UDP), v4) == "csum_offset"
    assert _bad(vnet(t.GSO_TCPV4, 1400, at4, TCP, flags=0), v4) == "csum_offset"
    bad_doff = bytearray(v4)
    bad_doff[at4 + 12] = 0x40  # a TCP header of 16 bytes
    assert _bad(vnet(t.GSO_TCPV4, 1400, at4, TCP), bytes(bad_doff)) == "tcp_header"
    assert _bad(vnet(t.GSO_TCPV4, 1400, at4, TCP), v4[:19]) == "short"
    bad_version = bytearray(v4)
    bad_version[0] = 0x55
    assert _bad(vnet(t.GSO_UDP_L4, 1400, at4, UDP), bytes(bad_version)) == "ip_version"


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 3), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 0xFF]),
       st.integers(0, 400), st.integers(0, 400), st.integers(0, 100),
       st.sampled_from([0, 6, 16, 300]), st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x00]),
       st.binary(min_size=0, max_size=400))
def test_any_header_is_segmented_or_refused_never_another_exception(
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, first, rest):
    header = struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    buf = bytearray(header + bytes([first]) + rest)
    try:
        t.split(buf, 0, len(buf), lambda p, now: None, 0.0)
    except t.BadOffload:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CASES), st.integers(0, 9000), st.integers(1, 3000),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF),
       st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN, ACK | CWR, ACK | CWR | FIN]),
       st.sampled_from([b"", TIMESTAMPS]))
def test_segments_match_the_reference_for_any_sizes(case, length, gso_size, seq, ip_id, flags,
                                                   options):
    version, proto, gso_type = case
    payload = random.Random(length ^ gso_size).randbytes(length)
    packet, l4_at = super_packet(version, proto, payload, seq=seq, ip_id=ip_id, flags=flags,
                                 options=options)
    segments = run_split(vnet(gso_type, gso_size, l4_at, proto), packet)
    check_segments(segments, packet, version, proto, l4_at, gso_size)
