"""TCP segment coalescing for the TUN device: which runs merge, and the headers they get."""

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.common import tcpgro

SRC, DST = ipaddress.ip_address("10.77.0.2").packed, ipaddress.ip_address("10.77.0.1").packed


def segment(seq, payload, *, flags=0x10, df=True, src=SRC, sport=40000, ack=7, window=500,
            options=b"\x01\x01\x08\x0a" + bytes(8), ttl=64, proto=6):
    doff = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (doff // 4) << 4, flags, window, 0, 0)
    total = 20 + doff + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000 if df else 0, ttl, proto, 0,
                     src, DST)
    return ip + tcp + options + payload


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def written(iov) -> bytes:
    return b"".join(bytes(part) for part in iov[1:])


def test_a_run_of_one_flow_becomes_one_gso_write():
    pkts = [segment(1000 + 100 * i, bytes([i]) * 100) for i in range(3)]
    pkts.append(segment(1300, b"z" * 90, flags=0x18))  # shorter, with PSH: ends the run
    [iov] = tcpgro.plan(pkts)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", iov[0])
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (1, 1, 52, 100, 20, 16)
    merged = written(iov)
    assert len(merged) == 52 + 390
    assert merged[52:] == b"".join(p[52:] for p in pkts)
    assert struct.unpack("!H", merged[2:4])[0] == len(merged)
    assert ones_sum(merged[:20]) == 0xFFFF  # a valid IPv4 header checksum
    assert merged[33] == 0x18  # the last segment's PSH
    # Checksum partial: the field holds the pseudo-header sum; the kernel adds the rest.
    pseudo = ones_sum(merged[12:20] + struct.pack("!HH", 6, len(merged) - 20))
    assert struct.unpack("!H", merged[36:38])[0] == pseudo


def test_what_must_not_merge_is_written_alone_in_order():
    base = segment(1000, b"a" * 100)
    cases = [
        segment(1200, b"b" * 100),                   # a gap in sequence numbers
        segment(1100, b"b" * 100, sport=40001),      # another flow
        segment(1100, b"b" * 100, ack=8),            # another ACK number
        segment(1100, b"b" * 100, window=501),       # another window
        segment(1100, b"b" * 100, ttl=63),           # another TTL
        segment(1100, b"b" * 100, flags=0x11),       # FIN
        segment(1100, b"b" * 100, df=False),         # no DF
        segment(1100, b"b" * 120),                   # longer than the first
        segment(1100, b"b" * 100, options=b"\x01" * 12),  # other options
    ]
    for other in cases:
        iovs = tcpgro.plan([base, other])
        assert iovs == [[tcpgro.PLAIN, base], [tcpgro.PLAIN, other]]
    psh_first = segment(1000, b"a" * 100, flags=0x18)
    assert len(tcpgro.plan([psh_first, segment(1100, b"b" * 100)])) == 2
    assert tcpgro.plan([segment(1000, b"")]) == [[tcpgro.PLAIN, segment(1000, b"")]]


def test_not_tcp_or_malformed_passes_through_untouched():
    odd = [b"", b"\x45", bytes(60), segment(1, b"x" * 10, proto=17), b"\x60" + bytes(59),
           bytes(300), segment(1, b"x" * 200, proto=17), b"\x60" + bytes(299),
           segment(1, b"x" * 200)[:-5]]  # claims more bytes than it has
    assert tcpgro.plan(odd) == [[tcpgro.PLAIN, p] for p in odd]


def test_runs_stop_at_64_segments_and_64_kib():
    pkts = [segment(100 * i, b"x" * 100) for i in range(70)]
    iovs = tcpgro.plan(pkts)
    assert [len(iov) - 2 for iov in iovs] == [64, 6]
    big = [segment(1400 * i, b"y" * 1400) for i in range(50)]
    sizes = [sum(len(bytes(p)) for p in iov[2:]) + len(iov[1]) for iov in tcpgro.plan(big)]
    assert all(s <= 65535 for s in sizes) and sum(len(iov) - 2 for iov in tcpgro.plan(big)) == 50


# -- against a plain reference -------------------------------------------------------------------

def _reference_same_flow(a, b, doff: int) -> bool:
    return (a[1] == b[1] and a[8] == b[8] and a[12:24] == b[12:24] and a[28:33] == b[28:33]
            and a[34:36] == b[34:36] and a[40:20 + doff] == b[40:20 + doff])


def reference_runs(packets: list) -> list[int]:
    """How many packets each write takes, by the rules as written in the module docstring,
    one field at a time (slow and plain)."""
    runs, i, n = [], 0, len(packets)
    while i < n:
        p = packets[i]
        size = -1 if len(p) <= tcpgro.SMALL else tcpgro._mergeable(p)
        j = i + 1
        if size > 0:
            doff = (p[32] >> 4) * 4
            seq = int.from_bytes(p[24:28], "big") + size
            total = len(p)
            while j < n and j - i < tcpgro.MAX_SEGMENTS:
                q = packets[j]
                qsize = tcpgro._mergeable(q)
                if (qsize <= 0 or qsize > size or total + qsize > tcpgro.MAX_LENGTH
                        or int.from_bytes(q[24:28], "big") != seq & 0xFFFFFFFF
                        or not _reference_same_flow(p, q, doff) or p[33] & 0x08):
                    break
                seq += qsize
                total += qsize
                j += 1
                if qsize < size or q[33] & 0x08:
                    break
        runs.append(j - i)
        i = j
    return runs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 3)), min_size=1, max_size=80))
def test_runs_match_the_plain_reference(steps):
    """Random streams: mostly a flow's next segment, sometimes one field changed."""
    seq, pkts = 5000, []
    for change, size_pick in steps:
        size = (1200, 1200, 1200, 700)[size_pick]
        kw = {}
        if change == 1:
            kw["flags"] = 0x18
        elif change == 2:
            kw["sport"] = 40001
        elif change == 3:
            kw["ack"] = 8
        elif change == 4:
            kw["ttl"] = 63
        elif change == 5:
            kw["df"] = False
        elif change == 6:
            seq += 1  # a gap
        elif change == 7:
            kw["options"] = b"\x01" * 12
        elif change == 8:
            kw["flags"] = 0x11
        pkt = segment(seq & 0xFFFFFFFF, b"p" * (0 if change == 9 else size), **kw)
        if change == 10:
            pkt = pkt[:60]  # says it is longer than it is
        pkts.append(pkt)
        seq += size
    iovs = tcpgro.plan(pkts)
    runs = [1 if iov[0] == tcpgro.PLAIN else len(iov) - 2 for iov in iovs]
    assert runs == reference_runs(pkts)
    at = 0
    for iov, run in zip(iovs, runs):
        if run == 1:
            assert iov == [tcpgro.PLAIN, pkts[at]]
        else:  # the first header, then every segment's payload in order
            hlen = len(iov[1])
            assert written(iov)[hlen:] == b"".join(p[hlen:] for p in pkts[at:at + run])
        at += run
