"""mac1, mac2, cookie replies and the per-source rate limit (whitepaper 5.3 and 5.4.7).

mac1 and mac2 are recomputed here with hashlib.blake2s and the cookie is opened with PyNaCl's
XChaCha20-Poly1305 directly, so the checks do not lean on pytun's own cookie code. Under load
(Device(under_load_threshold=0)) every handshake message needs a valid mac2; without one the
answer is a 64-byte cookie reply and never a response.
"""

from __future__ import annotations

import hashlib
import struct

import nacl.bindings
import pytest

from pytun.common.cookie import (COOKIE_REFRESH_TIME, COOKIE_SECRET_MAX_AGE, CookieChecker,
                                 CookieGenerator, RateLimiter)
from tests.enginenet import Net, seeded_rng, static_key


def blake2s_mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def mac1_of(receiver_public: bytes, msg: bytes, offset: int) -> bytes:
    return blake2s_mac(hashlib.blake2s(b"mac1----" + receiver_public).digest(), msg[:offset])


def open_cookie(sender_public: bytes, reply: bytes, mac1: bytes) -> bytes:
    """Decrypt a cookie reply: XChaCha20-Poly1305 keyed HASH("cookie--" || Spub), AD = mac1."""
    key = hashlib.blake2s(b"cookie--" + sender_public).digest()
    nonce, sealed = reply[8:32], reply[32:64]
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, mac1, nonce, key)


def pair(*, b_load: int = 0, a_load: int = 1000):
    """a initiates towards b; b is under load from the first handshake message by default."""
    net = Net()
    a = net.node("a", "192.0.2.1", "10.0.0.1", under_load_threshold=a_load)
    b = net.node("b", "192.0.2.2", "10.0.0.2", under_load_threshold=b_load)
    net.link(a, b)
    return net, a, b


def take(node):
    out, node.device.net_out = node.device.net_out, []
    return out


def test_mac1_of_both_handshake_messages_is_blake2s_keyed_by_the_receiver():
    net, a, b = pair(b_load=1000)
    a.device.send(a.packet_to(b), net.now)
    [(init, _)] = take(a)
    assert init[116:132] == mac1_of(b.public_key, init, 116)
    b.device.receive(init, a.endpoint, net.now)
    [(resp, _)] = take(b)
    assert resp[60:76] == mac1_of(a.public_key, resp, 60)
    assert init[132:] == bytes(16) and resp[76:] == bytes(16)  # no cookies: mac2 is zero


def test_bad_mac1_is_dropped_before_any_other_work():
    net, a, b = pair(b_load=1000)
    a.device.send(a.packet_to(b), net.now)
    [(init, _)] = take(a)
    bad = init[:116] + bytes(16) + init[132:]
    b.device.receive(bad, a.endpoint, net.now)
    assert b.device.drops == {"bad_mac1": 1}
    assert b.device.net_out == []
    # mac1 made for another responder's key is just as bad.
    _, other = static_key("someone-else")
    bad = init[:116] + mac1_of(other, init, 116) + init[132:]
    b.device.receive(bad, a.endpoint, net.now)
    assert b.device.drops == {"bad_mac1": 2}
    b.device.receive(init, a.endpoint, net.now)  # the genuine one is answered
    assert [d[0] for d, _ in take(b)] == [2]


def test_under_load_an_initiation_without_mac2_gets_a_cookie_then_its_retransmission_works():
    net, a, b = pair()
    packet = a.packet_to(b, b"through the cookie")
    a.device.send(packet, net.now)
    [(init, _)] = take(a)
    b.device.receive(init, a.endpoint, net.now)
    [(reply, dst)] = take(b)
    assert len(reply) == 64 and reply[:4] == b"\x03\0\0\0"
    assert dst == a.endpoint
    assert reply[4:8] == init[4:8]  # addressed to the initiation's sender index
    assert b.device.drops == {"cookie_sent": 1}
    assert b.device.peers[a.public_key].next is None  # no session was derived

    cookie = open_cookie(b.public_key, reply, init[116:132])
    assert len(cookie) == 16
    a.device.receive(reply, b.endpoint, net.now)
    assert a.device.drops == {}
    assert a.device.net_out == []  # the cookie is kept; nothing is sent at once

    # The retransmission (REKEY_TIMEOUT + jitter later) carries mac2 = MAC(cookie, msg_beta).
    net.run(5.4)
    [again] = [s.datagram for s in net.sent_by("a", 1)]
    assert again[116:132] == mac1_of(b.public_key, again, 116)
    assert again[132:148] == blake2s_mac(cookie, again[:132])
    assert b.received == [packet]
    assert b.device.drops == {"cookie_sent": 1}
    assert [s.type for s in net.sent_by("b")] == [2]


