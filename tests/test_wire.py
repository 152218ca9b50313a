"""The wire format: exact lengths, one error type, and a Device that survives any datagram.

Every parser of untrusted bytes raises wire.BadPacket and nothing else; Device.receive turns
each bad datagram into exactly one drop counter and no output at all.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pytun.common import wire
from tests.enginenet import Net, ipv4, ipv6

LENGTHS = {wire.MSG_INITIATION: 148, wire.MSG_RESPONSE: 92, wire.MSG_COOKIE_REPLY: 64}


def test_message_sizes_are_the_papers():
    assert (wire.INITIATION_LEN, wire.RESPONSE_LEN, wire.COOKIE_REPLY_LEN) == (148, 92, 64)
    assert wire.TRANSPORT_HEADER_LEN == 16 and wire.TRANSPORT_MIN_LEN == 32
    assert (wire.INITIATION_MAC1, wire.RESPONSE_MAC1) == (116, 60)


def test_initiation_layout():
    msg = wire.Initiation(0x01020304, b"E" * 32, b"S" * 48, b"T" * 28, b"", b"")
    alpha = msg.pack_without_macs()
    assert alpha == b"\x01\0\0\0" + b"\x04\x03\x02\x01" + b"E" * 32 + b"S" * 48 + b"T" * 28
    parsed = wire.parse_initiation(alpha + b"M" * 16 + b"N" * 16)
    assert parsed == wire.Initiation(0x01020304, b"E" * 32, b"S" * 48, b"T" * 28, b"M" * 16,
                                     b"N" * 16)


def test_response_layout():
    msg = wire.Response(7, 0xFFFFFFFF, b"E" * 32, b"X" * 16, b"", b"")
    alpha = msg.pack_without_macs()
    assert alpha == struct.pack("<III", 2, 7, 0xFFFFFFFF) + b"E" * 32 + b"X" * 16
    parsed = wire.parse_response(alpha + b"M" * 16 + b"N" * 16)
    assert (parsed.sender, parsed.receiver, parsed.mac1, parsed.mac2) == (7, 0xFFFFFFFF,
                                                                          b"M" * 16, b"N" * 16)


def test_cookie_reply_layout():
    packed = wire.CookieReply(9, b"n" * 24, b"c" * 32).pack()
    assert packed == struct.pack("<II", 3, 9) + b"n" * 24 + b"c" * 32
    assert wire.parse_cookie_reply(packed) == wire.CookieReply(9, b"n" * 24, b"c" * 32)


def test_transport_header_layout():
    header = wire.pack_transport_header(0xA1B2C3D4, 2**64 - 1)
    assert header == b"\x04\0\0\0" + b"\xd4\xc3\xb2\xa1" + b"\xff" * 8
    assert wire.parse_transport_header(header + bytes(16)) == (0xA1B2C3D4, 2**64 - 1)


@pytest.mark.parametrize("mtype, length", sorted(LENGTHS.items()))
def test_handshake_messages_need_their_exact_length(mtype, length):
    head = struct.pack("<I", mtype)
    assert wire.message_type(head + bytes(length - 4)) == mtype
    for wrong in (length - 1, length + 1, 4, 32):
        with pytest.raises(wire.BadPacket) as info:
            wire.message_type(head + bytes(wrong - 4))
        assert info.value.reason == "bad_length"


def test_transport_needs_header_and_tag():
    head = struct.pack("<I", 4)
    assert wire.message_type(head + bytes(28)) == 4
    assert wire.message_type(head + bytes(2000)) == 4
    with pytest.raises(wire.BadPacket) as info:
        wire.message_type(head + bytes(27))
    assert info.value.reason == "bad_length"


def test_reserved_bytes_must_be_zero():
    for i in (1, 2, 3):
        data = bytearray(struct.pack("<I", 1) + bytes(144))
        data[i] = 1
        with pytest.raises(wire.BadPacket) as info:
            wire.message_type(bytes(data))
        assert info.value.reason == "bad_type"


PARSERS = [wire.message_type, wire.parse_initiation, wire.parse_response,
           wire.parse_cookie_reply, wire.parse_transport_header]


@given(st.binary(max_size=300))
@example(b"")
@example(struct.pack("<I", 2) + bytes(144))  # an initiation's length with a response's type
def test_parsers_raise_only_bad_packet(data):
    for parse in PARSERS:
        try:
            parse(data)
        except wire.BadPacket as exc:
            assert exc.reason in {"short", "bad_length", "bad_type"}


def test_ip_packet_length():
    packet = ipv4("10.0.0.1", "10.0.0.2", b"x" * 13)
    assert wire.ip_packet_length(packet) == 33
    assert wire.ip_packet_length(packet + bytes(15)) == 33  # WireGuard's zero padding
    assert wire.ip_packet_length(packet[:32]) == -1  # claims more than there is
    v6 = ipv6("fd00::1", "fd00::2", b"y" * 5)
    assert wire.ip_packet_length(v6 + bytes(3)) == 45
    assert wire.ip_packet_length(v6[:44]) == -1
    assert wire.ip_packet_length(b"\x45" + bytes(18)) == -1  # shorter than a header
    assert wire.ip_packet_length(b"\x60" + bytes(30)) == -1  # IPv6 shorter than its header
    assert wire.ip_packet_length(b"\x55" + bytes(40)) == -1  # IP version 5
    bad = bytearray(packet)
    bad[2:4] = (19).to_bytes(2, "big")  # total length below the header's
    assert wire.ip_packet_length(bytes(bad)) == -1


def test_the_harness_builds_valid_ipv4_headers():
    p = ipv4("10.0.0.1", "10.0.0.2", b"abc")
    assert len(p) == 23 and p[2:4] == (23).to_bytes(2, "big")
    words = struct.unpack("!10H", p[:20])
    total = sum(words)
    assert (total & 0xFFFF) + (total >> 16) == 0xFFFF  # the header checksum verifies
    v6 = ipv6("fd00::1", "fd00::2", b"abc")
    assert len(v6) == 43 and v6[4:6] == (3).to_bytes(2, "big")


@given(st.binary(max_size=100))
def test_ip_packet_length_never_raises(data):
    n = wire.ip_packet_length(data)
    assert n == -1 or 20 <= n <= len(data)


# -- Device.receive on anything -------------------------------------------------------------------


def established():
    """Two devices with a session (so the index table holds real entries)."""
    net = Net()
    a = net.node("a", "192.0.2.1", "10.0.0.1")
    b = net.node("b", "192.0.2.2", "10.0.0.2")
    net.link(a, b)
    a.device.send(a.packet_to(b, b"hello"), net.now)
    net.deliver()
    assert b.received == [a.packet_to(b, b"hello")]
    for node in (a, b):
        node.device.drops.clear()
        node.device.events.clear()
    return net, a, b


def expected_reason(data: bytes) -> str:
    n = len(data)
    if n < 4:
        return "short"
    mtype = data[0]
    if mtype == 4:
        return "bad_length" if n < 32 else "unknown_index"
    if mtype in LENGTHS:
        if n != LENGTHS[mtype]:
            return "bad_length"
        return "unknown_index" if mtype == 3 else "bad_mac1"
    return "bad_type"


def test_every_length_and_first_byte_is_one_drop_and_no_output():
    net, a, b = established()
    dev = b.device
    chance = random.Random(1)
    expected = {}
    for length in range(201):
        for first in range(256):
            rest = chance.randbytes(max(0, length - 4))
            data = (bytes([first]) + bytes(3) + rest)[:length]
            before = sum(dev.drops.values())
            dev.receive(data, a.endpoint, net.now)
            assert sum(dev.drops.values()) == before + 1, (length, first)
            reason = expected_reason(data)
            expected[reason] = expected.get(reason, 0) + 1
    assert dev.drops == expected
    assert dev.net_out == [] and dev.tun_out == [] and dev.events == []


NET_A_B = established()  # shared by the examples below: each must leave it as it found it


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_datagram_is_one_drop_and_no_output(data):
    net, a, b = NET_A_B
    dev = b.device
    before = sum(dev.drops.values())
    dev.receive(data, a.endpoint, net.now)
    assert sum(dev.drops.values()) == before + 1
    assert dev.net_out == [] and dev.tun_out == [] and dev.events == []



def under_load_pair():
    """`b` under load; `a` holds a cookie and an initiation with mac2 that `b` would accept."""
    net = Net()
    a = net.node("a", "192.0.2.1", "10.0.0.1")
    b = net.node("b", "192.0.2.2", "10.0.0.2", under_load_threshold=0)
    net.link(a, b)
    a.device.send(a.packet_to(b, b"x"), net.now)
    [(first, _)] = a.device.net_out
    a.device.net_out.clear()
    b.device.receive(first, a.endpoint, net.now)  # no mac2 yet: a cookie reply
    [(cookie_reply, _)] = b.device.net_out
    b.device.net_out.clear()
    b.device.drops.clear()
    a.device.receive(cookie_reply, b.endpoint, net.now)
    net.clock.advance(5.5)
    a.device.tick(net.now)  # the retransmission carries mac2
    [(initiation, _)] = a.device.net_out
    a.device.net_out.clear()
    assert initiation[132:] != bytes(16)
    return net, a, b, initiation


def flips(message: bytes, bits=None):
    """Every copy of `message` with exactly one bit flipped (or only those in `bits`)."""
    for bit in bits if bits is not None else range(len(message) * 8):
        bad = bytearray(message)
        bad[bit // 8] ^= 1 << (bit % 8)
        yield bit, bytes(bad)


def test_every_flipped_bit_in_an_initiation_or_cookie_reply_is_one_drop():
    net, a, b, initiation = under_load_pair()
    dev = b.device
    for bit, bad in flips(initiation):
        before = dev.drops.copy()
        dev.receive(bad, a.endpoint, net.now)
        assert sum(dev.drops.values()) == sum(before.values()) + 1, bit
        assert dev.events == []
        if bit < 132 * 8:
            assert dev.net_out == [], bit
        else:  # mac1 holds, mac2 does not: under load the answer is a cookie, never a response
            assert dev.drops - before == {"cookie_sent": 1}, bit
            [(reply, dst)] = dev.net_out
            assert len(reply) == 64 and reply[0] == 3 and dst == a.endpoint
            dev.net_out.clear()
    assert dev.peers[a.public_key].next is None
    dev.receive(initiation, a.endpoint, net.now)  # the genuine one is still accepted
    [(response, _)] = dev.net_out
    assert response[0] == 2

    # A cookie reply with one bit flipped anywhere: a never takes it.
    dev.net_out.clear()
    dev.receive(initiation[:132] + bytes(16), a.endpoint, net.now)
    [(cookie_reply, _)] = dev.net_out
    cookies = a.peer(b).cookies
    cookie_before = cookies._cookie
    for bit, bad in flips(cookie_reply):
        a.device.receive(bad, b.endpoint, net.now)
        assert sum(a.device.drops.values()) == bit + 1
    assert cookies._cookie == cookie_before
    assert a.device.net_out == [] and a.device.events == []
    a.device.receive(cookie_reply, b.endpoint, net.now)  # the genuine one is taken
    assert sum(a.device.drops.values()) == 64 * 8


def test_every_flipped_bit_in_a_response_or_transport_packet_is_one_drop():
    net = Net()
    a = net.node("a", "192.0.2.1", "10.0.0.1")
    b = net.node("b", "192.0.2.2", "10.0.0.2")
    net.link(a, b)
    a.device.send(a.packet_to(b, b"x"), net.now)
    [(initiation, _)] = a.device.net_out
    a.device.net_out.clear()
    b.device.receive(initiation, a.endpoint, net.now)
    [(response, _)] = b.device.net_out
    b.device.net_out.clear()
    # Any bit of the response but mac2 (which is not checked when not under load).
    for bit, bad in flips(response, range(76 * 8)):
        a.device.receive(bad, b.endpoint, net.now)
        assert sum(a.device.drops.values()) == bit + 1
    assert a.device.net_out == [] and a.device.events == [] and a.peer(b).current is None
    # The genuine response completes; then every one-bit change of the first data packet.
    a.device.receive(response, b.endpoint, net.now)
    [(data, _)] = a.device.net_out
    for bit, bad in flips(data):
        b.device.receive(bad, a.endpoint, net.now)
        assert sum(b.device.drops.values()) == bit + 1
    assert b.device.tun_out == [] and b.device.net_out == [] and b.device.events == []
    # The genuine one still gets through afterwards: no forgery burnt its counter.
    b.device.receive(data, a.endpoint, net.now)
    assert b.device.tun_out == [a.packet_to(b, b"x")]