def test_mac2_is_bound_to_the_source_address_and_port():
    net, a, b = pair()
    a.device.send(a.packet_to(b), net.now)
    [(init, _)] = take(a)
    b.device.receive(init, a.endpoint, net.now)
    [(reply, _)] = take(b)
    a.device.receive(reply, b.endpoint, net.now)
    net.clock.advance(5.5)
    a.device.tick(net.now)
    [(with_mac2, _)] = take(a)
    assert with_mac2[132:] != bytes(16)
    for src in [("192.0.2.1", 51821), ("192.0.2.99", 51820)]:
        b.device.drops.clear()
        b.device.receive(with_mac2, src, net.now)
        [(again, dst)] = take(b)
        assert (again[0], len(again), dst) == (3, 64, src)
        assert b.device.drops == {"cookie_sent": 1}
    # From the address the cookie was made for, the very same bytes are accepted.
    b.device.receive(with_mac2, a.endpoint, net.now)
    [(resp, _)] = take(b)
    assert resp[0] == 2


def test_a_roaming_initiator_gets_a_new_cookie_and_gets_through():
    net, a, b = pair()
    packet = a.packet_to(b, b"after the move")
    a.device.send(packet, net.now)
    net.deliver()  # initiation -> cookie reply -> a takes it
    a.endpoint = ("203.0.113.5", 1024)  # NAT rebinding: b sees a new source
    net.run(5.4)  # the retransmission has mac2 for the old address: another cookie
    assert [s.type for s in net.sent_by("b")] == [3, 3]
    net.run(5.4)  # the next one carries a cookie for the new address
    assert [s.type for s in net.sent_by("b")] == [3, 3, 2]
    assert b.received == [packet]
    assert b.peer(a).endpoint == ("203.0.113.5", 1024)


@pytest.mark.parametrize("age, accepted", [(COOKIE_SECRET_MAX_AGE - 0.1, True),
                                           (COOKIE_SECRET_MAX_AGE, False),
                                           (COOKIE_SECRET_MAX_AGE + 1, False)])
def test_a_cookie_from_before_the_secret_rotated_is_stale(age, accepted):
    net, a, b = pair()
    a.device.send(a.packet_to(b), 0.0)
    [(init0, _)] = take(a)
    b.device.receive(init0, a.endpoint, 0.0)  # b's cookie secret is born at 0
    take(b)
    # 100 s later a asks again and is given a cookie made with the same secret.
    a.device.send(a.packet_to(b), 100.0)
    [(init1, _)] = take(a)
    b.device.receive(init1, a.endpoint, 100.0)
    [(reply, _)] = take(b)
    a.device.receive(reply, b.endpoint, 100.0)
    # The cookie is young for a (it uses it), the secret behind it is `age` old for b.
    a.device.send(a.packet_to(b), age)
    [(init2, _)] = take(a)
    assert init2[132:] != bytes(16)
    b.device.drops.clear()
    b.device.receive(init2, a.endpoint, age)
    [(answer, _)] = take(b)
    if accepted:
        assert answer[0] == 2 and b.device.drops == {}
    else:
        assert answer[0] == 3 and b.device.drops == {"cookie_sent": 1}
        # The new cookie (from the new secret) works.
        a.device.receive(answer, b.endpoint, age)
        a.device.send(a.packet_to(b), age + 5)
        [(init3, _)] = take(a)
        b.device.receive(init3, a.endpoint, age + 5)
        assert [d[0] for d, _ in take(b)] == [2]


def test_the_initiator_stops_using_a_cookie_before_it_can_go_stale():
    _, responder = static_key("r")
    gen = CookieGenerator(responder)
    checker = CookieChecker(responder, seeded_rng("checker"))
    src = struct.pack("!4sH", bytes([192, 0, 2, 1]), 51820)
    msg = bytes(116)
    framed = gen.add_macs(msg, 0.0)
    reply = checker.create_reply(framed, 116, 1, src, 0.0)
    assert gen.consume_reply(reply[8:32], reply[32:64], 0.0)
    assert gen.add_macs(msg, COOKIE_REFRESH_TIME - 0.01)[132:] != bytes(16)
    assert gen.add_macs(msg, COOKIE_REFRESH_TIME)[132:] == bytes(16)
    assert COOKIE_REFRESH_TIME < COOKIE_SECRET_MAX_AGE == 120


def test_a_cookie_reply_is_only_taken_for_the_last_message_sent():
    _, responder = static_key("r")
    gen = CookieGenerator(responder)
    checker = CookieChecker(responder, seeded_rng("checker"))
    src = bytes(6)
    assert not gen.consume_reply(bytes(24), bytes(32), 0.0)  # nothing sent yet
    first = gen.add_macs(b"\x01" * 116, 0.0)
    gen.add_macs(b"\x02" * 116, 0.0)  # a newer message: its mac1 is the AD now
    reply = checker.create_reply(first, 116, 1, src, 0.0)
    assert not gen.consume_reply(reply[8:32], reply[32:64], 0.0)


def test_under_load_a_response_without_mac2_gets_a_cookie_and_the_next_round_completes():
    net, a, b = pair(b_load=1000, a_load=0)  # now the initiator is the one under load
    packet = a.packet_to(b, b"late but there")
    a.device.send(packet, net.now)
    net.deliver()
    assert [s.type for s in net.sent] == [1, 2, 3]  # the response got a cookie reply
    assert a.device.drops == {"cookie_sent": 1}
    assert b.device.drops == {}  # b took the cookie (found by its pending keypair's index)
    assert a.received == b.received == []
    net.run(5.4)  # a retransmits; b's new response carries mac2 and is accepted
    assert [s.type for s in net.sent][3:5] == [1, 2]
    assert net.sent[4].datagram[76:92] != bytes(16)
    assert b.received == [packet]
    assert a.device.drops == {"cookie_sent": 1}


def test_load_is_measured_per_second():
    net, a, b = pair(b_load=2)
    answers = []
    for i in range(3):
        net.clock.now = 0.1 * i  # a's wall clock moves too: each timestamp is newer
        a.peer(b).last_sent_handshake = None
        a.device.initiate(a.peer(b), net.now)
        [(init, _)] = take(a)
        b.device.receive(init, a.endpoint, net.now)
        answers.extend(d[0] for d, _ in take(b))
    # Two handshake messages in a second are fine; the third puts b under load.
    assert answers == [2, 2, 3]
    assert b.device.under_load(0.2) and b.device.under_load(1.19)
    assert not b.device.under_load(1.2)


# -- the per-source rate limit --------------------------------------------------------------------


def test_rate_limit_burst_is_five_then_twenty_a_second():
    rl = RateLimiter()
    src = ("192.0.2.7", 1000)
    assert [rl.allow(src, 10.0) for _ in range(6)] == [True] * 5 + [False]
    assert rl.allow(src, 10.05) is True  # 1/20 s later: one token
    assert rl.allow(src, 10.05) is False
    assert [rl.allow(src, 20.0) for _ in range(7)] == [True] * 5 + [False] * 2  # capped at 5
    # Long run at 64 tries a second: 20 a second get through, plus the first burst.
    rl = RateLimiter()
    allowed = sum(rl.allow(src, t / 64) for t in range(64 * 30))
    assert 20 * 30 <= allowed <= 20 * 30 + 5


def test_rate_limit_is_per_address_and_per_ipv6_64():
    rl = RateLimiter()
    for _ in range(5):
        assert rl.allow(("2001:db8:1:2::1", 1), 0.0)
    assert not rl.allow(("2001:db8:1:2:ffff:ffff:ffff:9", 2), 0.0)  # same /64: same bucket
    assert rl.allow(("2001:db8:1:3::1", 1), 0.0)  # the next /64 has its own
    for _ in range(5):
        assert rl.allow(("192.0.2.1", 1), 0.0)
    assert not rl.allow(("192.0.2.1", 9999), 0.0)  # another port, same address
    assert not rl.allow(("::ffff:192.0.2.1", 1), 0.0)  # the same address, IPv4-mapped
    assert rl.allow(("192.0.2.2", 1), 0.0)
    assert len(rl) == 4
    rl.collect(0.5)
    assert len(rl) == 4
    rl.collect(1.0)
    assert len(rl) == 0


def test_under_load_the_sixth_initiation_from_one_source_is_rate_limited():
    net, a, b = pair()
    a.device.send(a.packet_to(b), net.now)
    [(init, _)] = take(a)
    b.device.receive(init, a.endpoint, net.now)
    a.device.receive(take(b)[0][0], b.endpoint, net.now)  # a holds a cookie now
    b.device.drops.clear()
    inits = []
    for i in range(7):
        a.peer(b).last_sent_handshake = None
        a.device.initiate(a.peer(b), 1.0)
        inits.extend(d for d, _ in take(a))
    assert all(d[132:] != bytes(16) for d in inits)
    for d in inits[:6]:
        b.device.receive(d, a.endpoint, 1.0)
    # One answered; four more pass the limit but carry the same timestamp (same 16.8 ms).
    assert b.device.drops == {"replayed_initiation": 4, "rate_limited": 1}
    b.device.receive(inits[6], a.endpoint, 1.05)
    assert b.device.drops == {"replayed_initiation": 5, "rate_limited": 1}
    assert [d[0] for d, _ in take(b)] == [2]


def test_cookie_checker_and_generator_say_nothing_about_keys():
    private, public = static_key("r")
    checker = CookieChecker(public, seeded_rng("c"))
    checker.create_reply(bytes(148), 116, 1, bytes(6), 0.0)
    gen = CookieGenerator(public)
    for text in (repr(checker), str(checker), repr(gen), str(gen)):
        assert "redacted" in text
        assert public.hex() not in text and checker._secret.hex() not in text
